import pytest

from kobold_desktop.engine import Engine

from ..helpers import ARCHITECTURES, FLOAT32



@pytest.fixture(scope="session")
def gpt2_engine(model_dirs):
    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    return engine


@pytest.fixture
def engine(gpt2_engine):
    gpt2_engine.set_softprompt(None)
    return gpt2_engine


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_engine(request, model_dirs):
    """(architecture, engine) for each of the five tiny architectures, in float32."""
    engine = Engine()
    engine.load(model_dirs[request.param], FLOAT32)
    yield request.param, engine
    engine.unload()
