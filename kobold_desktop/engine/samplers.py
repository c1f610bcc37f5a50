"""The sampler chain: small transforms of the next token's scores, then one pick.

Every backend and every route goes through `SamplerChain` (one per request, so the
stateful ones, mirostat's surprise target and XTC's draws, belong to that request). The
order is KoboldCpp's (`gpttype_adapter.cpp` `SampleLogits`):

1. logit bias and token bans (OpenAI's `logit_bias`, KoboldCpp's `logit_bias` and
   `custom_token_bans`), then DRY (it needs the scores unsorted), then top-n-sigma;
2. the samplers of `sampler_order` (KoboldCpp's numbers: 0 top-k, 1 top-a, 2 top-p and
   min-p, 3 tail-free, 4 typical, 5 temperature with dynamic temperature and smoothing,
   6 repetition penalty with its slope and the presence and frequency penalties); the
   default is `[6, 0, 1, 3, 4, 2, 5]`;
3. XTC, last; then a draw from what is left.

Greedy (temperature 0) takes the argmax after the bias, bans, DRY and the penalties;
mirostat (v1 or v2) replaces step 2 with the penalties, the temperature and its own
pick. A removed token has the score -inf. Each transform is a function of the scores
(`[1, vocab]` float32) written from its published definition; `tests/engine/
test_samplers.py` checks each against a reference computed from that definition.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from kobold_desktop.engine.sampling import SamplingSettings

NEG_INF = float("-inf")
# KoboldCpp's numbers for `sampler_order`.
TOP_K, TOP_A, TOP_P, TFS, TYPICAL, TEMPERATURE, REP_PEN = range(7)
SAMPLER_NAMES = {TOP_K: "top-k", TOP_A: "top-a", TOP_P: "top-p and min-p", TFS: "tail-free sampling",
                 TYPICAL: "typical sampling", TEMPERATURE: "temperature", REP_PEN: "repetition penalty"}
MIROSTAT_M = 100  # mirostat v1 estimates the distribution's shape from this many top tokens
FLOAT_MAX_LOG = 88.7228391  # log of float32's largest value: DRY's exponent is clamped below it


def _probs(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1)


def _remove(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(mask, NEG_INF)


# -- bias and bans ---------------------------------------------------------------------------


def logit_bias(scores: torch.Tensor, bias: dict[int, float], banned: tuple[int, ...] = ()) -> torch.Tensor:
    """Add each token's bias (OpenAI: a bias of -100 or less bans it); ban `banned` outright."""
    if bias:
        ids = torch.tensor(list(bias), device=scores.device)
        values = torch.tensor(list(bias.values()), dtype=scores.dtype, device=scores.device)
        scores = scores.clone()
        scores[0, ids] += values
        scores[0, ids[values <= -100]] = NEG_INF
    if banned:
        scores = scores.clone()
        scores[0, torch.tensor(banned, device=scores.device)] = NEG_INF
    return scores


# -- DRY ----------------------------------------------------------------------------------------


class DryBreakers:
    """DRY's sequence breakers as token ids: every token whose text contains a breaker
    string, and the tokenization of each breaker that takes more than one token."""

    def __init__(self, tokens: frozenset[int], sequences: tuple[tuple[int, ...], ...]):
        self.tokens, self.sequences = tokens, sequences

    _cache: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, tokenizer: Any, breakers: tuple[str, ...]) -> "DryBreakers":
        """Built once per tokenizer and set of breakers (it reads the whole vocabulary)."""
        if tokenizer is None or not breakers:
            return cls(frozenset(), ())
        try:
            per_tokenizer = cls._cache.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable: build it each time
            per_tokenizer = {}
        found = per_tokenizer.get(breakers)
        if found is None:
            size = len(tokenizer)
            texts = tokenizer.batch_decode([[i] for i in range(size)]) if hasattr(tokenizer, "batch_decode") \
                else [tokenizer.decode([i]) for i in range(size)]
            tokens = frozenset(i for i, text in enumerate(texts) if any(b in text for b in breakers))
            sequences = []
            for breaker in breakers:
                ids = tuple(tokenizer(breaker, add_special_tokens=False)["input_ids"])
                if len(ids) > 1:
                    sequences.append(ids)
            found = per_tokenizer[breakers] = cls(tokens, tuple(sequences))
        return found

    def tail_after_last(self, window: list[int]) -> int:
        """How many tokens of `window` follow its last breaker (all of them when none)."""
        n = len(window)
        for distance in range(n):  # from the end
            index = n - 1 - distance
            if window[index] in self.tokens:
                return distance
            for sequence in self.sequences:
                end = index + len(sequence)
                if end <= n and tuple(window[index:end]) == sequence:
                    return n - end
        return n


def dry(scores: torch.Tensor, history: torch.Tensor, multiplier: float, base: float, allowed_length: int,
        last_n: int, breakers: DryBreakers) -> torch.Tensor:
    """DRY ("don't repeat yourself"): a token that would extend a repetition of the
    context's end of length L >= `allowed_length` loses multiplier * base^(L - allowed).
    A match never crosses a sequence breaker; only the last `last_n` tokens count (0: all)."""
    if multiplier <= 0 or base <= 0:
        return scores
    tokens = history[0, -last_n:] if last_n > 0 else history[0]
    n = int(tokens.shape[0])
    if n <= allowed_length:
        return scores
    limit = breakers.tail_after_last(tokens.tolist()) if (breakers.tokens or breakers.sequences) else n
    if limit <= allowed_length:
        return scores
    # lengths[j]: how many tokens ending at j equal the tokens ending at the context's end.
    last = n - 1
    earlier = tokens[:last]
    alive = earlier == tokens[last]
    lengths = torch.zeros(last, dtype=torch.long, device=tokens.device)
    shift = 0
    while bool(alive.any()) and shift < limit:
        lengths += alive
        shift += 1
        if shift > last:
            break
        before = torch.full_like(earlier, -1)
        before[shift:] = earlier[: last - shift]
        alive = alive & (before == tokens[last - shift])
    hits = lengths >= allowed_length
    if not bool(hits.any()):
        return scores
    followers = tokens[1:][hits]  # the token after each match would extend it
    longest = torch.zeros(scores.shape[-1], dtype=torch.long, device=scores.device)
    longest.scatter_reduce_(0, followers.to(scores.device), lengths[hits].to(scores.device), "amax")
    penalised = longest >= allowed_length
    exponent = (longest - allowed_length).clamp(min=0).to(scores.dtype)
    if base > 1.000001:
        exponent = exponent.clamp(max=math.floor(FLOAT_MAX_LOG / math.log(base)))
    penalty = multiplier * torch.pow(torch.tensor(base, dtype=scores.dtype, device=scores.device), exponent)
    return scores - torch.where(penalised, penalty, torch.zeros_like(penalty))[None]


# -- the penalties (sampler 6) ---------------------------------------------------------------


def repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float, last_n: int,
                       slope: float = 1.0, presence: float = 0.0, frequency: float = 0.0) -> torch.Tensor:
    """KoboldCpp's repetition penalty over the last `last_n` tokens (0: all): a token seen
    there has its score divided by the penalty (multiplied when negative). With a slope
    below 1 the older half of the window gets the gentler 1 + (penalty - 1) * slope.
    Each seen token also loses `presence`, and `frequency` times its count."""
    window = history[0, -last_n:] if last_n > 0 else history[0]
    n = int(window.shape[0])
    if n == 0 or (penalty == 1.0 and presence == 0.0 and frequency == 0.0):
        return scores
    vocab = scores.shape[-1]
    counts = torch.zeros(vocab, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(0, window.to(scores.device), torch.ones(n, dtype=scores.dtype, device=scores.device))
    seen = counts > 0
    near = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
    near[window[(n + 1) // 2:].to(scores.device)] = True  # the newer half (KoboldCpp: index * 2 >= n)
    reduced = 1.0 + (penalty - 1.0) * slope if penalty > 1.0 and 0 < slope < 1 else penalty
    factor = torch.where(near, torch.tensor(penalty, device=scores.device),
                         torch.tensor(reduced, device=scores.device)).to(scores.dtype)
    row = scores[0]
    penalised = torch.where(row <= 0, row * factor, row / factor)
    penalised = penalised - presence - frequency * counts
    return torch.where(seen, penalised, row)[None]


# -- truncation (samplers 0-4) -----------------------------------------------------------------


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return _remove(scores, scores < kth)


def top_a(scores: torch.Tensor, a: float) -> torch.Tensor:
    """Remove tokens less likely than a * p_max^2."""
    if a <= 0:
        return scores
    probs = _probs(scores)
    return _remove(scores, probs < a * probs.max() ** 2)


def top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches p (at least one)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = _probs(sorted_scores).cumsum(dim=-1)
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] >= p  # a token goes once those before it reach p
    return _remove(scores, drop_sorted.scatter(-1, order, drop_sorted))


def min_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Remove tokens less likely than p times the most likely one."""
    if p <= 0:
        return scores
    probs = _probs(scores)
    return _remove(scores, probs < p * probs.max())


def tail_free(scores: torch.Tensor, z: float) -> torch.Tensor:
    """Tail-free sampling: cut where the normalized absolute second derivative of the
    sorted probabilities has added up to more than z."""
    finite = int(torch.isfinite(scores).sum())
    if z >= 1.0 or finite <= 2:
        return scores
    sorted_scores, order = torch.sort(scores, descending=True)
    probs = _probs(sorted_scores)[0, :finite]
    second = (probs[:-2] - 2 * probs[1:-1] + probs[2:]).abs()
    total = second.sum()
    second = second / total if total > 1e-6 else torch.full_like(second, 1.0 / second.numel())
    over = (second.cumsum(0) > z).nonzero()
    over = over[over >= 1]  # keep at least one
    keep = int(over[0]) if over.numel() else finite
    drop_sorted = torch.ones_like(sorted_scores, dtype=torch.bool)
    drop_sorted[0, :keep] = False
    return _remove(scores, drop_sorted.scatter(-1, order, drop_sorted))


def typical(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the
    distribution's entropy until their probability reaches p."""
    if p >= 1.0:
        return scores
    logp = torch.log_softmax(scores, dim=-1)
    probs = logp.exp()
    entropy = -(torch.nan_to_num(probs * logp)).sum(dim=-1, keepdim=True)
    distance = (-logp - entropy).abs()
    sorted_distance, order = torch.sort(distance, dim=-1)
    cumulative = probs.gather(-1, order).cumsum(dim=-1)
    drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
    drop_sorted[..., 1:] = cumulative[..., :-1] >= p
    return _remove(scores, drop_sorted.scatter(-1, order, drop_sorted))


def top_n_sigma(scores: torch.Tensor, n: float) -> torch.Tensor:
    """Keep the tokens whose score is within n standard deviations of the best one."""
    if n <= 0:
        return scores
    finite = scores[torch.isfinite(scores)]
    if finite.numel() < 2:
        return scores
    return _remove(scores, scores < finite.max() - n * finite.std(correction=0))


# -- temperature (sampler 5) ------------------------------------------------------------------


def smoothing(scores: torch.Tensor, factor: float, curve: float = 1.0) -> torch.Tensor:
    """Quadratic ("smooth") sampling: each score becomes h - k*f*d^2 + s*f*d^3 with d its
    distance below the best score h, k = (3 - curve) / 2 and s = (curve - 1) / 2
    (curve 1: KoboldCpp's h - f*d^2)."""
    if factor <= 0:
        return scores
    best = scores.max()
    diff = scores - best
    k, s = (3.0 - curve) / 2.0, (curve - 1.0) / 2.0
    return torch.where(torch.isfinite(scores), best - k * factor * diff ** 2 + s * factor * diff ** 3, scores)


def dynamic_temperature(scores: torch.Tensor, low: float, high: float, exponent: float) -> torch.Tensor:
    """Entropy-scaled temperature: low + (high - low) * (H / H_max)^exponent, H_max the
    entropy of a uniform choice among the tokens left."""
    left = int(torch.isfinite(scores).sum())
    if left <= 1:
        return scores
    logp = torch.log_softmax(scores, dim=-1)
    entropy = float(-(torch.nan_to_num(logp.exp() * logp)).sum())
    normalized = entropy / math.log(left)
    temperature = low + (high - low) * normalized ** exponent
    return _scale(scores, temperature)


def _scale(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature; at (almost) 0 only the best token stays."""
    if temperature < 1 / 256:
        return _remove(scores, scores < scores.max())
    return scores / temperature


def temperature(scores: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    if settings.dynatemp_range > 0:
        low = max(0.0, settings.temperature - settings.dynatemp_range)
        high = max(0.0, settings.temperature + settings.dynatemp_range)
        scores = dynamic_temperature(scores, low, high, max(0.0, settings.dynatemp_exponent))
    else:
        scores = _scale(scores, settings.temperature)
    return smoothing(scores, settings.smoothing_factor, settings.smoothing_curve)


# -- XTC, and the pick ----------------------------------------------------------------------------


def xtc(scores: torch.Tensor, threshold: float, roll: float, probability: float) -> torch.Tensor:
    """Exclude Top Choices: when `roll` < probability, every token at or above the
    threshold except the least likely of them is removed (when there are two or more)."""
    if threshold > 0.5 or probability <= 0 or roll >= probability:
        return scores
    probs = _probs(scores)[0]
    above = probs >= threshold
    if int(above.sum()) < 2:
        return scores
    least = torch.where(above, probs, torch.full_like(probs, 2.0)).argmin()
    drop = above.clone()
    drop[least] = False
    return _remove(scores, drop[None])


def _draw(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(_probs(scores), 1, generator=generator).squeeze(1)


class Mirostat:
    """Mirostat v1 or v2: a pick that steers each token's surprise toward tau. Its state
    (mu, starting at 2 tau) belongs to one sequence."""

    def __init__(self, version: int, tau: float, eta: float):
        self.version, self.tau, self.eta = version, tau, eta
        self.mu = 2.0 * tau

    def pick(self, scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        probs = _probs(scores)
        sorted_probs, order = torch.sort(probs, descending=True)
        if self.version == 1:
            n = min(MIROSTAT_M, int((sorted_probs > 0).sum()))
            i = torch.arange(n - 1, dtype=torch.float32, device=scores.device)
            t = torch.log((i + 2) / (i + 1))
            b = torch.log(sorted_probs[0, : n - 1] / sorted_probs[0, 1:n])
            s_hat = float((t * b).sum() / (t * t).sum()) if n > 1 else 1.0
            epsilon = s_hat - 1
            vocab = scores.shape[-1]
            k = ((epsilon * 2 ** self.mu) / (1 - vocab ** -epsilon)) ** (1 / s_hat) if epsilon != 0 else vocab
            kept = top_k(scores, max(1, int(k)) if math.isfinite(k) else vocab)
        else:
            surprise = -torch.log2(sorted_probs)
            keep = max(1, int((surprise <= self.mu).sum()))  # sorted: the first `keep` pass
            drop_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
            drop_sorted[0, :keep] = False
            kept = _remove(scores, drop_sorted.scatter(-1, order, drop_sorted))
        token = _draw(kept, generator)
        observed = -math.log2(float(_probs(kept)[0, token]))
        self.mu -= self.eta * (observed - self.tau)
        return token


class SamplerChain:
    """One request's transforms and pick, built from its settings (see the module's text)."""

    def __init__(self, settings: SamplingSettings, tokenizer: Any = None):
        self.settings = settings
        self.bias = dict(settings.logit_bias)
        self.breakers = DryBreakers.of(tokenizer, settings.dry_sequence_breakers) \
            if settings.dry_multiplier > 0 else DryBreakers(frozenset(), ())
        self.mirostat = Mirostat(settings.mirostat, settings.mirostat_tau, settings.mirostat_eta) \
            if settings.mirostat and not settings.greedy else None
        self.extra: list = []  # more transforms (scores, history) -> scores, after the bias (tests)

    @property
    def needs_history(self) -> bool:
        """Whether any transform reads the tokens so far (the core keeps them only then)."""
        s = self.settings
        return bool(s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty
                    or s.dry_multiplier > 0 or self.extra)

    def _penalties(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return repetition_penalty(scores, history, s.repetition_penalty, s.repetition_penalty_range,
                                  s.repetition_penalty_slope, s.presence_penalty, s.frequency_penalty)

    def _stage(self, stage: int, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if stage == TOP_K:
            return top_k(scores, s.top_k)
        if stage == TOP_A:
            return top_a(scores, s.top_a)
        if stage == TOP_P:
            return min_p(top_p(scores, s.top_p), s.min_p)
        if stage == TFS:
            return tail_free(scores, s.tfs)
        if stage == TYPICAL:
            return typical(scores, s.typical_p)
        if stage == TEMPERATURE:
            return temperature(scores, s)
        return self._penalties(scores, history)

    def scores(self, history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The scores before the pick (for a sampled pick: what the draw is made from)."""
        s = self.settings
        scores = logit_bias(logits.float(), self.bias, s.banned_tokens)
        for transform in self.extra:
            scores = transform(scores, history)
        scores = dry(scores, history, s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_range, self.breakers)
        if s.greedy:
            return self._penalties(scores, history)
        scores = top_n_sigma(scores, s.top_n_sigma)
        if self.mirostat is not None:
            return temperature(self._penalties(scores, history), s)
        for stage in s.sampler_order:
            scores = self._stage(stage, scores, history)
        return scores

    def pick(self, history: torch.Tensor, logits: torch.Tensor, generator: torch.Generator | None,
             banned_here: tuple[int, ...] = ()) -> torch.Tensor:
        """The next token id as a [1] tensor on the logits' device. `banned_here`: tokens
        banned at this position only (a banned phrase began with them here)."""
        if banned_here:
            logits = logits.clone()
            logits[0, torch.tensor(banned_here, device=logits.device)] = NEG_INF
        scores = self.scores(history, logits)
        if self.settings.greedy:
            return scores.argmax(dim=-1)
        if self.mirostat is not None:
            return self.mirostat.pick(scores, generator)
        s = self.settings
        if s.xtc_probability > 0 and s.xtc_threshold <= 0.5:
            roll = float(torch.rand(1, generator=generator, device=scores.device))
            scores = xtc(scores, s.xtc_threshold, roll, s.xtc_probability)
        # The draw happens where the logits are: only the chosen id ever crosses to the host.
        return _draw(scores, generator)
