"""The window tells the truth at every moment and never waits on its own thread.
Each test here failed before the fix it names."""

import json
import threading

import torch
from PySide6.QtCore import Qt

from kobold_desktop import paths
from kobold_desktop.engine.generate import GenerationResult, TextChunk
from kobold_desktop.paths import user_softprompt_dir
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.story.files import load_story

from .conftest import LOAD_TIMEOUT
from .test_server_menu import call, serve, stop
from .test_window import drop, run_job


def on_gui_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def test_a_failed_model_switch_shows_that_no_model_is_loaded(qtbot, window, tmp_path):
    kobold_zip.write(user_softprompt_dir() / "sea.zip", torch.randn(4, 32), Metadata(name="Sea"))
    window.softprompt_panel.refresh()
    run_job(qtbot, window, lambda: window.choose_softprompt(user_softprompt_dir() / "sea.zip"))
    assert window.light.is_green and "gpt2" in window.model_label.text()
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with qtbot.waitSignal(window.ready, timeout=LOAD_TIMEOUT):
        window.load_model(str(broken))
    # The engine unloaded gpt2 before the new model failed: the window says so.
    assert not window.worker.engine.is_loaded
    assert window.model_status is None and window.model_label.text() == "No model loaded"
    assert not window.light.is_green and not window.status_light.is_green
    assert not window.submit_button.isEnabled() and not window.story_actions["submit"].isEnabled()
    assert window.notices[-1][0] == "Something went wrong"
    assert window.softprompt_panel.hidden_size is None


def test_a_softprompt_loaded_by_path_is_shown_in_the_list_and_the_details(qtbot, window, tmp_path):
    outside = tmp_path / "elsewhere" / "Far Away.zip"
    outside.parent.mkdir()
    kobold_zip.write(outside, torch.randn(4, 32), Metadata(name="Far Away", description="Not in any library."))
    panel = window.softprompt_panel
    run_job(qtbot, window, lambda: window.choose_softprompt(outside))
    assert window.light.is_green
    item = panel.list.currentItem()
    assert panel.selected_entry().path == outside  # not "[None]"
    assert item.text().startswith("Far Away (4 tokens)") and f"loaded from {outside.parent}" in item.text()
    assert item.font().bold()
    assert panel.details.text().startswith("Far Away\nNot in any library.")
    assert panel.unload_button.isEnabled()
    run_job(qtbot, window, lambda: qtbot.mouseClick(panel.unload_button, Qt.LeftButton))
    assert panel.selected_entry() is None and panel.list.currentItem().text() == "[None]"
    assert all("Far Away" not in panel.list.item(i).text() for i in range(panel.list.count()))


def test_a_softprompt_given_at_start_by_path_is_shown(qtbot, model_dirs, tmp_path):
    from .conftest import make_window

    outside = tmp_path / "start.zip"
    kobold_zip.write(outside, torch.randn(3, 32), Metadata(name="Given At Start"))
    window = make_window(qtbot)
    with qtbot.waitSignal(window.ready, timeout=LOAD_TIMEOUT):
        window.load_model(str(model_dirs["gpt2"]), softprompt=outside)
    qtbot.waitUntil(lambda: window.busy_job is None)
    assert window.light.is_green
    assert window.softprompt_panel.selected_entry().path == outside
    assert window.softprompt_panel.details.text().startswith("Given At Start")


def test_server_start_and_stop_run_off_the_gui_thread(qtbot, window, monkeypatch):
    from kobold_desktop.server import http

    threads = {}
    real_start, real_stop = http.KoboldServer.start, http.KoboldServer.stop

    def start(self):
        threads["start"] = on_gui_thread()
        return real_start(self)

    def stop_(self):
        threads["stop"] = on_gui_thread()
        return real_stop(self)

    monkeypatch.setattr(http.KoboldServer, "start", start)
    monkeypatch.setattr(http.KoboldServer, "stop", stop_)
    kobold_zip.write(user_softprompt_dir() / "sea.zip", torch.randn(4, 32), Metadata(name="Sea"))
    url = serve(qtbot, window)
    assert call(url, "GET", "/v1/models")[0] == 200
    window.stop_server()
    assert window.server_label.text() == "Server: stopping…" and not window.server_start_action.isEnabled()
    stop(qtbot, window)
    assert threads == {"start": False, "stop": False}
    assert window.server_start_action.isEnabled() and window.server_label.isHidden()


def test_loading_a_model_stops_the_server_first_off_the_gui_thread(qtbot, window, model_dirs):
    url = serve(qtbot, window)
    with qtbot.waitSignal(window.ready, timeout=LOAD_TIMEOUT):
        window.load_model(str(model_dirs["gpt2"]))
    assert window.server_control.state == "stopped" and window.server is None
    assert window.model_status is not None and url


def test_unload_runs_off_the_gui_thread_and_the_window_follows(qtbot, window, monkeypatch):
    engine = window.worker.engine
    real_unload = engine.unload
    seen = []

    def unload():
        seen.append(on_gui_thread())
        real_unload()

    monkeypatch.setattr(engine, "unload", unload)
    run_job(qtbot, window, window.unload_model)
    assert seen == [False]
    assert window.model_status is None and window.model_label.text() == "No model loaded"
    assert not window.submit_button.isEnabled()


def test_closing_while_the_model_is_busy_does_not_wait_on_the_gui_thread(qtbot, window, monkeypatch):
    gate = threading.Event()  # the job ends only when the test says so: closing must not wait for it

    def stream(prompt, settings, cancel=None, softprompt="active"):
        yield TextChunk(" a slow")
        gate.wait(60)
        yield GenerationResult(" a slow", "cancelled", len(prompt), 0, 1, 1.0)

    monkeypatch.setattr(window.worker.engine, "stream", stream)
    window.input.setPlainText("The tower")
    qtbot.mouseClick(window.submit_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: window.story.text.endswith(" a slow"))
    closed = []
    window.closed.connect(lambda: closed.append(True))
    window.close()  # returns at once, the job still running
    assert window.isHidden() and window.worker.busy and not closed
    assert load_story(paths.user_data_dir() / "autosave.json").text == "The tower a slow"  # saved at once
    gate.set()
    qtbot.waitUntil(lambda: bool(closed), timeout=60_000)
    assert not window.worker.busy
    assert not (paths.user_data_dir() / "session.json").exists()


def test_imports_run_off_the_gui_thread(qtbot, window, tmp_path, monkeypatch):
    seen = []
    real = window.library.import_paths

    def import_paths(sources):
        seen.append(on_gui_thread())
        return real(sources)

    monkeypatch.setattr(window.library, "import_paths", import_paths)
    zips = []
    for i in range(5):
        zips.append(tmp_path / f"sp{i}.zip")
        kobold_zip.write(zips[-1], torch.randn(2, 32), Metadata(name=f"Batch {i}"))
    drop(window, window.input, zips)
    assert seen == [False]
    assert sorted(p.name for p in user_softprompt_dir().iterdir()) == [f"sp{i}.zip" for i in range(5)]
    assert "Added Batch 4 (2 tokens) as sp4.zip" in window.notices[-1][1]
    assert json.loads(json.dumps(window.notices[-1]))  # plain text, shown in one dialog
