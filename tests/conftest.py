import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own data/config folders; no test touches the real user's."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("KOBOLD_DESKTOP_HOME", str(home))
    return home
