"""Starting the window: `kobold-desktop [--model M] [--softprompt S] [--dtype T] [--device D] [--screenshot PNG]`."""

from __future__ import annotations

import sys
from pathlib import Path

from kobold_desktop import APP_NAME, paths
from kobold_desktop.errors import KoboldError
from kobold_desktop.settings import Settings
from kobold_desktop.engine.loader import LoadOptions
from kobold_desktop.qt.window_state import WindowOptions
from kobold_desktop.softprompt.library import SoftPromptLibrary

SCREENSHOT_TIMEOUT_MS = 300_000


def startup_model(requested: str | None, settings: Settings) -> str | None:
    """The model to load at start: the one asked for, the last one used (a folder, a GGUF
    file or a Hugging Face id), or the starter model (`paths.starter_model`: SmolLM2 when
    installed, else the demo model)."""
    if requested:
        return requested
    last = settings.get("model.last")
    if isinstance(last, str) and (Path(last).exists() or not Path(last).is_absolute()):
        return last
    starter = paths.starter_model()
    return str(starter) if starter is not None else None


def startup_softprompt(requested: str | None, library: SoftPromptLibrary) -> Path | None:
    if requested:
        return library.resolve(requested)
    remembered = library.remembered_selection()
    return remembered.path if remembered else None


def run_window(options: WindowOptions) -> int:
    """The window, as the command line asked for it (`cli.window_options`)."""
    from kobold_desktop.qt.display import display_problem

    problem = display_problem()  # before Qt: a missing library would abort the process
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from kobold_desktop.qt._qt import QApplication, QEventLoop, QTimer
    from kobold_desktop.qt.main_window import MainWindow
    from kobold_desktop.qt.worker import ModelWorker

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    import gc

    gc.freeze()  # the libraries just imported live as long as the app: full collections skip them
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName(APP_NAME)
    app.setQuitOnLastWindowClosed(False)  # the window quits when its jobs have ended (MainWindow.closed)
    settings = Settings()
    library = SoftPromptLibrary(settings=settings)
    try:  # before the window (and its thread) exist, so a bad name exits cleanly
        softprompt = startup_softprompt(options.softprompt, library)
    except KoboldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    window = MainWindow(ModelWorker(), library, settings)
    window.closed.connect(app.quit)
    hints = app.styleHints()
    if hasattr(hints, "colorSchemeChanged"):  # Qt 6.5+: the desktop switched between light and dark
        hints.colorSchemeChanged.connect(window.follow_system_scheme)
    window.show()
    window.start_session(ask=not options.screenshot)
    model = startup_model(options.model, settings)
    screenshot = options.screenshot
    outcome = {"code": 0}

    if screenshot:
        def take_screenshot():
            QTimer.singleShot(300, lambda: _save_and_quit(window, Path(screenshot), outcome))

        window.ready.connect(take_screenshot)
        QTimer.singleShot(SCREENSHOT_TIMEOUT_MS, lambda: (outcome.update(code=1), app.quit()))
        if model is None:
            QTimer.singleShot(0, take_screenshot)
    if model is not None:
        window.load_model(model, options.load or LoadOptions(), softprompt=softprompt)
    elif not screenshot:
        window.statusBar().showMessage("No model yet: choose Model ▸ Load model…")
    app.exec()
    window.close()
    while not window.idle:  # a job that was running when the app quit: it was asked to stop
        app.processEvents(QEventLoop.AllEvents, 50)
    return outcome["code"]


def _save_and_quit(window, path: Path, outcome: dict) -> None:
    from kobold_desktop.qt._qt import QApplication

    path.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(path)):
        print(f"error: could not write the screenshot to {path}", file=sys.stderr)
        outcome["code"] = 1
    QApplication.instance().quit()
