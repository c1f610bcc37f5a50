"""Work is never lost: autosave at submit, save on close while streaming, a question before
New or Open replaces unsaved work, and recovery after a crash."""

import json

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

from kobold_desktop import paths
from kobold_desktop.story import Action, Story, WorldInfoEntry
from kobold_desktop.story.files import load_story, save_story

from .conftest import make_window

GEN_TIMEOUT = 60_000


def autosaved():
    return load_story(paths.user_data_dir() / "autosave.json")


def answer(window, button, asked=None):
    """Answer the window's next questions with `button`, recording their texts."""
    def reply(box):
        if asked is not None:
            asked.append(box.text())
        return button
    window._ask = reply


def write_story(window, qtbot, text="Once upon a time"):
    window.input.setPlainText(text)
    window.sync_story()
    window.story.prompt = text
    window.show_story()


def test_submit_saves_the_new_text_before_the_model_writes(qtbot, window):
    window.sampler_panel.max_new_tokens.setValue(200)
    started = []
    window.worker.chunk.connect(lambda _text: started.append(True))
    window.input.setPlainText("The dragon woke")
    qtbot.mouseClick(window.submit_button, Qt.LeftButton)
    assert window.busy_job == "generate" and not started  # the model has not written yet
    assert autosaved().prompt == "The dragon woke"
    window.stop()
    qtbot.waitUntil(lambda: window.busy_job is None, timeout=GEN_TIMEOUT)
    assert autosaved().text == window.story.text  # and the result is saved as soon as it ends


def test_closing_while_the_model_writes_saves_what_has_streamed(qtbot, window):
    window.sampler_panel.max_new_tokens.setValue(200)
    window.input.setPlainText("The knight")
    qtbot.mouseClick(window.submit_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: len(window.story.text) > len("The knight") + 5 or window.busy_job is None,
                    timeout=GEN_TIMEOUT)
    window._flush_timer.stop()
    window.flush_text()
    streamed = window.story.text
    assert window.busy_job == "generate" and len(streamed) > len("The knight")
    window.close()
    saved = autosaved()
    assert saved.text.startswith(streamed) and saved.prompt == "The knight"
    assert not (paths.user_data_dir() / "session.json").exists()  # a clean close


def test_new_with_unsaved_work_asks_save_discard_or_cancel(qtbot, bare_window, tmp_path, monkeypatch):
    window = bare_window
    write_story(window, qtbot)
    asked = []
    answer(window, QMessageBox.Cancel, asked)
    window.new_story()
    assert window.story.prompt == "Once upon a time" and "not been saved" in asked[0]

    target = tmp_path / "kept.json"
    monkeypatch.setattr("kobold_desktop.qt.main_window.QFileDialog.getSaveFileName",
                        lambda *a, **k: (str(target), ""))
    answer(window, QMessageBox.Save)
    window.new_story()
    assert load_story(target).prompt == "Once upon a time" and window.story == Story()

    write_story(window, qtbot, "Another tale")
    window.story_path = None
    answer(window, QMessageBox.Discard)
    window.new_story()
    assert window.story == Story()


def test_save_cancelled_in_its_file_dialog_keeps_the_story(qtbot, bare_window, monkeypatch):
    window = bare_window
    write_story(window, qtbot)
    monkeypatch.setattr("kobold_desktop.qt.main_window.QFileDialog.getSaveFileName", lambda *a, **k: ("", ""))
    answer(window, QMessageBox.Save)
    window.new_story()
    assert window.story.prompt == "Once upon a time"


def test_open_asks_too_and_a_titled_story_is_flushed_into_its_file(qtbot, bare_window, tmp_path):
    window = bare_window
    other = tmp_path / "other.json"
    save_story(Story(prompt="Other"), other)
    write_story(window, qtbot)
    answer(window, QMessageBox.Cancel)
    window.open_story(other)
    assert window.story.prompt == "Once upon a time"

    mine = tmp_path / "mine.json"
    assert window.save_as(mine)
    window.story.memory = "edited a moment ago"  # not yet autosaved
    window.memory_editor.load(window.story)
    answer(window, QMessageBox.Cancel)  # must not be asked: it has a file
    window.open_story(other)
    assert window.story.prompt == "Other"
    assert load_story(mine).memory == "edited a moment ago"


def test_a_bad_story_file_changes_nothing(qtbot, bare_window, tmp_path):
    window = bare_window
    write_story(window, qtbot)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "kobold-desktop-story", "version": "x", "prompt": None}))
    boxes = []
    window.notify = lambda title, text, error=False: boxes.append(text)
    answer(window, QMessageBox.Discard)
    window.open_story(bad)
    assert window.story.prompt == "Once upon a time" and "not a number" in boxes[0]


def crashed_session(story: Story):
    save_story(story, paths.user_data_dir() / "autosave.json")
    marker = paths.user_data_dir() / "session.json"
    marker.write_text(json.dumps({"story": str(paths.user_data_dir() / "autosave.json"), "pid": 999_999_999}))


def test_after_a_crash_the_autosave_is_offered_and_restored(qtbot):
    crashed_session(Story(prompt="Before the crash", actions=[Action(" it rained.")]))
    window = make_window(qtbot)
    asked = []
    answer(window, QMessageBox.Yes, asked)
    window.start_session()
    assert "did not close properly" in asked[0]
    assert window.story.text == "Before the crash it rained."
    assert json.loads((paths.user_data_dir() / "session.json").read_text())["pid"] > 0  # this session now


def test_declining_the_restore_keeps_the_autosave_aside(qtbot):
    crashed_session(Story(prompt="Keep me"))
    window = make_window(qtbot)
    answer(window, QMessageBox.No)
    window.start_session()
    assert window.story == Story()
    kept = list(paths.user_data_dir().glob("autosave-*.json"))
    assert len(kept) == 1 and load_story(kept[0]).prompt == "Keep me"


def test_a_clean_start_restores_without_asking(qtbot):
    save_story(Story(prompt="Where I left off"), paths.user_data_dir() / "autosave.json")
    window = make_window(qtbot)
    asked = []
    answer(window, QMessageBox.No, asked)
    window.start_session()
    assert asked == [] and window.story.prompt == "Where I left off"


def test_import_world_info_from_sillytavern(qtbot, bare_window, tmp_path):
    window = bare_window
    path = tmp_path / "lorebook.json"
    path.write_text(json.dumps({"entries": {"0": {"uid": 0, "key": ["dragon"], "keysecondary": [], "comment": "D",
                                                  "content": "Dragons hoard gold.", "constant": False,
                                                  "disable": False, "order": 100}}}))
    window.import_world_info(path)
    assert window.story.world_info == [WorldInfoEntry(["dragon"], "Dragons hoard gold.", comment="D")]
    window.sync_story()  # the editor shows it: taking the editor's state back keeps it
    assert window.story.world_info[0].content == "Dragons hoard gold."
