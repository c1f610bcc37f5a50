"""Appearance for long writing: a light or dark theme (following the system unless the
writer chooses) and the story's font and size.

The theme is Qt's Fusion style with a light or dark palette, so it looks the same on
every platform and every widget follows it; "Follow the system" reads Qt's colour scheme
(Qt 6.5+) and follows it when it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kobold_desktop.qt._qt import (
    QApplication,
    QColor,
    QComboBox,
    QFont,
    QFontComboBox,
    QFormLayout,
    QPalette,
    QSpinBox,
    Qt,
    QWidget,
    Signal,
)
from kobold_desktop.qt.story_view import DEFAULT_FONT

THEMES = {"system": "Follow the system", "light": "Light", "dark": "Dark"}


@dataclass(frozen=True)
class Appearance:
    theme: str = "system"  # "system", "light" or "dark"
    font_family: str = DEFAULT_FONT[0]
    font_size: int = DEFAULT_FONT[1]
    focus_mode: bool = False

    @classmethod
    def from_dict(cls, data) -> "Appearance":
        """Lenient: a bad stored value falls back to the default, one field at a time."""
        if not isinstance(data, dict):
            return cls()
        default = cls()
        theme = data.get("theme") if data.get("theme") in THEMES else default.theme
        family = data.get("font_family") if isinstance(data.get("font_family"), str) and data.get("font_family") \
            else default.font_family
        size = data.get("font_size")
        size = size if isinstance(size, int) and 6 <= size <= 72 else default.font_size
        return cls(theme, family, size, bool(data.get("focus_mode", False)))

    def to_dict(self) -> dict:
        return {"theme": self.theme, "font_family": self.font_family, "font_size": self.font_size,
                "focus_mode": self.focus_mode}


def system_scheme() -> str:
    """"dark" or "light", as the desktop says (light when it does not say)."""
    hints = QApplication.styleHints()
    scheme = getattr(hints, "colorScheme", None)
    if scheme is not None and scheme() == Qt.ColorScheme.Dark:
        return "dark"
    return "light"


def dark_palette() -> QPalette:
    palette = QPalette()
    window, base, text = QColor("#202124"), QColor("#17181a"), QColor("#e8eaed")
    button, highlight, disabled = QColor("#2d2e31"), QColor("#3d6fb4"), QColor("#7f8388")
    for role, color in (
        (QPalette.Window, window), (QPalette.WindowText, text), (QPalette.Base, base),
        (QPalette.AlternateBase, QColor("#232427")), (QPalette.ToolTipBase, button), (QPalette.ToolTipText, text),
        (QPalette.PlaceholderText, disabled), (QPalette.Text, text), (QPalette.Button, button),
        (QPalette.ButtonText, text), (QPalette.BrightText, QColor("#ff8a80")), (QPalette.Link, QColor("#8ab4f8")),
        (QPalette.Highlight, highlight), (QPalette.HighlightedText, QColor("#ffffff")),
        (QPalette.Light, QColor("#3c3d40")), (QPalette.Midlight, QColor("#333437")), (QPalette.Mid, QColor("#4a4b4f")),
        (QPalette.Dark, QColor("#111214")), (QPalette.Shadow, QColor("#000000")),
    ):
        palette.setColor(role, color)
    for role in (QPalette.WindowText, QPalette.Text, QPalette.ButtonText):
        palette.setColor(QPalette.Disabled, role, disabled)
    return palette


def apply_theme(theme: str) -> str:
    """Set the application's palette; returns the scheme in effect ("light" or "dark")."""
    app = QApplication.instance()
    if app.style().name().lower() != "fusion":
        app.setStyle("Fusion")
    scheme = system_scheme() if theme == "system" else theme
    app.setPalette(dark_palette() if scheme == "dark" else app.style().standardPalette())
    return scheme


class AppearancePanel(QWidget):
    """Theme, story font and size (in the Settings tab)."""

    changed = Signal(object)  # Appearance

    def __init__(self, appearance: Appearance, parent=None):
        super().__init__(parent)
        self.theme = QComboBox(self)
        for key, label in THEMES.items():
            self.theme.addItem(label, key)
        self.font_family = QFontComboBox(self)
        self.font_family.setFontFilters(QFontComboBox.ScalableFonts)
        self.font_size = QSpinBox(self, minimum=8, maximum=40)
        self.font_size.setSuffix(" pt")
        form = QFormLayout(self)
        form.addRow("Theme", self.theme)
        form.addRow("Story font", self.font_family)
        form.addRow("Font size", self.font_size)
        self._focus_mode = appearance.focus_mode
        self.set_appearance(appearance)
        self.theme.currentIndexChanged.connect(self._emit)
        self.font_family.currentFontChanged.connect(self._emit)
        self.font_size.valueChanged.connect(self._emit)

    def set_appearance(self, appearance: Appearance) -> None:
        self._focus_mode = appearance.focus_mode
        for box in (self.theme, self.font_family, self.font_size):
            box.blockSignals(True)
        self.theme.setCurrentIndex(max(0, self.theme.findData(appearance.theme)))
        self.font_family.setCurrentFont(QFont(appearance.font_family))
        self.font_size.setValue(appearance.font_size)
        for box in (self.theme, self.font_family, self.font_size):
            box.blockSignals(False)

    def appearance(self) -> Appearance:
        return Appearance(self.theme.currentData(), self.font_family.currentFont().family(),
                          self.font_size.value(), self._focus_mode)

    def _emit(self, *_args) -> None:
        self.changed.emit(self.appearance())
