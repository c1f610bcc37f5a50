"""The llama.cpp backend against the transformers engine on the same weights: a tiny
random Llama converted to GGUF by llama.cpp's own converter. Greedy output must be the
same token for token, with and without soft prompts of each format; cached work must be
reused; cancel, stop sequences and seeds must behave as on the transformers backend."""

import threading

import pytest
import torch

from kobold_desktop.engine import Engine, ModelError, SamplingSettings, TextChunk
from kobold_desktop.engine.llamacpp.header import gguf_info, read_metadata
from kobold_desktop.softprompt import Metadata, SoftPromptError, kobold_zip

from ..helpers import FLOAT32

GREEDY = SamplingSettings(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
PROMPTS = ["Once upon a time", "The knight rode", "In the beginning", "She opened the door", 'He said: "We']


@pytest.fixture(scope="module")
def engines(gguf_model):
    reference, gguf = Engine(), Engine()
    reference.load(gguf_model["dir"], FLOAT32)
    gguf.load(gguf_model["f32"])
    yield reference, gguf
    gguf.unload()


@pytest.fixture(scope="module")
def softprompts(gguf_model, tmp_path_factory):
    """A KoboldAI zip, a PEFT adapter saved by PEFT itself, and a zip of the wrong width."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sp")
    torch.manual_seed(7)
    kobold_zip.write(folder / "sea.zip", torch.randn(6, 64) * 0.5, Metadata(name="sea"))
    kobold_zip.write(folder / "forest.zip", torch.randn(9, 64) * 0.5, Metadata(name="forest"))
    kobold_zip.write(folder / "wide.zip", torch.randn(4, 48), Metadata(name="wide"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(gguf_model["dir"]),
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    model.save_pretrained(folder / "peft_adapter")
    from ..softprompt.builders import mkultra_json

    mkultra_json(folder / "old.json", torch.randn(7, 64) * 0.5)  # mkultra's JSON (a pickled tensor, read safely)
    return {"zip": folder / "sea.zip", "forest": folder / "forest.zip", "peft": folder / "peft_adapter",
            "mkultra": folder / "old.json", "wide": folder / "wide.zip"}


def both(engines, prompt, settings=GREEDY, softprompt=None):
    results = []
    for engine in engines:
        active = engine.prepare_softprompts([softprompt]) if softprompt else None
        engine.prefix_cache.clear()
        results.append(engine.generate(prompt, settings, softprompt=active))
    return results


def test_metadata_comes_from_the_gguf_header(gguf_model, engines):
    _, gguf = engines
    name, arch, hidden, context = gguf_info(gguf_model["f32"])
    assert (arch, hidden, context) == ("llama", 64, 256)
    assert name == read_metadata(gguf_model["f32"])["general.name"]
    loaded = gguf.loaded
    assert loaded.backend == "llama.cpp" and loaded.hidden_size == 64 and loaded.context_length == 256
    assert gguf.encode(PROMPTS[0]) == engines[0].encode(PROMPTS[0])  # BOS and all


def reference_margin(engine, prompt, softprompt, generated):
    """The gap between the transformers model's two likeliest next tokens after `prompt`
    and `generated`, by a plain forward pass over `[soft prompt][token embeddings]`."""
    model = engine.loaded.model
    ids = torch.tensor([engine.encode(prompt) + list(generated)])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        if softprompt is not None:
            embeds = torch.cat([softprompt.tensor[None], embeds], dim=1)
        top = model(inputs_embeds=embeds).logits[0, -1].topk(2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("kind", [None, "zip", "peft", "mkultra"])
def test_greedy_output_equals_the_transformers_engine(engines, softprompts, kind):
    full = 0
    for prompt in PROMPTS:
        want, got = both(engines, prompt, softprompt=softprompts[kind] if kind else None)
        assert got.generated_tokens == want.generated_tokens == 16
        assert got.softprompt_tokens == want.softprompt_tokens
        if got.token_ids == want.token_ids:
            assert got.text == want.text
            full += 1
            continue
        # llama.cpp sums in another order than torch; the two may part only where the
        # reference itself is torn between two tokens (a random model has such ties)
        k = next(i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b)
        active = engines[0].prepare_softprompts([softprompts[kind]]) if kind else None
        assert reference_margin(engines[0], prompt, active, want.token_ids[:k]) < 0.01, (prompt, k)
    assert full >= len(PROMPTS) - 1  # all 16 tokens equal for (nearly) every prompt


def test_penalties_and_top_k_run_on_llamacpp_logits_too(engines, softprompts):
    settings = SamplingSettings(max_new_tokens=16, temperature=0, repetition_penalty=1.3, top_k=5)
    want, got = both(engines, PROMPTS[1], settings, softprompts["zip"])
    assert got.token_ids == want.token_ids


def test_a_later_turn_decodes_only_its_new_tokens(engines, softprompts):
    _, gguf = engines
    gguf.set_softprompt(softprompts["zip"])
    model = gguf.loaded.model
    model.prefix_cache.clear()
    first = gguf.generate(PROMPTS[0], GREEDY)
    # the story goes on: the first turn's prompt, what it wrote, and the writer's words
    ids = gguf.encode(PROMPTS[0]) + list(first.token_ids) + gguf.encode(" and the dragon", add_special_tokens=False)
    before = model.tokens_decoded
    second = gguf.generate(ids, GREEDY)
    decoded = model.tokens_decoded - before
    # cached: the soft prompt's 6 rows and every token the first turn fed (its prompt and
    # all but its last generated token, which was picked but never run)
    assert second.cached_tokens == 6 + len(gguf.encode(PROMPTS[0])) + 15
    new_positions = 6 + len(ids) - second.cached_tokens
    assert new_positions == 1 + len(gguf.encode(" and the dragon", add_special_tokens=False))
    assert decoded == new_positions + (second.generated_tokens - 1)
    # and what it generates is what a run with nothing cached generates
    model.prefix_cache.clear()
    assert gguf.generate(ids, GREEDY).token_ids == second.token_ids
    # another soft prompt shares nothing with it
    gguf.set_softprompt(softprompts["forest"])
    assert gguf.generate(ids, GREEDY).cached_tokens == 0
    gguf.set_softprompt(None)


def test_the_whole_prompt_cached_runs_one_position(engines):
    _, gguf = engines
    gguf.set_softprompt(None)
    model = gguf.loaded.model
    first = gguf.generate(PROMPTS[2], GREEDY)
    before = model.tokens_decoded
    again = gguf.generate(PROMPTS[2], GREEDY)
    assert again.token_ids == first.token_ids
    assert model.tokens_decoded - before == 1 + 15  # the last prompt position again, then 15 fed tokens


def test_cancel_stops_at_once(engines):
    _, gguf = engines
    gguf.set_softprompt(None)
    cancel = threading.Event()
    chunks = 0
    result = None
    for event in gguf.stream(PROMPTS[0], SamplingSettings(max_new_tokens=200, temperature=0), cancel):
        if isinstance(event, TextChunk):
            chunks += 1
            if chunks == 3:
                cancel.set()
        else:
            result = event
    assert result.finish_reason == "cancelled"
    assert result.generated_tokens < 10


def test_stop_sequences_end_the_text_before_them(engines):
    _, gguf = engines
    full = gguf.generate(PROMPTS[3], SamplingSettings(max_new_tokens=24, temperature=0))
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip()
    cut = gguf.generate(PROMPTS[3], SamplingSettings(max_new_tokens=24, temperature=0, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_a_seed_repeats_a_sampled_text(engines):
    reference, gguf = engines
    settings = SamplingSettings(max_new_tokens=20, temperature=1.0, top_p=1.0, seed=11)
    first = gguf.generate(PROMPTS[4], settings)
    assert gguf.generate(PROMPTS[4], settings).token_ids == first.token_ids
    others = {gguf.generate(PROMPTS[4], SamplingSettings(max_new_tokens=20, temperature=1.0, top_p=1.0,
                                                        seed=s)).token_ids for s in range(4)}
    assert len(others) > 1
    # the same seed on the transformers engine samples the same tokens (same logits, same sampler)
    assert reference.generate(PROMPTS[4], settings).token_ids == first.token_ids


def test_a_soft_prompt_of_the_wrong_width_is_refused_before_anything_runs(engines, softprompts):
    _, gguf = engines
    gguf.set_softprompt(softprompts["zip"])
    model = gguf.loaded.model
    before = model.tokens_decoded
    with pytest.raises(SoftPromptError, match="hidden size 48"):
        gguf.set_softprompt(softprompts["wide"])
    assert model.tokens_decoded == before
    assert gguf.softprompt.name == "sea"  # the previous one stays
    gguf.set_softprompt(None)


def test_requests_batched_across_soft_prompts_equal_each_alone(engines, softprompts):
    _, gguf = engines
    gguf.set_softprompt(None)
    cases = [(PROMPTS[0], softprompts["zip"]), (PROMPTS[1], softprompts["peft"]), (PROMPTS[2], None),
             (PROMPTS[3], softprompts["forest"])]
    alone = []
    for prompt, sp in cases:
        active = gguf.prepare_softprompts([sp]) if sp else None
        gguf.loaded.model.prefix_cache.clear()
        alone.append(gguf.generate(prompt, GREEDY, softprompt=active).token_ids)
    gguf.loaded.model.prefix_cache.clear()
    results = [[] for _ in cases]
    loaded = gguf.loaded
    requests = [loaded.new_request(gguf.encode(prompt), gguf.prepare_softprompts([sp]) if sp else None, GREEDY,
                                   results[i].append) for i, (prompt, sp) in enumerate(cases)]
    decoded = loaded.model.tokens_decoded
    gguf.run(requests, max_batch=8)
    got = [r[-1].token_ids for r in results]
    assert got == alone
    # one decode per step for all rows: 15 steps of 4 tokens after the prompts
    prompt_positions = sum(len(gguf.encode(p)) + (gguf.prepare_softprompts([sp]).n_tokens if sp else 0)
                           for p, sp in cases)
    assert loaded.model.tokens_decoded - decoded == prompt_positions + 4 * 15


def test_a_mixture_on_gguf_equals_the_mixture_on_transformers(engines, softprompts):
    from kobold_desktop.softprompt.mixture import Mixture, MixtureMember

    mixture = Mixture("m", "bayes", (MixtureMember("sea.zip", 0.6), MixtureMember("forest.zip", 0.4)))
    paths = [softprompts["zip"], softprompts["forest"]]
    results = []
    for engine in engines:
        engine.set_mixture(mixture, paths)
        engine.prefix_cache.clear()
        results.append(engine.generate(PROMPTS[0], GREEDY))
        engine.set_softprompt(None)
    want, got = results
    assert got.token_ids == want.token_ids
    assert got.mixture_weights == pytest.approx(want.mixture_weights, abs=1e-3)


def test_q8_0_agrees_with_f32_on_most_first_tokens(gguf_model, engines):
    _, f32 = engines
    q8 = Engine()
    q8.load(gguf_model["q8_0"])
    agree = total = 0
    for prompt in PROMPTS:
        a, b = f32.generate(prompt, GREEDY).token_ids, q8.generate(prompt, GREEDY).token_ids
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))  # tokens before they part
        agree, total = agree + same, total + len(a)
    q8.unload()
    print(f"q8_0 agrees with f32 on {agree}/{total} first greedy tokens ({agree / total:.0%})")
    assert agree / total > 0.5


def test_tuning_a_gguf_is_refused_with_the_way_out(engines):
    _, gguf = engines
    with pytest.raises(ModelError, match="transformers weights"):
        gguf.loaded.require_transformers("Tuning")


def test_without_llama_cpp_a_gguf_names_the_extra(gguf_model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"\[gguf\]"):
        Engine().load(gguf_model["f32"])


def test_a_file_that_is_not_gguf_is_refused_clearly(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        Engine().load(fake)
    with pytest.raises(ModelError, match="no GGUF file"):
        Engine().load(tmp_path / "missing.gguf")


def test_more_requests_than_the_cache_holds_wait_their_turn(gguf_model):
    from kobold_desktop.engine import LoadOptions
    from kobold_desktop.engine.llamacpp.core import LlamaCore

    engine = Engine()
    engine.load(gguf_model["f32"], LoadOptions(context=128))  # 256 KV cells in all
    model = engine.loaded.model
    assert model.cells == 256
    settings = SamplingSettings(max_new_tokens=60, temperature=0, repetition_penalty=1.0)
    prompts = [p + suffix for p in PROMPTS for suffix in ("", " and")]  # 10 requests of ~65 cells each
    alone = [engine.generate(p, settings).token_ids for p in prompts]
    widest = []
    step = LlamaCore.step

    def counting_step(core):
        widest.append(len(core.rows))
        return step(core)

    results = [[] for _ in prompts]
    # as `generate` stops, at llama.cpp's end tokens
    requests = [engine.loaded.new_request(engine.encode(p), None, settings, results[i].append)
                for i, p in enumerate(prompts)]
    LlamaCore.step = counting_step
    try:
        engine.run(requests, max_batch=16)
    finally:
        LlamaCore.step = step
    ends = [r[-1] for r in results]
    assert all(e.finish_reason in ("length", "stop") for e in ends)
    # batched rows sum in another order than a row alone (another matrix kernel), so a
    # random model's near-ties may part them late; the start is the same
    assert [e.token_ids[:16] for e in ends] == [a[:16] for a in alone]
    assert 1 < max(widest) <= 3  # at most 3 x 65 cells fit in 256: the others joined as rows left
    assert model.reserved == 0
    engine.unload()


def test_the_deterministic_samplers_give_the_same_greedy_text_on_both_backends(engines):
    """DRY, the penalties with their slope, presence and frequency, a logit bias and a token
    ban change a greedy pick the same way whatever runs the model."""
    settings = GREEDY.with_changes(repetition_penalty=1.3, repetition_penalty_range=32, repetition_penalty_slope=0.5,
                                   presence_penalty=0.4, frequency_penalty=0.2, dry_multiplier=1.5,
                                   dry_allowed_length=1, logit_bias=((40, 3.0), (41, -2.0)), banned_tokens=(42,))
    full = 0
    for prompt in PROMPTS:
        want, got = both(engines, prompt, settings)
        plain = both(engines, prompt)[0]
        assert want.token_ids != plain.token_ids  # the samplers changed the text
        full += got.token_ids == want.token_ids
    assert full >= len(PROMPTS) - 1  # llama.cpp may part only at a near-tie, as for plain greedy
