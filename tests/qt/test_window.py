"""The window, driven through its real widgets (pytest-qt, offscreen)."""

import json
import threading

import torch
from PySide6.QtCore import QMimeData, QPoint, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from kobold_desktop.paths import user_softprompt_dir
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.story import Story

from .conftest import LOAD_TIMEOUT, make_window

GEN_TIMEOUT = 60_000


def run_job(qtbot, window, clicker, timeout=GEN_TIMEOUT):
    """Start a job and wait until the window has handled its end. (pytest-qt's
    waitSignal would fire in the worker's thread, before the window's queued slots.)"""
    clicker()
    assert window.busy_job is not None
    qtbot.waitUntil(lambda: window.busy_job is None, timeout=timeout)


def generate(qtbot, window, clicker):
    window.last_result = None
    run_job(qtbot, window, clicker)
    return window.last_result


def drop(window, widget, paths):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    enter = QDragEnterEvent(QPoint(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted()
    event = QDropEvent(QPoint(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(widget, event)
    wait_for(lambda: not window.importing)  # imports run off the GUI thread


def wait_for(condition, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        QApplication.processEvents()
        time.sleep(0.005)


def test_model_status_in_the_status_bar(window):
    import torch

    from kobold_desktop.engine.device import choose_dtype

    label = window.model_label.text()
    dtype = str(choose_dtype(torch.device("cpu"))).removeprefix("torch.")  # bfloat16 on CPUs that have it
    assert "gpt2" in label and "cpu" in label and dtype in label and "context 256" in label
    assert window.submit_button.isEnabled()
    assert window.sampler_panel.context_size.maximum() == 256


def test_load_softprompt_turns_the_light_green(qtbot, window):
    kobold_zip.write(user_softprompt_dir() / "sea.zip", torch.randn(5, 32), Metadata(name="Sea Shanties"))
    panel = window.softprompt_panel
    panel.refresh()
    assert not window.light.is_green and window.light.label.text() == "No soft prompt active"
    panel.select(user_softprompt_dir() / "sea.zip")
    assert panel.list.currentItem().text().startswith("Sea Shanties (5 tokens)")
    run_job(qtbot, window, lambda: qtbot.mouseClick(panel.load_button, Qt.LeftButton))
    assert window.light.is_green
    assert window.light.label.text() == "Active soft prompt (5 tokens): Sea Shanties"
    assert window.worker.engine.softprompt.n_tokens == 5
    assert window.library.remembered_selection().file_name == "sea.zip"
    run_job(qtbot, window, lambda: qtbot.mouseClick(panel.unload_button, Qt.LeftButton))
    assert not window.light.is_green and window.light.label.text() == "No soft prompt active"


def test_light_stays_grey_when_the_engine_refuses(qtbot, window, tmp_path):
    path = user_softprompt_dir() / "nan.zip"
    tensor = torch.randn(3, 32)
    tensor[1, 1] = float("nan")
    kobold_zip.write(path, tensor, Metadata(name="Broken"))  # listing reads headers: it looks fine
    window.softprompt_panel.refresh()
    window.softprompt_panel.select(path)
    run_job(qtbot, window, lambda: qtbot.mouseClick(window.softprompt_panel.load_button, Qt.LeftButton))
    assert not window.light.is_green
    assert "NaN" in window.notices[-1][1]


def test_softprompts_that_do_not_fit_are_greyed_with_the_reason(window):
    kobold_zip.write(user_softprompt_dir() / "wide.zip", torch.randn(4, 64), Metadata(name="Wide"))
    window.softprompt_panel.refresh()
    window.softprompt_panel.select(user_softprompt_dir() / "wide.zip")
    item = window.softprompt_panel.list.currentItem()
    assert "does not fit: made for a model with hidden size 64; this model has 32" in item.text()
    assert not window.softprompt_panel.load_button.isEnabled()


def test_drop_valid_and_invalid_zips_anywhere(qtbot, window, tmp_path):
    good = tmp_path / "Good One.zip"
    kobold_zip.write(good, torch.randn(6, 32), Metadata(name="Good"))
    bad = tmp_path / "bad.zip"
    bad.write_text("not a zip")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    drop(window, window.input, [good, bad, notes])
    names = [window.softprompt_panel.list.item(i).text() for i in range(window.softprompt_panel.list.count())]
    assert any(n.startswith("Good (6 tokens)\nGood One.zip") for n in names)
    assert not any("bad.zip" in n for n in names)
    title, text = window.notices[-1]
    assert "Added Good (6 tokens) as Good One.zip" in text
    assert "Refused bad.zip: is not a zip file" in text
    assert "Refused notes.txt: not a soft prompt" in text
    assert sorted(p.name for p in user_softprompt_dir().iterdir()) == ["Good One.zip"]
    assert (user_softprompt_dir() / "Good One.zip").read_bytes() == good.read_bytes()  # copied, not extracted
    drop(window, window.view.viewport(), [good])  # the story view hands files to the window too
    assert (user_softprompt_dir() / "Good One (2).zip").exists()
    assert window.view.toPlainText() == ""


def test_submit_streams_text_into_the_view(qtbot, window):
    chunks = []
    window.worker.chunk.connect(chunks.append)
    qtbot.keyClicks(window.input, "Once upon a time")
    result = generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    assert result.finish_reason in ("length", "stop") and result.generated_tokens > 0
    assert len(chunks) > 1
    assert window.view.toPlainText() == "Once upon a time" + result.text
    assert window.story.prompt == "Once upon a time"
    assert [a.source for a in window.story.actions] == ["model"]
    assert window.input.toPlainText() == ""


def test_generation_runs_on_the_worker_thread_and_the_window_stays_responsive(qtbot, window, monkeypatch):
    engine = window.worker.engine
    real_stream = engine.stream
    threads, ticks = [], []

    def recording_stream(*args, **kwargs):
        threads.append(threading.current_thread().name)
        yield from real_stream(*args, **kwargs)

    monkeypatch.setattr(engine, "stream", recording_stream)
    timer = window.startTimer(5)
    window.timerEvent = lambda event: ticks.append(1)
    window.sampler_panel.max_new_tokens.setValue(200)  # long enough to span many 5 ms ticks
    qtbot.keyClicks(window.input, "The knight")
    generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    window.killTimer(timer)
    assert threads and threads[0] != threading.main_thread().name
    assert len(ticks) > 3  # the GUI thread kept handling events while the model worked


def test_stop_cancels_at_once(qtbot, window):
    window.sampler_panel.max_new_tokens.setValue(200)
    # Runs on the worker's thread (a plain callable): only set the event, touch no widget.
    window.worker.chunk.connect(lambda _text: window.worker.cancel_event.set())
    qtbot.keyClicks(window.input, "The dragon")
    result = generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    assert result.finish_reason == "cancelled"
    assert result.generated_tokens < 200
    assert window.view.toPlainText() == "The dragon" + result.text
    assert window.submit_button.isEnabled() and not window.stop_button.isEnabled()


def test_undo_redo_retry(qtbot, window):
    qtbot.keyClicks(window.input, "In the beginning")
    first = generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    full_text = window.view.toPlainText()
    qtbot.mouseClick(window.undo_button, Qt.LeftButton)
    assert window.view.toPlainText() == "In the beginning" and window.story.actions == []
    qtbot.mouseClick(window.redo_button, Qt.LeftButton)
    assert window.view.toPlainText() == full_text
    retried = generate(qtbot, window, lambda: qtbot.mouseClick(window.retry_button, Qt.LeftButton))
    assert len(window.story.actions) == 1  # replaced, not added
    assert retried.text == first.text  # greedy: the same continuation again
    window.sampler_panel.temperature.setValue(1.5)
    window.sampler_panel.seed.setValue(7)
    generate(qtbot, window, lambda: qtbot.mouseClick(window.more_button, Qt.LeftButton))
    assert len(window.story.actions) == 2


def test_user_edits_in_the_view_are_kept(qtbot, window):
    qtbot.keyClicks(window.input, "Once")
    generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    window.view.moveCursor(window.view.textCursor().MoveOperation.End)
    qtbot.keyClicks(window.view, " EDITED")
    window.sync_story()
    assert window.story.text.endswith(" EDITED")
    window.view.moveCursor(window.view.textCursor().MoveOperation.Start)
    qtbot.keyClicks(window.view, "Long ago. ")
    window.sync_story()
    assert window.story.prompt.startswith("Long ago. Once")


def test_save_and_reopen_a_story(qtbot, window, tmp_path):
    qtbot.keyClicks(window.input, "A tale")
    generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    window.memory_editor.memory.setPlainText("The hero is brave.")
    window.world_info_editor.add_entry()
    qtbot.keyClicks(window.world_info_editor.keys, "dragon, wyrm")
    window.world_info_editor.content.setPlainText("Dragons hoard gold.")
    text = window.view.toPlainText()
    assert window.save_as(tmp_path / "tale")
    assert (tmp_path / "tale.json").exists()
    window.new_story()
    assert window.view.toPlainText() == ""
    window.open_story(tmp_path / "tale.json")
    assert window.view.toPlainText() == text
    assert window.memory_editor.memory.toPlainText() == "The hero is brave."
    assert window.story.world_info[0].keys == ["dragon", "wyrm"]
    assert window.story_path == tmp_path / "tale.json"
    assert str(tmp_path / "tale.json") in window.settings.get("recent_stories")


def test_autosave_writes_the_story_file(qtbot, window, tmp_path):
    window.save_as(tmp_path / "auto.json")
    qtbot.keyClicks(window.input, "Autosaved words")
    generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    window.autosave()
    saved = json.loads((tmp_path / "auto.json").read_text())
    assert saved["prompt"] == "Autosaved words" and saved["actions"]


def test_import_a_koboldai_story(qtbot, window, tmp_path):
    kobold = {"gamestarted": True, "prompt": "You are a knight.", "memory": "Sir Bors.", "authorsnote": "grim",
              "anotetemplate": "[Author's note: <|>]", "actions": [" You draw.", " It wakes."],
              "worldinfo": [{"key": "dragon", "keysecondary": "", "content": "Old.", "comment": "",
                             "folder": None, "selective": False, "constant": True}]}
    path = tmp_path / "knight.json"
    path.write_text(json.dumps(kobold))
    window.open_story(path, import_only=True)
    assert window.view.toPlainText() == "You are a knight. You draw. It wakes."
    assert window.memory_editor.memory.toPlainText() == "Sir Bors."
    assert window.memory_editor.note.toPlainText() == "grim"
    assert window.world_info_editor.list.count() == 1
    assert window.story_path is None  # saving will not overwrite KoboldAI's file
    generate(qtbot, window, lambda: qtbot.mouseClick(window.more_button, Qt.LeftButton))
    assert len(window.story.actions) == 3


def test_settings_and_softprompt_are_remembered_across_restarts(qtbot, window, model_dirs):
    kobold_zip.write(user_softprompt_dir() / "keep.zip", torch.randn(3, 32), Metadata(name="Keep"))
    window.softprompt_panel.refresh()
    window.softprompt_panel.select(user_softprompt_dir() / "keep.zip")
    run_job(qtbot, window, window.softprompt_panel.request_load)
    window.sampler_panel.top_k.setValue(33)
    window._save_sampler_settings()
    window.close()

    from kobold_desktop.qt.app import startup_model, startup_softprompt
    from kobold_desktop.settings import Settings

    again = make_window(qtbot, Settings())
    assert again.sampler_panel.top_k.value() == 33
    model = startup_model(None, again.settings)
    softprompt = startup_softprompt(None, again.library)
    assert model == str(model_dirs["gpt2"]) and softprompt.name == "keep.zip"
    with qtbot.waitSignal(again.ready, timeout=LOAD_TIMEOUT):
        again.load_model(model, softprompt=softprompt)
    assert again.light.is_green and again.light.label.text() == "Active soft prompt (3 tokens): Keep"


def test_reset_restores_default_settings(window):
    window.sampler_panel.top_p.setValue(0.5)
    window.sampler_panel.reset()
    assert window.sampler_panel.settings() == type(window.sampler_panel.settings())()


def test_bad_model_shows_an_error_and_keeps_working(qtbot, bare_window, tmp_path):
    with qtbot.waitSignal(bare_window.ready, timeout=LOAD_TIMEOUT):
        bare_window.load_model(str(tmp_path / "no-model-here"))
    assert "no model folder" in bare_window.notices[-1][1]
    assert bare_window.model_status is None and not bare_window.submit_button.isEnabled()


def test_author_note_and_memory_reach_the_model(qtbot, window, monkeypatch):
    seen = {}
    from kobold_desktop.qt import worker as worker_module

    real = worker_module.build_context

    def spy(story, tokenizer, budget):
        built = real(story, tokenizer, budget)
        seen["text"] = tokenizer.decode(built.ids)
        return built

    monkeypatch.setattr(worker_module, "build_context", spy)
    window.memory_editor.memory.setPlainText("MEMORY LINE")
    window.memory_editor.note.setPlainText("NOTE")
    window.memory_editor.depth.setValue(0)
    qtbot.keyClicks(window.input, "Story start.")
    generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    assert seen["text"] == "MEMORY LINE\nStory start.\n[Author's note: NOTE]\n"
    assert isinstance(window.story, Story)


def test_worker_signals_are_handled_on_the_gui_thread(qtbot, model_dirs):
    from kobold_desktop.qt.main_window import MainWindow

    seen = []

    class Recording(MainWindow):
        def _record(self, name):
            seen.append((name, threading.current_thread() is threading.main_thread()))

        def on_started(self, job):
            self._record("started")
            super().on_started(job)

        def on_model_loaded(self, status):
            self._record("model_loaded")
            super().on_model_loaded(status)

        def on_chunk(self, text):
            self._record("chunk")
            super().on_chunk(text)

        def on_error(self, message):
            self._record("error")
            super().on_error(message)

        def on_finished(self, job):
            self._record("finished")
            super().on_finished(job)

    from kobold_desktop.qt.worker import ModelWorker
    from kobold_desktop.settings import Settings
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    settings = Settings()
    window = Recording(ModelWorker(), SoftPromptLibrary(settings=settings, extra_folders=[]), settings)
    qtbot.addWidget(window)
    with qtbot.waitSignal(window.ready, timeout=LOAD_TIMEOUT):
        window.load_model(str(model_dirs["gpt2"]))
    window.sampler_panel.max_new_tokens.setValue(5)
    qtbot.keyClicks(window.input, "Hi")
    generate(qtbot, window, window.submit)
    run_job(qtbot, window, lambda: window.load_model("/no/such/model"))
    names = {name for name, _ in seen}
    assert {"started", "model_loaded", "chunk", "error", "finished"} <= names
    assert all(on_gui for _, on_gui in seen)


def test_status_bar_light_and_selection_follow_the_engine(qtbot, window):
    kobold_zip.write(user_softprompt_dir() / "a.zip", torch.randn(2, 32), Metadata(name="Alpha"))
    panel = window.softprompt_panel
    panel.refresh()
    panel.select(user_softprompt_dir() / "a.zip")
    run_job(qtbot, window, panel.request_load)
    assert window.status_light.is_green and window.status_light.label.text() == window.light.label.text()
    panel.list.setCurrentRow(0)  # the user looks at [None] ...
    window.on_softprompt_changed(window.softprompt_status)  # ... the active one is shown again
    assert panel.selected_entry().file_name == "a.zip" and panel.list.currentItem().font().bold()


def test_dropping_a_zipped_peft_adapter_imports_it(qtbot, window, tmp_path):
    """A PEFT adapter folder zipped by a file manager, tokenizer files and all."""
    import zipfile

    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    source = window.worker.engine.loaded.source
    folder = tmp_path / "tavern-adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(source),
                   PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)).save_pretrained(folder)
    window.worker.engine.loaded.tokenizer.save_pretrained(folder)
    zipped = tmp_path / "tavern-adapter.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, f"{folder.name}/{file.name}")
    drop(window, window.view.viewport(), [zipped])
    assert (user_softprompt_dir() / "tavern-adapter.zip").read_bytes() == zipped.read_bytes()
    names = [window.softprompt_panel.list.item(i).text() for i in range(window.softprompt_panel.list.count())]
    assert any("tavern-adapter" in name for name in names), names
