"""Generation in three layers over the stepping core: tokens -> text chunks -> one result.

`generate_step` yields token ids for one sequence, the soft prompt's rows placed before
every prompt token (before BOS) exactly as PEFT's prompt tuning does. `stream_generate`
turns them into text chunks, applying stop sequences, EOS and cancellation.
`generate` collects the stream into a `GenerationResult`. All three run `StepCore`,
the one loop there is; the server runs the same core with many sequences.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterator, Sequence as Seq

import torch

from kobold_desktop.engine.core import BaseCore, StepCore
from kobold_desktop.engine.prefix_cache import PrefixCache
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.sequence import (  # noqa: F401 - the public names of this layer
    CancelCriteria,
    Continuation,
    GenerationResult,
    Request,
    Sequence,
    StreamEvent,
    TextChunk,
    eos_token_ids,
)


def generate_step(
    model: Any,
    prompt_ids: torch.Tensor | Seq[int],
    softprompt: torch.Tensor | None,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    prefix_cache: PrefixCache | None = None,
) -> Iterator[int]:
    """Yield token ids forever; the caller decides when to stop.

    `softprompt` is [v, hidden] on the model's input device, or None. The next forward
    pass runs only when the caller asks for the next token, so stopping wastes nothing.
    """
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    core = StepCore(model, prefix_cache)
    core.add(Sequence(prompt_ids, softprompt, settings, generator=generator))
    try:
        while True:
            for _, token in core.step():
                yield token
    finally:
        core.close()


def _drain(events: list) -> Iterator[StreamEvent]:
    while events:
        event = events.pop(0)
        if isinstance(event, BaseException):
            raise event
        yield event


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Seq[int],
    softprompt: torch.Tensor | None,
    settings: SamplingSettings,
    cancel: threading.Event | None = None,
    *,
    prefix_cache: PrefixCache | None = None,
    lock: AbstractContextManager | None = None,
    check: Callable[[], None] | None = None,
    softprompt_key: str | None = None,
) -> Iterator[StreamEvent]:
    """Yield `TextChunk`s as text becomes final, then one `GenerationResult`.

    `lock` is held for each step, never across a `yield`: a consumer that stops reading
    keeps nothing locked, and closing the stream ends the sequence (its cache is kept
    for reuse). `check` runs under the lock before each step (the engine uses it to make
    sure the model is still the one this stream started on).
    """
    events: list = []
    seq = Sequence(prompt_ids, softprompt, settings, events.append, cancel, tokenizer=tokenizer,
                   eos=eos_token_ids(model, tokenizer), softprompt_key=softprompt_key)
    yield from stream_request(model, seq, events, prefix_cache=prefix_cache, lock=lock, check=check)


def stream_request(
    model: Any,
    request: Request,
    events: list,
    *,
    prefix_cache: PrefixCache | None = None,
    lock: AbstractContextManager | None = None,
    check: Callable[[], None] | None = None,
    core: BaseCore | None = None,
) -> Iterator[StreamEvent]:
    """Run one request (a sequence or a mixture) whose sink appends to `events`, and yield
    what it reports; `stream_generate` for requests built elsewhere. `core` is the
    backend's (a transformers `StepCore` on `model` when not given)."""
    lock = lock if lock is not None else nullcontext()
    check = check or (lambda: None)
    core = core or StepCore(model, prefix_cache)
    try:
        with lock:
            check()
            core.add(request)
        yield from _drain(events)
        while core.active:
            with lock:
                check()
                core.step()
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


def collect(events: Iterator[StreamEvent]) -> GenerationResult:
    """The result at the end of a stream."""
    result = None
    for event in events:
        if isinstance(event, GenerationResult):
            result = event
    assert result is not None, "a stream always ends with a result"
    return result
