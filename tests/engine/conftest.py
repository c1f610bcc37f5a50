import pytest

from kobold_desktop.engine import Engine

from ..helpers import ARCHITECTURES, build_tiny_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def gpt2_engine(model_dirs):
    engine = Engine()
    engine.load(model_dirs["gpt2"])
    return engine


@pytest.fixture
def engine(gpt2_engine):
    gpt2_engine.set_softprompt(None)
    return gpt2_engine
