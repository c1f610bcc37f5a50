"""Building a mixture of soft prompts by ticking them, and learning its weights from text."""

from __future__ import annotations

from pathlib import Path

from kobold_desktop.qt.accessible import name_controls
from kobold_desktop.qt._qt import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
    Signal,
)
from kobold_desktop.qt.worker import RankRequest
from kobold_desktop.softprompt.library import LibraryEntry
from kobold_desktop.softprompt.mixture import Mixture, MixtureMember


class _Members(QWidget):
    """One row per soft prompt: a tick box and a weight (percent)."""

    def __init__(self, entries: list[LibraryEntry], with_weights: bool, parent=None):
        super().__init__(parent)
        self.entries = entries
        self.ticks: list[QCheckBox] = []
        self.weights: list[QDoubleSpinBox] = []
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        for row, entry in enumerate(entries):
            tick = QCheckBox(f"{entry.name} ({entry.softprompt.n_tokens} tokens)", self)
            tick.setAccessibleName(f"Use {entry.name}")
            grid.addWidget(tick, row, 0)
            self.ticks.append(tick)
            if with_weights:
                weight = QDoubleSpinBox(self, minimum=0.0, maximum=100.0, decimals=1, value=50.0, suffix=" %")
                weight.setAccessibleName(f"Weight of {entry.name}")
                weight.setEnabled(False)
                tick.toggled.connect(weight.setEnabled)
                grid.addWidget(weight, row, 1)
                self.weights.append(weight)

    def chosen(self) -> list[tuple[LibraryEntry, float]]:
        return [(entry, self.weights[i].value() if self.weights else 1.0)
                for i, entry in enumerate(self.entries) if self.ticks[i].isChecked()]

    def set_choice(self, weights: dict[Path, float]) -> None:
        for i, entry in enumerate(self.entries):
            self.ticks[i].setChecked(entry.path in weights)
            if self.weights and entry.path in weights:
                self.weights[i].setValue(round(weights[entry.path] * 100, 1))


class MixtureDialog(QDialog):
    """New mixture: tick soft prompts, set their weights, name it, choose the mode."""

    def __init__(self, entries: list[LibraryEntry], parent=None):
        super().__init__(parent)
        self.setWindowTitle("New mixture of soft prompts")
        self.name = QLineEdit("My mixture", self)
        self.name.setAccessibleName("Mixture name")
        self.mode = QComboBox(self)
        self.mode.addItem("Bayes: the soft prompt that explains the story best leads", "bayes")
        self.mode.addItem("Fixed: the same weights at every word", "fixed")
        self.mode.setAccessibleName("Mixture mode")
        self.members = _Members(entries, True, self)
        self.message = QLabel(self)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel, self)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self.save_button = self.buttons.button(QDialogButtonBox.Save)
        form = QFormLayout()
        form.addRow("Name", self.name)
        form.addRow("Mode", self.mode)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(QLabel("Soft prompts and their weights:"))
        layout.addWidget(self.members)
        layout.addWidget(self.message)
        layout.addWidget(self.buttons)
        for box in self.members.ticks:
            box.toggled.connect(self._check)
        for spin in self.members.weights:
            spin.valueChanged.connect(self._check)
        self.name.textChanged.connect(self._check)
        self._check()
        name_controls(self)  # every control has an accessible name

    def _check(self) -> None:
        chosen = self.members.chosen()
        problem = ""
        if not self.name.text().strip():
            problem = "Give the mixture a name."
        elif not chosen:
            problem = "Tick at least one soft prompt."
        elif sum(w for _, w in chosen) <= 0:
            problem = "At least one weight must be above 0."
        self.message.setText(problem)
        self.save_button.setEnabled(not problem)

    def mixture(self) -> Mixture:
        members = tuple(MixtureMember(entry.path.name, round(weight / 100, 6))
                        for entry, weight in self.members.chosen())
        return Mixture(self.name.text().strip(), self.mode.currentData(), members)


class LearnWeightsDialog(QDialog):
    """Score soft prompts on a text (or this story) and learn a mixture's weights."""

    start_requested = Signal(object)  # RankRequest
    cancel_requested = Signal()
    save_requested = Signal(object)  # a Mixture with the learned weights

    def __init__(self, entries: list[LibraryEntry], story_text: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Learn weights from a text or from this story")
        self.story_text = story_text
        self.file: Path | None = None
        self.ranking = None
        self.members = _Members(entries, False, self)
        self.from_story = QRadioButton("This story", self)
        self.from_file = QRadioButton("A text file…", self)
        self.from_story.setChecked(bool(story_text.strip()))
        self.from_file.setChecked(not story_text.strip())
        group = QButtonGroup(self)
        group.addButton(self.from_story)
        group.addButton(self.from_file)
        self.choose = QPushButton("Choose…", self)
        self.choose.clicked.connect(self._choose_file)
        self.file_label = QLabel("", self)
        source = QHBoxLayout()
        for widget in (self.from_story, self.from_file, self.choose, self.file_label):
            source.addWidget(widget)
        source.addStretch(1)
        self.progress = QProgressBar(self, minimum=0, maximum=100)
        self.progress.setAccessibleName("Learning progress")
        self.result = QLabel("Tick the soft prompts to compare, choose the text, then Learn.", self)
        self.result.setWordWrap(True)
        self.name = QLineEdit("Learned mixture", self)
        self.name.setAccessibleName("Mixture name")
        self.learn_button = QPushButton("Learn", self)
        self.cancel_button = QPushButton("Cancel", self)
        self.save_button = QPushButton("Save as mixture", self)
        self.close_button = QPushButton("Close", self)
        self.learn_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel_requested)
        self.save_button.clicked.connect(self._save)
        self.close_button.clicked.connect(self.close)
        buttons = QHBoxLayout()
        buttons.addWidget(QLabel("Name"))
        buttons.addWidget(self.name, 1)
        for button in (self.learn_button, self.cancel_button, self.save_button, self.close_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Soft prompts:"))
        layout.addWidget(self.members)
        layout.addLayout(source)
        layout.addWidget(self.progress)
        layout.addWidget(self.result)
        layout.addLayout(buttons)
        self.set_running(False)
        name_controls(self)  # every control has an accessible name

    def _choose_file(self) -> None:
        chosen, _ = QFileDialog.getOpenFileName(self, "Text to learn from", "", "Text or stories (*.txt *.json)")
        if chosen:
            self.set_file(Path(chosen))

    def set_file(self, path: Path) -> None:
        self.file = path
        self.file_label.setText(path.name)
        self.from_file.setChecked(True)

    def request(self) -> RankRequest | None:
        chosen = [entry.path for entry, _ in self.members.chosen()]
        if not chosen:
            self.result.setText("Tick at least one soft prompt.")
            return None
        if self.from_story.isChecked():
            if not self.story_text.strip():
                self.result.setText("The story is empty; choose a text file instead.")
                return None
            return RankRequest(tuple(chosen), text=self.story_text)
        if self.file is None:
            self.result.setText("Choose a text file first.")
            return None
        return RankRequest(tuple(chosen), files=(self.file,))

    def start(self) -> None:
        request = self.request()
        if request is None:
            return
        self.ranking = None
        self.progress.setValue(0)
        self.result.setText("Scoring…")
        self.set_running(True)
        self.start_requested.emit(request)

    def set_running(self, running: bool) -> None:
        self.learn_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.save_button.setEnabled(not running and self.ranking is not None)

    def show_progress(self, fraction: float, what: str) -> None:
        self.progress.setValue(int(fraction * 100))

    def show_ranking(self, ranking) -> None:
        self.ranking = ranking
        lines = [f"Held-out loss (lower is better), on {ranking.held_out_blocks} blocks of {ranking.block_len} tokens:"]
        for i, s in enumerate(ranking.softprompts, 1):
            lines.append(f"{i}. {s.name}: {s.loss:.4f}, weight {s.weight:.0%}")
        lines.append(f"No soft prompt: {ranking.none_loss:.4f}")
        lines.append(f"Mixture with the learned weights: {ranking.mixture_loss:.4f}")
        self.result.setText("\n".join(lines))
        self.progress.setValue(100)
        self.set_running(False)

    def finish(self, message: str) -> None:
        if message:
            self.result.setText(message)
        self.set_running(False)

    def mixture(self) -> Mixture:
        members = tuple(MixtureMember(s.path.name, round(s.weight, 6)) for s in self.ranking.softprompts)
        return Mixture(self.name.text().strip() or "Learned mixture", "bayes", members)

    def _save(self) -> None:
        if self.ranking is not None:
            self.save_requested.emit(self.mixture())
