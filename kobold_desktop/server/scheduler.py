"""One thread that runs every server request on the model, batching those that wait together.

Requests that arrive while a batch runs wait; the next batch takes all of them (up to
`max_batch`), whatever soft prompt each uses. The engine's lock is held per batch, so
the window's own generation and the server take turns on the model.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from kobold_desktop.engine import Engine, SamplingSettings
from kobold_desktop.engine.batch import BatchRequest, generate_batch
from kobold_desktop.engine.generate import GenerationResult, StreamEvent

_DONE = object()


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


@dataclass
class _Pending:
    prompt_ids: Sequence[int]
    softprompt: torch.Tensor | None
    settings: SamplingSettings
    stream: RequestStream


class BatchScheduler:
    def __init__(self, engine: Engine, max_batch: int = 16, gather_seconds: float = 0.025):
        self.engine = engine
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self.batch_sizes: list[int] = []  # for tests and benchmarks
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="server-batches", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], softprompt: torch.Tensor | None,
               settings: SamplingSettings) -> RequestStream:
        stream = RequestStream(threading.Event())
        self._queue.put(_Pending(list(prompt_ids), softprompt, settings, stream))
        return stream

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.gather_seconds
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Pending]) -> None:
        self.batch_sizes.append(len(batch))
        requests = [BatchRequest(p.prompt_ids, p.softprompt, p.settings, p.stream.put, p.stream.cancel) for p in batch]
        try:
            with self.engine.lock:
                loaded = self.engine.loaded
                generate_batch(loaded.model, loaded.tokenizer, requests)
        except Exception as exc:  # noqa: BLE001 - every waiting client must hear of it
            traceback.print_exc()
            for pending in batch:
                pending.stream.put(exc)
                pending.stream.put(_DONE)
