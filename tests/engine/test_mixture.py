"""Mixtures of soft prompts in the engine: the mixed distribution, the posterior, reuse.

Every expectation is computed here by hand from plain forward passes of the model (one
per member and step, the whole text each time), never from the code under test.
"""

import math

import pytest
import torch

from kobold_desktop.engine import Engine, ModelError, SamplingSettings
from kobold_desktop.engine.mixture import mix, posterior
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.softprompt.mixture import Mixture, MixtureError, MixtureMember

GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=8)
PROMPT = "Once upon a time there was a"


def write_softprompt(folder, name, n, hidden, seed):
    torch.manual_seed(seed)
    path = folder / f"{name}.zip"
    kobold_zip.write(path, torch.randn(n, hidden) * 2, Metadata(name=name))
    return path


def mixture_of(paths, weights, mode="bayes"):
    return Mixture("test", mode, tuple(MixtureMember(str(p), w) for p, w in zip(paths, weights)))


@pytest.fixture
def members(arch_engine, tmp_path):
    """Three soft prompts of different lengths for this architecture."""
    _, engine = arch_engine
    engine.set_softprompt(None)
    engine.prefix_cache.clear()
    return [write_softprompt(tmp_path, name, n, engine.hidden_size, seed)
            for name, n, seed in (("A", 4, 1), ("B", 9, 2), ("C", 1, 3))]


def member_logprobs(engine, path, ids):
    """log p_k(next token | soft prompt k, ids) for every position, from one plain forward."""
    loaded = engine.loaded
    active = engine.prepare_softprompts([path])
    with torch.inference_mode():
        embeds = loaded.model.get_input_embeddings()(torch.tensor([ids]))
        inputs = torch.cat([active.tensor[None], embeds], dim=1)
        logits = loaded.model(inputs_embeds=inputs).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[active.n_tokens - 1:]  # row j predicts ids[j]


@pytest.mark.parametrize("settings", [GREEDY, SamplingSettings(temperature=0, max_new_tokens=12)],
                         ids=["greedy", "with-repetition-penalty"])
def test_a_mixture_of_one_is_that_softprompt(arch_engine, members, settings):
    _, engine = arch_engine
    single = engine.generate(PROMPT, settings, softprompt=engine.prepare_softprompts([members[1]]))
    engine.prefix_cache.clear()
    for weights, paths in (([1.0], members[1:2]), ([0.0, 1.0, 0.0], members)):
        engine.prefix_cache.clear()
        mixed = engine.generate(PROMPT, settings, softprompt=engine.prepare_mixture(mixture_of(paths, weights), paths))
        assert mixed.token_ids == single.token_ids
        assert mixed.text == single.text
        assert mixed.mixture_weights == (1.0,)


@pytest.mark.parametrize("mode", ["fixed", "bayes"])
def test_mixed_distribution_equals_the_weighted_sum_by_hand(arch_engine, members, mode):
    _, engine = arch_engine
    loaded = engine.loaded
    weights = [0.5, 0.3, 0.2]
    active = engine.prepare_mixture(mixture_of(members, weights, mode), members)
    prompt_ids = engine.encode(PROMPT)
    request = active.request(prompt_ids, GREEDY, tokenizer=loaded.tokenizer)
    from kobold_desktop.engine.core import StepCore

    core = StepCore(loaded.model)
    core.add(request)
    seen_mixed, seen_weights, chosen = [], [], []
    for _ in range(5):
        before = torch.tensor(request.weights())
        ((_, token),) = core.step()
        seen_mixed.append(request.mixed[0].clone())
        seen_weights.append(before)
        chosen.append(token)
    core.close()

    log_w = torch.tensor(weights).log()
    for step in range(5):
        ids = prompt_ids + chosen[:step]
        per_member = [member_logprobs(engine, path, ids) for path in members]
        if mode == "bayes":  # pi_k proportional to w_k * p_k(every token so far)
            evidence = torch.stack([lp[torch.arange(len(ids)), torch.tensor(ids)].sum() for lp in per_member])
            pi = torch.softmax(log_w + evidence, dim=0)
        else:
            pi = torch.tensor(weights)
        expected = sum(pi[k] * per_member[k][-1].exp() for k in range(3))
        assert torch.allclose(seen_weights[step], pi, atol=1e-4), (step, seen_weights[step], pi)
        assert torch.allclose(seen_mixed[step].exp(), expected, atol=1e-5)
        assert chosen[step] == int(expected.argmax())  # temperature 0: greedy on the mixture


def test_posterior_update_by_hand():
    prior = torch.tensor([0.7, 0.3]).log()
    token = torch.tensor([math.log(0.1), math.log(0.4)])
    # 0.7 * 0.1 = 0.07 and 0.3 * 0.4 = 0.12: the second member now leads, 0.12 / 0.19
    updated = posterior(prior, token).exp()
    assert torch.allclose(updated, torch.tensor([0.07 / 0.19, 0.12 / 0.19]))
    assert torch.allclose(mix(prior, torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)]])).exp(),
                          torch.tensor([0.7 * 0.5 + 0.3 * 0.9, 0.7 * 0.5 + 0.3 * 0.1]))


def test_bayes_weights_are_reported_while_streaming(arch_engine, members):
    _, engine = arch_engine
    active = engine.prepare_mixture(mixture_of(members[:2], [0.5, 0.5]), members[:2])
    events = list(engine.stream(PROMPT, GREEDY.with_changes(max_new_tokens=6), softprompt=active))
    chunks = [e for e in events if hasattr(e, "weights") and not hasattr(e, "finish_reason")]
    assert chunks and all(len(c.weights) == 2 and abs(sum(c.weights) - 1) < 1e-5 for c in chunks)
    assert len(events[-1].mixture_weights) == 2


def test_a_later_turn_reuses_every_members_work_and_scores(arch_engine, members):
    """The second turn runs only the new tokens of each member (plus the one position that
    gives the first new token's score), and its output equals a run with nothing cached."""
    _, engine = arch_engine
    active = engine.prepare_mixture(mixture_of(members, [0.4, 0.4, 0.2]), members)
    first = engine.generate(PROMPT, GREEDY, softprompt=active)
    story = list(engine.encode(PROMPT)) + list(first.token_ids) + engine.encode(" and then", add_special_tokens=False)
    second = engine.generate(story, GREEDY, softprompt=active)
    assert second.cached_tokens > 0
    engine.prefix_cache.clear()
    fresh = engine.generate(story, GREEDY, softprompt=active)
    assert fresh.cached_tokens == 0
    assert second.token_ids == fresh.token_ids
    assert second.mixture_weights == pytest.approx(fresh.mixture_weights, abs=1e-4)


def test_a_mixture_runs_in_a_batch_beside_plain_requests(arch_engine, members):
    _, engine = arch_engine
    loaded = engine.loaded
    active = engine.prepare_mixture(mixture_of(members, [0.2, 0.5, 0.3]), members)
    plain = engine.prepare_softprompts([members[0]])
    alone = [engine.generate(PROMPT, GREEDY, softprompt=active), engine.generate("The knight", GREEDY, softprompt=plain)]
    engine.prefix_cache.clear()
    results = [[], []]
    requests = [loaded.new_request(engine.encode(PROMPT), active, GREEDY, results[0].append),
                loaded.new_request(engine.encode("The knight"), plain, GREEDY, results[1].append)]
    engine.run(requests)
    assert results[0][-1].token_ids == alone[0].token_ids
    assert results[1][-1].token_ids == alone[1].token_ids


def test_a_bad_member_is_refused_and_the_previous_softprompt_stays(gpt2_engine, tmp_path):
    engine = gpt2_engine
    good = write_softprompt(tmp_path, "good", 3, engine.hidden_size, 1)
    wide = write_softprompt(tmp_path, "wide", 3, engine.hidden_size + 8, 2)
    previous = engine.set_softprompt(good)
    with pytest.raises(MixtureError, match="member 'wide.zip'.*hidden size"):
        engine.set_mixture(mixture_of([good, wide], [0.5, 0.5]), [good, wide])
    assert engine.softprompt is previous
    with pytest.raises(MixtureError, match="member .gone.zip. cannot be used: does not exist"):
        engine.set_mixture(mixture_of([good, tmp_path / "gone.zip"], [0.5, 0.5]), [good, tmp_path / "gone.zip"])
    assert engine.softprompt is previous
    engine.set_softprompt(None)


def test_mixture_light_label_and_context_room(gpt2_engine, tmp_path):
    engine = gpt2_engine
    a = write_softprompt(tmp_path, "Proverbs", 3, engine.hidden_size, 1)
    b = write_softprompt(tmp_path, "Laws of Leviticus", 10, engine.hidden_size, 2)
    active = engine.set_mixture(mixture_of([a, b], [7, 3]), [a, b])
    assert active.name == "Mixture: Proverbs 70% + Laws of Leviticus 30%"
    assert active.n_tokens == 10
    assert engine.context_budget(GREEDY) == engine.context_length - GREEDY.max_new_tokens - 10
    engine.set_softprompt(None)


def test_a_mixture_survives_loading_another_model(model_dirs, tmp_path):
    from ..helpers import FLOAT32

    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    paths = [write_softprompt(tmp_path, n, 2, engine.hidden_size, i) for i, n in enumerate("XY")]
    engine.set_mixture(mixture_of(paths, [1, 1]), paths)
    engine.load(model_dirs["gpt2"], FLOAT32)
    assert engine.softprompt.name == "Mixture: X 50% + Y 50%"
    engine.unload()
    with pytest.raises(ModelError):
        engine.prepare_mixture(mixture_of(paths, [1, 1]), paths)
