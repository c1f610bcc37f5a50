"""Creating a soft prompt from the window."""

from PySide6.QtCore import Qt

from kobold_desktop.paths import user_softprompt_dir

from ..tuning.conftest import PATTERN
from .conftest import LOAD_TIMEOUT, make_window


def tune_window(qtbot, tune_model_dir):
    window = make_window(qtbot)
    with qtbot.waitSignal(window.ready, timeout=LOAD_TIMEOUT):
        window.load_model(str(tune_model_dir))
    return window


def test_create_softprompt_from_the_window(qtbot, tune_model_dir, tmp_path):
    window = tune_window(qtbot, tune_model_dir)
    data = tmp_path / "my writing.txt"
    data.write_text(PATTERN * 600)
    dialog = window.show_tune_dialog()
    dialog.add_paths([data])
    assert dialog.name.text() == "my writing"
    dialog.author.setText("Me")
    dialog.tokens.setValue(8)
    dialog.steps.setValue(50)
    dialog.lr.setValue(0.1)
    qtbot.mouseClick(dialog.start_button, Qt.LeftButton)
    assert window.busy_job == "tune" and not window.submit_button.isEnabled()
    qtbot.waitUntil(lambda: window.busy_job is None, timeout=120_000)
    assert (user_softprompt_dir() / "my writing.zip").exists()
    entry = window.softprompt_panel.selected_entry()
    assert entry.file_name == "my writing.zip" and entry.softprompt.authors == ("Me",)
    assert window.tabs.currentWidget() is window.softprompt_panel
    assert len(dialog.plot.train) == 50 and dialog.plot.held and dialog.plot.baseline
    assert dialog.progress.value() == 100 and "Created my writing.zip" in dialog.status.text()
    assert dialog.start_button.isEnabled() and not dialog.cancel_button.isEnabled()


def test_cancel_tuning_keeps_the_window_usable(qtbot, tune_model_dir, tmp_path):
    window = tune_window(qtbot, tune_model_dir)
    data = tmp_path / "long.txt"
    data.write_text(PATTERN * 600)
    dialog = window.show_tune_dialog()
    dialog.add_paths([data])
    dialog.steps.setValue(100_000)
    window.worker.tune_progress.connect(lambda p: p.step == 3 and window.worker.cancel_event.set())
    qtbot.mouseClick(dialog.start_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: window.busy_job is None, timeout=120_000)
    assert "Cancelled at step" in dialog.status.text()
    assert list(user_softprompt_dir().glob("*.zip")) == []
    assert window.submit_button.isEnabled()


def test_start_without_files_explains(qtbot, tune_model_dir):
    window = tune_window(qtbot, tune_model_dir)
    dialog = window.show_tune_dialog()
    qtbot.mouseClick(dialog.start_button, Qt.LeftButton)
    assert "add at least one file" in dialog.status.text() and window.busy_job is None
