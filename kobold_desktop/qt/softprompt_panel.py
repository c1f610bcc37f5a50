"""The Soft Prompt panel: every soft prompt in the library, Load / Unload, and the light."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kobold_desktop.engine.active import Choice, RemoteModel, SoftPromptStatus, same_choice

from kobold_desktop.qt._qt import (
    QBrush,
    QColor,
    QDesktopServices,
    QFileSystemWatcher,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPainter,
    QPushButton,
    QSize,
    Qt,
    QTimer,
    QUrl,
    QVBoxLayout,
    QWidget,
    Signal,
)
from kobold_desktop.softprompt.library import LibraryEntry, SoftPromptLibrary

NONE_TEXT = "[None]"
ENTRY_ROLE = Qt.UserRole + 1
GREEN, GREY = QColor("#2fb344"), QColor("#9aa0a6")


class StatusLight(QWidget):
    """A round light: green with the soft prompt's name when one is active, grey otherwise."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._dot = _Dot(self)
        self.label = QLabel(self)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(4, 0, 4, 0)
        layout.addWidget(self._dot)
        layout.addWidget(self.label, 1)
        self.set_status(None)

    @property
    def is_green(self) -> bool:
        return self._dot.color == GREEN

    def set_status(self, status: SoftPromptStatus | None) -> None:
        if status is None:
            text = "No soft prompt active"
            self._dot.color = GREY
        elif status.is_mixture:
            text = f"{status.name} ({status.mode}, {status.n_tokens} tokens)"
            self._dot.color = GREEN
        else:
            text = f"Active soft prompt ({status.n_tokens} tokens): {status.name}"
            self._dot.color = GREEN
        self.label.setText(text)
        self.setToolTip(text + ("\n" + "\n".join(status.warnings) if status and status.warnings else ""))
        self._dot.update()


class _Dot(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.color = GREY
        self.setFixedSize(QSize(14, 14))

    def paintEvent(self, event):
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setBrush(QBrush(self.color))
        painter.setPen(self.color.darker(130))
        painter.drawEllipse(1, 1, 12, 12)


@dataclass(frozen=True)
class ServerEntry:
    """One of a connected server's models in the list: a soft prompt the server serves."""

    name: str
    tokens: int = 0
    valid: bool = True
    is_mixture: bool = False

    @property
    def choice(self) -> RemoteModel:
        return RemoteModel(self.name, self.tokens)


def choice_of(entry: LibraryEntry | ServerEntry | None) -> Choice | None:
    """What loading a row asks for: its file, or the server's model."""
    if entry is None:
        return None
    return entry.choice if isinstance(entry, ServerEntry) else entry.path


class SoftPromptPanel(QWidget):
    load_requested = Signal(object)  # a Choice (a file or a server's model), or None to unload
    new_mixture_requested = Signal()
    learn_weights_requested = Signal()

    def __init__(self, library: SoftPromptLibrary, parent=None):
        super().__init__(parent)
        self.library = library
        self.hidden_size: int | None = None
        self.model_name: str | None = None
        self.model_fingerprint: str | None = None  # what the model is (engine/fingerprint.py)
        self.active_choices: tuple[Choice, ...] = ()
        self.light_status: SoftPromptStatus | None = None
        self.outside: LibraryEntry | None = None  # the active soft prompt, when it is not in a library folder
        self.server: tuple[str, list[ServerEntry]] | None = None  # (address, models) while writing with a server

        self.light = StatusLight(self)
        self.list = QListWidget(self)
        self.list.setAccessibleName("Soft prompts")
        self.list.setAlternatingRowColors(True)
        self.list.setWordWrap(True)
        self.list.setSpacing(3)
        self.details = QLabel(self)
        self.details.setAccessibleName("Soft prompt details")
        self.details.setWordWrap(True)
        self.details.setTextFormat(Qt.PlainText)
        self.live_weights = QLabel(self)  # a bayes mixture's member weights while text streams
        self.live_weights.setWordWrap(True)
        self.live_weights.setAccessibleName("Current mixture weights")
        self.live_weights.hide()
        self.mixture_button = QPushButton("New mixture…", self)
        self.learn_button = QPushButton("Learn weights…", self)
        self.mixture_button.setToolTip("Tick soft prompts and set their weights: they write together")
        self.learn_button.setToolTip("Learn weights from a text or from this story")
        self.mixture_button.clicked.connect(self.new_mixture_requested)
        self.learn_button.clicked.connect(self.learn_weights_requested)
        self.load_button = QPushButton("Load", self)
        self.unload_button = QPushButton("Unload", self)
        self.refresh_button = QPushButton("Refresh", self)
        self.folder_button = QPushButton("Open folder", self)
        buttons = QHBoxLayout()
        for button in (self.load_button, self.unload_button, self.refresh_button, self.folder_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.light)
        layout.addWidget(self.list, 1)
        layout.addWidget(self.details)
        layout.addWidget(self.live_weights)
        layout.addLayout(buttons)
        mixture_buttons = QHBoxLayout()
        mixture_buttons.addWidget(self.mixture_button)
        mixture_buttons.addWidget(self.learn_button)
        layout.addLayout(mixture_buttons)

        self.list.currentItemChanged.connect(lambda *_: self._update_details())
        self.list.itemDoubleClicked.connect(lambda *_: self.request_load())
        self.load_button.clicked.connect(self.request_load)
        self.unload_button.clicked.connect(lambda: self.load_requested.emit(None))
        self.refresh_button.clicked.connect(self.refresh)
        self.folder_button.clicked.connect(self.open_folder)

        # Refresh by itself when files appear in or leave a soft prompt folder.
        self._watch_timer = QTimer(self, singleShot=True, interval=300)
        self._watch_timer.timeout.connect(self.refresh)
        self.watcher = QFileSystemWatcher([str(f) for f in library.folders if f.is_dir()], self)
        self.watcher.directoryChanged.connect(lambda _path: self._watch_timer.start())
        self.refresh()

    # -- the list --------------------------------------------------------------------

    def selected_entry(self) -> LibraryEntry | None:
        item = self.list.currentItem()
        return item.data(ENTRY_ROLE) if item is not None else None

    def item_for(self, choice: Choice | None) -> QListWidgetItem | None:
        for row in range(self.list.count()):
            if same_choice(choice_of(self.list.item(row).data(ENTRY_ROLE)), choice):
                return self.list.item(row)
        return None

    def select(self, choice: Choice | None) -> None:
        item = self.item_for(choice)
        if item is not None:
            self.list.setCurrentItem(item)

    def set_server(self, address: str | None, models=()) -> None:
        """List a server's models (its soft prompts) instead of the library; None: the library."""
        self.server = None if address is None else (address, [ServerEntry(m.name, m.softprompt_tokens) for m in models])
        for button in (self.refresh_button, self.folder_button, self.mixture_button, self.learn_button):
            button.setVisible(address is None)
        self.refresh()

    def refresh(self) -> None:
        keep = choice_of(self.selected_entry())
        entries = self.library.refresh() if self.server is None else []
        self.list.clear()
        none_item = QListWidgetItem(NONE_TEXT)
        none_item.setData(ENTRY_ROLE, None)
        self.list.addItem(none_item)
        for entry in self.server[1] if self.server else ():
            item = QListWidgetItem(f"{entry.name}" + (f" ({entry.tokens} tokens)" if entry.tokens else "")
                                   + f"\non {self.server[0]}")
            item.setData(ENTRY_ROLE, entry)
            self.list.addItem(item)
        if self.outside is not None and self.server is None:
            item = self._item(self.outside)
            item.setText(item.text() + f"\nloaded from {self.outside.path.parent}")
            item.setToolTip(f"{self.outside.path}\nNot in your soft prompt folder: drop it on the window to add it."
                            + (f"\n{item.toolTip()}" if item.toolTip() else ""))
            self.list.addItem(item)
        for entry in entries:
            self.list.addItem(self._item(entry))
        self._mark_active()
        self.select(keep)
        if self.list.currentItem() is None:
            self.list.setCurrentRow(0)
        self._update_details()

    def softprompt_entries(self) -> list[LibraryEntry]:
        """The soft prompts (not mixtures) that fit the loaded model: what a mixture can use."""
        return [e for e in self.library.entries if e.softprompt is not None and self.fits(e)[0]]

    def _item(self, entry: LibraryEntry) -> QListWidgetItem:
        sp = entry.softprompt
        if entry.is_mixture:
            item = QListWidgetItem(f"{entry.name} (mixture, {entry.mixture.mode})\n"
                                   f"{entry.mixture.label.removeprefix('Mixture: ')}")
            compat = entry.compatibility(self.hidden_size, self.model_name, self.model_fingerprint)
            if not compat.ok:
                item.setForeground(QBrush(GREY))
                item.setText(item.text() + f"\ncannot be used: {compat.reason}")
            item.setToolTip("\n".join(list(compat.warnings) + ([compat.reason] if not compat.ok else [])))
        elif sp is None:
            item = QListWidgetItem(f"{entry.file_name}\nunreadable: {entry.error.reason if entry.error else ''}")
            item.setForeground(QBrush(GREY))
        else:
            byline = f" · by {sp.author}" if sp.authors else ""
            item = QListWidgetItem(f"{sp.name} ({sp.n_tokens} tokens)\n{entry.file_name}{byline}")
            compat = entry.compatibility(self.hidden_size, self.model_name, self.model_fingerprint)
            if not compat.ok:
                item.setForeground(QBrush(GREY))
                item.setText(item.text() + f"\ndoes not fit: {compat.reason}")
            tip = [sp.description] if sp.description else []
            tip += list(compat.warnings) + ([compat.reason] if not compat.ok else [])
            item.setToolTip("\n".join(tip))
        item.setData(ENTRY_ROLE, entry)
        return item

    def fits(self, entry: LibraryEntry | None) -> tuple[bool, str]:
        if entry is None or isinstance(entry, ServerEntry):
            return True, ""
        compat = entry.compatibility(self.hidden_size, self.model_name, self.model_fingerprint)
        return compat.ok, compat.reason

    def _update_details(self) -> None:
        entry = self.selected_entry()
        if entry is None:
            self.details.setText("No soft prompt: the model writes on its own.")
        elif isinstance(entry, ServerEntry):
            size = f" with a {entry.tokens}-token soft prompt" if entry.tokens else ""
            where = self.server[0] if self.server else "the server"  # None while the list is rebuilt
            self.details.setText(f"{entry.name}: a model served by {where}{size}. Load it to write with it.")
        elif entry.is_mixture:
            mode = {"bayes": "the soft prompt that explains the story best leads",
                    "fixed": "the same weights at every word"}[entry.mixture.mode]
            lines = [f"{entry.name}: a mixture ({entry.mixture.mode}: {mode})"]
            for member, weight, found in zip(entry.mixture.members, entry.mixture.weights, entry.members):
                where = f"{found.softprompt.n_tokens} tokens" if found else "MISSING"
                lines.append(f"  {weight:.0%}  {found.name if found else member.softprompt} ({where})")
            ok, reason = self.fits(entry)
            if not ok:
                lines.append(f"Cannot be used: {reason}.")
            self.details.setText("\n".join(lines))
        elif entry.softprompt is None:
            self.details.setText(f"{entry.file_name} cannot be used: {entry.error.reason if entry.error else ''}")
        else:
            sp = entry.softprompt
            lines = [sp.name]
            if sp.authors:
                lines.append(f"by {sp.author}")
            if sp.description:
                lines.append(sp.description)
            lines.append(f"{sp.n_tokens} tokens · hidden size {sp.hidden_size} · {sp.format.value} · {entry.file_name}")
            ok, reason = self.fits(entry)
            if not ok:
                lines.append(f"Does not fit the loaded model: {reason}.")
            self.details.setText("\n".join(lines))
        ok, _ = self.fits(entry)
        self.load_button.setEnabled(ok and (entry is None or entry.valid))
        self.unload_button.setEnabled(bool(self.active_choices))

    # -- actions ---------------------------------------------------------------------

    def request_load(self) -> None:
        entry = self.selected_entry()
        ok, _ = self.fits(entry)
        if entry is not None and (not entry.valid or not ok):
            return
        self.load_requested.emit(choice_of(entry))

    def open_folder(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.library.user_folder)))

    def set_model(self, hidden_size: int | None, model_name: str | None, fingerprint: str | None = None) -> None:
        self.hidden_size, self.model_name, self.model_fingerprint = hidden_size, model_name, fingerprint
        self.refresh()

    def show_live_weights(self, weights) -> None:
        """A bayes mixture's member weights now (while its text streams)."""
        status = self.light_status
        if status is None or not status.is_mixture or len(weights) != len(status.members):
            return
        self.live_weights.setText("Weights now: " + " · ".join(
            f"{name} {weight:.0%}" for name, weight in zip(status.members, weights)))
        self.live_weights.show()

    def set_active(self, status: SoftPromptStatus | None) -> None:
        """Called only when the engine has really switched."""
        self.light_status = status
        self.live_weights.hide()
        self.active_choices = status.chosen if status else ()
        self.light.set_status(status)
        first = status.first if status else None
        outside = None
        if self.server is not None:
            first = first if first is not None and self.item_for(first) is not None else None
        elif isinstance(first, Path) and not any(status.shows(e.path) for e in self.library.entries):
            outside = self.library.entry_for(first)  # loaded by path (--softprompt some/file.zip)
        if outside != self.outside or (outside is None and first is not None and self.item_for(first) is None):
            self.outside = outside
            self.refresh()
        self._mark_active()
        self.select(first)
        self._update_details()

    def _mark_active(self) -> None:
        """The active soft prompt's row in bold (or [None]'s, when none is active)."""
        for row in range(self.list.count()):
            item = self.list.item(row)
            entry = item.data(ENTRY_ROLE)
            status = self.light_status
            active = status.shows(choice_of(entry)) if status and entry is not None else (
                entry is None and not self.active_choices)
            font = item.font()
            font.setBold(active)
            item.setFont(font)
