"""Request bodies, one pydantic model per route (vLLM's `protocol.py` does the same).

Fields have bounds; unknown fields are accepted and ignored, because front ends send many
(SillyTavern sends `sampler_order`, `tfs`, `top_a`, `mirostat*`, `dry_*`, `xtc_*`...).
Everything arrives checked: a route's code never sees a wrong type.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kobold_desktop.engine.sampling import SamplingSettings

MAX_STOPS = 16


def _lone_surrogate(value, where: str = "") -> str | None:
    """Where in a decoded JSON body half of a UTF-16 surrogate pair hides ("\\ud800" is
    valid JSON but no text: nothing can encode it), or None."""
    if isinstance(value, str):
        return where or "the body" if any("\ud800" <= ch <= "\udfff" for ch in value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _lone_surrogate(key, where) or _lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _text_is_text(cls, data):
        where = _lone_surrogate(data)
        if where:
            raise ValueError(f"'{where}' holds half of a UTF-16 surrogate pair, which is not text")
        return data


def _stops(value):
    """A stop string, a list of them, or nothing: always a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and len(value) <= MAX_STOPS and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v)
    raise ValueError(f"must be a string or a list of at most {MAX_STOPS} strings")


Stops = tuple[str, ...]


class Sampling(Body):
    """OpenAI's (and vLLM's) sampling fields."""

    temperature: Annotated[float, Field(ge=0, le=100)] = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0  # 0 means off, as 1
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] = 0  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, le=0.999)] = 0.0
    typical_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] = 1.0
    seed: int | None = None
    stop: Stops = ()
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value):
        return _stops(value)

    def to_settings(self, max_tokens: int) -> SamplingSettings:
        """The one translation of OpenAI's (and vLLM's) fields; raises `SettingsError`.
        `repetition_penalty` is vLLM's: it covers the whole text, as in the Python API."""
        return SamplingSettings(
            max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p or 1.0,
            top_k=max(0, self.top_k), min_p=self.min_p, typical_p=self.typical_p or 1.0,
            repetition_penalty=self.repetition_penalty, repetition_penalty_range=0, seed=self.seed, stop=self.stop)


class CompletionRequest(Sampling):
    model: str | None = None
    prompt: Union[str, list[str], list[Annotated[int, Field(ge=0, lt=1 << 31)]]] = ""
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 16

    @property
    def new_tokens(self) -> int:
        return self.max_tokens


class ChatMessage(Body):
    role: str
    content: str


class ChatCompletionRequest(Sampling):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None

    @property
    def new_tokens(self) -> int:
        """`max_tokens`, or OpenAI's newer `max_completion_tokens`; 16 as vLLM without either."""
        return self.max_tokens or self.max_completion_tokens or 16


class KoboldGenerateRequest(Body):
    """KoboldAI's and KoboldCpp's generate body, as SillyTavern and KoboldAI Lite send it."""

    prompt: str = ""
    memory: str = ""  # KoboldCpp: goes before the prompt and is never cut to fit (KoboldAI Lite sends it)
    max_length: Annotated[int, Field(ge=1, le=1_000_000)] = 80
    max_context_length: Annotated[int | None, Field(ge=1, le=10_000_000)] = None
    temperature: Annotated[float, Field(ge=0, le=100)] = 0.7
    top_p: Annotated[float, Field(ge=0, le=1)] = 0.9
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] = 0
    min_p: Annotated[float, Field(ge=0, le=0.999)] = 0.0
    typical: Annotated[float, Field(ge=0, le=1)] = 1.0
    rep_pen: Annotated[float, Field(ge=0.01, le=100)] = 1.1
    rep_pen_range: Annotated[int | None, Field(ge=0, le=1_000_000)] = None
    sampler_seed: int | None = None  # KoboldCpp: -1 (any negative) for a random seed
    stop_sequence: Stops = ()
    stopping_strings: Stops = ()  # SillyTavern's name in its text-completion mode
    soft_prompt: str | None = None
    genkey: str | None = None  # KoboldCpp: names this generation for check and abort

    @field_validator("stop_sequence", "stopping_strings", mode="before")
    @classmethod
    def _check_stop(cls, value):
        return _stops(value)

    def to_settings(self) -> SamplingSettings:
        """The one translation of KoboldAI's and KoboldCpp's fields; raises `SettingsError`.
        A negative seed is a random one, as in KoboldCpp."""
        seed = None if self.sampler_seed is None or self.sampler_seed < 0 else self.sampler_seed
        return SamplingSettings(
            max_new_tokens=self.max_length, temperature=self.temperature, top_p=self.top_p or 1.0,
            top_k=max(0, self.top_k), min_p=self.min_p, typical_p=self.typical or 1.0,
            repetition_penalty=self.rep_pen, seed=seed, stop=self.stop_sequence + self.stopping_strings,
            **({} if self.rep_pen_range is None else {"repetition_penalty_range": self.rep_pen_range}))


class GenkeyRequest(Body):
    genkey: str | None = None


class LoadSoftPromptRequest(Body):
    name: Annotated[str, Field(min_length=1)]
    path: Annotated[str, Field(min_length=1)]


class UnloadSoftPromptRequest(Body):
    name: Annotated[str, Field(min_length=1)]


class PutSoftPromptRequest(Body):
    value: str = ""


class TokenCountRequest(Body):
    prompt: str = ""


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str = ""
    add_special_tokens: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]
