import pytest

from kobold_desktop.engine import Engine

from ..helpers import FLOAT32

PATTERN = " dragon knight"


@pytest.fixture
def tune_engine(tune_model_dir):
    engine = Engine()
    engine.load(tune_model_dir, FLOAT32)
    return engine
