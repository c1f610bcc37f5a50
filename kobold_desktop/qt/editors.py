"""Editors for what steers the model: Memory, Author's Note, World Info, sampler settings."""

from __future__ import annotations

from kobold_desktop.engine import SamplingSettings
from kobold_desktop.qt._qt import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
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
        placement = ("At the top, with Memory (-1), or before the last N pieces of the story, as the Author's "
                     "Note. Near the end the model weighs it more, and an entry that comes and goes no longer "
                     "makes the model read the whole story again; at the top it is background.")
        self.place = QSpinBox(self, minimum=-1, maximum=1000, value=-1)
        self.place.setSpecialValueText("at the top")
        self.place.setToolTip(placement)
        self.new_place = QSpinBox(self, minimum=-1, maximum=1000, value=-1)
        self.new_place.setSpecialValueText("at the top")
        self.new_place.setToolTip("Where new entries go. " + placement)
        add, remove = QPushButton("Add entry", self), QPushButton("Remove", self)
        buttons = QHBoxLayout()
        buttons.addWidget(add)
        buttons.addWidget(remove)
        form = QFormLayout()
        form.addRow("Keys", self.keys)
        form.addRow("Content", self.content)
        form.addRow(self.constant)
        form.addRow("Scan depth", self.scan_depth)
        form.addRow("Place (pieces from the end)", self.place)
        form.addRow("Default scan depth (pieces)", self.story_depth)
        form.addRow("New entries go (pieces from the end)", self.new_place)
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
        self.place.valueChanged.connect(self._store)
        self.story_depth.valueChanged.connect(self.changed)
        self.new_place.valueChanged.connect(self.changed)
        self._loading = False
        self._show(-1)

    def _label(self, entry: WorldInfoEntry) -> str:
        keys = ", ".join(entry.keys) or ("(constant)" if entry.constant else "(no keys)")
        return f"{keys}: {entry.content[:40]}"

    def load(self, story: Story) -> None:
        self.entries = [WorldInfoEntry(**e.__dict__) for e in story.world_info]
        self.story_depth.setValue(story.world_info_depth)
        self.new_place.setValue(-1 if story.world_info_new_depth is None else story.world_info_new_depth)
        self.list.clear()
        self.list.addItems([self._label(e) for e in self.entries])
        self._show(self.list.currentRow())

    def apply(self, story: Story) -> None:
        story.world_info = [WorldInfoEntry(**e.__dict__) for e in self.entries]
        story.world_info_depth = self.story_depth.value()
        story.world_info_new_depth = None if self.new_place.value() < 0 else self.new_place.value()

    def add_entry(self) -> None:
        self.entries.append(WorldInfoEntry(depth=None if self.new_place.value() < 0 else self.new_place.value()))
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
        for widget in (self.keys, self.content, self.constant, self.scan_depth, self.place):
            widget.setEnabled(valid)
        entry = self.entries[row] if valid else WorldInfoEntry()
        self.keys.setText(", ".join(entry.keys))
        self.content.setPlainText(entry.content)
        self.constant.setChecked(entry.constant)
        self.scan_depth.setValue(entry.scan_depth or 0)
        self.place.setValue(-1 if entry.depth is None else entry.depth)
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
        entry.depth = None if self.place.value() < 0 else self.place.value()
        self.list.item(row).setText(self._label(entry))
        self.changed.emit()


# The Settings tab, group by group: (field, label, minimum, maximum, step, decimals, shown at the
# minimum). decimals None: a whole number. Every field's tooltip is sampling.DESCRIPTIONS'.
SAMPLER_GROUPS: tuple[tuple[str, tuple], ...] = (
    ("Basic", (
        ("max_new_tokens", "Max new tokens", 1, 4096, 1, None, None),
        ("temperature", "Temperature", 0.0, 5.0, 0.05, 2, "0 (greedy)"),
        ("top_k", "Top-k", 0, 1000, 1, None, "off"),
        ("top_p", "Top-p", 0.01, 1.0, 0.01, 2, None),
        ("min_p", "Min-p", 0.0, 1.0, 0.01, 2, "off"),
    )),
    ("Repetition", (
        ("repetition_penalty", "Repetition penalty", 0.5, 3.0, 0.01, 2, None),
        ("repetition_penalty_range", "Penalty range (tokens)", 0, 100_000, 64, None, "whole story"),
        ("repetition_penalty_slope", "Penalty slope", 0.0, 1.0, 0.05, 2, None),
        ("presence_penalty", "Presence penalty", -2.0, 2.0, 0.05, 2, None),
        ("frequency_penalty", "Frequency penalty", -2.0, 2.0, 0.05, 2, None),
        ("dry_multiplier", "DRY multiplier", 0.0, 10.0, 0.05, 2, "off"),
        ("dry_base", "DRY base", 1.0, 10.0, 0.05, 2, None),
        ("dry_allowed_length", "DRY allowed length", 1, 100, 1, None, None),
        ("dry_range", "DRY range (tokens)", 0, 100_000, 64, None, "whole story"),
    )),
    ("Advanced", (
        ("typical_p", "Typical-p", 0.01, 1.0, 0.01, 2, None),
        ("top_a", "Top-a", 0.0, 1.0, 0.01, 2, "off"),
        ("tfs", "Tail-free (TFS)", 0.01, 1.0, 0.01, 2, None),
        ("top_n_sigma", "Top-n-sigma", 0.0, 10.0, 0.1, 2, "off"),
        ("dynatemp_range", "Dynamic temperature range", 0.0, 5.0, 0.05, 2, "off"),
        ("dynatemp_exponent", "Dynamic temperature exponent", 0.0, 10.0, 0.1, 2, None),
        ("smoothing_factor", "Smoothing factor", 0.0, 10.0, 0.05, 2, "off"),
        ("smoothing_curve", "Smoothing curve", 1.0, 3.0, 0.05, 2, None),
        ("xtc_probability", "XTC probability", 0.0, 1.0, 0.05, 2, "off"),
        ("xtc_threshold", "XTC threshold", 0.0, 1.0, 0.01, 2, None),
        ("mirostat_tau", "Mirostat tau", 0.0, 20.0, 0.1, 2, None),
        ("mirostat_eta", "Mirostat eta", 0.0, 1.0, 0.01, 2, None),
    )),
)
# Fields edited as text: (field, label, group)
TEXT_FIELDS = (
    ("dry_sequence_breakers", "DRY sequence breakers", "Repetition"),
    ("banned_phrases", "Banned phrases", "Repetition"),
    ("sampler_order", "Sampler order", "Advanced"),
    ("logit_bias", "Logit bias", "Advanced"),
    ("banned_tokens", "Banned token ids", "Advanced"),
)


SHIFT_TIP = ("Past the context the story is trimmed in blocks, so most turns reuse the work of the turn "
             "before and the model reads exactly its prompt. With this on, the turns where a block goes reuse "
             "it too: the oldest text is taken out of the cache and the rest moved back (KoboldCpp's "
             "ContextShift). Faster, but the moved text was read with the dropped text before it: close to a "
             "fresh read, not the same.")


class SamplerPanel(QWidget):
    """Every sampler, grouped (basic, repetition, advanced), each with a tooltip that says
    what it does; presets to pick, change and save. Its settings travel with the story."""

    changed = Signal()

    def __init__(self, parent=None, app_settings=None):
        from kobold_desktop.engine.sampling import DESCRIPTIONS

        super().__init__(parent)
        self.app_settings = app_settings  # where saved presets live (kobold_desktop.settings.Settings)
        self.preset = QComboBox(self)
        self.preset.setAccessibleName("Sampler preset")
        self.preset.setToolTip("Pick a preset to set every sampler at once; change any value after.")
        save = QPushButton("Save as preset…", self)
        self.delete_preset_button = QPushButton("Delete preset", self)
        top = QHBoxLayout()
        top.addWidget(self.preset, 1)
        top.addWidget(save)
        top.addWidget(self.delete_preset_button)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        self.context_size = QSpinBox(self, minimum=64, maximum=1_000_000, singleStep=256)
        self.context_size.setToolTip("The most tokens of the story the model reads each turn (at most the model's).")
        self.context_shift = QCheckBox("Shift the cache past the context (faster, not exact)", self)
        self.context_shift.setAccessibleName("Context shift")
        self.context_shift.setToolTip(SHIFT_TIP)
        self.seed = QSpinBox(self, minimum=-1, maximum=2**31 - 1)
        self.seed.setSpecialValueText("random")
        self.seed.setToolTip(DESCRIPTIONS["seed"])
        self.mirostat = QComboBox(self)
        self.mirostat.addItems(["off", "1", "2"])
        self.mirostat.setToolTip(DESCRIPTIONS["mirostat"])
        forms = {}
        for group, fields in SAMPLER_GROUPS:
            box = QGroupBox(group, self)
            form = QFormLayout(box)
            forms[group] = form
            for name, label, low, high, step, decimals, special in fields:
                if decimals is None:
                    widget = QSpinBox(self, minimum=int(low), maximum=int(high), singleStep=int(step))
                else:
                    widget = QDoubleSpinBox(self, minimum=low, maximum=high, singleStep=step, decimals=decimals)
                if special:
                    widget.setSpecialValueText(special)
                widget.setToolTip(DESCRIPTIONS[name])
                widget.setAccessibleName(label)
                setattr(self, name, widget)
                form.addRow(label, widget)
            if group == "Basic":
                form.addRow("Context size", self.context_size)
                form.addRow("", self.context_shift)
                form.addRow("Seed", self.seed)
            if group == "Advanced":
                form.addRow("Mirostat", self.mirostat)
            layout.addWidget(box)
        for name, label, group in TEXT_FIELDS:
            widget = QPlainTextEdit(self) if name == "banned_phrases" else QLineEdit(self)
            if name == "banned_phrases":
                widget.setMaximumHeight(70)
                widget.setPlaceholderText("one phrase per line; /regex/ for a regular expression")
            widget.setToolTip(DESCRIPTIONS[name])
            widget.setAccessibleName(label)
            setattr(self, name, widget)
            forms[group].addRow(label, widget)
        reset = QPushButton("Reset to defaults", self)
        layout.addWidget(reset)
        reset.clicked.connect(self.reset)
        save.clicked.connect(self._ask_preset_name)
        self.delete_preset_button.clicked.connect(lambda: self.delete_preset(self.preset.currentText()))
        self.reset()
        self._fill_presets()
        self.preset.activated.connect(lambda _index: self.choose_preset(self.preset.currentText()))
        for widget in self._inputs():
            signal = widget.valueChanged if hasattr(widget, "valueChanged") else widget.textChanged
            signal.connect(self.changed)
        self.mirostat.currentIndexChanged.connect(self.changed)
        self.context_shift.toggled.connect(self.changed)

    def _inputs(self):
        numbers = [getattr(self, name) for _, fields in SAMPLER_GROUPS for name, *_ in fields]
        return numbers + [self.context_size, self.seed] + [getattr(self, name) for name, *_ in TEXT_FIELDS]

    # -- presets ------------------------------------------------------------------------

    def _saved_presets(self) -> dict:
        from kobold_desktop.engine import presets

        return presets.saved(self.app_settings.get(presets.SETTINGS_KEY)) if self.app_settings is not None else {}

    def presets(self) -> dict:
        """Every preset by name: the built-in ones, then the writer's."""
        from kobold_desktop.engine import presets

        return {**presets.BUILT_IN, **self._saved_presets()}

    def _fill_presets(self, current: str = "") -> None:
        from kobold_desktop.engine import presets

        saved = list(self._saved_presets())
        self.preset.blockSignals(True)
        self.preset.clear()
        self.preset.addItem("")  # no preset chosen (or changed since)
        self.preset.addItems(list(presets.BUILT_IN))
        if saved:
            self.preset.insertSeparator(self.preset.count())
            self.preset.addItems(saved)
        self.preset.setCurrentText(current)
        self.preset.blockSignals(False)
        self.delete_preset_button.setEnabled(current in saved)

    def choose_preset(self, name: str) -> None:
        from kobold_desktop.engine import presets

        chosen = self.presets().get(name)
        if chosen is None:
            return
        self.set_settings(presets.apply(chosen, self.settings()))
        self._fill_presets(name)
        self.changed.emit()

    def save_preset(self, name: str) -> None:
        """Keep the settings now as a preset of the writer's (a name taken is replaced)."""
        from kobold_desktop.engine import presets

        name = name.strip()
        if not name or self.app_settings is None:
            return
        stored = self._saved_presets()
        stored[name] = presets.from_settings(self.settings())
        self.app_settings.set(presets.SETTINGS_KEY, stored)
        self._fill_presets(name)

    def delete_preset(self, name: str) -> None:
        from kobold_desktop.engine import presets

        stored = self._saved_presets()
        if name in stored and self.app_settings is not None:
            del stored[name]
            self.app_settings.set(presets.SETTINGS_KEY, stored)
            self._fill_presets("")

    def _ask_preset_name(self) -> None:
        from kobold_desktop.qt._qt import QInputDialog

        name, ok = QInputDialog.getText(self, "Save preset", "Name of the preset:")
        if ok:
            self.save_preset(name)

    # -- values -------------------------------------------------------------------------

    def reset(self) -> None:
        self.set_settings(SamplingSettings(), context_size=2048, context_shift=False)

    def set_settings(self, settings: SamplingSettings, context_size: int | None = None,
                     context_shift: bool | None = None) -> None:
        import json

        for _, fields in SAMPLER_GROUPS:
            for name, *_ in fields:
                getattr(self, name).setValue(getattr(settings, name))
        self.seed.setValue(-1 if settings.seed is None else settings.seed)
        self.mirostat.setCurrentIndex(settings.mirostat)
        self.dry_sequence_breakers.setText(json.dumps(list(settings.dry_sequence_breakers), ensure_ascii=False))
        self.banned_phrases.setPlainText("\n".join(settings.banned_phrases))
        self.sampler_order.setText(", ".join(str(i) for i in settings.sampler_order))
        self.logit_bias.setText(", ".join(f"{t}:{b:g}" for t, b in settings.logit_bias))
        self.banned_tokens.setText(", ".join(str(t) for t in settings.banned_tokens))
        if context_size is not None:
            self.context_size.setValue(context_size)
        if context_shift is not None:
            self.context_shift.setChecked(context_shift)

    def settings(self) -> SamplingSettings:
        """The settings shown; a `SettingsError` that names the field when one cannot be read."""
        from kobold_desktop.engine.sampling import SettingsError

        values = {name: getattr(self, name).value() for _, fields in SAMPLER_GROUPS for name, *_ in fields}
        seed = self.seed.value()
        try:
            breakers = _json_strings(self.dry_sequence_breakers.text())
        except ValueError as exc:
            raise SettingsError(f"DRY sequence breakers: {exc}.") from exc
        return SamplingSettings(
            **values, seed=None if seed < 0 else seed, mirostat=self.mirostat.currentIndex(),
            dry_sequence_breakers=breakers,
            banned_phrases=tuple(line for line in self.banned_phrases.toPlainText().splitlines() if line.strip()),
            sampler_order=_ids(self.sampler_order.text(), "Sampler order"),
            logit_bias=_bias(self.logit_bias.text()),
            banned_tokens=_ids(self.banned_tokens.text(), "Banned token ids"))

    def to_dict(self) -> dict:
        """The settings and the context size, as the app's settings and a story file keep them."""
        data = self.settings().to_dict()
        data["context_size"] = self.context_size.value()
        data["context_shift"] = self.context_shift.isChecked()
        return data

    def set_dict(self, data: dict) -> None:
        """Show settings kept by `to_dict`; raises `SettingsError`, `TypeError` or
        `ValueError` (nothing shown changes) when they cannot be used."""
        context = data.get("context_size")
        if context is not None and (not isinstance(context, int) or isinstance(context, bool)):
            raise ValueError("the context size is not a whole number")
        shift = data.get("context_shift")
        if shift is not None and not isinstance(shift, bool):
            raise ValueError("context shift is not true or false")
        self.set_settings(SamplingSettings.from_dict(data), context, shift)

    def allow_shift(self, refusal: str | None) -> None:
        """Say on the check box when the loaded model cannot shift (the story is then
        trimmed exactly whatever it says)."""
        self.context_shift.setToolTip(SHIFT_TIP if refusal is None
                                      else f"{SHIFT_TIP}\n\nNot with this model: {refusal}.")


def _json_strings(text: str) -> tuple[str, ...]:
    import json

    if not text.strip():
        return ()
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('write them as a JSON list of strings, e.g. ["\\n", ":"]')
    return tuple(value)


def _ids(text: str, label: str) -> tuple[int, ...]:
    from kobold_desktop.engine.sampling import SettingsError

    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise SettingsError(f"{label}: write whole numbers separated by commas.")
    return tuple(int(p) for p in parts)


def _bias(text: str) -> tuple[tuple[int, float], ...]:
    from kobold_desktop.engine.sampling import SettingsError

    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        token, _sep, bias = part.partition(":")
        try:
            pairs.append((int(token), float(bias)))
        except ValueError:
            raise SettingsError(f"Logit bias: write token id:bias pairs, e.g. 198:-2 (not '{part}').") from None
    return tuple(pairs)

