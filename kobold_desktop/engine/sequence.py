"""One sequence being generated: what it asked for, its sampling state and its text.

The stepping core (`core.py`) advances any number of these together. A `Sequence`
carries everything that belongs to one request: its soft prompt rows, prompt ids,
sampler chain, seeded generator, stop sequences, token budget, cancel flag and the sink
its events go to. Its `Continuation` is the text side: tokens in, text chunks out.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence as Seq, Union

import torch

from kobold_desktop.engine.detokenize import IncrementalDetokenizer, PhraseBans, StopSequences
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.samplers import SamplerChain


class FinishReason(enum.StrEnum):
    """Why a generation ended; each front end's word for it is here and nowhere else."""

    LENGTH = "length"  # max new tokens
    STOP = "stop"  # EOS or a stop sequence
    CANCELLED = "cancelled"  # the user (or the client) stopped it

    @property
    def openai(self) -> str:
        """OpenAI's and KoboldCpp's `finish_reason`: "length" or "stop" (a stopped request
        ended where it was asked to)."""
        return "length" if self is FinishReason.LENGTH else "stop"

    @property
    def vllm(self) -> str:
        """vLLM's `CompletionOutput.finish_reason`: "length", "stop" or "abort"."""
        return "abort" if self is FinishReason.CANCELLED else self.value

    @classmethod
    def from_server(cls, reason: str | None) -> "FinishReason":
        """A server's finish reason (OpenAI's, KoboldCpp's, vLLM's) as ours."""
        return cls.LENGTH if reason == "length" else cls.STOP


@dataclass(frozen=True)
class TextChunk:
    text: str
    weights: tuple[float, ...] | None = None  # a mixture's member weights when the text became final


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the continuation only, stop sequence trimmed
    finish_reason: FinishReason
    prompt_tokens: int
    softprompt_tokens: int
    generated_tokens: int
    seconds: float
    token_ids: tuple[int, ...] = ()
    cached_tokens: int = 0  # positions (soft prompt rows included) taken from an earlier sequence's cache
    shifted_tokens: int = 0  # of those, positions moved back past dropped text (context shift; not exact)
    first_token_seconds: float | None = None  # from the request to its first token
    mixture_weights: tuple[float, ...] | None = None  # a mixture's member weights at the end
    # With logprobs asked for: per generated token (id, log-probability, the top alternatives
    # as (id, log-probability)), from the model's distribution before the samplers.
    logprobs: tuple["TokenLogprob", ...] | None = None

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


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


StreamEvent = Union[TextChunk, GenerationResult]
Sink = Callable[[Any], None]  # receives TextChunk, GenerationResult, or an exception


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def softprompt_fingerprint(tensor: torch.Tensor | None) -> str | None:
    """Identifies soft prompt rows for cache reuse: equal rows, equal fingerprint."""
    if tensor is None:
        return None
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


MAX_REWINDS = 64  # banned phrases met in one request before it ends where it is


class Continuation:
    """The text side of one generated sequence: turns its tokens into text chunks and
    decides when it ends (EOS, a stop sequence, max new tokens, cancel).

    With banned phrases it holds back the last characters a phrase could still span (at
    token boundaries). When a phrase appears, it rewinds: the tokens from the one where
    the phrase began are dropped, that token is banned at that position, and `rewind`
    says where the request's rows must start again (the core re-runs them from there,
    reusing their cache). Nothing banned is ever emitted."""

    def __init__(self, tokenizer: Any, prompt_ids: Seq[int], softprompt_tokens: int,
                 settings: SamplingSettings, eos: set[int], cancel: threading.Event | None = None):
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.settings = settings
        self._tokenizer = tokenizer
        self._prompt_ids = list(prompt_ids)
        self.prompt_tokens = len(prompt_ids)
        self.softprompt_tokens = softprompt_tokens
        self.cached_tokens = 0
        self.shifted_tokens = 0
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopSequences(settings.stop)
        self._bans = PhraseBans(settings.banned_phrases)
        self._pending = ""  # text held back from the bans' check
        self._released = 0  # characters passed on (always at a token boundary)
        self._ends: list[int] = []  # the text's length after each generated token
        self.position_bans: dict[int, set[int]] = {}  # generated index -> tokens banned there
        self.rewind: int | None = None  # set when a banned phrase made the tokens from here go
        self.rewinds = 0
        self._eos = eos
        self._cancel = cancel
        self._pieces: list[str] = []
        self.generated: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None  # set to a list when asked for
        self.finish_reason: str | None = None

    def cancelled(self) -> bool:
        return self._cancel is not None and self._cancel.is_set()

    def banned_here(self) -> tuple[int, ...]:
        """Tokens banned at the next position (a banned phrase began with them there)."""
        return tuple(self.position_bans.get(len(self.generated), ()))

    def _emit(self, text: str) -> list[TextChunk]:
        if not text:
            return []
        self._pieces.append(text)
        return [TextChunk(text)]

    def _checked(self, piece: str) -> str | None:
        """The text that passed the phrase bans (None: a banned phrase began a rewind)."""
        if not self._bans:
            return piece
        self._pending += piece
        self._ends.append(self._released + len(self._pending))
        start = self._bans.search(self._pending)
        if start is not None:
            self._go_back(self._released + start)
            return None
        limit = self._released + len(self._pending) - (self._bans.longest - 1)
        boundary = max((end for end in self._ends if self._released < end <= limit), default=self._released)
        safe = self._pending[: boundary - self._released]
        self._pending = self._pending[boundary - self._released:]
        self._released = boundary
        return safe

    def _go_back(self, start: int) -> None:
        """A banned phrase starts at character `start` of the generated text."""
        k = next(i for i, end in enumerate(self._ends) if end > start)  # the token that wrote character `start`
        self.rewinds += 1
        keep_text = (self._ends[k - 1] if k > 0 else 0) - self._released
        if self.rewinds > MAX_REWINDS:  # give up on this request, keeping what is clean
            self._pending = self._pending[: start - self._released]
            self._detokenizer = IncrementalDetokenizer(self._tokenizer, [])  # nothing of the phrase follows
            self.finish_reason = "stop"
            return
        self.position_bans.setdefault(k, set()).add(self.generated[k])
        self.generated = self.generated[:k]
        if self.logprobs is not None:
            del self.logprobs[k:]
        self._ends = self._ends[:k]
        self._pending = self._pending[:keep_text]
        self._detokenizer = IncrementalDetokenizer(self._tokenizer, self._prompt_ids + self.generated)
        self.rewind = k

    def feed(self, token: int) -> list[TextChunk]:
        """Take the next token; returns the text that became final. Sets `finish_reason`
        when the sequence is over (then `close()` gives the rest), or `rewind`."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self._eos:
            self.finish_reason = "stop"
            return []
        self.generated.append(token)
        safe = self._checked(self._detokenizer.add(token))
        if safe is None:
            return []
        chunks = self._emit(self._stops.feed(safe))
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
        rest = self._pending + self._detokenizer.flush()
        self._pending = ""
        start = self._bans.search(rest) if self._bans else None
        if start is not None:  # completed by the last bytes: too late to rewind, so cut
            rest = rest[:start]
        chunks = self._emit(self._stops.feed(rest))
        if self._stops.stopped:
            self.finish_reason = "stop"
            return chunks
        return chunks + self._emit(self._stops.flush())

    def result(self) -> GenerationResult:
        return GenerationResult(
            text="".join(self._pieces),
            finish_reason=FinishReason(self.finish_reason or FinishReason.LENGTH),
            prompt_tokens=self.prompt_tokens,
            softprompt_tokens=self.softprompt_tokens,
            generated_tokens=len(self.generated),
            seconds=time.perf_counter() - self.start,
            token_ids=tuple(self.generated),
            cached_tokens=self.cached_tokens,
            shifted_tokens=self.shifted_tokens,
            first_token_seconds=None if self.first_token_at is None else self.first_token_at - self.start,
            logprobs=None if self.logprobs is None else tuple(self.logprobs[: len(self.generated)]),
        )


class Request(abc.ABC):
    """What the stepping core asks of every request: its rows, a pick, a feed, an end.

    A `Sequence` is a request of one row; a mixture of soft prompts
    (`mixture.MixedSequence`) is one request of several rows that share one pick. The
    text side, the sink, the cancel flag and the seeded generator live here.
    """

    rows: list["Sequence"]
    text: Continuation | None
    settings: SamplingSettings
    _generator: torch.Generator | None

    def __init__(self, settings: SamplingSettings, sink: Sink | None, cancel: threading.Event | None,
                 generator: torch.Generator | None):
        self.settings = settings
        self.sink = sink or (lambda event: None)
        self.cancel = cancel
        self._generator = generator
        self.done = False
        self.group: object = self  # whose fair share of a batch it counts in (the server's n copies share one)
        self.top_logprobs: int | None = None  # report each token's log-probability and this many alternatives
        self._distribution: torch.Tensor | None = None  # [vocab] log-probabilities at the last pick

    def generator_for(self, device: torch.device) -> torch.Generator | None:
        """The private generator, on the device where the draw happens (seeded runs are
        reproducible on the same device)."""
        if self._generator is None and self.settings.seed is not None:
            self._generator = torch.Generator(device=device).manual_seed(self.settings.seed)
        return self._generator

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def started(self) -> None:
        """Every row's prompt has run (the core calls this after `add`, and after a rewind)."""
        if self.text is not None and self.text.rewinds == 0:
            self.text.cached_tokens = sum(row.reused for row in self.rows)
            self.text.shifted_tokens = sum(row.shifted for row in self.rows)

    @property
    def rewinding(self) -> bool:
        """A banned phrase appeared: the rows must start again where it began (`restart`)."""
        return self.text is not None and self.text.rewind is not None and not self.done

    def restart(self) -> None:
        """Make every row a prompt of the original prompt and the tokens kept; the core then
        adds the request again, taking their cache from the prefix cache."""
        self.text.rewind = None
        prompt = self.prompt_ids_at_start + self.text.generated
        for row in self.rows:
            row.reset(prompt)

    def banned_here(self) -> tuple[int, ...]:
        return self.text.banned_here() if self.text is not None else ()

    @abc.abstractmethod
    def pick(self) -> torch.Tensor:
        """The next token id as a [1] tensor on the logits' device."""

    def _chunk(self, chunk: TextChunk) -> Any:
        return chunk

    def _result(self, result: GenerationResult) -> GenerationResult:
        return result

    def want_logprobs(self, top: int | None) -> None:
        """Report log-probabilities (and `top` alternatives) for every generated token."""
        self.top_logprobs = top
        if self.text is not None and top is not None:
            self.text.logprobs = []

    def _keep_distribution(self, scores: torch.Tensor) -> None:
        """At a pick: the distribution to report the chosen token's log-probability from."""
        if self.top_logprobs is not None:
            self._distribution = torch.log_softmax(scores.float()[0], dim=-1)

    def feed(self, token: int) -> bool:
        """The chosen token: its text goes to the sink. True when the request is over."""
        if self._distribution is not None and self.text is not None and self.text.logprobs is not None \
                and token not in self.text._eos:
            dist, top = self._distribution, []
            if self.top_logprobs:
                values, ids = torch.topk(dist, min(self.top_logprobs, dist.shape[0]))
                top = list(zip(ids.tolist(), values.tolist()))
            self.text.logprobs = self.text.logprobs[: len(self.text.generated)]
            self.text.logprobs.append(TokenLogprob(token, float(dist[token]), tuple(top)))
        for chunk in self.text.feed(token):
            self.sink(self._chunk(chunk))
        return self.text.finish_reason is not None

    def finish(self, reason: str | None = None) -> None:
        """Close the text side and send the result (once)."""
        if self.done:
            return
        self.done = True
        if self.text is not None:
            for chunk in self.text.close(reason):
                self.sink(self._chunk(chunk))
            self.sink(self._result(self.text.result()))

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.sink(error)


class Sequence(Request):
    """One row in the stepping core, and a request of its own unless it is a member of
    a mixture (then `owner` is the mixture, which picks for it and has the text side, and
    the row is made without a tokenizer). A request of its own has a `Continuation`: it
    decides when the sequence ends, and text chunks then the result go to `sink`.
    """

    def __init__(
        self,
        prompt_ids: Seq[int],
        softprompt: torch.Tensor | None,
        settings: SamplingSettings,
        sink: Sink | None = None,
        cancel: threading.Event | None = None,
        *,
        tokenizer: Any = None,
        eos: set[int] = frozenset(),
        softprompt_key: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(settings, sink, cancel, generator)
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.prompt_ids_at_start = list(self.prompt_ids)
        self.softprompt = softprompt
        self.n_soft = 0 if softprompt is None else int(softprompt.shape[0])
        if self.n_soft + len(self.prompt_ids) == 0:
            raise ModelError("the prompt is empty and there is no soft prompt to start from.")
        if softprompt is not None and softprompt_key is None:
            softprompt_key = softprompt_fingerprint(softprompt)
        self.softprompt_key = softprompt_key
        self.text = (Continuation(tokenizer, self.prompt_ids, self.n_soft, settings, eos, cancel)
                     if tokenizer is not None else None)
        # a member of a mixture gets None: the mixture's chain picks for it
        self.chain: SamplerChain | None = SamplerChain(settings, tokenizer) if tokenizer is not None else None
        self.rows = [self]
        self.owner: Request = self  # who picks this row's tokens
        self.scoring = False  # keep each fed token's log-probability (a bayes mixture's member)
        self.scores: list[torch.Tensor] = []  # pieces, one value per fed id once the prompt ran
        self.reused = 0  # positions taken from the prefix cache
        self.shifted = 0  # of those, positions moved back past dropped text (context shift)
        self.fed_ids = list(self.prompt_ids)  # token ids whose keys and values are in the cache
        self.next_position = 0  # set by the core when the prompt has been run
        self.history: torch.Tensor | None = None  # [1, n] on the model's device, for the penalties and DRY
        self.logits: torch.Tensor | None = None  # [1, vocab]: the next token's scores

    def pick(self) -> torch.Tensor:
        """The next token id as a [1] tensor on the logits' device."""
        self._keep_distribution(self.logits)
        return self.chain.pick(self.history, self.logits, self.generator_for(self.logits.device), self.banned_here())

    def reset(self, prompt_ids: Seq[int]) -> None:
        """Start again from `prompt_ids` (a rewind): the core runs it like a new prompt."""
        self.prompt_ids = list(prompt_ids)
        self.fed_ids = list(prompt_ids)
        self.scores = []
        self.reused = 0
        self.history = None
        self.logits = None
