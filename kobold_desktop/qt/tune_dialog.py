"""The "Create soft prompt…" dialog: pick your writing, train, watch the loss fall."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kobold_desktop.qt.accessible import name_controls
from kobold_desktop.qt._qt import (
    QColor,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPainter,
    QProgressBar,
    QPushButton,
    QSpinBox,
    Qt,
    QVBoxLayout,
    QWidget,
    Signal,
)
from kobold_desktop.softprompt import Metadata
from kobold_desktop.tuning import TuningConfig, TuningError, TuningProgress

TRAIN_COLOR, HELD_COLOR = QColor("#1d4f91"), QColor("#d9822b")


@dataclass(frozen=True)
class TuneRequest:
    files: tuple[Path, ...]
    config: TuningConfig
    meta: Metadata
    mixture: int = 1  # 2 or more: train that many soft prompts together as a mixture


class LossPlot(QWidget):
    """Training loss (blue) and held-out loss (orange) against the step."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(160)
        self.train: list[tuple[int, float]] = []
        self.held: list[tuple[int, float]] = []
        self.baseline: float | None = None
        self.total_steps = 1

    def clear(self) -> None:
        self.train, self.held, self.baseline = [], [], None
        self.update()

    def add(self, progress: TuningProgress) -> None:
        self.total_steps = progress.total_steps
        self.train.append((progress.step, progress.loss))
        if progress.held_out_loss is not None:
            self.held.append((progress.step, progress.held_out_loss))
        self.baseline = progress.baseline_held_out_loss
        self.update()

    def paintEvent(self, event):
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        rect = self.rect().adjusted(40, 10, -10, -22)
        painter.fillRect(self.rect(), self.palette().base())
        painter.setPen(self.palette().mid().color())
        painter.drawRect(rect)
        values = [v for _, v in self.train + self.held] + ([self.baseline] if self.baseline else [])
        if not values:
            painter.drawText(rect, Qt.AlignCenter, "The loss curve appears here while training.")
            return
        low, high = min(values), max(values)
        high = high if high > low else low + 1

        def point(step: int, value: float):
            x = rect.left() + rect.width() * step / max(1, self.total_steps)
            y = rect.bottom() - rect.height() * (value - low) / (high - low)
            return int(x), int(y)

        painter.setPen(self.palette().text().color())
        painter.drawText(2, rect.top() + 10, f"{high:.2f}")
        painter.drawText(2, rect.bottom(), f"{low:.2f}")
        painter.drawText(rect.left(), self.height() - 6, "training loss (blue), held-out loss (orange), "
                         "dashed: held-out without a soft prompt")
        if self.baseline is not None:
            pen = painter.pen()
            pen.setColor(HELD_COLOR)
            pen.setStyle(Qt.DashLine)
            painter.setPen(pen)
            y = point(0, self.baseline)[1]
            painter.drawLine(rect.left(), y, rect.right(), y)
        for series, color in ((self.train, TRAIN_COLOR), (self.held, HELD_COLOR)):
            painter.setPen(color)
            for a, b in zip(series, series[1:]):
                painter.drawLine(*point(*a), *point(*b))


class TuneDialog(QDialog):
    start_requested = Signal(object)  # TuneRequest
    cancel_requested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Create soft prompt")
        self.files = QListWidget(self)
        self.files.setAccessibleName("Text files to learn from")
        add_files, add_folder, remove = QPushButton("Add files…"), QPushButton("Add folder…"), QPushButton("Remove")
        add_files.clicked.connect(self._add_files)
        add_folder.clicked.connect(self._add_folder)
        remove.clicked.connect(lambda: self.files.takeItem(self.files.currentRow()))
        file_buttons = QHBoxLayout()
        for button in (add_files, add_folder, remove):
            file_buttons.addWidget(button)
        self.name = QLineEdit(self)
        self.author = QLineEdit(self)
        self.description = QLineEdit(self)
        self.tokens = QSpinBox(self, minimum=1, maximum=2048, value=20)
        self.steps = QSpinBox(self, minimum=1, maximum=1_000_000, value=200)
        self.lr = QDoubleSpinBox(self, minimum=0.0001, maximum=10.0, decimals=4, singleStep=0.01, value=0.03)
        self.init_text = QLineEdit(self)
        self.init_text.setPlaceholderText("optional: start from this text (e.g. a few words of the style)")
        self.members = QSpinBox(self, minimum=1, maximum=8, value=1)
        self.members.setSpecialValueText("1 (a single soft prompt)")
        self.members.setToolTip("2 or more: train that many soft prompts and their weights together (a mixture); "
                                "each one specialises on the part of your writing it explains best.")
        for widget, name in ((self.name, "Name"), (self.author, "Author"), (self.description, "Description"),
                             (self.tokens, "Tokens"), (self.steps, "Steps"), (self.lr, "Learning rate"),
                             (self.init_text, "Start from text"), (self.members, "Soft prompts in a mixture")):
            widget.setAccessibleName(name)
        form = QFormLayout()
        form.addRow("Name", self.name)
        form.addRow("Author", self.author)
        form.addRow("Description", self.description)
        form.addRow("Tokens", self.tokens)
        form.addRow("Steps", self.steps)
        form.addRow("Learning rate", self.lr)
        form.addRow("Start from text", self.init_text)
        form.addRow("Soft prompts", self.members)
        self.plot = LossPlot(self)
        self.progress = QProgressBar(self, minimum=0, maximum=100)
        self.status = QLabel("Choose your writing (.txt files, a folder, or a story), then Start.", self)
        self.status.setWordWrap(True)
        self.start_button = QPushButton("Start", self)
        self.cancel_button = QPushButton("Cancel", self)
        self.close_button = QPushButton("Close", self)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel_requested)
        self.close_button.clicked.connect(self.close)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for button in (self.start_button, self.cancel_button, self.close_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Your writing"))
        layout.addWidget(self.files)
        layout.addLayout(file_buttons)
        layout.addLayout(form)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self.resize(620, 720)
        self.set_running(False)
        name_controls(self)  # every control has an accessible name

    def _add_files(self) -> None:
        chosen, _ = QFileDialog.getOpenFileNames(self, "Your writing", "", "Text or stories (*.txt *.json)")
        self.add_paths([Path(c) for c in chosen])

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A folder of .txt files")
        if folder:
            self.add_paths([Path(folder)])

    def add_paths(self, paths: list[Path]) -> None:
        for path in paths:
            self.files.addItem(str(path))
        if paths and not self.name.text():
            self.name.setText(paths[0].stem)

    def request(self) -> TuneRequest:
        files = tuple(Path(self.files.item(i).text()) for i in range(self.files.count()))
        if not files:
            raise TuningError("add at least one file of your writing.")
        init_text = self.init_text.text()
        config = TuningConfig(n_tokens=self.tokens.value(), steps=self.steps.value(), lr=self.lr.value(),
                              init="text" if init_text else "vocab", init_text=init_text)
        name = self.name.text().strip() or files[0].stem
        authors = (self.author.text().strip(),) if self.author.text().strip() else ()
        return TuneRequest(files, config, Metadata(name=name, authors=authors, description=self.description.text()),
                           self.members.value())

    def start(self) -> None:
        try:
            request = self.request()
        except TuningError as exc:
            self.status.setText(str(exc))
            return
        self.plot.clear()
        self.progress.setValue(0)
        self.status.setText("Preparing…")
        self.set_running(True)
        self.start_requested.emit(request)

    def set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def show_progress(self, progress: TuningProgress) -> None:
        self.plot.add(progress)
        self.progress.setValue(int(100 * progress.step / progress.total_steps))
        left = "" if progress.seconds_left == float("inf") else f", about {progress.seconds_left:.0f} s left"
        held = ""
        if self.plot.held:
            held = f"; held-out {self.plot.held[-1][1]:.3f}"
            if progress.baseline_held_out_loss is not None:
                held += f" (without a soft prompt {progress.baseline_held_out_loss:.3f})"
        self.status.setText(f"Step {progress.step} of {progress.total_steps}: loss {progress.loss:.3f}{held}, "
                            f"{progress.tokens_per_second:,.0f} tokens/s{left}")

    def finish(self, message: str) -> None:
        self.set_running(False)
        self.status.setText(message)
