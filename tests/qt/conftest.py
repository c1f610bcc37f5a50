import pytest

from kobold_desktop.qt.main_window import MainWindow
from kobold_desktop.qt.worker import ModelWorker
from kobold_desktop.settings import Settings
from kobold_desktop.softprompt.library import SoftPromptLibrary

LOAD_TIMEOUT = 60_000


def make_window(qtbot, settings=None):
    settings = settings or Settings()
    library = SoftPromptLibrary(settings=settings, extra_folders=[])
    window = MainWindow(ModelWorker(), library, settings)
    # What the tests read, recorded through the window's hooks.
    window.notices = []
    window.noticed.connect(lambda title, text: window.notices.append((title, text)))
    window.last_result = None
    window.generation_done.connect(lambda result: setattr(window, "last_result", result))
    qtbot.addWidget(window)
    window.show()
    return window


@pytest.fixture
def bare_window(qtbot):
    return make_window(qtbot)


@pytest.fixture
def window(qtbot, model_dirs):
    win = make_window(qtbot)
    with qtbot.waitSignal(win.ready, timeout=LOAD_TIMEOUT):
        win.load_model(str(model_dirs["gpt2"]))
    # Short, deterministic generations for the tests.
    win.sampler_panel.max_new_tokens.setValue(12)
    win.sampler_panel.temperature.setValue(0)
    return win
