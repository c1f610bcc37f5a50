"""The local API server's life, seen from the window: Server ▸ Start and Stop.

Starting prepares every soft prompt that fits the model and binds a port; stopping ends
the server's threads. Both run on the server's own `JobRunner`, never on the GUI thread,
and the status bar says "starting…" and "stopping…" while they do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from kobold_desktop.qt._qt import QObject, Signal
from kobold_desktop.qt.jobs import JobRunner
from kobold_desktop.qt.window_state import ModelStatus

if TYPE_CHECKING:
    from kobold_desktop.qt.worker import ModelWorker
    from kobold_desktop.settings import Settings
    from kobold_desktop.softprompt.library import SoftPromptLibrary

Notify = Callable[..., None]  # (title, text, error=False): a notice for the user


def _serve(engine, library, model_name: str, hidden_size: int, port: int):
    """On the server's thread: the soft prompts that fit, the service, the HTTP server."""
    from kobold_desktop.server.config import ServeConfig
    from kobold_desktop.server.http import KoboldServer
    from kobold_desktop.server.library import library_adapters
    from kobold_desktop.server.service import Service

    config = ServeConfig()
    config.library_adapters = library_adapters(library, hidden_size, model_name, config.max_prompt_adapter_token)
    service = Service(engine, config)
    try:
        return KoboldServer(service, config.host, port).start(), [model_name, *service.adapters]
    except BaseException:
        service.close()
        raise


class ServerControl(QObject):
    changed = Signal()  # started, stopped, or on its way

    def __init__(self, parent: QObject, worker: "ModelWorker", library: "SoftPromptLibrary", settings: "Settings",
                 notify: Notify, model_status: Callable[[], ModelStatus | None]):
        super().__init__(parent)
        self.worker, self.library, self.settings = worker, library, settings
        self.notify, self.model_status = notify, model_status
        self.server = None  # a KoboldServer while the local API is running
        self.state = "stopped"  # "starting", "running", "stopping"
        self.runner = JobRunner("server", self)
        self.runner.returned.connect(self._on_returned)
        self.runner.errored.connect(self._on_errored)
        self.runner.finished.connect(self._on_finished)
        self._after_stop: list[Callable[[], None]] = []

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    @property
    def idle(self) -> bool:
        return self.state in ("stopped", "running") and not self.runner.busy

    def start(self, port: int | None = None) -> bool:
        """Start serving the loaded model; False (with a message) when it cannot start now."""
        if self.state != "stopped":
            return self.state in ("starting", "running")
        status = self.model_status()
        if status is None or status.remote:
            self.notify("No model", "Load a model before starting the server" + (
                " (it serves a local model; the window writes with another server now)." if status else "."), error=True)
            return False
        port = port if port is not None else int(self.settings.get("server.port", 2242))
        self.state = "starting"
        self.changed.emit()
        self.runner.submit("start", _serve, self.worker.engine, self.library, status.name, status.hidden_size, port)
        return True

    def stop(self, then: Callable[[], None] | None = None) -> None:
        """Stop serving; `then` runs on the GUI thread once it has stopped (at once if it was not running)."""
        if then is not None:
            self._after_stop.append(then)
        if self.state == "stopped" and not self.runner.busy:
            self._run_after_stop()
            return
        if self.state == "running":
            server, self.server = self.server, None
            self.state = "stopping"
            self.changed.emit()
            self.runner.submit("stop", server.stop)
        # "starting": the stop follows when the start has ended (see _on_finished)

    def _on_returned(self, job: str, value) -> None:
        if job == "start":
            self.server, models = value
            self.state = "running"
            self.changed.emit()  # with the state: whoever sees "running" sees the window say so
            self.notify("Server running", f"OpenAI API: {self.server.url}/v1\nKoboldAI API: "
                               f"{self.server.url}/api\nModels: {', '.join(models)}")

    def _on_errored(self, job: str, message: str) -> None:
        if job == "start":
            self.notify("Cannot start the server", message, error=True)
        else:
            self.notify("The server did not stop cleanly", message, error=True)

    def _on_finished(self, job: str) -> None:
        if job == "start" and self.state == "starting":
            self.state = "stopped"  # it failed
        elif job == "stop":
            self.state = "stopped"
        self.changed.emit()
        if self._after_stop:
            if self.state == "running":
                self.stop()
            elif self.state == "stopped" and not self.runner.busy:
                self._run_after_stop()

    def _run_after_stop(self) -> None:
        waiting, self._after_stop = self._after_stop, []
        for callback in waiting:
            callback()
