"""Request bodies, one pydantic model per route (vLLM's `protocol.py` does the same).

Fields have bounds; everything arrives checked: a route's code never sees a wrong type.
Every generation route takes every sampler under the names its clients send
(`Samplers`: KoboldCpp's names, with text-generation-webui's, Aphrodite's and llama.cpp's
server's as aliases, as SillyTavern's Text Completion types send them). A field we accept
but do not apply is in `NOT_APPLIED`, with why; a body remembers which fields it was sent
(`sent`), so the server can say so once per client (`Service.note_fields`) and list them
(`GET /api/extra/sampling`). Anything else unknown is ignored, and reported the same way.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kobold_desktop.engine.sampling import DEFAULT_SAMPLER_ORDER, SamplingSettings

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
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    _sent: frozenset = PrivateAttr(default=frozenset())

    @model_validator(mode="before")
    @classmethod
    def _text_is_text(cls, data):
        where = _lone_surrogate(data)
        if where:
            raise ValueError(f"'{where}' holds half of a UTF-16 surrogate pair, which is not text")
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _remember_sent(cls, data, handler):
        body = handler(data)
        if isinstance(data, dict):
            body._sent = frozenset(str(k) for k in data)
        return body

    @property
    def sent(self) -> frozenset:
        """The field names the client sent (aliases as sent)."""
        return self._sent

    @classmethod
    def known_names(cls) -> set[str]:
        """Every name a field of this body is read from (its own and its aliases)."""
        names = set()
        for name, info in cls.model_fields.items():
            names.add(name)
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(a for a in alias.choices if isinstance(a, str))
            elif isinstance(alias, str):
                names.add(alias)
        return names


# Fields front ends send that we accept and do not apply, and why. The one list: the
# server logs them once per client and `GET /api/extra/sampling` reports them.
NOT_APPLIED: dict[str, str] = {
    "min_length": "a minimum length is not applied",
    "min_tokens": "a minimum length is not applied",
    "minimum_message_content_tokens": "a minimum length is not applied",
    "num_beams": "beam search is not offered",
    "length_penalty": "beam search is not offered",
    "early_stopping": "beam search is not offered",
    "epsilon_cutoff": "epsilon sampling is not offered",
    "eta_cutoff": "eta sampling is not offered",
    "guidance_scale": "classifier-free guidance is not offered",
    "negative_prompt": "classifier-free guidance is not offered",
    "grammar": "grammars are not offered",
    "grammar_string": "grammars are not offered",
    "grammar_retain_state": "grammars are not offered",
    "json_schema": "JSON schemas are not offered",
    "guided_grammar": "grammars are not offered",
    "guided_json": "JSON schemas are not offered",
    "penalty_alpha": "contrastive search is not offered",
    "encoder_repetition_penalty": "an encoder repetition penalty applies to encoder-decoder models only",
    "no_repeat_ngram_size": "n-gram blocking is not offered (DRY does the same job)",
    "repetition_decay": "TabbyAPI's repetition decay is not offered",
    "skew": "skew sampling is not offered",
    "sampler_priority": "text-generation-webui's order is not read; send sampler_order (KoboldCpp's)",
    "samplers": "llama.cpp's order is not read; send sampler_order (KoboldCpp's)",
    "ban_eos_token": "the end-of-text token is never banned",
    "ignore_eos": "the end-of-text token is never ignored",
    "bypass_eos": "the end-of-text token is never ignored",
    "max_tokens_second": "no speed limit is applied",
    "speculative_ngram": "speculative decoding is not offered",
    "add_bos_token": "the model's own BOS rule applies",
    "skip_special_tokens": "special tokens are always skipped in text",
    "spaces_between_special_tokens": "special tokens are always skipped in text",
    "render_special": "special tokens are always skipped in text",
    "trim_stop": "stop sequences are always trimmed",
    "include_stop_str_in_output": "stop sequences are always trimmed",
    "n_probs": "log-probabilities are asked for with logprobs",
    "best_of": "best-of is not offered (n is)",
    "use_default_badwordsids": "KoboldCpp's default banned words are not applied (send banned_tokens)",
    "quiet": "the server's log is its own setting (--verbose)",
    "truncation_length": "the server's own context length applies",
    "num_ctx": "the server's own context length applies",
}


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


def _aliases(*names: str) -> Any:
    return Field(validation_alias=AliasChoices(*names))


def _breakers(value):
    """DRY's sequence breakers: a list of strings, or (SillyTavern) that list as JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = [value]  # one breaker written plainly
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("must be a list of strings, or that list as JSON text")


def _token_ids(value):
    """Token ids to ban: a list of ids, or KoboldCpp's text "1, 2, 3"."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not all(p.isdigit() for p in parts):
            raise ValueError("must be token ids separated by commas, such as \"318, 1212\"")
        return tuple(int(p) for p in parts)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError("must be a list of token ids, or ids separated by commas")


def _biases(value):
    """`{token id: bias}` (OpenAI, KoboldCpp; ids as text) or llama.cpp's `[[id, bias], ...]`
    where a bias of false bans the token."""
    if value is None:
        return ()
    pairs = value.items() if isinstance(value, dict) else value if isinstance(value, list) else None
    if pairs is None:
        raise ValueError("must be an object of token id: bias")
    out = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError("must be an object of token id: bias, or a list of [id, bias] pairs")
        token, bias = pair
        try:
            token = int(token)
        except (TypeError, ValueError):
            raise ValueError(f"'{token}' is not a token id") from None
        if bias is False:
            bias = -100.0
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ValueError(f"the bias of token {token} must be a number")
        out.append((token, float(bias)))
    return tuple(out)


class Samplers(Body):
    """The samplers beyond OpenAI's, under KoboldCpp's names and the aliases other clients
    send. Bounds are SamplingSettings' (it says why a value is refused)."""

    top_a: Annotated[float, Field(ge=0, le=1)] = 0.0
    tfs: Annotated[float, Field(ge=0, le=1), _aliases("tfs", "tfs_z")] = 1.0
    dynatemp_range: Annotated[float, Field(ge=0, le=100)] = 0.0
    dynatemp_exponent: Annotated[float, Field(ge=0, le=100)] = 1.0
    dynamic_temperature: bool | None = None  # text-generation-webui: with dynatemp_low / dynatemp_high
    dynatemp_low: Annotated[float | None, Field(ge=0, le=100), _aliases("dynatemp_low", "dynatemp_min")] = None
    dynatemp_high: Annotated[float | None, Field(ge=0, le=100), _aliases("dynatemp_high", "dynatemp_max")] = None
    smoothing_factor: Annotated[float, Field(ge=0, le=100)] = 0.0
    smoothing_curve: Annotated[float, Field(ge=1, le=3)] = 1.0
    nsigma: Annotated[float, Field(ge=0, le=100), _aliases("nsigma", "top_n_sigma")] = 0.0
    xtc_threshold: Annotated[float, Field(ge=0, le=1)] = 0.1
    xtc_probability: Annotated[float, Field(ge=0, le=1)] = 0.0
    dry_multiplier: Annotated[float, Field(ge=0, le=100)] = 0.0
    dry_base: Annotated[float, Field(ge=1, le=100)] = 1.75
    dry_allowed_length: Annotated[int, Field(ge=1, le=1000)] = 2
    dry_penalty_last_n: Annotated[int, Field(ge=-1, le=1_000_000), _aliases("dry_penalty_last_n", "dry_range")] = 320
    dry_sequence_breakers: tuple[str, ...] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    rep_pen_slope: Annotated[float, Field(ge=0, le=10), _aliases("rep_pen_slope", "repetition_penalty_slope")] = 1.0
    mirostat: Annotated[int, Field(ge=0, le=2), _aliases("mirostat", "mirostat_mode")] = 0
    mirostat_tau: Annotated[float, Field(ge=0, le=100)] = 5.0
    mirostat_eta: Annotated[float, Field(ge=0, le=1)] = 0.1
    logit_bias: tuple[tuple[int, float], ...] = ()
    custom_token_bans: tuple[int, ...] = ()
    # KoboldCpp's banned_tokens are phrases (SillyTavern sends banned_strings): "/regex/" too
    banned_strings: Annotated[tuple[str, ...], _aliases("banned_strings", "banned_tokens")] = ()
    sampler_order: Annotated[tuple[int, ...] | None, Field(min_length=1, max_length=7)] = None
    temperature_last: bool | None = None  # text-generation-webui / Aphrodite: where temperature goes

    _check_breakers = field_validator("dry_sequence_breakers", mode="before")(classmethod(lambda cls, v: _breakers(v)))
    _check_bans = field_validator("custom_token_bans", mode="before")(classmethod(lambda cls, v: _token_ids(v)))
    _check_biases = field_validator("logit_bias", mode="before")(classmethod(lambda cls, v: _biases(v)))

    @field_validator("banned_strings", mode="before")
    @classmethod
    def _check_phrases(cls, value):
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError("must be a list of phrases")

    def sampler_fields(self, temperature: float) -> dict[str, Any]:
        """These samplers as SamplingSettings' fields (with the temperature, which dynamic
        temperature given as low and high replaces)."""
        fields: dict[str, Any] = dict(
            temperature=temperature, top_a=self.top_a, tfs=self.tfs or 1.0, dynatemp_range=self.dynatemp_range,
            dynatemp_exponent=self.dynatemp_exponent, smoothing_factor=self.smoothing_factor,
            smoothing_curve=self.smoothing_curve, top_n_sigma=self.nsigma, xtc_threshold=self.xtc_threshold,
            xtc_probability=self.xtc_probability, dry_multiplier=self.dry_multiplier, dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length, dry_range=max(0, self.dry_penalty_last_n),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty_slope=self.rep_pen_slope if 0 < self.rep_pen_slope <= 1 else 1.0,
            mirostat=self.mirostat, mirostat_tau=self.mirostat_tau, mirostat_eta=self.mirostat_eta,
            logit_bias=self.logit_bias, banned_tokens=self.custom_token_bans, banned_phrases=self.banned_strings)
        if self.dry_sequence_breakers is not None:
            fields["dry_sequence_breakers"] = self.dry_sequence_breakers
        if self.dynamic_temperature and self.dynatemp_low is not None and self.dynatemp_high is not None:
            low, high = sorted((self.dynatemp_low, self.dynatemp_high))
            fields.update(temperature=(low + high) / 2, dynatemp_range=(high - low) / 2)
        if self.sampler_order is not None:
            fields["sampler_order"] = self.sampler_order
        elif self.temperature_last is not None:
            rest = tuple(i for i in DEFAULT_SAMPLER_ORDER if i != 5)
            fields["sampler_order"] = rest + (5,) if self.temperature_last else (5,) + rest
        return fields


def _seed(value: int | None) -> int | None:
    """A negative seed is a random one (KoboldCpp, SillyTavern's -1), on every route."""
    return None if value is None or value < 0 else value


class Sampling(Samplers):
    """OpenAI's (and vLLM's) sampling fields, and every other sampler (`Samplers`)."""

    temperature: Annotated[float, Field(ge=0, le=100)] = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0  # 0 means off, as 1
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] = 0  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    typical_p: Annotated[float, Field(ge=0, le=1), _aliases("typical_p", "typical")] = 1.0
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100),
                                  _aliases("repetition_penalty", "rep_pen", "repeat_penalty")] = 1.0
    # text-generation-webui's names; without one the penalty covers the whole text (vLLM's meaning)
    repetition_penalty_range: Annotated[int | None, Field(ge=0, le=10_000_000),
                                        _aliases("repetition_penalty_range", "rep_pen_range", "repeat_last_n")] = None
    seed: int | None = None  # negative: random
    stop: Stops = ()
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value):
        return _stops(value)

    def to_settings(self, max_tokens: int) -> SamplingSettings:
        """The one translation of OpenAI's (and vLLM's) fields; raises `SettingsError`.
        `repetition_penalty` is vLLM's: it covers the whole text, as in the Python API,
        unless a range is sent."""
        return SamplingSettings(
            max_new_tokens=max_tokens, top_p=self.top_p or 1.0, top_k=max(0, self.top_k), min_p=self.min_p,
            typical_p=self.typical_p or 1.0, repetition_penalty=self.repetition_penalty,
            repetition_penalty_range=self.repetition_penalty_range or 0, seed=_seed(self.seed), stop=self.stop,
            **self.sampler_fields(self.temperature))


class CompletionRequest(Sampling):
    model: str | None = None
    prompt: Union[str, list[str], list[Annotated[int, Field(ge=0, lt=1 << 31)]]] = ""
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 16
    logprobs: Annotated[int | None, Field(ge=0, le=20)] = None  # OpenAI: the chosen token's and this many others

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_bool(cls, value):
        return None if value is False else value  # some clients send false for none

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
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] = 0

    @property
    def new_tokens(self) -> int:
        """`max_tokens`, or OpenAI's newer `max_completion_tokens`; 16 as vLLM without either."""
        return self.max_tokens or self.max_completion_tokens or 16


class KoboldGenerateRequest(Samplers):
    """KoboldAI's and KoboldCpp's generate body, as SillyTavern and KoboldAI Lite send it."""

    prompt: str = ""
    memory: str = ""  # KoboldCpp: goes before the prompt and is never cut to fit (KoboldAI Lite sends it)
    max_length: Annotated[int, Field(ge=1, le=1_000_000)] = 80
    max_context_length: Annotated[int | None, Field(ge=1, le=10_000_000)] = None
    temperature: Annotated[float, Field(ge=0, le=100), _aliases("temperature", "temp")] = 0.7  # temp: old KoboldAI
    top_p: Annotated[float, Field(ge=0, le=1)] = 0.9
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    typical: Annotated[float, Field(ge=0, le=1), _aliases("typical", "typical_p")] = 1.0
    rep_pen: Annotated[float, Field(ge=0.01, le=100), _aliases("rep_pen", "repetition_penalty", "repeat_penalty")] = 1.1
    rep_pen_range: Annotated[int | None, Field(ge=0, le=10_000_000),
                             _aliases("rep_pen_range", "repetition_penalty_range", "repeat_last_n")] = None
    sampler_seed: Annotated[int | None, _aliases("sampler_seed", "seed")] = None  # negative: random
    stop_sequence: Stops = ()
    stopping_strings: Stops = ()  # SillyTavern's name in its text-completion mode
    soft_prompt: str | None = None
    genkey: str | None = None  # KoboldCpp: names this generation for check and abort
    logprobs: bool = False  # KoboldCpp: each token's log-probability and its top alternatives

    @field_validator("stop_sequence", "stopping_strings", mode="before")
    @classmethod
    def _check_stop(cls, value):
        return _stops(value)

    def to_settings(self) -> SamplingSettings:
        """The one translation of KoboldAI's and KoboldCpp's fields; raises `SettingsError`.
        A negative seed is a random one, as in KoboldCpp."""
        return SamplingSettings(
            max_new_tokens=self.max_length, top_p=self.top_p or 1.0, top_k=max(0, self.top_k), min_p=self.min_p,
            typical_p=self.typical or 1.0, repetition_penalty=self.rep_pen, seed=_seed(self.sampler_seed),
            stop=self.stop_sequence + self.stopping_strings,
            **({} if self.rep_pen_range is None else {"repetition_penalty_range": self.rep_pen_range}),
            **self.sampler_fields(self.temperature))


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


class KoboldDetokenizeRequest(Body):
    ids: list[Annotated[int, Field(ge=0, lt=1 << 31)]] = []


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str = ""
    add_special_tokens: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]
