"""The offline Python API, in vLLM's and Aphrodite's shape: `LLM`, `SamplingParams`,
`RequestOutput`, and soft prompts as `PromptAdapterRequest`s.

    from kobold_desktop import LLM, SamplingParams
    from kobold_desktop.prompt_adapter.request import PromptAdapterRequest
    llm = LLM(model="path/or/id", enable_prompt_adapter=True, max_prompt_adapter_token=512)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256),
                           prompt_adapter_request=PromptAdapterRequest("tweet_adapter", 1, "path/to/adapter"))
    outputs[0].outputs[0].text

Every prompt (and each of its `n` samples) runs as one row of the engine core's batch,
each with its own soft prompt; the `Engine` stays available as `llm.engine`.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kobold_desktop.engine.active import Active
from kobold_desktop.engine.engine import Engine
from kobold_desktop.engine.loader import LoadOptions
from kobold_desktop.engine.sampling import DEFAULT_SAMPLER_ORDER, SEED_LIMIT, SamplingSettings
from kobold_desktop.engine.sequence import GenerationResult
from kobold_desktop.errors import KoboldError
from kobold_desktop.prompt_adapter.request import PromptAdapterRequest


class PromptAdapterError(KoboldError, ValueError):
    """A prompt adapter cannot be used (disabled, too long, or a mismatch with its request).
    A `ValueError` too, as vLLM raises."""


@dataclass
class SamplingParams:
    """Aphrodite's (and vLLM's) names; `top_k` of 0 or -1 is off, `temperature=0` greedy.
    The repetition penalty covers the whole text, as in vLLM. Samplers vLLM lacks take
    Aphrodite's names (`top_a`, `tfs`, `dynatemp_min`/`max`, `smoothing_factor`, `xtc_*`,
    `dry_*`, `mirostat_mode`, `custom_token_bans`, `nsigma`, `temperature_last`)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    custom_token_bans: list[int] | None = None
    bad_words: list[str] | None = None  # vLLM's name: phrases that never reach the text (see banned_phrases)
    banned_strings: list[str] | None = None  # Aphrodite's and SillyTavern's name for the same
    top_a: float = 0.0
    tfs: float = 1.0
    dynatemp_min: float = 0.0
    dynatemp_max: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    nsigma: float = 0.0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_range: int = 0  # Aphrodite's default: the whole text
    dry_sequence_breakers: list[str] | None = None
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    temperature_last: bool = False  # vLLM and Aphrodite apply temperature first unless asked

    def settings(self, seed: int | None = None) -> SamplingSettings:
        if not isinstance(self.n, int) or self.n < 1:
            raise PromptAdapterError("n must be at least 1.")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature, dynatemp_range = self.temperature, 0.0
        if self.dynatemp_max > self.dynatemp_min:
            temperature = (self.dynatemp_min + self.dynatemp_max) / 2
            dynatemp_range = (self.dynatemp_max - self.dynatemp_min) / 2
        order = tuple(i for i in DEFAULT_SAMPLER_ORDER if i != 5)
        order = order + (5,) if self.temperature_last else (5,) + order
        extra = {} if self.dry_sequence_breakers is None else {"dry_sequence_breakers": tuple(self.dry_sequence_breakers)}
        return SamplingSettings(
            max_new_tokens=self.max_tokens if self.max_tokens is not None else 16,
            temperature=temperature, top_p=self.top_p, top_k=max(0, self.top_k), min_p=self.min_p,
            typical_p=self.typical_p, repetition_penalty=self.repetition_penalty, repetition_penalty_range=0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed if seed is None else seed, stop=tuple(stop),
            logit_bias=tuple((self.logit_bias or {}).items()), banned_tokens=tuple(self.custom_token_bans or ()),
            banned_phrases=tuple(self.bad_words or ()) + tuple(self.banned_strings or ()),
            top_a=self.top_a, tfs=self.tfs, dynatemp_range=dynatemp_range, dynatemp_exponent=self.dynatemp_exponent,
            smoothing_factor=self.smoothing_factor, smoothing_curve=self.smoothing_curve, top_n_sigma=self.nsigma,
            xtc_threshold=self.xtc_threshold, xtc_probability=self.xtc_probability,
            dry_multiplier=self.dry_multiplier, dry_base=self.dry_base, dry_allowed_length=self.dry_allowed_length,
            dry_range=self.dry_range, mirostat=self.mirostat_mode, mirostat_tau=self.mirostat_tau,
            mirostat_eta=self.mirostat_eta, sampler_order=order, **extra)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "length" or "stop" (and "abort" when cancelled)
    cumulative_logprob: float | None = None
    logprobs: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def _per_prompt(value: Any, count: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise PromptAdapterError(f"{len(value)} {what} for {count} prompts; give one, or one per prompt.")
        return list(value)
    return [value] * count


class LLM:
    def __init__(self, model: str, enable_prompt_adapter: bool = False, max_prompt_adapter_token: int = 0,
                 max_prompt_adapters: int = 1, dtype: str | None = "auto", device: str | None = "auto",
                 seed: int | None = 0, trust_remote_code: bool = False, **unused: Any):
        self.engine = Engine()
        self.engine.load(model, LoadOptions(device=device, dtype=dtype, trust_remote_code=trust_remote_code))
        self.enable_prompt_adapter = enable_prompt_adapter
        self.max_prompt_adapter_token = max_prompt_adapter_token
        self.max_prompt_adapters = max(1, max_prompt_adapters)
        self._adapters: OrderedDict[int, tuple[PromptAdapterRequest, Active]] = OrderedDict()
        if seed is not None:  # as vLLM: the seed of the global generator, for requests without one
            import torch

            torch.manual_seed(seed)

    def get_tokenizer(self) -> Any:
        return self.engine.loaded.tokenizer

    def _adapter(self, request: PromptAdapterRequest | None) -> Active | None:
        if request is None:
            return None
        if not self.enable_prompt_adapter:
            raise PromptAdapterError("prompt adapters are disabled; create the LLM with enable_prompt_adapter=True.")
        cached = self._adapters.get(request.adapter_id)
        if cached is not None and cached[0] == request:
            self._adapters.move_to_end(request.adapter_id)
            return cached[1]
        softprompt = self.engine.prepare(Path(request.local_path))
        if self.max_prompt_adapter_token and softprompt.n_tokens > self.max_prompt_adapter_token:
            raise PromptAdapterError(
                f"prompt adapter '{request.name}' has {softprompt.n_tokens} virtual tokens, more than "
                f"max_prompt_adapter_token ({self.max_prompt_adapter_token}).")
        declared = request.prompt_adapter_num_virtual_tokens
        if declared is not None and declared != softprompt.n_tokens:
            raise PromptAdapterError(f"prompt adapter '{request.name}' has {softprompt.n_tokens} virtual tokens, "
                                     f"not the {declared} its request says.")
        self._adapters[request.adapter_id] = (request, softprompt)
        while len(self._adapters) > self.max_prompt_adapters:  # the least recently used goes
            self._adapters.popitem(last=False)
        return softprompt

    def generate(self, prompts: str | Sequence[str], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_adapter_request: PromptAdapterRequest | Sequence[PromptAdapterRequest | None] | None = None,
                 use_tqdm: bool = False, **unused: Any) -> list[RequestOutput]:
        """Generate for every prompt, all in one batch; one `RequestOutput` per prompt."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(texts), "sampling params")
        adapters = [self._adapter(r) for r in _per_prompt(prompt_adapter_request, len(texts), "adapter requests")]
        loaded = self.engine.loaded
        outputs, rows = [], []
        for text, param, adapter in zip(texts, params, adapters):
            ids = self.engine.encode(text)
            output = RequestOutput(uuid.uuid4().hex, text, ids)
            outputs.append(output)
            for index in range(param.n):
                # n samples must differ: each gets its own seed derived from the request's.
                seed = None if param.seed is None else (param.seed + index) % SEED_LIMIT
                results: list = []
                row = loaded.new_request(ids, adapter, param.settings(seed), results.append)
                rows.append((output, index, row, results))
        self.engine.run([row for _, _, row, _ in rows])
        for output, index, _, results in rows:
            final = results[-1]
            if isinstance(final, BaseException):
                raise final
            assert isinstance(final, GenerationResult)
            output.outputs.append(CompletionOutput(index, final.text, list(final.token_ids),
                                                   final.finish_reason.vllm))
        return outputs
