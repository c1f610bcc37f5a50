"""Accessible names on every control, taken from what a sighted user reads beside it."""

from __future__ import annotations

from kobold_desktop.qt._qt import (
    QAbstractButton,
    QAbstractItemView,
    QAbstractSpinBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QSlider,
    QTabWidget,
    QTextEdit,
    QWidget,
)

CONTROL_TYPES = (QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit, QTextEdit, QPlainTextEdit,
                 QAbstractItemView, QTabWidget, QSlider)


def _label_for(widget: QWidget) -> str:
    """The text of the form label beside a field, if it is in a QFormLayout."""
    parent = widget.parentWidget()
    while parent is not None:
        for form in parent.findChildren(QFormLayout):
            label = form.labelForField(widget)
            if isinstance(label, QLabel) and label.text():
                return label.text()
        parent = parent.parentWidget() if parent.parentWidget() is not None and not parent.isWindow() else None
    return ""


def _internal(widget: QWidget) -> bool:
    """A part of another control (a spin box's text field, a combo box's popup list, the
    menu bar's overflow button): the control it belongs to carries the name."""
    if widget.objectName().startswith("qt_"):
        return True
    parent = widget.parentWidget()
    while parent is not None:
        if isinstance(parent, (QAbstractSpinBox, QComboBox)):
            return True
        parent = parent.parentWidget()
    return False


def name_controls(root: QWidget) -> list[QWidget]:
    """Give every control under `root` an accessible name from what a sighted user reads
    (its text, its form label, its tooltip); return those still without one."""
    unnamed = []
    for widget in root.findChildren(QWidget):
        if not isinstance(widget, CONTROL_TYPES) or widget.accessibleName() or _internal(widget):
            continue
        text = ""
        if isinstance(widget, QAbstractButton):
            text = widget.text().replace("&", "")
        text = text or _label_for(widget) or widget.toolTip().split("\n")[0]
        if isinstance(widget, (QLineEdit, QPlainTextEdit, QTextEdit)) and not text:
            text = widget.placeholderText()
        if text:
            widget.setAccessibleName(text.rstrip(":"))
        else:
            unnamed.append(widget)
    return unnamed
