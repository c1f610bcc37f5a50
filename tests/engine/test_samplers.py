"""Each transform of the sampler chain against a reference computed here from its published
definition (plain Python over lists, no torch), and the chain's order, greedy and seeds."""

import math
import random

import pytest
import torch

from kobold_desktop.engine import samplers as S
from kobold_desktop.engine.sampling import SamplingSettings, SettingsError

LOGITS = [2.0, 1.5, 1.4, 0.3, -0.2, -1.0, -3.0, 0.9]


def softmax(values):
    finite = [v for v in values if v != -math.inf]
    top = max(finite)
    exps = [math.exp(v - top) if v != -math.inf else 0.0 for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def tensor(values):
    return torch.tensor([values], dtype=torch.float32)


def kept(scores):
    return [i for i, v in enumerate(scores[0].tolist()) if v != -math.inf]


# -- penalties ----------------------------------------------------------------------------------


def test_repetition_penalty_only_touches_recent_tokens():
    scores = tensor([2.0, 2.0, -2.0, 2.0])
    history = torch.tensor([[0, 3, 2]])
    assert S.repetition_penalty(scores, history, 2.0, 2).tolist() == [[2.0, 2.0, -4.0, 1.0]]  # 0 is out of range
    assert S.repetition_penalty(scores, history, 2.0, 0).tolist() == [[1.0, 2.0, -4.0, 1.0]]


def test_the_slope_softens_the_older_half_and_presence_and_frequency_subtract():
    scores = tensor([4.0, 4.0, 4.0, 4.0])
    history = torch.tensor([[0, 1, 1, 2]])  # older half: 0 1; newer half: 1 2
    out = S.repetition_penalty(scores, history, 2.0, 0, slope=0.5, presence=0.25, frequency=0.5)[0].tolist()
    reduced = 1 + (2.0 - 1) * 0.5
    assert out[0] == pytest.approx(4.0 / reduced - 0.25 - 0.5 * 1)
    assert out[1] == pytest.approx(4.0 / 2.0 - 0.25 - 0.5 * 2)  # in the newer half: the full penalty
    assert out[2] == pytest.approx(4.0 / 2.0 - 0.25 - 0.5 * 1)
    assert out[3] == 4.0


def test_logit_bias_adds_and_minus_100_bans():
    out = S.logit_bias(tensor(LOGITS), {1: 2.5, 3: -100.0}, banned=(7,))[0].tolist()
    assert out[1] == pytest.approx(4.0) and out[3] == -math.inf and out[7] == -math.inf and out[0] == 2.0


# -- DRY --------------------------------------------------------------------------------------------


def dry_reference(context, vocab, multiplier, base, allowed, breaker_tokens=()):
    """For each candidate c: the longest L such that the context's last L tokens also occur
    earlier followed by c, the match not crossing a breaker; penalty m * b^(L - allowed)."""
    n = len(context)
    limit = n
    for distance in range(n):
        if context[n - 1 - distance] in breaker_tokens:
            limit = distance
            break
    penalties = [0.0] * vocab
    for j in range(n - 1):  # a match ending at j, followed by context[j + 1]
        length = 0
        while length < limit and j - length >= 0 and context[j - length] == context[n - 1 - length]:
            length += 1
        if length >= allowed:
            c = context[j + 1]
            penalties[c] = max(penalties[c], multiplier * base ** (length - allowed))
    return penalties


@pytest.mark.parametrize("seed", range(6))
def test_dry_equals_its_definition_on_random_repetitive_contexts(seed):
    rng = random.Random(seed)
    phrase = [rng.randrange(8) for _ in range(5)]
    context = []
    while len(context) < 40:
        context += phrase if rng.random() < 0.6 else [rng.randrange(8)]
    breakers = S.DryBreakers(frozenset({7}) if seed % 2 else frozenset(), ())
    scores = torch.zeros(1, 8)
    out = S.dry(scores, torch.tensor([context]), 0.8, 1.75, 2, 0, breakers)[0].tolist()
    want = dry_reference(context, 8, 0.8, 1.75, 2, breakers.tokens)
    assert out == pytest.approx([-p for p in want], rel=1e-5)


def test_dry_penalises_the_token_that_continues_a_repeated_phrase():
    context = [1, 2, 3, 4, 9, 1, 2, 3]  # "1 2 3" again: 4 would repeat "1 2 3 4"
    out = S.dry(torch.zeros(1, 10), torch.tensor([context]), 1.0, 2.0, 2, 0, S.DryBreakers(frozenset(), ()))
    assert out[0, 4] == pytest.approx(-2.0) and out[0].tolist().count(0.0) == 9  # L=3: 1 * 2^(3-2)
    broken = S.dry(torch.zeros(1, 10), torch.tensor([context]), 1.0, 2.0, 2, 0,
                   S.DryBreakers(frozenset({2}), ()))  # a breaker inside the match: L is 1 < 2
    assert broken.abs().sum() == 0
    far = S.dry(torch.zeros(1, 10), torch.tensor([context]), 1.0, 2.0, 2, 4, S.DryBreakers(frozenset(), ()))
    assert far.abs().sum() == 0  # the earlier "1 2 3 4" is out of the last 4 tokens


def test_dry_breakers_come_from_the_tokenizers_texts():
    from ..helpers import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    breakers = S.DryBreakers.of(tokenizer, ("\n", ":"))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    assert breakers.tokens == {i for i, t in enumerate(texts) if "\n" in t or ":" in t}
    assert S.DryBreakers.of(tokenizer, ("\n", ":")) is breakers  # built once


# -- truncation -------------------------------------------------------------------------------------


def test_top_k_top_p_min_p_top_a():
    probs = softmax(LOGITS)
    order = sorted(range(len(LOGITS)), key=lambda i: -probs[i])
    assert kept(S.top_k(tensor(LOGITS), 3)) == sorted(order[:3])
    total, want = 0.0, []
    for i in order:
        if total >= 0.8:
            break
        want.append(i)
        total += probs[i]
    assert kept(S.top_p(tensor(LOGITS), 0.8)) == sorted(want)
    assert kept(S.min_p(tensor(LOGITS), 0.3)) == [i for i, p in enumerate(probs) if p >= 0.3 * max(probs)]
    assert kept(S.top_a(tensor(LOGITS), 0.5)) == [i for i, p in enumerate(probs) if p >= 0.5 * max(probs) ** 2]


def test_tail_free_sampling_cuts_at_the_second_derivative():
    probs = sorted(softmax(LOGITS), reverse=True)
    first = [probs[i] - probs[i + 1] for i in range(len(probs) - 1)]
    second = [abs(first[i] - first[i + 1]) for i in range(len(first) - 1)]
    second = [v / sum(second) for v in second]
    z, total, keep = 0.6, 0.0, len(probs)
    for i, v in enumerate(second):
        total += v
        if total > z and i >= 1:
            keep = i
            break
    assert len(kept(S.tail_free(tensor(LOGITS), z))) == keep


def test_typical_sampling_keeps_the_tokens_nearest_the_entropy():
    probs = softmax(LOGITS)
    entropy = -sum(p * math.log(p) for p in probs)
    order = sorted(range(len(probs)), key=lambda i: abs(-math.log(probs[i]) - entropy))
    total, want = 0.0, []
    for i in order:
        if total >= 0.5:
            break
        want.append(i)
        total += probs[i]
    assert kept(S.typical(tensor(LOGITS), 0.5)) == sorted(want)


def test_top_n_sigma_keeps_scores_near_the_best():
    mean = sum(LOGITS) / len(LOGITS)
    std = math.sqrt(sum((v - mean) ** 2 for v in LOGITS) / len(LOGITS))
    assert kept(S.top_n_sigma(tensor(LOGITS), 1.0)) == [i for i, v in enumerate(LOGITS) if v >= max(LOGITS) - std]


# -- temperature ----------------------------------------------------------------------------------


def test_dynamic_temperature_follows_the_entropy():
    probs = softmax(LOGITS)
    entropy = -sum(p * math.log(p) for p in probs)
    t = 0.5 + (1.5 - 0.5) * (entropy / math.log(len(LOGITS))) ** 2.0
    out = S.dynamic_temperature(tensor(LOGITS), 0.5, 1.5, 2.0)[0].tolist()
    assert out == pytest.approx([v / t for v in LOGITS], rel=1e-5)


def test_smoothing_is_quadratic_around_the_best_score_and_the_curve_adds_a_cubic():
    out = S.smoothing(tensor(LOGITS), 0.5)[0].tolist()
    assert out == pytest.approx([2.0 - 0.5 * (v - 2.0) ** 2 for v in LOGITS], rel=1e-5, abs=1e-6)
    curved = S.smoothing(tensor(LOGITS), 0.5, curve=2.0)[0].tolist()
    assert curved == pytest.approx([2.0 - 0.5 * 0.5 * (v - 2.0) ** 2 + 0.5 * 0.5 * (v - 2.0) ** 3 for v in LOGITS],
                                   rel=1e-5, abs=1e-6)


# -- XTC and mirostat ------------------------------------------------------------------------------


def test_xtc_removes_the_top_choices_but_the_least_likely_of_them():
    probs = softmax(LOGITS)
    above = [i for i, p in enumerate(probs) if p >= 0.1]
    least = min(above, key=lambda i: probs[i])
    out = S.xtc(tensor(LOGITS), 0.1, roll=0.2, probability=0.5)
    assert kept(out) == sorted(set(range(len(LOGITS))) - (set(above) - {least}))
    assert kept(S.xtc(tensor(LOGITS), 0.1, roll=0.7, probability=0.5)) == list(range(len(LOGITS)))  # no luck
    assert kept(S.xtc(tensor(LOGITS), 0.6, roll=0.0, probability=1.0)) == list(range(len(LOGITS)))  # off above 0.5


def test_mirostat_v2_truncates_by_surprise_and_moves_mu_per_sequence():
    one, two = S.Mirostat(2, tau=3.0, eta=0.1), S.Mirostat(2, tau=3.0, eta=0.1)
    generator = torch.Generator().manual_seed(0)
    token = int(one.pick(tensor(LOGITS), generator))
    probs = softmax(LOGITS)
    allowed = [i for i, p in enumerate(probs) if -math.log2(p) <= 6.0]
    assert token in allowed
    renormalized = probs[token] / sum(probs[i] for i in allowed)
    assert one.mu == pytest.approx(6.0 - 0.1 * (-math.log2(renormalized) - 3.0), rel=1e-5)
    assert two.mu == 6.0  # another sequence's state is its own


# -- the chain ------------------------------------------------------------------------------------------


def test_the_order_matters_as_koboldcpp_defines_it():
    """Temperature last (the default) truncates on the untempered distribution."""
    settings = SamplingSettings(temperature=3.0, top_p=0.6, repetition_penalty=1.0)
    history = torch.tensor([[0]])
    last = S.SamplerChain(settings).scores(history, tensor(LOGITS))
    first = S.SamplerChain(settings.with_changes(sampler_order=(5, 6, 0, 1, 3, 4, 2))).scores(history, tensor(LOGITS))
    assert kept(last) == kept(S.top_p(tensor(LOGITS), 0.6))
    assert len(kept(first)) > len(kept(last))  # hotter first: more tokens make up 60%


def test_greedy_takes_the_argmax_after_bias_and_penalties_and_ignores_xtc():
    settings = SamplingSettings(temperature=0, repetition_penalty=4.0, xtc_probability=1.0, xtc_threshold=0.01,
                                logit_bias=((2, 0.2),))
    chain = S.SamplerChain(settings)
    assert int(chain.pick(torch.tensor([[0]]), tensor(LOGITS), None)) == 2  # 0 penalised to 0.5; 2 biased to 1.6, past 1's 1.5


def test_seeded_picks_repeat_and_mirostat_state_is_per_chain():
    settings = SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.0, mirostat=2, mirostat_tau=2.0)
    runs = []
    for _ in range(2):
        chain, generator = S.SamplerChain(settings), torch.Generator().manual_seed(5)
        runs.append([int(chain.pick(torch.tensor([[0]]), tensor(LOGITS), generator)) for _ in range(20)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("bad", [dict(top_a=2), dict(tfs=0), dict(mirostat=3), dict(sampler_order=(1, 1)),
                                 dict(sampler_order=(7,)), dict(dry_base=0.5), dict(smoothing_curve=5),
                                 dict(presence_penalty=3), dict(logit_bias=((-1, 1.0),)), dict(top_a=float("nan")),
                                 dict(logit_bias=((1, float("inf")),))])
def test_out_of_range_settings_are_refused_with_a_message(bad):
    with pytest.raises(SettingsError):
        SamplingSettings(**bad)


def test_settings_round_trip_through_json():
    import json

    settings = SamplingSettings(logit_bias=((5, -2.0),), banned_tokens=(3, 1), sampler_order=(0, 6),
                                dry_sequence_breakers=("\n",))
    assert SamplingSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
