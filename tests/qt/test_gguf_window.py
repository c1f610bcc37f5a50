"""The window on a GGUF model: dropped onto the window or chosen in the model dialog, with
soft prompts greyed by the GGUF's width, the green light and streaming as for any model."""

import torch
from PySide6.QtCore import Qt

from kobold_desktop.engine import Engine, LoadOptions, SamplingSettings
from kobold_desktop.paths import user_softprompt_dir
from kobold_desktop.qt.model_dialog import ModelDialog
from kobold_desktop.softprompt import Metadata, kobold_zip

from .conftest import LOAD_TIMEOUT, make_window
from .test_window import drop, generate, run_job


def test_a_dropped_gguf_loads_and_writes_with_a_soft_prompt(qtbot, gguf_model):
    torch.manual_seed(2)
    kobold_zip.write(user_softprompt_dir() / "sea.zip", torch.randn(5, 64) * 0.5, Metadata(name="Sea"))
    kobold_zip.write(user_softprompt_dir() / "narrow.zip", torch.randn(5, 32), Metadata(name="Narrow"))
    window = make_window(qtbot)
    with qtbot.waitSignal(window.ready, timeout=LOAD_TIMEOUT):
        drop(window, window.input, [gguf_model["q8_0"]])
    assert window.worker.engine.loaded.backend == "llama.cpp"
    label = window.model_label.text()
    assert "llama.cpp" in label and "Q8_0" in label and "context 256" in label
    panel = window.softprompt_panel
    panel.refresh()
    panel.select(user_softprompt_dir() / "narrow.zip")
    assert "does not fit: made for a model with hidden size 32; this model has 64" in panel.list.currentItem().text()
    assert not panel.load_button.isEnabled()
    panel.select(user_softprompt_dir() / "sea.zip")
    run_job(qtbot, window, lambda: qtbot.mouseClick(panel.load_button, Qt.LeftButton))
    assert window.light.is_green and window.light.label.text() == "Active soft prompt (5 tokens): Sea"
    window.sampler_panel.max_new_tokens.setValue(12)
    window.sampler_panel.temperature.setValue(0)
    window.sampler_panel.repetition_penalty.setValue(1.0)
    qtbot.keyClicks(window.input, "Once upon a time")
    result = generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    assert window.view.toPlainText() == "Once upon a time" + result.text
    engine = Engine()
    engine.load(gguf_model["q8_0"])
    want = engine.generate("Once upon a time", SamplingSettings(max_new_tokens=12, temperature=0,
                                                                repetition_penalty=1.0),
                           softprompt=engine.prepare_softprompts([user_softprompt_dir() / "sea.zip"]))
    assert result.token_ids == want.token_ids


def test_the_model_dialog_takes_a_gguf_and_its_llamacpp_settings(qtbot, gguf_model):
    dialog = ModelDialog([], "")
    qtbot.addWidget(dialog)
    dialog.source.setText(str(gguf_model["f32"]))
    assert dialog.threads.text() == "auto" and dialog.gpu_layers.text() == "all when llama.cpp has a GPU"
    dialog.threads.setValue(1)
    dialog.context.setValue(128)
    dialog.gpu_layers.setValue(0)
    source, options = dialog.choice()
    assert source == str(gguf_model["f32"])
    assert options == LoadOptions(threads=1, context=128, gpu_layers=0)


def test_create_softprompt_on_a_loaded_gguf(qtbot, gguf_model, tmp_path):
    """The Create dialog works with a GGUF loaded: its weights are dequantized for training
    (said in the status bar first), and the soft prompt made is made for that file."""
    from kobold_desktop.softprompt.io import describe_softprompt

    from ..tuning.conftest import PATTERN

    window = make_window(qtbot)
    with qtbot.waitSignal(window.ready, timeout=60_000):
        window.load_model(str(gguf_model["q8_0"]))
    data = tmp_path / "gguf writing.txt"
    data.write_text(PATTERN * 300)
    dialog = window.show_tune_dialog()
    assert "which cannot train" in dialog.status.text() and "of memory with training" in dialog.status.text()
    dialog.add_paths([data])
    dialog.tokens.setValue(4)
    dialog.steps.setValue(10)
    messages = []
    window.worker.progress.connect(lambda message, fraction: messages.append(message))
    qtbot.mouseClick(dialog.start_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: window.busy_job is None, timeout=120_000)
    made = user_softprompt_dir() / "gguf writing.zip"
    assert made.exists(), window.notices
    assert any("for training" in m for m in messages)
    assert describe_softprompt(made).made_for == window.worker.engine.loaded.fingerprint
    assert window.worker.engine.loaded.backend == "llama.cpp"  # still writing with llama.cpp
