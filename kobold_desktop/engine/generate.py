"""Generation in three layers: tokens -> text chunks -> one result.

`generate_step` runs the model one token at a time with its KV cache, the soft prompt's
rows placed before every prompt token (before BOS), exactly as PEFT's prompt tuning
does. `stream_generate` turns tokens into text chunks, applying stop sequences, EOS
and cancellation. `generate` collects the stream into a `GenerationResult`.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

import torch
from transformers import StoppingCriteria

from kobold_desktop.engine.detokenize import IncrementalDetokenizer, StopSequences
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.sampling import SamplingSettings, build_processors, pick_next_token


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the continuation only, stop sequence trimmed
    finish_reason: str  # "length", "stop" or "cancelled"
    prompt_tokens: int
    softprompt_tokens: int
    generated_tokens: int
    seconds: float
    token_ids: tuple[int, ...] = ()

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "softprompt_tokens": self.softprompt_tokens,
            "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 4),
        }


StreamEvent = Union[TextChunk, GenerationResult]


class CancelCriteria(StoppingCriteria):
    """Stops generation once `event` is set (from any thread); checked every token."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def generate_step(
    model: Any,
    prompt_ids: torch.LongTensor,
    softprompt: torch.Tensor | None,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield token ids forever; the caller decides when to stop.

    `prompt_ids` is [1, n]; `softprompt` is [v, hidden] in the model's dtype and on its
    input device, or None. The next forward pass runs only when the caller asks for the
    next token, so stopping wastes nothing.
    """
    embed = model.get_input_embeddings()
    device = embed.weight.device
    processors = build_processors(settings)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    with torch.inference_mode():
        history = prompt_ids.to(device)
        embeds = embed(history)
        if softprompt is not None:
            embeds = torch.cat([softprompt.unsqueeze(0).to(embeds.dtype), embeds], dim=1)
        if embeds.shape[1] == 0:
            raise ModelError("the prompt is empty and there is no soft prompt to start from.")
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long, device=device)
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **extra)
        while True:
            token = pick_next_token(history, out.logits[:, -1, :], processors, settings.greedy, generator)
            yield int(token[0])
            history = torch.cat([history, token[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                past_key_values=out.past_key_values,
                use_cache=True,
                **extra,
            )


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class Continuation:
    """The text side of one generated sequence: turns its tokens into text chunks and
    decides when it ends (EOS, a stop sequence, max new tokens, cancel)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], softprompt_tokens: int,
                 settings: SamplingSettings, eos: set[int], cancel: threading.Event | None = None):
        self.start = time.perf_counter()
        self.settings = settings
        self.prompt_tokens = len(prompt_ids)
        self.softprompt_tokens = softprompt_tokens
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopSequences(settings.stop)
        self._eos = eos
        self._cancel = CancelCriteria(cancel) if cancel is not None else None
        self._pieces: list[str] = []
        self.generated: list[int] = []
        self.finish_reason: str | None = None

    def cancelled(self) -> bool:
        return self._cancel is not None and bool(self._cancel(torch.zeros(1, 1), None).any())

    def _emit(self, text: str) -> list[TextChunk]:
        if not text:
            return []
        self._pieces.append(text)
        return [TextChunk(text)]

    def feed(self, token: int) -> list[TextChunk]:
        """Take the next token; returns the text that became final. Sets `finish_reason`
        when the sequence is over (then `close()` gives the rest)."""
        if token in self._eos:
            self.finish_reason = "stop"
            return []
        self.generated.append(token)
        chunks = self._emit(self._stops.feed(self._detokenizer.add(token)))
        if self._stops.stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.settings.max_new_tokens:
            self.finish_reason = "length"
        elif self.cancelled():
            self.finish_reason = "cancelled"
        return chunks

    def close(self, reason: str | None = None) -> list[TextChunk]:
        """End the sequence (with `reason` if it has none yet): the held-back text."""
        self.finish_reason = self.finish_reason or reason or "length"
        if self._stops.stopped:
            return []
        chunks = self._emit(self._stops.feed(self._detokenizer.flush()))
        if self._stops.stopped:
            self.finish_reason = "stop"
            return chunks
        return chunks + self._emit(self._stops.flush())

    def result(self) -> GenerationResult:
        return GenerationResult(
            text="".join(self._pieces),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=self.prompt_tokens,
            softprompt_tokens=self.softprompt_tokens,
            generated_tokens=len(self.generated),
            seconds=time.perf_counter() - self.start,
            token_ids=tuple(self.generated),
        )


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    softprompt: torch.Tensor | None,
    settings: SamplingSettings,
    cancel: threading.Event | None = None,
) -> Iterator[StreamEvent]:
    """Yield `TextChunk`s as text becomes final, then one `GenerationResult`."""
    n_soft = 0 if softprompt is None else int(softprompt.shape[0])
    state = Continuation(tokenizer, prompt_ids, n_soft, settings, eos_token_ids(model, tokenizer), cancel)
    if state.cancelled():
        state.finish_reason = "cancelled"
    else:
        generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long)
        steps = generate_step(model, prompt, softprompt, settings, generator)
        try:
            for token in steps:
                yield from state.feed(token)
                if state.finish_reason is not None:
                    break
        finally:
            steps.close()
    yield from state.close()
    yield state.result()


def collect(events: Iterator[StreamEvent]) -> GenerationResult:
    """The result at the end of a stream."""
    result = None
    for event in events:
        if isinstance(event, GenerationResult):
            result = event
    assert result is not None, "a stream always ends with a result"
    return result
