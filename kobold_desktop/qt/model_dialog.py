"""The "Load model…" dialog: a folder, a recent model, or a Hugging Face id."""

from __future__ import annotations

from kobold_desktop.engine import LoadOptions
from kobold_desktop.qt._qt import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
)


class ModelDialog(QDialog):
    def __init__(self, recent: list[str], current: str = "", parent=None):
        super().__init__(parent)
        self.setWindowTitle("Load model")
        self.source = QLineEdit(current, self)
        self.source.setPlaceholderText("a model folder, or a Hugging Face id such as EleutherAI/pythia-160m")
        browse = QPushButton("Folder…", self)
        browse.clicked.connect(self.browse)
        row = QHBoxLayout()
        row.addWidget(self.source, 1)
        row.addWidget(browse)
        self.recent = QListWidget(self)
        self.recent.addItems(recent)
        self.recent.currentTextChanged.connect(self.source.setText)
        self.recent.itemDoubleClicked.connect(lambda *_: self.accept())
        self.device = QComboBox(self)
        self.device.addItems(["auto", "cuda", "mps", "cpu"])
        self.dtype = QComboBox(self)
        self.dtype.addItems(["auto", "bfloat16", "float16", "float32"])
        self.gpu_memory = QLineEdit(self)
        self.gpu_memory.setPlaceholderText("e.g. 6GiB: layers beyond it stay on the CPU (empty: all on the GPU)")
        self.trust = QCheckBox("Allow the model's own code to run (trust_remote_code; only for models you trust)", self)
        form = QFormLayout()
        form.addRow("Device", self.device)
        form.addRow("Precision", self.dtype)
        form.addRow("GPU memory limit", self.gpu_memory)
        form.addRow(self.trust)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Model folder or Hugging Face id"))
        layout.addLayout(row)
        layout.addWidget(QLabel("Recent models"))
        layout.addWidget(self.recent)
        layout.addLayout(form)
        layout.addWidget(buttons)
        self.resize(620, 420)

    def browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder", self.source.text())
        if folder:
            self.source.setText(folder)

    def choice(self) -> tuple[str, LoadOptions]:
        def auto(value: str) -> str | None:
            return None if value == "auto" else value

        return self.source.text().strip(), LoadOptions(
            device=auto(self.device.currentText()),
            dtype=auto(self.dtype.currentText()),
            max_gpu_memory=self.gpu_memory.text().strip() or None,
            trust_remote_code=self.trust.isChecked(),
        )
