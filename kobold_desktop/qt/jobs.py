"""One runner for everything that must not run on the GUI thread.

A `JobRunner` runs jobs one at a time, in order, on one long-lived thread of its own (a
`QThreadPool` of one thread that never expires). Each job is a superqt `FunctionWorker`,
the field's well-kept version of the started / returned / errored / finished protocol;
the runner adds the job's name to each signal and turns an exception into a message a
user can act on. The model's runner is the only thread that touches the model.

superqt's workers are started here on the runner's own pool, never on Qt's global pool,
so that one thread owns the model for the life of the window.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

os.environ.setdefault("QT_API", "pyside6")  # superqt (through qtpy) must use our binding, not another one installed
from superqt.utils import FunctionWorker  # noqa: E402

from kobold_desktop.errors import KoboldError  # noqa: E402
from kobold_desktop.qt._qt import QObject, QThreadPool, Signal  # noqa: E402


def error_message(exc: BaseException) -> str:
    """What the user is told: our typed errors as they are, a bug with its type."""
    if isinstance(exc, KoboldError):
        return str(exc)
    traceback.print_exception(type(exc), exc, exc.__traceback__)  # a bug: log it, keep the app alive
    return f"Unexpected error ({type(exc).__name__}): {exc}"


def _emit(signal, *args) -> None:
    """Emit from the runner's thread; a runner deleted meanwhile (its window closed) hears nothing."""
    try:
        signal.emit(*args)
    except RuntimeError:
        pass


class JobRunner(QObject):
    started = Signal(str)  # the job's name, when its turn comes
    returned = Signal(str, object)  # the job's name and what its function returned
    errored = Signal(str, str)  # the job's name and a message for the user
    finished = Signal(str)  # the job's name, always last
    idle = Signal()  # nothing is queued or running any more
    _ended = Signal(object)  # a worker is done (internal: from the runner's thread)

    def __init__(self, name: str, parent: QObject | None = None):
        super().__init__(parent)
        self.name = name
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)
        self.pool.setExpiryTimeout(-1)  # the same thread for every job, for the life of the runner
        self._workers: list[FunctionWorker] = []  # queued or running (keeps them alive)
        self._ended.connect(self._on_ended)

    @property
    def busy(self) -> bool:
        return bool(self._workers)

    def submit(self, job: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FunctionWorker:
        """Queue `fn(*args, **kwargs)` under the name `job`; its signals come back to this thread."""
        worker = FunctionWorker(fn, *args, **kwargs)
        worker.job = job
        # These run in the runner's thread; they only emit this object's signals, which
        # reach their receivers on the GUI thread (queued), in the order they were emitted.
        worker.started.connect(lambda: _emit(self.started, job))
        worker.returned.connect(lambda value: _emit(self.returned, job, value))
        worker.errored.connect(lambda exc: _emit(self.errored, job, error_message(exc)))
        worker.signals._finished.connect(lambda done: _emit(self._ended, done))
        self._workers.append(worker)
        self.pool.start(worker)
        return worker

    def _on_ended(self, worker: FunctionWorker) -> None:
        """On the GUI thread: the job leaves the queue, then `finished`, then `idle`."""
        self._workers = [w for w in self._workers if w is not worker]
        self.finished.emit(worker.job)
        if not self._workers:
            self.idle.emit()
