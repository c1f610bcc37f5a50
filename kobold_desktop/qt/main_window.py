"""The main window: the story, the input box, and the panels that steer the model.

The window never touches the model. It sends requests to the `ModelWorker`'s thread
through queued signals and reacts to the signals that come back. Streamed text is
buffered and drawn at most every 40 ms.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kobold_desktop import APP_NAME, paths
from kobold_desktop.engine import LoadOptions, SamplingSettings
from kobold_desktop.engine.generate import GenerationResult
from kobold_desktop.errors import KoboldError
from kobold_desktop.fileio import atomic_write_bytes
from kobold_desktop.qt._qt import (
    QAction,
    QApplication,
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QKeySequence,
    QLabel,
    QMainWindow,
    QMessageBox,
    QObject,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    Qt,
    QtCore,
    QTabWidget,
    QThread,
    QTimer,
    QVBoxLayout,
    QWidget,
    Signal,
)
from kobold_desktop.qt.editors import MemoryEditor, SamplerPanel, WorldInfoEditor
from kobold_desktop.qt.model_dialog import ModelDialog
from kobold_desktop.qt.mixture_dialogs import LearnWeightsDialog, MixtureDialog
from kobold_desktop.qt.softprompt_panel import SoftPromptPanel, StatusLight
from kobold_desktop.qt.story_view import StoryView
from kobold_desktop.qt.tune_dialog import TuneDialog, TuneRequest
from kobold_desktop.qt.worker import ModelStatus, ModelWorker, SoftPromptStatus
from kobold_desktop.settings import Settings
from kobold_desktop.softprompt import peft_dir
from kobold_desktop.softprompt.library import SoftPromptLibrary
from kobold_desktop.story import Action, Story
from kobold_desktop.story.document import MODEL, USER
from kobold_desktop.story.files import StoryFileError, load_story, read_story, read_world_info, save_story

RECENT_LIMIT = 10
FLUSH_MS = 40
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


def _copy(story: Story) -> Story:
    return Story.from_dict(story.to_dict())


class _DropFilter(QObject):
    """Catches files dropped anywhere on the window, whichever widget is under them."""

    def __init__(self, window: "MainWindow"):
        super().__init__(window)
        self.window = window

    def eventFilter(self, obj, event):
        kind = event.type()
        if kind in (QtCore.QEvent.DragEnter, QtCore.QEvent.DragMove, QtCore.QEvent.Drop):
            if isinstance(obj, QWidget) and obj.window() is self.window and event.mimeData().hasUrls():
                if kind == QtCore.QEvent.Drop:
                    self.window.handle_dropped_paths(
                        [Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()]
                    )
                event.acceptProposedAction()
                return True
        return False


class MainWindow(QMainWindow):
    request_load = Signal(str, object)
    request_softprompt = Signal(object)
    request_generate = Signal(object, object, int)
    request_tune = Signal(object)
    request_rank = Signal(object)
    ready = Signal()  # nothing is loading any more (start-up is over)

    def __init__(self, worker: ModelWorker, library: SoftPromptLibrary, settings: Settings):
        super().__init__()
        self.worker = worker
        self.library = library
        self.settings = settings
        self.story = Story()
        self.story_path: Path | None = None
        self.redo_stack: list[Action] = []
        self.generating_index: int | None = None
        self.busy_job: str | None = None
        self.model_status: ModelStatus | None = None
        self.softprompt_status: SoftPromptStatus | None = None
        self.pending_softprompt: Path | None = None
        self.last_result: GenerationResult | None = None
        self.notices: list[tuple[str, str]] = []
        self.tune_dialog: TuneDialog | None = None
        self.learn_dialog: LearnWeightsDialog | None = None
        worker.library_folders = list(library.folders)
        self.server = None  # a KoboldServer while the local API is running
        self._boxes: list[QMessageBox] = []
        self._session_open = False  # start_session() sets it; then autosaves record what is open
        self._pending_text = ""
        self._rendering = False

        self.thread = QThread(self)
        self.thread.setObjectName("model-worker")
        worker.moveToThread(self.thread)
        self.thread.start()

        self._build_ui()
        self._connect_worker()
        self._restore_settings()
        self.setAcceptDrops(True)
        self._drop_filter = _DropFilter(self)
        QApplication.instance().installEventFilter(self._drop_filter)
        self.update_actions()
        self.update_title()

    # -- building ------------------------------------------------------------------------

    def _build_ui(self) -> None:
        self.resize(1280, 820)
        self.view = StoryView(self)
        self.view.textChanged.connect(self._story_edited)
        self.view.paths_dropped.connect(self.handle_dropped_paths)
        self.input = QPlainTextEdit(self)
        self.input.setPlaceholderText("What happens next? (Ctrl+Enter submits; leave empty to let the model go on)")
        self.input.setMaximumHeight(110)
        self.submit_button = QPushButton("Submit", self)
        self.more_button = QPushButton("Generate more", self)
        self.stop_button = QPushButton("Stop", self)
        self.retry_button = QPushButton("Retry", self)
        self.undo_button = QPushButton("Undo", self)
        self.redo_button = QPushButton("Redo", self)
        self.submit_button.setDefault(True)
        buttons = QHBoxLayout()
        for button in (self.submit_button, self.more_button, self.stop_button, self.retry_button,
                       self.undo_button, self.redo_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        left = QWidget(self)
        left_layout = QVBoxLayout(left)
        left_layout.addWidget(self.view, 1)
        left_layout.addWidget(self.input)
        left_layout.addLayout(buttons)

        self.softprompt_panel = SoftPromptPanel(self.library, self)
        self.memory_editor = MemoryEditor(self)
        self.world_info_editor = WorldInfoEditor(self)
        self.sampler_panel = SamplerPanel(self)
        self.tabs = QTabWidget(self)
        self.tabs.addTab(self.softprompt_panel, "Soft prompts")
        self.tabs.addTab(self.memory_editor, "Memory")
        self.tabs.addTab(self.world_info_editor, "World Info")
        self.tabs.addTab(self.sampler_panel, "Settings")
        splitter = QSplitter(Qt.Horizontal, self)
        splitter.addWidget(left)
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        self.setCentralWidget(splitter)

        self.model_label = QLabel("No model loaded", self)
        self.progress = QProgressBar(self, minimum=0, maximum=100)
        self.progress.setMaximumWidth(220)
        self.progress.hide()
        status = self.statusBar()
        # The light is in the panel and, so it is seen from every tab, in the status bar.
        self.light = self.softprompt_panel.light
        self.status_light = StatusLight(self)
        self.server_label = QLabel(self)
        self.server_label.hide()
        status.addPermanentWidget(self.server_label)
        status.addPermanentWidget(self.progress)
        status.addPermanentWidget(self.status_light)
        status.addPermanentWidget(self.model_label)

        self.submit_button.clicked.connect(self.submit)
        self.more_button.clicked.connect(self.generate_more)
        self.stop_button.clicked.connect(self.stop)
        self.retry_button.clicked.connect(self.retry)
        self.undo_button.clicked.connect(self.undo)
        self.redo_button.clicked.connect(self.redo)
        submit_shortcut = QAction(self)
        submit_shortcut.setShortcuts([QKeySequence("Ctrl+Return"), QKeySequence("Ctrl+Enter")])
        submit_shortcut.triggered.connect(self.submit)
        self.addAction(submit_shortcut)
        self.softprompt_panel.load_requested.connect(self.choose_softprompt)
        self.memory_editor.changed.connect(self._story_edited)
        self.world_info_editor.changed.connect(self._story_edited)
        self.sampler_panel.changed.connect(lambda: self._settings_timer.start())

        self._flush_timer = QTimer(self, singleShot=True, interval=FLUSH_MS)
        self._flush_timer.timeout.connect(self.flush_text)
        self._autosave_timer = QTimer(self, singleShot=True, interval=AUTOSAVE_MS)
        self._autosave_timer.timeout.connect(self.autosave)
        self._settings_timer = QTimer(self, singleShot=True, interval=500)
        self._settings_timer.timeout.connect(self._save_sampler_settings)
        self._build_menus()

    def _build_menus(self) -> None:
        menu = self.menuBar().addMenu("&File")
        self._add(menu, "&New story", self.new_story, QKeySequence.New)
        self._add(menu, "&Open…", lambda: self.open_story(), QKeySequence.Open)
        self.recent_stories_menu = menu.addMenu("Open &recent")
        self._add(menu, "&Save", self.save, QKeySequence.Save)
        self._add(menu, "Save &as…", lambda: self.save_as(), QKeySequence.SaveAs)
        self._add(menu, "&Import KoboldAI story…", lambda: self.open_story(import_only=True))
        self._add(menu, "Import &World Info…", lambda: self.import_world_info())
        menu.addSeparator()
        self._add(menu, "&Quit", self.close, QKeySequence.Quit)
        menu = self.menuBar().addMenu("&Model")
        self._add(menu, "&Load model…", self.show_model_dialog)
        self.recent_models_menu = menu.addMenu("&Recent models")
        self._add(menu, "&Unload model", self.unload_model)
        menu = self.menuBar().addMenu("&Soft prompts")
        self._add(menu, "&Create soft prompt…", self.show_tune_dialog)
        self._add(menu, "&Import soft prompt…", self.import_softprompt_dialog)
        self._add(menu, "&Refresh", self.softprompt_panel.refresh)
        self._add(menu, "&Open folder", self.softprompt_panel.open_folder)
        menu = self.menuBar().addMenu("Se&rver")
        self.server_start_action = self._add(menu, "&Start server", self.start_server)
        self.server_stop_action = self._add(menu, "S&top server", self.stop_server)
        self.server_stop_action.setEnabled(False)
        menu = self.menuBar().addMenu("&Help")
        self._add(menu, "&About", self.about)
        self._rebuild_recent_menus()

    def _add(self, menu, text, slot, shortcut=None) -> QAction:
        action = menu.addAction(text)
        action.triggered.connect(lambda checked=False: slot())
        if shortcut is not None:
            action.setShortcut(shortcut)
        return action

    def _connect_worker(self) -> None:
        w = self.worker
        self.request_load.connect(w.load_model)
        self.request_softprompt.connect(w.set_softprompt)
        self.request_generate.connect(w.generate)
        self.request_tune.connect(w.tune)
        self.request_rank.connect(w.rank)
        w.rank_progress.connect(self.on_rank_progress)
        w.ranked.connect(self.on_ranked)
        w.mixture_weights.connect(self.softprompt_panel.show_live_weights)
        self.softprompt_panel.new_mixture_requested.connect(self.new_mixture_dialog)
        self.softprompt_panel.learn_weights_requested.connect(self.show_learn_dialog)
        w.tune_progress.connect(self.on_tune_progress)
        w.tuned.connect(self.on_tuned)
        w.started.connect(self.on_started)
        w.progress.connect(self.on_progress)
        w.model_loaded.connect(self.on_model_loaded)
        w.softprompt_changed.connect(self.on_softprompt_changed)
        w.chunk.connect(self.on_chunk)
        w.generated.connect(self.on_generation_done)
        w.cancelled.connect(self.on_generation_done)
        # Bound methods of this window, never lambdas: a lambda would run in the
        # worker's thread, and only the GUI thread may touch widgets.
        w.errored.connect(self.on_error)
        w.finished.connect(self.on_finished)

    # -- settings --------------------------------------------------------------------------

    def _restore_settings(self) -> None:
        stored = self.settings.get("sampler")
        if isinstance(stored, dict):
            try:
                self.sampler_panel.set_settings(SamplingSettings.from_dict(stored), stored.get("context_size"))
            except (KoboldError, TypeError, ValueError):
                pass  # a bad stored value: keep the defaults

    def _save_sampler_settings(self) -> None:
        try:
            data = self.sampler_panel.settings().to_dict()
        except KoboldError:
            return
        data["context_size"] = self.sampler_panel.context_size.value()
        self.settings.set("sampler", data)

    def _remember(self, key: str, value: str) -> None:
        items = [v for v in self.settings.get(key, []) if v != value]
        self.settings.set(key, [value] + items[: RECENT_LIMIT - 1])
        self._rebuild_recent_menus()

    def _rebuild_recent_menus(self) -> None:
        self.recent_stories_menu.clear()
        for path in self.settings.get("recent_stories", []):
            self._add(self.recent_stories_menu, path, lambda p=path: self.open_story(Path(p)))
        self.recent_models_menu.clear()
        for source in self.settings.get("recent_models", []):
            self._add(self.recent_models_menu, source, lambda s=source: self.load_model(s))

    # -- notices ---------------------------------------------------------------------------

    def notify(self, title: str, text: str, error: bool = False) -> None:
        """Tell the user something in a dialog that does not block the window."""
        self.notices.append((title, text))
        box = QMessageBox(QMessageBox.Warning if error else QMessageBox.Information, title, text,
                          QMessageBox.Ok, self)
        box.setModal(False)
        box.finished.connect(lambda *_: self._boxes.remove(box) if box in self._boxes else None)
        self._boxes.append(box)
        box.show()
        self.statusBar().showMessage(text.splitlines()[0], 8000)

    def about(self) -> None:
        from kobold_desktop import __version__

        self.notify(f"About {APP_NAME}", f"{APP_NAME} {__version__}\nWrite stories with a local language model "
                    "steered by soft prompts.")

    # -- state -----------------------------------------------------------------------------

    @property
    def generating(self) -> bool:
        return self.busy_job == "generate"

    def update_actions(self) -> None:
        idle = self.busy_job is None
        can_generate = idle and self.model_status is not None
        self.submit_button.setEnabled(can_generate)
        self.more_button.setEnabled(can_generate and bool(self.story.text))
        self.stop_button.setEnabled(self.generating)
        last = self.story.actions[-1] if self.story.actions else None
        self.retry_button.setEnabled(can_generate and last is not None and last.source == MODEL)
        self.undo_button.setEnabled(idle and bool(self.story.actions))
        self.redo_button.setEnabled(idle and bool(self.redo_stack))
        self.view.setReadOnly(self.generating)

    def update_title(self) -> None:
        name = self.story.title or (self.story_path.stem if self.story_path else "Untitled story")
        self.setWindowTitle(f"{name} — {APP_NAME}")

    def sync_story(self) -> None:
        """Take in the user's edits of the text and the editors."""
        self.story = self.view.to_story(self.story)
        self.memory_editor.apply(self.story)
        self.world_info_editor.apply(self.story)

    def show_story(self) -> None:
        self._rendering = True
        try:
            self.view.show_story(self.story)
            self.memory_editor.load(self.story)
            self.world_info_editor.load(self.story)
        finally:
            self._rendering = False
        self.update_actions()
        self.update_title()

    def _story_edited(self) -> None:
        if self._rendering or self.generating:
            return
        self._autosave_timer.start()
        QTimer.singleShot(0, self.update_actions)

    # -- writing ---------------------------------------------------------------------------

    def submit(self) -> None:
        if not self.submit_button.isEnabled():
            return
        self.sync_story()
        text = self.input.toPlainText()
        if text:
            if not self.story.text:
                self.story.prompt = text
            else:
                if not self.story.text[-1].isspace() and not text[0].isspace() and text[0].isalnum():
                    text = " " + text  # keep words apart, as KoboldAI does
                self.story.actions.append(Action(text, USER))
            self.redo_stack.clear()
            self.input.clear()
            self.show_story()
            self._autosave_timer.stop()
            self.autosave()  # what was just written is on disk before the model starts
        self.start_generation()

    def generate_more(self) -> None:
        self.sync_story()
        self.start_generation()

    def retry(self) -> None:
        self.sync_story()
        if self.story.actions and self.story.actions[-1].source == MODEL:
            self.story.actions.pop()
            self.show_story()
        self.start_generation()

    def undo(self) -> None:
        self.sync_story()
        if self.story.actions:
            self.redo_stack.append(self.story.actions.pop())
            self.show_story()
            self._autosave_timer.start()

    def redo(self) -> None:
        self.sync_story()
        if self.redo_stack:
            self.story.actions.append(self.redo_stack.pop())
            self.show_story()
            self._autosave_timer.start()

    def stop(self) -> None:
        self.worker.cancel_event.set()

    def start_generation(self) -> None:
        if self.model_status is None:
            self.notify("No model", "Load a model first (Model ▸ Load model…).", error=True)
            return
        if self.busy_job is not None:
            return
        try:
            settings = self.sampler_panel.settings()
        except KoboldError as exc:
            self.notify("Settings", str(exc), error=True)
            return
        request = _copy(self.story)
        self.story.actions.append(Action("", MODEL))
        self.generating_index = len(self.story.actions) - 1
        self.worker.cancel_event.clear()
        self.busy_job = "generate"  # set now, so a second click cannot queue another
        self.update_actions()
        self.request_generate.emit(request, settings, self.sampler_panel.context_size.value())

    def on_chunk(self, text: str) -> None:
        self._pending_text += text
        if not self._flush_timer.isActive():
            self._flush_timer.start()

    def flush_text(self) -> None:
        if not self._pending_text or self.generating_index is None:
            return
        text, self._pending_text = self._pending_text, ""
        self.story.actions[self.generating_index].text += text
        self._rendering = True
        try:
            self.view.append_piece(self.generating_index, MODEL, text)
        finally:
            self._rendering = False

    def on_generation_done(self, result: GenerationResult) -> None:
        self._flush_timer.stop()
        self.flush_text()
        self.last_result = result
        if self.generating_index is not None:
            action = self.story.actions[self.generating_index]
            if action.text != result.text:  # the stream and the result always agree; be safe
                action.text = result.text
                self.show_story()
        verb = {"cancelled": "Stopped", "stop": "Done (stop sequence)", "length": "Done"}[result.finish_reason]
        self.statusBar().showMessage(
            f"{verb}: {result.generated_tokens} tokens in {result.seconds:.1f} s "
            f"({result.tokens_per_second:.1f} tokens/s)", 10000)

    # -- worker signals -----------------------------------------------------------------------

    def on_error(self, message: str) -> None:
        self.notify("Something went wrong", message, error=True)

    def on_started(self, job: str) -> None:
        self.busy_job = job
        if job in ("load", "softprompt"):
            self.progress.setRange(0, 0 if job == "softprompt" else 100)
            self.progress.setValue(0)
            self.progress.show()
        self.update_actions()

    def on_progress(self, message: str, fraction: float) -> None:
        self.progress.setValue(int(fraction * 100))
        self.statusBar().showMessage(message)

    def on_finished(self, job: str) -> None:
        self.busy_job = None
        self.progress.hide()
        if job == "tune" and self.tune_dialog is not None:
            self.tune_dialog.set_running(False)
        if job == "rank" and self.learn_dialog is not None:
            self.learn_dialog.set_running(False)
        if job == "generate":
            self._flush_timer.stop()
            self.flush_text()
            if self.generating_index is not None and self.generating_index < len(self.story.actions):
                if not self.story.actions[self.generating_index].text:
                    del self.story.actions[self.generating_index]
            self.generating_index = None
            self._autosave_timer.stop()
            self.autosave()
        if job == "load" and self.model_status is not None and self.pending_softprompt is not None:
            path, self.pending_softprompt = self.pending_softprompt, None
            self.request_softprompt.emit(path)
            self.busy_job = "softprompt"
        self.update_actions()
        if self.busy_job is None:
            self.ready.emit()

    def on_model_loaded(self, status: ModelStatus) -> None:
        self.model_status = status
        self.model_label.setText(
            f"{status.name} · {status.device} · {status.dtype} · context {status.context_length}")
        self.softprompt_panel.set_model(status.hidden_size, status.name)
        self.sampler_panel.context_size.setMaximum(status.context_length)
        self.settings.set("model.last", status.source)
        self._remember("recent_models", status.source)
        self.statusBar().showMessage(f"Loaded {status.name}", 5000)

    def on_softprompt_changed(self, status: SoftPromptStatus | None) -> None:
        self.softprompt_status = status
        self.softprompt_panel.set_active(status)
        self.status_light.set_status(status)
        for warning in status.warnings if status else ():
            self.statusBar().showMessage(f"Soft prompt: {warning}", 10000)

    # -- model and soft prompts ----------------------------------------------------------------

    def show_model_dialog(self) -> None:
        dialog = ModelDialog(self.settings.get("recent_models", []),
                             self.model_status.source if self.model_status else "", self)
        if dialog.exec() == QDialog.Accepted:
            source, options = dialog.choice()
            if source:
                self.load_model(source, options)

    def load_model(self, source: str, options: LoadOptions = LoadOptions(), softprompt: Path | None = None) -> None:
        if self.busy_job is not None:
            self.notify("Busy", "Wait until the model has finished its current job.", error=True)
            return
        self.stop_server()  # it serves the model being replaced
        self.pending_softprompt = softprompt
        self.busy_job = "load"
        self.update_actions()
        self.request_load.emit(source, options)

    def unload_model(self) -> None:
        if self.busy_job is None and self.model_status is not None:
            self.stop_server()
            self.worker.engine.unload()  # the worker is idle, so nothing is using the model
            self.model_status = None
            self.model_label.setText("No model loaded")
            self.softprompt_panel.set_model(None, None)
            self.on_softprompt_changed(None)
            self.update_actions()

    def choose_softprompt(self, path: Path | None) -> None:
        if self.model_status is None:
            self.notify("No model", "Load a model before loading a soft prompt.", error=True)
            return
        if self.busy_job is not None:
            self.notify("Busy", "Wait until the model has finished its current job.", error=True)
            return
        entry = self.library.find(path) if path else None
        self.library.remember_selection(entry)
        self.busy_job = "softprompt"
        self.update_actions()
        self.request_softprompt.emit(path)

    def show_tune_dialog(self) -> TuneDialog:
        if self.tune_dialog is None:
            self.tune_dialog = TuneDialog(self)
            self.tune_dialog.start_requested.connect(self.start_tuning)
            self.tune_dialog.cancel_requested.connect(self.stop)
        self.tune_dialog.show()
        self.tune_dialog.raise_()
        return self.tune_dialog

    def start_tuning(self, request: TuneRequest) -> None:
        if self.model_status is None or self.busy_job is not None:
            message = "Load a model first." if self.model_status is None else "Wait until the model is free."
            self.tune_dialog.finish(message)
            return
        self.worker.cancel_event.clear()
        self.busy_job = "tune"
        self.update_actions()
        self.request_tune.emit(request)

    def on_tune_progress(self, progress) -> None:
        if self.tune_dialog is not None:
            self.tune_dialog.show_progress(progress)

    def on_tuned(self, path: Path | None, result) -> None:
        if path is None:
            message = (f"Cancelled at step {result.steps_done}. Start again with the same settings to go on "
                       "from there.")
        elif path.suffix == ".json":  # a mixture: its members and the mixture file
            losses = ""
            if result.mixture_held_out_loss is not None:
                losses = (f" Held-out loss {result.mixture_held_out_loss:.3f} with the mixture, "
                          f"{result.baseline_held_out_loss:.3f} without a soft prompt.")
            message = (f"Created the mixture {path.name} of {len(result.tensors)} soft prompts (weights "
                       f"{', '.join(f'{w:.0%}' for w in result.weights)}); it is selected, ready to Load.{losses}")
            self.softprompt_panel.refresh()
            self.softprompt_panel.select(path)
            self.tabs.setCurrentWidget(self.softprompt_panel)
        else:
            change = ""
            if result.held_out_loss is not None and result.baseline_held_out_loss:
                change = (f" Held-out loss {result.held_out_loss:.3f} with it, "
                          f"{result.baseline_held_out_loss:.3f} without.")
            message = f"Created {path.name}; it is selected in the Soft prompts panel, ready to Load.{change}"
            self.softprompt_panel.refresh()
            self.softprompt_panel.select(path)
            self.tabs.setCurrentWidget(self.softprompt_panel)
        if self.tune_dialog is not None:
            self.tune_dialog.finish(message)
        self.statusBar().showMessage(message, 10000)

    # -- mixtures ---------------------------------------------------------------------------------

    def new_mixture_dialog(self) -> MixtureDialog | None:
        entries = self.softprompt_panel.softprompt_entries()
        if not entries:
            self.notify("No soft prompts", "A mixture is made of soft prompts that fit the loaded model; "
                                           "add some first.", error=True)
            return None
        dialog = MixtureDialog(entries, self)
        dialog.accepted.connect(lambda: self.save_mixture(dialog.mixture()))
        dialog.open()
        return dialog

    def save_mixture(self, mixture) -> Path | None:
        """Write a mixture into the user's soft prompt folder (a new name, never over a file)."""
        from kobold_desktop.softprompt.mixture import write_mixture

        try:
            path = write_mixture(self.library.free_path(mixture.name, ".json"), mixture)
        except KoboldError as exc:
            self.notify("Mixture not saved", str(exc), error=True)
            return None
        self.softprompt_panel.refresh()
        self.softprompt_panel.select(path)
        self.tabs.setCurrentWidget(self.softprompt_panel)
        self.statusBar().showMessage(f"Saved the mixture {path.name}; Load it to write with it.", 10000)
        return path

    def show_learn_dialog(self) -> LearnWeightsDialog | None:
        entries = self.softprompt_panel.softprompt_entries()
        if self.model_status is None or not entries:
            self.notify("Learn weights", "Load a model and add soft prompts that fit it first.", error=True)
            return None
        self.sync_story()
        if self.learn_dialog is not None:
            self.learn_dialog.close()
        self.learn_dialog = LearnWeightsDialog(entries, self.story.text, self)
        self.learn_dialog.start_requested.connect(self.start_ranking)
        self.learn_dialog.cancel_requested.connect(self.stop)
        self.learn_dialog.save_requested.connect(self.save_mixture)
        self.learn_dialog.show()
        return self.learn_dialog

    def start_ranking(self, request) -> None:
        if self.model_status is None or self.busy_job is not None:
            self.learn_dialog.finish("Load a model first." if self.model_status is None else "Wait until the model is free.")
            return
        self.worker.cancel_event.clear()
        self.busy_job = "rank"
        self.update_actions()
        self.request_rank.emit(request)

    def on_rank_progress(self, fraction: float, what: str) -> None:
        if self.learn_dialog is not None:
            self.learn_dialog.show_progress(fraction, what)

    def on_ranked(self, ranking) -> None:
        if self.learn_dialog is not None:
            self.learn_dialog.show_ranking(ranking)

    def import_softprompt_dialog(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Import soft prompts", "",
                                                "Soft prompts (*.zip *.json);;All files (*)")
        if files:
            self.handle_dropped_paths([Path(f) for f in files])

    def handle_dropped_paths(self, dropped: list[Path]) -> None:
        """Validate each dropped file, copy the good ones into the user's folder, explain the rest.
        A dropped GGUF file is a model: it is loaded."""
        candidates, refused = [], []
        models = [path for path in dropped if path.is_file() and path.suffix.lower() == ".gguf"]
        for path in dropped:
            if path in models:
                continue
            if (path.is_dir() and peft_dir.is_peft_dir(path)) or (path.is_file() and path.suffix.lower() in (".zip", ".json")):
                candidates.append(path)
            else:
                refused.append(f"{path.name}: not a soft prompt; drop KoboldAI .zip files or PEFT adapter folders.")
        imported, rejected = self.library.import_paths(candidates)
        refused += [str(error) for error in rejected]
        self.softprompt_panel.refresh()
        if imported:
            self.softprompt_panel.select(imported[-1].path)
            self.tabs.setCurrentWidget(self.softprompt_panel)
        lines = [f"Added {e.name} ({'a mixture' if e.is_mixture else f'{e.softprompt.n_tokens} tokens'}) as "
                 f"{e.file_name}" for e in imported]
        lines += [f"Refused {reason}" for reason in refused]
        if lines:
            self.notify("Soft prompts", "\n".join(lines), error=bool(refused))
        if models:
            if len(models) > 1:
                self.notify("Models", f"Dropped {len(models)} GGUF files; loading {models[-1].name}.")
            self.load_model(str(models[-1]))

    # -- story files -----------------------------------------------------------------------------

    def _has_unsaved_work(self) -> bool:
        """An untitled story with something in it. (A story with a file is autosaved into
        that file; only its last moments can be pending, and those are flushed.)"""
        self.sync_story()
        story = self.story
        return bool(story.text or story.memory or story.authors_note or story.world_info)

    def _ask(self, box: QMessageBox) -> int:
        """Show a question and return the button chosen (tests answer in its place)."""
        return box.exec()

    def confirm_replace(self) -> bool:
        """Before New or Open replaces the story: keep the work, or ask. True to go on."""
        if self.story_path is not None:
            self._autosave_timer.stop()
            self.autosave()
            return True
        if not self._has_unsaved_work():
            return True
        box = QMessageBox(QMessageBox.Warning, "Unsaved story",
                          "This story has not been saved to a file. Save it before going on?",
                          QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, self)
        box.setDefaultButton(QMessageBox.Save)
        choice = self._ask(box)
        if choice == QMessageBox.Save:
            return self.save()
        return choice == QMessageBox.Discard

    def new_story(self) -> None:
        if self.generating or not self.confirm_replace():
            return
        self.story, self.story_path, self.redo_stack = Story(), None, []
        self.show_story()

    def open_story(self, path: Path | None = None, import_only: bool = False) -> None:
        if self.generating:
            return
        if path is None:
            title = "Import a KoboldAI story" if import_only else "Open a story"
            chosen, _ = QFileDialog.getOpenFileName(self, title, "", "Stories (*.json);;All files (*)")
            if not chosen:
                return
            path = Path(chosen)
        try:
            story, native, notices = read_story(path)  # read and checked whole, before anything is replaced
        except StoryFileError as exc:
            self.notify("Cannot open the story", str(exc), error=True)
            return
        if not self.confirm_replace():
            return
        if notices:
            self.notify("Imported", "\n".join(notices))
        is_ours = native and not import_only
        self.story, self.redo_stack = story, []
        self.story_path = path if is_ours else None  # an imported story is saved in our format, elsewhere
        if is_ours:
            self._remember("recent_stories", str(path))
        self.show_story()

    def save(self) -> bool:
        if self.story_path is None:
            return self.save_as()
        return self._write(self.story_path)

    def save_as(self, path: Path | None = None) -> bool:
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(self, "Save story", self.story.title or "story.json",
                                                    "Stories (*.json)")
            if not chosen:
                return False
            path = Path(chosen)
        if path.suffix.lower() != ".json":
            path = path.with_suffix(".json")
        if self._write(path):
            self.story_path = path
            self._remember("recent_stories", str(path))
            self.update_title()
            return True
        return False

    def _write(self, path: Path) -> bool:
        if not self.generating:
            self.sync_story()
        try:
            save_story(self.story, path)
        except StoryFileError as exc:
            self.notify("Cannot save the story", str(exc), error=True)
            return False
        self.statusBar().showMessage(f"Saved {path.name}", 4000)
        return True

    def autosave_path(self) -> Path:
        return self.story_path or paths.user_data_dir() / "autosave.json"

    def autosave(self) -> None:
        """Save to the story's file (or the autosave file) after every change."""
        if self.generating:
            return
        self.sync_story()
        self._save_to(self.story)

    def _save_to(self, story: Story) -> None:
        path = self.autosave_path()
        try:
            save_story(story, path)
        except StoryFileError as exc:
            self.statusBar().showMessage(f"Autosave failed: {exc}", 10000)
            return
        if self._session_open:
            self._write_session_marker(path)

    def save_streamed(self) -> None:
        """Save the story with the text streamed so far (closing while the model writes)."""
        self._flush_timer.stop()
        self.flush_text()
        story = _copy(self.story)
        if story.actions and not story.actions[-1].text:
            story.actions.pop()
        self._save_to(story)

    # A file that exists while the window is open: found at start, it means a crash.
    def _session_marker(self) -> Path:
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
                                  "as it was last saved?", QMessageBox.Yes | QMessageBox.No, self)
                box.setDefaultButton(QMessageBox.Yes)
                restore = self._ask(box) == QMessageBox.Yes
            if restore:
                self._open_recovered(previous, autosave)
            elif previous == autosave:  # keep it, out of the way: nothing is ever thrown away
                autosave.replace(autosave.with_name(f"autosave-{time.strftime('%Y%m%d-%H%M%S')}.json"))
        elif autosave.is_file():
            self._open_recovered(autosave, autosave)
        self._write_session_marker(self.autosave_path())

    def _open_recovered(self, path: Path, autosave: Path) -> None:
        try:
            self.story = load_story(path)
        except StoryFileError:
            return
        self.story_path = None if path == autosave else path
        self.show_story()

    def end_session(self) -> None:
        self._session_open = False
        self._session_marker().unlink(missing_ok=True)

    def import_world_info(self, path: Path | None = None) -> None:
        """Add World Info entries from a SillyTavern, KoboldAI Lite or KoboldAI file."""
        if path is None:
            chosen, _ = QFileDialog.getOpenFileName(self, "Import World Info", "", "World Info (*.json);;All files (*)")
            if not chosen:
                return
            path = Path(chosen)
        try:
            entries = read_world_info(path)
        except StoryFileError as exc:
            self.notify("Cannot import World Info", str(exc), error=True)
            return
        self.sync_story()
        self.story.world_info.extend(entries)
        self.show_story()
        self.autosave()
        self.statusBar().showMessage(f"Imported {len(entries)} World Info entries from {path.name}", 6000)

    # -- the local API server ------------------------------------------------------------------

    def start_server(self, port: int | None = None) -> str | None:
        """Serve the loaded model and every soft prompt that fits it (OpenAI and KoboldAI
        APIs on 127.0.0.1). The server shares the model with the window, taking turns."""
        from kobold_desktop.server.config import ServeConfig
        from kobold_desktop.server.http import KoboldServer
        from kobold_desktop.server.service import Service

        if self.server is not None:
            return self.server.url
        if self.model_status is None:
            self.notify("No model", "Load a model before starting the server.", error=True)
            return None
        config = ServeConfig(max_prompt_adapters=256)
        adapters: dict[str, str] = {}
        for entry in self.library.refresh():
            fits = entry.compatibility(self.model_status.hidden_size).ok
            if fits and entry.n_tokens <= config.max_prompt_adapter_token:
                name, counter = entry.name, 2
                while name in adapters or name == self.model_status.name:
                    name, counter = f"{entry.name} ({counter})", counter + 1
                adapters[name] = str(entry.path)
        config.prompt_adapters = adapters
        port = port if port is not None else int(self.settings.get("server.port", 2242))
        service = None
        try:
            service = Service(self.worker.engine, config)
            self.server = KoboldServer(service, config.host, port).start()
        except (OSError, KoboldError) as exc:
            if service is not None:
                service.close()
            self.notify("Cannot start the server", f"{exc}", error=True)
            return None
        self.server_start_action.setEnabled(False)
        self.server_stop_action.setEnabled(True)
        self.server_label.setText(f"Server: {self.server.url}")
        self.server_label.show()
        self.notify("Server running", f"OpenAI API: {self.server.url}/v1\nKoboldAI API: {self.server.url}/api\n"
                    f"Models: {', '.join([self.model_status.name, *adapters])}")
        return self.server.url

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.server_start_action.setEnabled(True)
        self.server_stop_action.setEnabled(False)
        self.server_label.hide()

    def closeEvent(self, event) -> None:
        self.stop_server()
        self.worker.cancel_event.set()
        if self.generating:
            self.save_streamed()
        else:
            self.autosave()
        self.end_session()
        QApplication.instance().removeEventFilter(self._drop_filter)
        self.thread.quit()
        self.thread.wait(30_000)
        super().closeEvent(event)

