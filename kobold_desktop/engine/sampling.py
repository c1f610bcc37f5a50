"""How to pick each next token: `SamplingSettings`, checked when made.

The transforms themselves and their order are `samplers.py`'s (`SamplerChain`). Field
names are ours; each route and the Python API translate their clients' names into these
in one place (`server/protocol.py`, `llm.SamplingParams`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kobold_desktop.errors import KoboldError


class SettingsError(KoboldError):
    """A sampler setting is out of range."""


SEED_LIMIT = 2**64  # torch generators take 64-bit seeds


GREEDY_BELOW = 1e-4


# KoboldCpp's default order of the samplers (see samplers.py for the numbers).
DEFAULT_SAMPLER_ORDER = (6, 0, 1, 3, 4, 2, 5)
# The breakers KoboldAI Lite and SillyTavern send for DRY: a repetition never spans them.
DEFAULT_DRY_BREAKERS = ("\n", ":", "\"", "*")
MAX_BIASES = 1024  # logit_bias entries (OpenAI allows 300, KoboldCpp 16): plenty
MAX_BREAKERS = 64
MAX_PHRASES = 256
MAX_PHRASE_CHARS = 200


# What each setting does, in a writer's words: the window's tooltips and the README.
DESCRIPTIONS: dict[str, str] = {
    "max_new_tokens": "How many tokens the model writes each turn.",
    "temperature": "Randomness. Higher is more surprising, lower more predictable; 0 always takes the most "
                   "likely token.",
    "top_k": "Only the k most likely tokens can be chosen. 0 is off.",
    "top_p": "Only the most likely tokens that together make up this probability can be chosen. 1 is off.",
    "min_p": "Tokens less likely than this fraction of the most likely one are left out. 0 is off.",
    "typical_p": "Keeps the tokens whose surprise is closest to the usual (locally typical sampling). 1 is off.",
    "repetition_penalty": "Makes tokens already in the recent text less likely. 1 is off; 1.05 to 1.2 is usual.",
    "repetition_penalty_range": "How many recent tokens the repetition penalty looks at. 0: the whole text.",
    "repetition_penalty_slope": "Below 1, the older half of that range is penalised less (KoboldAI's slope).",
    "presence_penalty": "Lowers every token already in the range by this much, once.",
    "frequency_penalty": "Lowers every token in the range by this much for each time it appears.",
    "seed": "The same seed writes the same text again. Random when empty.",
    "top_a": "Leaves out tokens less likely than a times the square of the top probability. 0 is off.",
    "tfs": "Tail-free sampling: cuts the long tail of unlikely tokens where the probabilities flatten. 1 is off.",
    "dynatemp_range": "Dynamic temperature: the temperature moves up to this far each way, higher when the model "
                      "is unsure. 0 is off.",
    "dynatemp_exponent": "How dynamic temperature follows the model's uncertainty (1: in proportion).",
    "smoothing_factor": "Quadratic (smooth) sampling: evens out the likely tokens and drops the unlikely ones "
                        "faster. 0 is off.",
    "smoothing_curve": "The shape of smooth sampling (1: plain quadratic).",
    "top_n_sigma": "Keeps the tokens whose score is within this many standard deviations of the best. 0 is off.",
    "xtc_probability": "Exclude Top Choices: how often the most likely tokens are set aside for a less obvious one. "
                       "0 is off.",
    "xtc_threshold": "XTC sets aside tokens at least this likely (all but the least likely of them).",
    "dry_multiplier": "DRY: how hard repeating a phrase from earlier in the story is penalised. 0 is off; 0.8 is "
                      "usual.",
    "dry_base": "DRY: how fast the penalty grows with the length of the repeat.",
    "dry_allowed_length": "DRY: repeats this many tokens long are never penalised.",
    "dry_range": "DRY: how many recent tokens it looks at. 0: the whole text.",
    "dry_sequence_breakers": "DRY: a repeat never runs across these (a JSON list, e.g. [\"\\n\", \":\"]).",
    "mirostat": "Mirostat keeps the text's surprise near tau, replacing the other samplers. 0 is off.",
    "mirostat_tau": "Mirostat's target surprise (higher is more varied).",
    "mirostat_eta": "How fast mirostat corrects itself.",
    "logit_bias": "Make tokens more or less likely: token id:bias, e.g. 198:-2, 50256:-100 (-100 bans).",
    "banned_tokens": "Token ids that are never chosen, e.g. 198, 628.",
    "banned_phrases": "Phrases that never appear, one per line, any case; /regex/ for a regular expression. The "
                      "model goes back and writes something else.",
    "sampler_order": "KoboldCpp's order: 0 top-k, 1 top-a, 2 top-p and min-p, 3 tail-free, 4 typical, "
                     "5 temperature, 6 repetition penalty.",
}


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token. The defaults suit story writing; every sampler not
    set below is off."""

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
    # KoboldCpp's and text-generation-webui's samplers (samplers.py says what each does)
    top_a: float = 0.0  # 0 = off
    tfs: float = 1.0  # tail-free sampling; 1 = off
    dynatemp_range: float = 0.0  # temperature +- this, by entropy; 0 = off
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0  # quadratic sampling; 0 = off
    smoothing_curve: float = 1.0
    top_n_sigma: float = 0.0  # 0 = off
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0  # 0 = off
    dry_multiplier: float = 0.0  # 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_range: int = 320  # the last tokens DRY looks at; 0 = all
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_DRY_BREAKERS
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty_slope: float = 1.0  # below 1: the older half of the window is penalised less
    mirostat: int = 0  # 0 off, 1 or 2
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); -100 or less bans
    banned_tokens: tuple[int, ...] = ()
    # Phrases that never reach the text (case-insensitive; "/regex/" for a regular
    # expression): generation goes back to where one began and tries another token.
    banned_phrases: tuple[str, ...] = ()
    sampler_order: tuple[int, ...] = DEFAULT_SAMPLER_ORDER

    def __post_init__(self) -> None:
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (
            self.temperature, self.top_p, self.min_p, self.typical_p, self.repetition_penalty, self.top_a, self.tfs,
            self.dynatemp_range, self.dynatemp_exponent, self.smoothing_factor, self.smoothing_curve,
            self.top_n_sigma, self.xtc_threshold, self.xtc_probability, self.dry_multiplier, self.dry_base,
            self.presence_penalty, self.frequency_penalty, self.repetition_penalty_slope, self.mirostat_tau,
            self.mirostat_eta))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "dry_sequence_breakers", tuple(b for b in self.dry_sequence_breakers if b))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in dict(self.logit_bias).items()))
        object.__setattr__(self, "banned_tokens", tuple(sorted({int(t) for t in self.banned_tokens})))
        object.__setattr__(self, "sampler_order", tuple(int(i) for i in self.sampler_order))
        object.__setattr__(self, "banned_phrases", tuple(p for p in self.banned_phrases if p))
        checks = [
            (finite, "every sampler setting must be a finite number"),
            (self.max_new_tokens >= 1, "max new tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be 0 (greedy) or more"),
            (self.top_k >= 0, "top-k must be 0 (off) or more"),
            (0 < self.top_p <= 1, "top-p must be above 0 and at most 1"),
            (0 <= self.min_p <= 1, "min-p must be from 0 to 1"),
            (0 < self.typical_p <= 1, "typical-p must be above 0 and at most 1"),
            (self.repetition_penalty > 0, "repetition penalty must be above 0"),
            (self.repetition_penalty_range >= 0, "repetition penalty range must be 0 (all) or more"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT),
             f"the seed must be a whole number from 0 to {SEED_LIMIT - 1}"),
            (0 <= self.top_a <= 1, "top-a must be from 0 (off) to 1"),
            (0 < self.tfs <= 1, "tail-free sampling (tfs) must be above 0 and at most 1"),
            (self.dynatemp_range >= 0 and self.dynatemp_exponent >= 0,
             "dynamic temperature's range and exponent must be 0 or more"),
            (self.smoothing_factor >= 0 and 1 <= self.smoothing_curve <= 3,
             "the smoothing factor must be 0 (off) or more, and its curve from 1 to 3"),
            (self.top_n_sigma >= 0, "top-n-sigma must be 0 (off) or more"),
            (0 <= self.xtc_threshold <= 1 and 0 <= self.xtc_probability <= 1,
             "XTC's threshold and probability must be from 0 to 1"),
            (self.dry_multiplier >= 0 and self.dry_base >= 1 and self.dry_allowed_length >= 1 and self.dry_range >= 0,
             "DRY needs a multiplier of 0 (off) or more, a base of 1 or more, an allowed length of 1 or more "
             "and a range of 0 (all) or more"),
            (len(self.dry_sequence_breakers) <= MAX_BREAKERS, f"DRY takes at most {MAX_BREAKERS} sequence breakers"),
            (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2,
             "presence and frequency penalties must be from -2 to 2"),
            (0 <= self.repetition_penalty_slope <= 1, "the repetition penalty slope must be from 0 to 1"),
            (self.mirostat in (0, 1, 2), "mirostat must be 0 (off), 1 or 2"),
            (self.mirostat_tau >= 0 and self.mirostat_eta >= 0, "mirostat's tau and eta must be 0 or more"),
            (len(self.logit_bias) <= MAX_BIASES and all(0 <= t < 2**31 for t, _ in self.logit_bias)
             and all(math.isfinite(b) for _, b in self.logit_bias),
             f"logit_bias takes at most {MAX_BIASES} token ids (0 or more) with finite biases"),
            (all(0 <= t < 2**31 for t in self.banned_tokens), "banned token ids must be 0 or more"),
            (set(self.sampler_order) <= set(range(7)) and len(set(self.sampler_order)) == len(self.sampler_order),
             "sampler_order lists KoboldCpp's samplers 0-6, each at most once"),
            (len(self.banned_phrases) <= MAX_PHRASES and all(len(p) <= MAX_PHRASE_CHARS for p in self.banned_phrases),
             f"at most {MAX_PHRASES} banned phrases of at most {MAX_PHRASE_CHARS} characters each"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message + ".")
        from kobold_desktop.engine.detokenize import check_phrases

        problem = check_phrases(self.banned_phrases)
        if problem:
            raise SettingsError(problem + ".")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it (2.5e-324 is a valid float) that dividing the
        logits by it would overflow: the limit of sampling there is the argmax."""
        return self.temperature < GREEDY_BELOW

    def check_vocab(self, vocab_size: int) -> None:
        """Raise unless every token id the settings name (bias, bans) is in the vocabulary."""
        for where, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("the banned tokens", self.banned_tokens)):
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise SettingsError(f"token id {bad} in {where} is not in this model's vocabulary "
                                    f"(ids 0 to {vocab_size - 1}).")

    def unlike_openai(self) -> list[str]:
        """The samplers on here, with an effect, that OpenAI's API (and vLLM) has no field for."""
        sampled = not self.greedy
        return [name for name, on in (
            ("typical_p", sampled and self.typical_p < 1.0), ("top_a", sampled and self.top_a > 0),
            ("tfs", sampled and self.tfs < 1.0), ("dynatemp_range", sampled and self.dynatemp_range > 0),
            ("smoothing_factor", sampled and self.smoothing_factor > 0), ("nsigma", sampled and self.top_n_sigma > 0),
            ("xtc_probability", sampled and self.xtc_probability > 0 and self.xtc_threshold <= 0.5),
            ("dry_multiplier", self.dry_multiplier > 0), ("banned_strings", bool(self.banned_phrases)),
            ("rep_pen_slope", self.repetition_penalty > 1.0 and self.repetition_penalty_slope < 1.0),
            ("mirostat", sampled and self.mirostat > 0),
            ("sampler_order", sampled and self.sampler_order != DEFAULT_SAMPLER_ORDER)) if on]

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
        if self.presence_penalty:
            fields["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            fields["frequency_penalty"] = self.frequency_penalty
        bias = {str(t): b for t, b in self.logit_bias}
        bias.update({str(t): -100.0 for t in self.banned_tokens})
        if bias:
            fields["logit_bias"] = bias
        if self.seed is not None:
            fields["seed"] = self.seed
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingSettings":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "stop" in known:
            known["stop"] = tuple(known["stop"] or ())
        return cls(**known)
