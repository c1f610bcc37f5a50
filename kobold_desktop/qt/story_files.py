"""Story files for the window: open, save, autosave, recovery after a crash, imports.

The controller reads and writes through `kobold_desktop.story.files` and shows what
happened through the window (`notify`, the status bar, `ask` for questions).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from kobold_desktop import paths
from kobold_desktop.fileio import atomic_write_bytes
from kobold_desktop.qt._qt import QFileDialog, QMessageBox, QObject, QTimer
from kobold_desktop.story import Story
from kobold_desktop.story.session import StorySession
from kobold_desktop.story.files import StoryFileError, load_story, read_story, read_world_info, save_story


class StoryHost(Protocol):
    """What story files need of the window (the `MainWindow` is one)."""

    session: StorySession

    def sync_story(self) -> None: ...  # take in the user's edits
    def show_story(self) -> None: ...  # show the session's story
    def flush_text(self) -> None: ...  # streamed text not yet in the session
    def update_title(self) -> None: ...
    def story_opened(self) -> None: ...  # the settings saved with the story come back
    def notify(self, title: str, text: str, error: bool = False) -> None: ...
    def remember(self, key: str, value: str) -> None: ...  # a recent file
    def _ask(self, box: QMessageBox) -> int: ...  # a question (tests answer in its place)
    def statusBar(self) -> Any: ...

AUTOSAVE_MS = 1500


def _running(pid) -> bool:
    """Whether another process with this id is alive (ours does not count)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class StoryFiles(QObject):
    def __init__(self, window: StoryHost):
        super().__init__(window)
        self.window = window
        self.path: Path | None = None  # the story's own file; None: untitled (autosave.json)
        self._session_open = False  # start_session() sets it; then autosaves record what is open
        self.autosave_timer = QTimer(self, singleShot=True, interval=AUTOSAVE_MS)
        self.autosave_timer.timeout.connect(self.autosave)

    @property
    def session(self):
        return self.window.session

    # -- asking before work is replaced -----------------------------------------------------

    def _has_unsaved_work(self) -> bool:
        """An untitled story with something in it. (A story with a file is autosaved into
        that file; only its last moments can be pending, and those are flushed.)"""
        self.window.sync_story()
        story = self.session.story
        return bool(story.text or story.memory or story.authors_note or story.world_info)

    def confirm_replace(self) -> bool:
        """Before New or Open replaces the story: keep the work, or ask. True to go on."""
        if self.path is not None:
            self.autosave_timer.stop()
            self.autosave()
            return True
        if not self._has_unsaved_work():
            return True
        box = QMessageBox(QMessageBox.Warning, "Unsaved story",
                          "This story has not been saved to a file. Save it before going on?",
                          QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, self.window)
        box.setDefaultButton(QMessageBox.Save)
        choice = self.window._ask(box)
        if choice == QMessageBox.Save:
            return self.save()
        return choice == QMessageBox.Discard

    # -- New, Open, Save --------------------------------------------------------------------

    def new_story(self) -> None:
        if self.session.generating or not self.confirm_replace():
            return
        self.session.replace(Story())
        self.path = None
        self.window.show_story()

    def open_story(self, path: Path | None = None, import_only: bool = False) -> None:
        if self.session.generating:
            return
        if path is None:
            title = "Import a KoboldAI story" if import_only else "Open a story"
            chosen, _ = QFileDialog.getOpenFileName(self.window, title, "", "Stories (*.json);;All files (*)")
            if not chosen:
                return
            path = Path(chosen)
        try:
            story, native, notices = read_story(path)  # read and checked whole, before anything is replaced
        except StoryFileError as exc:
            self.window.notify("Cannot open the story", str(exc), error=True)
            return
        if not self.confirm_replace():
            return
        if notices:
            self.window.notify("Imported", "\n".join(notices))
        is_ours = native and not import_only
        self.session.replace(story)
        self.path = path if is_ours else None  # an imported story is saved in our format, elsewhere
        if is_ours:
            self.window.remember("recent_stories", str(path))
        self.window.show_story()
        self.window.story_opened()

    def save(self) -> bool:
        if self.path is None:
            return self.save_as()
        return self._write(self.path)

    def save_as(self, path: Path | None = None) -> bool:
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(self.window, "Save story", self.session.story.title or "story.json",
                                                    "Stories (*.json)")
            if not chosen:
                return False
            path = Path(chosen)
        if path.suffix.lower() != ".json":
            path = path.with_suffix(".json")
        if self._write(path):
            self.path = path
            self.window.remember("recent_stories", str(path))
            self.window.update_title()
            return True
        return False

    def _write(self, path: Path) -> bool:
        if not self.session.generating:
            self.window.sync_story()
        try:
            save_story(self.session.story, path)
        except StoryFileError as exc:
            self.window.notify("Cannot save the story", str(exc), error=True)
            return False
        self.window.statusBar().showMessage(f"Saved {path.name}", 4000)
        return True

    # -- autosave ---------------------------------------------------------------------------

    def autosave_path(self) -> Path:
        return self.path or paths.user_data_dir() / "autosave.json"

    def autosave(self) -> None:
        """Save to the story's file (or the autosave file) after every change."""
        if self.session.generating:
            return
        self.window.sync_story()
        self._save_to(self.session.story)

    def save_now(self) -> None:
        """What was just written is on disk before anything else happens."""
        self.autosave_timer.stop()
        self.autosave()

    def _save_to(self, story: Story) -> None:
        path = self.autosave_path()
        try:
            save_story(story, path)
        except StoryFileError as exc:
            self.window.statusBar().showMessage(f"Autosave failed: {exc}", 10000)
            return
        if self._session_open:
            self._write_session_marker(path)

    def save_streamed(self) -> None:
        """Save the story with the text streamed so far (closing while the model writes)."""
        self.window.flush_text()
        self._save_to(self.session.streamed_copy())

    # -- recovery after a crash -------------------------------------------------------------

    def _session_marker(self) -> Path:
        """A file that exists while the window is open: found at start, it means a crash."""
        return paths.user_data_dir() / "session.json"

    def _write_session_marker(self, story_file: Path) -> None:
        try:
            atomic_write_bytes(self._session_marker(),
                               json.dumps({"story": str(story_file), "pid": os.getpid()}).encode("utf-8"))
        except OSError:
            pass  # recovery is a convenience; writing never fails for want of it

    def start_session(self, ask: bool = True) -> None:
        """Restore the last untitled story as the app left it; after a crash, offer the
        story that was open then (`ask=False`: restore without asking)."""
        marker = self._session_marker()
        autosave = paths.user_data_dir() / "autosave.json"
        previous = None
        if marker.is_file():
            try:
                recorded = json.loads(marker.read_text(encoding="utf-8"))
                previous = Path(recorded["story"])
                if _running(recorded.get("pid")):
                    previous = None  # another Kobold Desktop is open, not crashed
            except (OSError, ValueError, KeyError, TypeError):
                previous = autosave
        self._session_open = True
        if previous is not None and previous.is_file():
            restore = True
            if ask:
                box = QMessageBox(QMessageBox.Question, "Restore your story?",
                                  f"Kobold Desktop did not close properly last time. Restore “{previous.stem}” "
                                  "as it was last saved?", QMessageBox.Yes | QMessageBox.No, self.window)
                box.setDefaultButton(QMessageBox.Yes)
                restore = self.window._ask(box) == QMessageBox.Yes
            if restore:
                self._open_recovered(previous, autosave)
            elif previous == autosave:  # keep it, out of the way: nothing is ever thrown away
                autosave.replace(autosave.with_name(f"autosave-{time.strftime('%Y%m%d-%H%M%S')}.json"))
        elif autosave.is_file():
            self._open_recovered(autosave, autosave)
        self._write_session_marker(self.autosave_path())

    def _open_recovered(self, path: Path, autosave: Path) -> None:
        try:
            story = load_story(path)
        except StoryFileError:
            return
        self.session.replace(story)
        self.path = None if path == autosave else path
        self.window.show_story()
        self.window.story_opened()

    def end_session(self) -> None:
        self._session_open = False
        self._session_marker().unlink(missing_ok=True)

    # -- imports ----------------------------------------------------------------------------

    def import_world_info(self, path: Path | None = None) -> None:
        """Add World Info entries from a SillyTavern, KoboldAI Lite or KoboldAI file."""
        if path is None:
            chosen, _ = QFileDialog.getOpenFileName(self.window, "Import World Info", "",
                                                    "World Info (*.json);;All files (*)")
            if not chosen:
                return
            path = Path(chosen)
        try:
            entries = read_world_info(path)
        except StoryFileError as exc:
            self.window.notify("Cannot import World Info", str(exc), error=True)
            return
        self.window.sync_story()
        self.session.story.world_info.extend(entries)
        self.window.show_story()
        self.autosave()
        self.window.statusBar().showMessage(f"Imported {len(entries)} World Info entries from {path.name}", 6000)
