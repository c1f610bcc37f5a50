"""Driving the stepping core: one request as a stream of events, or many run together.

Generation is layered: the core picks the next token of every row, each request's
`Continuation` turns its tokens into text chunks, and a stream ends with one
`GenerationResult`. The drivers here (and the server's `BatchScheduler`, which admits
requests while it steps) share one failure policy, `step_or_fail`: a forward pass that
raises fails every request in the batch with that error, and the batch is emptied.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterator, Sequence as Seq

from kobold_desktop.engine.core import BaseCore
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.sequence import (  # noqa: F401 - the public names of this layer
    FinishReason,
    GenerationResult,
    Request,
    StreamEvent,
    TextChunk,
)


def step_or_fail(core: BaseCore) -> None:
    """One step of every row; when the model itself fails, every request in the batch hears
    of it (its sink gets the exception), the batch is emptied, and the error is raised."""
    try:
        core.step()
    except BaseException as exc:
        core.fail_all(exc if isinstance(exc, Exception) else ModelError("stopped"))
        raise


def _drain(events: list) -> Iterator[StreamEvent]:
    while events:
        event = events.pop(0)
        if isinstance(event, BaseException):
            raise event
        yield event


def stream_request(
    core: BaseCore,
    request: Request,
    events: list,
    *,
    lock: AbstractContextManager | None = None,
    check: Callable[[], None] | None = None,
) -> Iterator[StreamEvent]:
    """Run one request (a sequence or a mixture) whose sink appends to `events`, and yield
    what it reports: text chunks, then its result.

    `lock` is held for each step, never across a `yield`: a consumer that stops reading
    keeps nothing locked, and closing the stream ends the request (its cache is kept for
    reuse). `check` runs under the lock before each step (the engine uses it to make sure
    the model is still the one this stream started on)."""
    lock = lock if lock is not None else nullcontext()
    check = check or (lambda: None)
    try:
        with lock:
            check()
            core.add(request)
        yield from _drain(events)
        while core.active:
            with lock:
                check()
                step_or_fail(core)
            yield from _drain(events)
    except GeneratorExit:  # the consumer went away: end the request, keep its work for reuse
        with lock:
            try:
                check()
            except Exception:  # noqa: BLE001 - the model is gone: nothing to keep
                core.fail_all(RuntimeError("abandoned"))
            else:
                core.close()
        raise
    except BaseException:
        core.fail_all(RuntimeError("failed"))
        raise


def run_requests(core: BaseCore, requests: Seq[Request], max_batch: int, *,
                 lock: AbstractContextManager | None = None, check: Callable[[], None] | None = None) -> None:
    """Run `requests` together until every one has ended (rows join as others leave), each
    reporting to its own sink. On a failure every request still waiting hears of it too."""
    lock = lock if lock is not None else nullcontext()
    check = check or (lambda: None)
    waiting = list(requests)
    try:
        while waiting or core.active:
            with lock:
                check()
                core.admit(waiting, max_batch)
                if core.active:
                    step_or_fail(core)
    except BaseException as exc:
        core.fail_all(exc if isinstance(exc, Exception) else ModelError("stopped"))
        for request in waiting:
            request.fail(exc)
        raise


def collect(events: Iterator[StreamEvent]) -> GenerationResult:
    """The result at the end of a stream."""
    result = None
    for event in events:
        if isinstance(event, GenerationResult):
            result = event
    assert result is not None, "a stream always ends with a result"
    return result
