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
