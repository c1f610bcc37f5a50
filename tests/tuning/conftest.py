import pytest

from kobold_desktop.engine import Engine

from ..helpers import build_tiny_model

PATTERN = " dragon knight"


@pytest.fixture(scope="session")
def tune_model_dir(tmp_path_factory):
    """Hidden size 64: big enough for a soft prompt to steer a random model clearly."""
    return build_tiny_model(tmp_path_factory.mktemp("tune") / "model", "gpt2", hidden=64)


@pytest.fixture
def tune_engine(tune_model_dir):
    engine = Engine()
    engine.load(tune_model_dir)
    return engine
