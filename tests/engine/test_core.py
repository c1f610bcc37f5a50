"""The stepping core: batches, requests that join a running batch, prefix reuse, isolation.

Every comparison is against the same request run alone with nothing cached, greedy,
token for token, on the five tiny architectures.
"""

import gc
import threading

import pytest
import torch

from kobold_desktop.engine import Engine, GenerationResult, ModelError, SamplingSettings, TextChunk
from kobold_desktop.engine.core import StepCore
from kobold_desktop.engine.sequence import Sequence
from kobold_desktop.softprompt import Metadata, kobold_zip

from ..helpers import FLOAT32, greedy_reference

GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=16)
PROMPTS = ["The knight", "Once upon a time there was a", "In", "She opened the door and saw"]


class TokenCounter:
    """Counts the positions the model is run on (per row), from outside our code."""

    def __init__(self, model):
        self.positions = 0
        self.calls = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        self.positions += int(inputs.shape[1])
        self.calls += 1

    def close(self):
        self._handle.remove()


@pytest.fixture
def softprompts(arch_engine, tmp_path):
    _, engine = arch_engine
    found = [None]
    for n in (3, 7, 12):
        torch.manual_seed(n)
        kobold_zip.write(tmp_path / f"{n}.zip", torch.randn(n, engine.hidden_size), Metadata(name=str(n)))
        found.append(engine.prepare_softprompts([tmp_path / f"{n}.zip"]))
    return found


def reference(engine, prompt, max_new_tokens):
    """Greedy decoding from first principles (a full forward pass per token)."""
    ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return tuple(greedy_reference(engine.loaded.model, ids, max_new_tokens))


def alone(engine, prompt, settings, softprompt):
    engine.prefix_cache.clear()
    result = engine.generate(prompt, settings, softprompt=softprompt)
    engine.prefix_cache.clear()
    return result


def make_sequence(engine, prompt, settings, softprompt, events):
    loaded = engine.loaded
    return Sequence(engine.encode(prompt), softprompt.tensor if softprompt else None, settings, events.append,
                    tokenizer=loaded.tokenizer, eos=loaded.eos_ids)


def run_core(engine, sequences_at_step):
    """Add each sequence at its step; step until all are done."""
    core = StepCore(engine.loaded.model)
    step = 0
    pending = sorted(sequences_at_step, key=lambda pair: pair[0])
    while pending or core.active:
        while pending and pending[0][0] <= step:
            core.add(pending.pop(0)[1])
        if core.active:
            core.step()
        step += 1
    return core


SETTINGS = [GREEDY, GREEDY.with_changes(max_new_tokens=5), GREEDY.with_changes(stop=("e",)),
            SamplingSettings(temperature=0.9, top_k=20, max_new_tokens=10, seed=11)]


def decode_runs(result):
    """Positions run after the prompt: every generated token but the last, which is run
    only when the model answered it with EOS (no stop strings in these settings)."""
    return result.generated_tokens - (0 if result.finish_reason == "stop" else 1)


def check_equal(arch, expected, events):
    for i, want in enumerate(expected):
        result = events[i][-1]
        assert isinstance(result, GenerationResult), (arch, i, result)
        assert result.token_ids == want.token_ids, (arch, i)
        assert (result.text, result.finish_reason) == (want.text, want.finish_reason)
        assert "".join(e.text for e in events[i] if isinstance(e, TextChunk)) == result.text


def test_a_batch_equals_each_request_alone(arch_engine, softprompts):
    arch, engine = arch_engine
    expected = [alone(engine, p, s, sp) for p, s, sp in zip(PROMPTS, SETTINGS, softprompts)]
    events = [[] for _ in PROMPTS]
    seqs = [make_sequence(engine, p, s, sp, events[i]) for i, (p, s, sp) in enumerate(zip(PROMPTS, SETTINGS, softprompts))]
    run_core(engine, [(0, seq) for seq in seqs])
    check_equal(arch, expected, events)
    for i, sp in enumerate(softprompts):
        assert events[i][-1].softprompt_tokens == (sp.n_tokens if sp else 0)


def test_requests_that_join_a_running_batch_at_different_steps(arch_engine, softprompts):
    arch, engine = arch_engine
    settings = [GREEDY.with_changes(max_new_tokens=20), GREEDY, GREEDY.with_changes(max_new_tokens=6),
                SamplingSettings(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=5)]
    expected = [alone(engine, p, s, sp) for p, s, sp in zip(PROMPTS, settings, softprompts)]
    events = [[] for _ in PROMPTS]
    seqs = [make_sequence(engine, p, s, sp, events[i]) for i, (p, s, sp) in enumerate(zip(PROMPTS, settings, softprompts))]
    run_core(engine, list(zip((0, 3, 4, 9), seqs)))
    check_equal(arch, expected, events)
    for i in (0, 1):  # and directly against transformers, for rows with no soft prompt / greedy
        if softprompts[i] is None:
            assert events[i][-1].token_ids == reference(engine, PROMPTS[i], settings[i].max_new_tokens)


def test_a_finished_row_leaves_at_once(engine):
    """A short request's result arrives while a long one is still running."""
    events_long, events_short = [], []
    long = make_sequence(engine, "The knight", GREEDY.with_changes(max_new_tokens=40), None, events_long)
    short = make_sequence(engine, "In", GREEDY.with_changes(max_new_tokens=3), None, events_short)
    core = StepCore(engine.loaded.model)
    core.add(long)
    core.add(short)
    for _ in range(3):
        core.step()
    assert isinstance(events_short[-1], GenerationResult)
    assert core.rows == [long] and not long.done
    core.close()


def test_reuse_equals_recompute_and_runs_only_the_new_tokens(arch_engine, softprompts):
    arch, engine = arch_engine
    for softprompt in (None, softprompts[2]):
        first = engine.encode("Once upon a time there was a little dragon")
        engine.prefix_cache.clear()
        turn1 = engine.generate(first, GREEDY, softprompt=softprompt)
        # The next turn: the story so far, its continuation and a little more text.
        story = first + list(turn1.token_ids) + engine.encode(" who", add_special_tokens=False)
        expected = alone(engine, story, GREEDY, softprompt)
        engine.prefix_cache.clear()
        engine.generate(first, GREEDY, softprompt=softprompt)
        counter = TokenCounter(engine.loaded.model)
        try:
            reused = engine.generate(story, GREEDY, softprompt=softprompt)
        finally:
            counter.close()
        assert reused.token_ids == expected.token_ids and reused.text == expected.text, arch
        if softprompt is None:
            assert reused.token_ids == reference(engine, story, GREEDY.max_new_tokens)
        n_soft = softprompt.n_tokens if softprompt else 0
        # Cached: the soft prompt, the first prompt and the generated tokens that were run
        # (all but the last one, unless the turn ended on EOS: then the last one was run
        # to give the EOS). GREEDY has no stop strings, so "stop" means EOS here.
        ran_last = turn1.finish_reason == "stop"
        assert reused.cached_tokens == n_soft + len(first) + len(turn1.token_ids) - (0 if ran_last else 1)
        new_positions = n_soft + len(story) - reused.cached_tokens
        assert counter.positions == new_positions + decode_runs(reused)
        assert expected.cached_tokens == 0


def test_retry_of_the_same_prompt_runs_one_position(engine):
    ids = engine.encode("The knight rode through the dark")
    engine.prefix_cache.clear()
    first = engine.generate(ids, GREEDY)
    counter = TokenCounter(engine.loaded.model)
    try:
        again = engine.generate(ids, GREEDY)
    finally:
        counter.close()
    assert again.token_ids == first.token_ids
    assert again.cached_tokens == len(ids) - 1
    assert counter.positions == 1 + decode_runs(again)


def test_a_different_softprompt_never_reuses(engine, tmp_path):
    kobold_zip.write(tmp_path / "a.zip", torch.randn(4, 32), Metadata(name="a"))
    kobold_zip.write(tmp_path / "b.zip", torch.randn(4, 32), Metadata(name="b"))
    a, b = engine.prepare_softprompts([tmp_path / "a.zip"]), engine.prepare_softprompts([tmp_path / "b.zip"])
    engine.prefix_cache.clear()
    ids = engine.encode("The knight rode")
    engine.generate(ids, GREEDY, softprompt=a)
    assert engine.generate(ids, GREEDY, softprompt=b).cached_tokens == 0
    assert engine.generate(ids, GREEDY, softprompt=None).cached_tokens == 0
    same = engine.prepare_softprompts([tmp_path / "a.zip"])  # loaded again: equal rows, equal key
    assert engine.generate(ids, GREEDY, softprompt=same).cached_tokens == 4 + len(ids) - 1


def test_loading_a_model_empties_the_prefix_cache(model_dirs):
    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    engine.generate("The knight", GREEDY)
    assert len(engine.prefix_cache) == 1
    engine.load(model_dirs["gpt2"], FLOAT32)
    assert len(engine.prefix_cache) == 0
    assert engine.generate("The knight", GREEDY).cached_tokens == 0


def test_one_rows_failure_is_its_own(engine):
    class Broken(torch.nn.Module):
        def __call__(self, input_ids, scores):
            raise RuntimeError("this row's sampler broke")

    events = [[], [], []]
    seqs = [make_sequence(engine, p, GREEDY, None, events[i]) for i, p in enumerate(PROMPTS[:3])]
    seqs[1].chain.extra.append(Broken())
    expected = [alone(engine, PROMPTS[i], GREEDY, None) for i in (0, 2)]
    run_core(engine, [(0, s) for s in seqs])
    assert isinstance(events[1][-1], RuntimeError)
    check_equal("gpt2", expected, [events[0], events[2]])


def test_an_empty_prompt_without_bos_or_softprompt_is_refused(engine):
    with pytest.raises(ModelError, match="prompt is empty"):
        engine.generate([], GREEDY)


def test_an_abandoned_stream_holds_no_lock(engine):
    stream = engine.stream("The knight", GREEDY.with_changes(max_new_tokens=50))
    next(stream)
    got = []

    def probe():
        if engine.lock.acquire(timeout=5):
            got.append(True)
            engine.lock.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert got == [True]
    engine.prefix_cache.clear()
    del stream
    gc.collect()
    assert len(engine.prefix_cache) == 1  # closing the stream kept its work


def test_unloading_during_a_stream_is_a_clear_error(model_dirs):
    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    stream = engine.stream("The knight", GREEDY.with_changes(max_new_tokens=50))
    next(stream)
    engine.unload()
    with pytest.raises(ModelError, match="unloaded or replaced"):
        list(stream)


def test_seeded_draws_use_a_generator_on_the_logits_device(engine):
    seq = Sequence([5, 6], None, SamplingSettings(seed=3))
    generator = seq.generator_for(torch.device("cpu"))
    assert generator.device == torch.device("cpu") and generator.initial_seed() == 3
    assert seq.generator_for(torch.device("cpu")) is generator


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seeds_out_of_range_are_refused(seed):
    from kobold_desktop.engine import SettingsError

    with pytest.raises(SettingsError, match="seed"):
        SamplingSettings(seed=seed)
