"""The window's context shift setting: off by default, saved with the settings, said not to
apply on a model that cannot shift, and when on, a turn where the story's oldest block went
reuses the cache by shifting it, which the status bar says."""

from kobold_desktop.qt._qt import Qt
from kobold_desktop.qt.editors import SamplerPanel

from .conftest import LOAD_TIMEOUT
from .test_window import generate


def test_the_setting_is_off_by_default_and_travels_with_the_settings(qtbot):
    panel = SamplerPanel()
    qtbot.addWidget(panel)
    assert not panel.context_shift.isChecked()
    panel.context_shift.setChecked(True)
    data = panel.to_dict()
    assert data["context_shift"] is True
    panel.reset()
    assert not panel.context_shift.isChecked()
    panel.set_dict(data)
    assert panel.context_shift.isChecked()


def test_a_model_that_cannot_shift_says_so(window):
    assert "Not with this model: context shift supports" in window.sampler_panel.context_shift.toolTip()


def test_past_the_context_a_turn_shifts_the_cache_and_the_status_bar_says_so(qtbot, bare_window, model_dirs):
    window = bare_window
    with qtbot.waitSignal(window.ready, timeout=LOAD_TIMEOUT):
        window.load_model(str(model_dirs["llama"]))  # a RoPE model: it can shift
    assert "Not with this model" not in window.sampler_panel.context_shift.toolTip()
    panel = window.sampler_panel
    panel.max_new_tokens.setValue(40)
    panel.temperature.setValue(0)
    panel.context_size.setValue(256)
    panel.context_shift.setChecked(True)
    window.input.setPlainText("Once upon a time, in a land of rivers and hills, a knight set out. " * 12)
    said = []
    generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    for _ in range(6):  # each turn adds 40 tokens: a block (a quarter of the room) goes every turn or two
        said.append(window.statusBar().currentMessage())
        if "cache shifted" in said[-1]:
            break
        generate(qtbot, window, lambda: qtbot.mouseClick(window.more_button, Qt.LeftButton))
    assert any("story trimmed by" in s and "cache shifted" in s for s in said), said
    assert window.worker.engine.context_shift
