"""Editors for what steers the model: Memory, Author's Note, World Info, sampler settings."""

from __future__ import annotations

from kobold_desktop.engine import SamplingSettings
from kobold_desktop.qt._qt import (
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
    Signal,
)
from kobold_desktop.story import Story, WorldInfoEntry
from kobold_desktop.story.document import AUTHORS_NOTE_TEMPLATE


class MemoryEditor(QWidget):
    """Memory (always at the top of the context) and the Author's Note."""

    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.memory = QPlainTextEdit(self)
        self.memory.setPlaceholderText("Facts the model should always know, e.g. who the hero is.")
        self.note = QPlainTextEdit(self)
        self.note.setPlaceholderText("A nudge placed near the end of the story, e.g. 'The tone is grim.'")
        self.template = QLineEdit(AUTHORS_NOTE_TEMPLATE, self)
        self.depth = QSpinBox(self, minimum=0, maximum=100, value=3)
        self.depth.setToolTip("How many pieces of the story come after the Author's Note")
        form = QFormLayout(self)
        form.addRow(QLabel("Memory"))
        form.addRow(self.memory)
        form.addRow(QLabel("Author's Note"))
        form.addRow(self.note)
        form.addRow("Template (<|> is the note)", self.template)
        form.addRow("Insertion depth", self.depth)
        for widget in (self.memory, self.note):
            widget.textChanged.connect(self.changed)
        self.template.textChanged.connect(self.changed)
        self.depth.valueChanged.connect(self.changed)

    def load(self, story: Story) -> None:
        self.memory.setPlainText(story.memory)
        self.note.setPlainText(story.authors_note)
        self.template.setText(story.authors_note_template)
        self.depth.setValue(story.authors_note_depth)

    def apply(self, story: Story) -> None:
        story.memory = self.memory.toPlainText()
        story.authors_note = self.note.toPlainText()
        story.authors_note_template = self.template.text() or AUTHORS_NOTE_TEMPLATE
        story.authors_note_depth = self.depth.value()


class WorldInfoEditor(QWidget):
    """World Info entries: keys, content, constant flag and scan depth."""

    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.entries: list[WorldInfoEntry] = []
        self.list = QListWidget(self)
        self.list.setAccessibleName("World Info entries")
        self.keys = QLineEdit(self)
        self.keys.setPlaceholderText("keys, separated by commas")
        self.content = QPlainTextEdit(self)
        self.constant = QCheckBox("Always include (constant)", self)
        self.scan_depth = QSpinBox(self, minimum=0, maximum=1000, value=0)
        self.scan_depth.setSpecialValueText("story default")
        self.story_depth = QSpinBox(self, minimum=0, maximum=1000, value=3)
        add, remove = QPushButton("Add entry", self), QPushButton("Remove", self)
        buttons = QHBoxLayout()
        buttons.addWidget(add)
        buttons.addWidget(remove)
        form = QFormLayout()
        form.addRow("Keys", self.keys)
        form.addRow("Content", self.content)
        form.addRow(self.constant)
        form.addRow("Scan depth", self.scan_depth)
        form.addRow("Default scan depth (pieces)", self.story_depth)
        layout = QVBoxLayout(self)
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)
        layout.addLayout(form)
        add.clicked.connect(self.add_entry)
        remove.clicked.connect(self.remove_entry)
        self.list.currentRowChanged.connect(self._show)
        self.keys.textEdited.connect(self._store)
        self.content.textChanged.connect(self._store)
        self.constant.toggled.connect(self._store)
        self.scan_depth.valueChanged.connect(self._store)
        self.story_depth.valueChanged.connect(self.changed)
        self._loading = False
        self._show(-1)

    def _label(self, entry: WorldInfoEntry) -> str:
        keys = ", ".join(entry.keys) or ("(constant)" if entry.constant else "(no keys)")
        return f"{keys}: {entry.content[:40]}"

    def load(self, story: Story) -> None:
        self.entries = [WorldInfoEntry(**e.__dict__) for e in story.world_info]
        self.story_depth.setValue(story.world_info_depth)
        self.list.clear()
        self.list.addItems([self._label(e) for e in self.entries])
        self._show(self.list.currentRow())

    def apply(self, story: Story) -> None:
        story.world_info = [WorldInfoEntry(**e.__dict__) for e in self.entries]
        story.world_info_depth = self.story_depth.value()

    def add_entry(self) -> None:
        self.entries.append(WorldInfoEntry())
        self.list.addItem(self._label(self.entries[-1]))
        self.list.setCurrentRow(len(self.entries) - 1)
        self.keys.setFocus()
        self.changed.emit()

    def remove_entry(self) -> None:
        row = self.list.currentRow()
        if 0 <= row < len(self.entries):
            del self.entries[row]
            self.list.takeItem(row)
            self.changed.emit()

    def _show(self, row: int) -> None:
        self._loading = True
        valid = 0 <= row < len(self.entries)
        for widget in (self.keys, self.content, self.constant, self.scan_depth):
            widget.setEnabled(valid)
        entry = self.entries[row] if valid else WorldInfoEntry()
        self.keys.setText(", ".join(entry.keys))
        self.content.setPlainText(entry.content)
        self.constant.setChecked(entry.constant)
        self.scan_depth.setValue(entry.scan_depth or 0)
        self._loading = False

    def _store(self, *_args) -> None:
        row = self.list.currentRow()
        if self._loading or not 0 <= row < len(self.entries):
            return
        entry = self.entries[row]
        entry.keys = [k.strip() for k in self.keys.text().split(",") if k.strip()]
        entry.content = self.content.toPlainText()
        entry.constant = self.constant.isChecked()
        entry.scan_depth = self.scan_depth.value() or None
        self.list.item(row).setText(self._label(entry))
        self.changed.emit()


class SamplerPanel(QWidget):
    """Sampler settings with sensible defaults and a Reset button."""

    changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.max_new_tokens = QSpinBox(self, minimum=1, maximum=4096)
        self.context_size = QSpinBox(self, minimum=64, maximum=1_000_000, singleStep=256)
        self.temperature = QDoubleSpinBox(self, minimum=0.0, maximum=5.0, singleStep=0.05, decimals=2)
        self.temperature.setSpecialValueText("0 (greedy)")
        self.top_k = QSpinBox(self, minimum=0, maximum=1000)
        self.top_k.setSpecialValueText("off")
        self.top_p = QDoubleSpinBox(self, minimum=0.01, maximum=1.0, singleStep=0.01, decimals=2)
        self.min_p = QDoubleSpinBox(self, minimum=0.0, maximum=0.99, singleStep=0.01, decimals=2)
        self.typical_p = QDoubleSpinBox(self, minimum=0.01, maximum=1.0, singleStep=0.01, decimals=2)
        self.repetition_penalty = QDoubleSpinBox(self, minimum=0.5, maximum=3.0, singleStep=0.01, decimals=2)
        self.repetition_penalty_range = QSpinBox(self, minimum=0, maximum=100_000, singleStep=64)
        self.repetition_penalty_range.setSpecialValueText("whole story")
        self.seed = QSpinBox(self, minimum=-1, maximum=2**31 - 1)
        self.seed.setSpecialValueText("random")
        reset = QPushButton("Reset to defaults", self)
        form = QFormLayout(self)
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Context size", self.context_size)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-k", self.top_k)
        form.addRow("Top-p", self.top_p)
        form.addRow("Min-p", self.min_p)
        form.addRow("Typical-p", self.typical_p)
        form.addRow("Repetition penalty", self.repetition_penalty)
        form.addRow("Penalty range (tokens)", self.repetition_penalty_range)
        form.addRow("Seed", self.seed)
        form.addRow(reset)
        reset.clicked.connect(self.reset)
        self.reset()
        for box in self._boxes():
            box.valueChanged.connect(self.changed)

    def _boxes(self):
        return (self.max_new_tokens, self.context_size, self.temperature, self.top_k, self.top_p, self.min_p,
                self.typical_p, self.repetition_penalty, self.repetition_penalty_range, self.seed)

    def reset(self) -> None:
        self.set_settings(SamplingSettings(), context_size=2048)

    def set_settings(self, settings: SamplingSettings, context_size: int | None = None) -> None:
        self.max_new_tokens.setValue(settings.max_new_tokens)
        self.temperature.setValue(settings.temperature)
        self.top_k.setValue(settings.top_k)
        self.top_p.setValue(settings.top_p)
        self.min_p.setValue(settings.min_p)
        self.typical_p.setValue(settings.typical_p)
        self.repetition_penalty.setValue(settings.repetition_penalty)
        self.repetition_penalty_range.setValue(settings.repetition_penalty_range)
        self.seed.setValue(-1 if settings.seed is None else settings.seed)
        if context_size is not None:
            self.context_size.setValue(context_size)

    def settings(self) -> SamplingSettings:
        return SamplingSettings(
            max_new_tokens=self.max_new_tokens.value(),
            temperature=self.temperature.value(),
            top_k=self.top_k.value(),
            top_p=self.top_p.value(),
            min_p=self.min_p.value(),
            typical_p=self.typical_p.value(),
            repetition_penalty=self.repetition_penalty.value(),
            repetition_penalty_range=self.repetition_penalty_range.value(),
            seed=None if self.seed.value() < 0 else self.seed.value(),
        )
