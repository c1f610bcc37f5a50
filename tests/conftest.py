import os

import pytest

from .helpers import ARCHITECTURES, build_tiny_model

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own data/config folders; no test touches the real user's."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("KOBOLD_DESKTOP_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random models of every architecture we support, saved with their tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tune_model_dir(tmp_path_factory):
    """Hidden size 64: big enough for a soft prompt to steer a random model clearly."""
    return build_tiny_model(tmp_path_factory.mktemp("tune") / "model", "gpt2", hidden=64)


def require_llama_cpp():
    """llama-cpp-python (the [gguf] extra), which `make test` installs: its absence fails
    the run there (KOBOLD_REQUIRE_GGUF=1) and skips the GGUF tests elsewhere."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("KOBOLD_REQUIRE_GGUF"):
            pytest.fail("llama-cpp-python is not installed; `make test` installs the [gguf] extra")
        pytest.skip("llama-cpp-python (the [gguf] extra) is not installed")


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory):
    """A tiny random Llama (hidden size 64, a BOS-adding byte-level BPE tokenizer), saved
    for transformers and converted by llama.cpp's converter to f32 and q8_0 GGUF files."""
    require_llama_cpp()
    from kobold_desktop.engine.llamacpp.convert import convert

    root = tmp_path_factory.mktemp("gguf")
    folder = build_tiny_model(root / "tiny-llama", "llama", hidden=64)
    return {"dir": folder, "f32": convert(folder, root / "tiny-llama-f32.gguf", "f32"),
            "q8_0": convert(folder, root / "tiny-llama-q8_0.gguf", "q8_0")}
