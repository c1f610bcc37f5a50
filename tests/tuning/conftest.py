import pytest

from kobold_desktop.engine import Engine

PATTERN = " dragon knight"


@pytest.fixture
def tune_engine(tune_model_dir):
    engine = Engine()
    engine.load(tune_model_dir)
    return engine
