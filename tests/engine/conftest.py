import pytest

from kobold_desktop.engine import Engine

from ..helpers import FLOAT32



@pytest.fixture(scope="session")
def gpt2_engine(model_dirs):
    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    return engine


@pytest.fixture
def engine(gpt2_engine):
    gpt2_engine.set_softprompt(None)
    return gpt2_engine
