"""The "Load model…" dialog: a folder, a GGUF file, a recent model, or a Hugging Face id."""

from __future__ import annotations

from kobold_desktop.engine import LoadOptions
from kobold_desktop.qt.accessible import name_controls
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
    QSpinBox,
    QVBoxLayout,
)


def recent_list(dialog: QDialog, items: list[str], target: QLineEdit, name: str) -> QListWidget:
    """Recent choices: one click fills `target`, a double click accepts."""
    recent = QListWidget(dialog)
    recent.setAccessibleName(name)
    recent.addItems(items)
    recent.currentTextChanged.connect(target.setText)
    recent.itemDoubleClicked.connect(lambda *_: dialog.accept())
    return recent


def ok_cancel(dialog: QDialog) -> QDialogButtonBox:
    buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, dialog)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    return buttons


class ModelDialog(QDialog):
    def __init__(self, recent: list[str], current: str = "", parent=None):
        super().__init__(parent)
        self.setWindowTitle("Load model")
        self.source = QLineEdit(current, self)
        self.source.setPlaceholderText("a model folder, a .gguf file, or a Hugging Face id such as "
                                       "EleutherAI/pythia-160m")
        self.source.setAccessibleName("Model folder, GGUF file or Hugging Face id")
        browse = QPushButton("Folder…", self)
        browse.clicked.connect(self.browse)
        browse_file = QPushButton("GGUF file…", self)
        browse_file.clicked.connect(self.browse_gguf)
        row = QHBoxLayout()
        row.addWidget(self.source, 1)
        row.addWidget(browse)
        row.addWidget(browse_file)
        self.recent = recent_list(self, recent, self.source, "Recent models")
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
        # GGUF files run with llama.cpp: its own settings (0 = choose)
        self.threads = self._spin(0, 256, "auto", "CPU threads for llama.cpp")
        self.context = self._spin(0, 1 << 20, "the model's, at most 4096", "Context size for GGUF models", step=512)
        self.gpu_layers = self._spin(-1, 999, "all when llama.cpp has a GPU", "Layers on the GPU for GGUF models")
        form.addRow("GGUF: CPU threads", self.threads)
        form.addRow("GGUF: context size", self.context)
        form.addRow("GGUF: layers on the GPU", self.gpu_layers)
        buttons = ok_cancel(self)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Model folder or Hugging Face id"))
        layout.addLayout(row)
        layout.addWidget(QLabel("Recent models"))
        layout.addWidget(self.recent)
        layout.addLayout(form)
        layout.addWidget(buttons)
        self.resize(620, 420)
        name_controls(self)  # every control has an accessible name

    def _spin(self, low: int, high: int, auto: str, name: str, step: int = 1) -> QSpinBox:
        spin = QSpinBox(self)
        spin.setRange(low, high)
        spin.setSingleStep(step)
        spin.setValue(low)
        spin.setSpecialValueText(auto)  # shown at the lowest value: let llama.cpp choose
        spin.setAccessibleName(name)
        return spin

    def browse_gguf(self) -> None:
        chosen, _ = QFileDialog.getOpenFileName(self, "Choose a GGUF model", self.source.text(),
                                                "GGUF models (*.gguf);;All files (*)")
        if chosen:
            self.source.setText(chosen)

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
            threads=self.threads.value() or None,
            context=self.context.value() or None,
            gpu_layers=None if self.gpu_layers.value() < 0 else self.gpu_layers.value(),
        )


class ConnectDialog(QDialog):
    """Model ▸ Connect to server…: the address of a KoboldAI- or OpenAI-compatible server
    (ours, KoboldCpp, vLLM, llama.cpp's server) and its API key, if it has one."""

    def __init__(self, recent: list[str], parent=None):
        super().__init__(parent)
        self.setWindowTitle("Connect to server")
        self.url = QLineEdit(recent[0] if recent else "http://127.0.0.1:2242", self)
        self.url.setPlaceholderText("http://127.0.0.1:2242 (Kobold Desktop), :5001 (KoboldCpp), :8000/v1 (vLLM)")
        self.url.setAccessibleName("Server address")
        self.key = QLineEdit(self)
        self.key.setEchoMode(QLineEdit.Password)
        self.key.setPlaceholderText("only if the server asks for one")
        self.key.setAccessibleName("API key")
        self.recent = recent_list(self, recent, self.url, "Recent servers")
        form = QFormLayout()
        form.addRow("Server address", self.url)
        form.addRow("API key", self.key)
        buttons = ok_cancel(self)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Write with a model on another server: its models are your soft prompt list."))
        layout.addLayout(form)
        layout.addWidget(QLabel("Recent servers"))
        layout.addWidget(self.recent)
        layout.addWidget(buttons)
        self.resize(560, 300)
        name_controls(self)

    def choice(self) -> tuple[str, str]:
        return self.url.text().strip(), self.key.text().strip()
