"""Sampler settings become a chain of small logits transforms, then one pick.

Each transform is a transformers `LogitsProcessor` (called with the token history and
the next-token scores); `pick_next_token` applies the chain and samples, or takes the
argmax when the temperature is 0, on the device where the logits are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from kobold_desktop.errors import KoboldError


class SettingsError(KoboldError):
    """A sampler setting is out of range."""


SEED_LIMIT = 2**64  # torch generators take 64-bit seeds


GREEDY_BELOW = 1e-4


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token. The defaults suit story writing."""

    max_new_tokens: int = 80
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 0.9  # 1 = off
    min_p: float = 0.0  # 0 = off
    typical_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.1  # 1 = off
    repetition_penalty_range: int = 1024  # how many recent tokens are penalised; 0 = all
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max new tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be 0 (greedy) or more"),
            (self.top_k >= 0, "top-k must be 0 (off) or more"),
            (0 < self.top_p <= 1, "top-p must be above 0 and at most 1"),
            (0 <= self.min_p < 1, "min-p must be at least 0 and below 1"),
            (0 < self.typical_p <= 1, "typical-p must be above 0 and at most 1"),
            (self.repetition_penalty > 0, "repetition penalty must be above 0"),
            (self.repetition_penalty_range >= 0, "repetition penalty range must be 0 (all) or more"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT),
             f"the seed must be a whole number from 0 to {SEED_LIMIT - 1}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message + ".")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it (2.5e-324 is a valid float) that dividing the
        logits by it would overflow: the limit of sampling there is the argmax."""
        return self.temperature < GREEDY_BELOW

    def with_changes(self, **changes: Any) -> "SamplingSettings":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data

    def openai_fields(self) -> dict[str, Any]:
        """These settings in the OpenAI completions API's names, with the extensions vLLM,
        llama.cpp's server and KoboldCpp read (`top_k` -1 is off; `typical_p` only when on).
        The repetition penalty is vLLM's: over the whole text."""
        fields: dict[str, Any] = {
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k if self.top_k > 0 else -1,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "stop": list(self.stop),
        }
        if self.typical_p < 1.0:
            fields["typical_p"] = self.typical_p
        if self.seed is not None:
            fields["seed"] = self.seed
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingSettings":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "stop" in known:
            known["stop"] = tuple(known["stop"] or ())
        return cls(**known)


class RangedRepetitionPenalty(LogitsProcessor):
    """KoboldAI's repetition penalty: only the last `window` tokens are penalised."""

    def __init__(self, penalty: float, window: int):
        self.penalty = penalty
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        recent = input_ids[:, -self.window :] if self.window else input_ids
        if recent.shape[1] == 0:
            return scores
        picked = torch.gather(scores, 1, recent)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, recent, picked)


def build_processors(settings: SamplingSettings) -> LogitsProcessorList:
    """The transforms in the order they apply; sampling-only ones are skipped when greedy."""
    chain = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        chain.append(RangedRepetitionPenalty(settings.repetition_penalty, settings.repetition_penalty_range))
    if settings.greedy:
        return chain
    if settings.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        chain.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        chain.append(TopPLogitsWarper(settings.top_p))
    if settings.typical_p < 1.0:
        chain.append(TypicalLogitsWarper(settings.typical_p))
    if settings.min_p > 0.0:
        chain.append(MinPLogitsWarper(settings.min_p))
    return chain


def pick_next_token(
    history: torch.LongTensor,
    logits: torch.FloatTensor,
    processors: LogitsProcessorList,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.LongTensor:
    """One token per row: `history` is [batch, seq] token ids, `logits` [batch, vocab]."""
    scores = processors(history, logits.float())
    if greedy:
        return scores.argmax(dim=-1)
    # The draw happens where the logits are: only the chosen id ever crosses to the host.
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
