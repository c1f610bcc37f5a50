"""`serve --backend vllm` on the command line, where no vLLM is installed."""

import shutil
import sys

import pytest

from kobold_desktop.cli import main


def test_without_vllm_the_message_says_how_to_install_it(model_dirs, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None or shutil.which("vllm"):
        pytest.skip("vLLM is installed here")
    assert main(["serve", str(model_dirs["llama"]), "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "pip install vllm" in err and "--backend-url" in err
    assert main(["serve", str(model_dirs["llama"]), "--backend", "vllm", "--vllm-python", sys.executable]) == 2
    assert "vLLM is not installed" in capsys.readouterr().err


def test_a_backend_url_needs_the_vllm_backend(model_dirs, capsys):
    assert main(["serve", str(model_dirs["llama"]), "--backend-url", "http://127.0.0.1:9/v1"]) == 2
    assert "add --backend vllm" in capsys.readouterr().err


def test_a_gguf_file_cannot_go_to_vllm(tmp_path, capsys):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    assert main(["serve", str(model), "--backend", "vllm", "--backend-url", "http://127.0.0.1:9/v1"]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
