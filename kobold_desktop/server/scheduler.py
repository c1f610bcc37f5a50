"""One thread that runs every server request on the model, batching continuously.

A request is checked when it is submitted (an impossible one is refused at once, in the
caller's thread) and joins the running batch at the next step, whatever soft prompt it
uses (a mixture joins as one row per member); a finished one leaves at once and its client hears at once (vLLM's scheduler does
the same). The engine's lock is held for one step at a time, so the window's own
generation and the server take turns on the model token by token.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections import deque
from typing import Callable, Iterator, Protocol, Sequence as Seq

from kobold_desktop.engine.active import Active
from kobold_desktop.engine.engine import Engine
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.generate import step_or_fail
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.sequence import GenerationResult, Request, StreamEvent

_DONE = object()


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl)
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give freed memory back to the system. glibc keeps what large request bodies, their
    text and tokens, and finished batches freed in its arenas: the server's resident size
    stayed a third above idle after a burst. malloc_trim returns it (a few ms)."""
    if _TRIM is not None:
        _TRIM(0)


class RequestStream:
    """The events of one request, as they come (an iterator, safe to read from any thread)."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self._events: queue.Queue = queue.Queue()

    def put(self, event) -> None:
        self._events.put(event)

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            event = self._events.get()
            if event is _DONE:
                return
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, GenerationResult):
                return

    def result(self) -> GenerationResult:
        final = None
        for event in self:
            if isinstance(event, GenerationResult):
                final = event
        assert final is not None
        return final


class Scheduler(Protocol):
    """Where the server's generation runs: the local model (`BatchScheduler`) or a vLLM
    server (`server.vllm.VllmScheduler`). Every route goes through `submit`."""

    supports_mixtures: bool  # mixtures run their members side by side: the local model only
    supports_logprobs: bool  # each token's log-probability and alternatives

    def submit(self, prompt_ids: Seq[int], softprompt: Active | None, settings: SamplingSettings,
               group: object = None, logprobs: int | None = None) -> "RequestStream":
        """Queue a request; raise a `KoboldError` at once for one that cannot run."""

    def stop(self) -> None:
        """Stop taking requests; the ones in flight end."""


class BatchScheduler:
    supports_mixtures = True
    supports_logprobs = True

    def __init__(self, engine: Engine, max_batch: int = 16, on_step: Callable[[int], None] | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self.on_step = on_step  # called with the rows in each step (tests and benchmarks watch the batches)
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="server-batches", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Seq[int], softprompt: Active | None,
               settings: SamplingSettings, group: object = None, logprobs: int | None = None) -> RequestStream:
        """Queue a request; raises `ModelError` at once for one that cannot run. Requests
        with the same `group` (the n copies of one client request) share its fair share."""
        stream = RequestStream(threading.Event())
        seq = self.engine.loaded.new_request(prompt_ids, softprompt, settings, stream.put, stream.cancel,
                                             logprobs=logprobs)
        if group is not None:
            seq.group = group
        self._queue.put(seq)
        return stream

    def _admit(self, core, waiting: deque) -> None:
        """Oldest first while the batch has room. Then fairness: while one client holds more
        than half the batch (a request with n: 16 takes every row), requests of clients with
        nothing running may join past `max_batch`, up to half as much again, so no one waits
        for the heavy client's rows to finish (there is no preempting a running row)."""
        core.admit(waiting, self.max_batch)
        if not waiting or not core.rows:
            return
        held: dict[object, int] = {}
        for seq in core.rows:
            group = seq.owner.group
            held[group] = held.get(group, 0) + 1
        if max(held.values()) <= self.max_batch // 2:
            return
        newcomers = deque(r for r in waiting if r.group not in held)
        if newcomers:
            core.admit(newcomers, self.max_batch + self.max_batch // 2)
            left = set(map(id, newcomers))
            kept = [r for r in waiting if r.group in held or id(r) in left]
            waiting.clear()
            waiting.extend(kept)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        waiting: deque[Request] = deque()
        core, loaded = None, None
        stopping = False
        worked = False
        while not stopping:
            idle = not waiting and (core is None or not core.active)
            if idle and worked:  # a burst just ended: hand its memory back before waiting
                release_memory()
                worked = False
            try:
                item = self._queue.get(block=idle)
                while True:
                    if item is None:
                        stopping = True
                        break
                    waiting.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                with self.engine.lock:
                    if core is None or not self.engine.is_loaded or self.engine.loaded is not loaded:
                        if core is not None:
                            core.fail_all(ModelError("the model was unloaded or replaced while generating."))
                        if not self.engine.is_loaded:
                            for seq in waiting:
                                seq.fail(ModelError("no model is loaded on the server."))
                            waiting.clear()
                            core = None
                            continue
                        loaded = self.engine.loaded
                        core = loaded.new_core(self.engine.prefix_cache, self.engine.context_shift)
                    self._admit(core, waiting)
                    if core.active:
                        worked = True
                        if self.on_step is not None:
                            self.on_step(len(core.rows))
                        try:
                            step_or_fail(core)
                        except Exception:  # noqa: BLE001 - every row in it heard; keep serving
                            traceback.print_exc()
            except Exception as exc:  # noqa: BLE001 - keep serving whatever happens
                traceback.print_exc()
                for seq in waiting:
                    seq.fail(exc)
                waiting.clear()
        for seq in waiting:
            seq.fail(ModelError("the server is stopping."))
        if core is not None:
            with self.engine.lock:
                core.close()
