"""Generation correctness: equal, token for token, to greedy decoding computed from first
principles (a full forward pass per token), with and without soft prompts."""

import threading

import pytest
import torch

from kobold_desktop.engine import Engine, GenerationResult, ModelError, SamplingSettings, TextChunk
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.softprompt.errors import HiddenSizeMismatchError

from ..helpers import FLOAT32, adapter_rows, greedy_reference

GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=24)
PROMPT = "The knight rode through the dark"


def test_without_softprompt_equals_the_reference(arch_engine):
    _, engine = arch_engine
    ids = engine.encode(PROMPT)
    result = engine.generate(ids, GREEDY)
    assert list(result.token_ids) == greedy_reference(engine.loaded.model, ids, GREEDY.max_new_tokens)
    assert result.generated_tokens == len(result.token_ids) > 0


def test_softprompt_of_embeddings_equals_the_hard_prompt(arch_engine, tmp_path):
    arch, engine = arch_engine
    text_ids = engine.encode("Once upon a time there was", add_special_tokens=False)
    rows = engine.loaded.model.get_input_embeddings().weight[text_ids].detach()
    kobold_zip.write(tmp_path / "t.zip", rows, Metadata(name="T"))
    engine.set_softprompt(tmp_path / "t.zip")
    try:
        prompt_ids = engine.encode(" a dragon")  # with BOS where the tokenizer adds one
        soft = engine.generate(prompt_ids, GREEDY)
        hard = engine.generate(text_ids + prompt_ids, GREEDY, softprompt=None)
    finally:
        engine.set_softprompt(None)
    assert soft.softprompt_tokens == len(text_ids)
    assert soft.token_ids == hard.token_ids and soft.text == hard.text
    if arch == "llama":
        assert prompt_ids[0] == 1  # the soft prompt went before BOS


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_a_peft_prompt_tuning_adapter_equals_the_reference(model_dirs, tmp_path, arch):
    """PEFT writes the adapter (as users get them); the reference reads its rows straight
    from the safetensors file and puts them before every token, BOS included."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()
    torch.manual_seed(3)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=7)
    peft_model = get_peft_model(base, config).eval()
    with torch.no_grad():  # a trained-looking prompt, not PEFT's default init
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")

    engine = Engine()
    engine.load(model_dirs[arch], FLOAT32)
    active = engine.set_softprompt(tmp_path / "adapter")
    assert active.n_tokens == 7
    ids = engine.encode(PROMPT)
    ours = engine.generate(ids, GREEDY)
    plain = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()
    theirs = greedy_reference(plain, ids, GREEDY.max_new_tokens, rows=adapter_rows(tmp_path / "adapter"))
    assert len(theirs) > 10
    assert list(ours.token_ids) == theirs
    assert theirs != greedy_reference(plain, ids, GREEDY.max_new_tokens)  # the rows steer


def test_stream_yields_chunks_then_a_result(engine):
    events = list(engine.stream(PROMPT, GREEDY))
    assert isinstance(events[-1], GenerationResult)
    chunks = [e.text for e in events[:-1]]
    assert all(isinstance(e, TextChunk) for e in events[:-1]) and len(chunks) > 1
    assert "".join(chunks) == events[-1].text
    assert events[-1].prompt_tokens == len(engine.encode(PROMPT))


def test_cancel_from_another_thread_stops_within_one_token(engine):
    cancel = threading.Event()
    seen, result = [], {}

    def consume():
        for event in engine.stream(PROMPT, GREEDY.with_changes(max_new_tokens=200), cancel):
            if isinstance(event, TextChunk):
                seen.append(event.text)
                if len(seen) == 3:
                    cancel.set()
            else:
                result["final"] = event

    worker = threading.Thread(target=consume)
    worker.start()
    worker.join(timeout=60)
    final = result["final"]
    assert final.finish_reason == "cancelled"
    # The third chunk came from token k >= 3; the loop checks the event before the next
    # forward pass, so nothing after token k is generated.
    assert final.text == "".join(seen) or final.text.startswith("".join(seen))
    assert final.generated_tokens < 200
    tokens_for_seen = len(engine.encode(PROMPT + "".join(seen), add_special_tokens=False)) - len(
        engine.encode(PROMPT, add_special_tokens=False))
    assert final.generated_tokens <= tokens_for_seen + 3


def test_cancel_before_start(engine):
    cancel = threading.Event()
    cancel.set()
    result = engine.generate(PROMPT, GREEDY, cancel)
    assert (result.finish_reason, result.generated_tokens, result.text) == ("cancelled", 0, "")


def test_stop_sequence_ends_and_is_trimmed(engine):
    full = engine.generate(PROMPT, GREEDY.with_changes(max_new_tokens=40))
    text = full.text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2)
                if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2])
    result = engine.generate(PROMPT, GREEDY.with_changes(max_new_tokens=40, stop=(stop,)))
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.index(stop)]
    assert stop not in result.text


def test_max_new_tokens_gives_length(engine):
    result = engine.generate(PROMPT, GREEDY.with_changes(max_new_tokens=5))
    assert (result.finish_reason, result.generated_tokens) in (("length", 5),) or result.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(engine):
    settings = SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=30, seed=42)
    first, second = engine.generate(PROMPT, settings), engine.generate(PROMPT, settings)
    other = engine.generate(PROMPT, settings.with_changes(seed=43))
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


def test_every_sampler_runs(engine):
    settings = SamplingSettings(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.9,
                                repetition_penalty=1.2, repetition_penalty_range=16, max_new_tokens=10, seed=1)
    result = engine.generate(PROMPT, settings)
    assert result.generated_tokens > 0


def test_wrong_hidden_size_is_refused_and_keeps_the_active_one(engine, tmp_path):
    kobold_zip.write(tmp_path / "ok.zip", torch.randn(4, 32), Metadata(name="ok"))
    kobold_zip.write(tmp_path / "big.zip", torch.randn(4, 4096), Metadata(name="big"))
    engine.set_softprompt(tmp_path / "ok.zip")
    with pytest.raises(HiddenSizeMismatchError, match="hidden size 4096; this model has 32"):
        engine.set_softprompt(tmp_path / "big.zip")
    assert engine.softprompt.name == "ok"


def test_switching_softprompts_never_reloads_the_model(engine, tmp_path, monkeypatch):
    model = engine.loaded.model
    monkeypatch.setattr("kobold_desktop.engine.engine.load_model", lambda *a, **k: pytest.fail("reloaded"))
    for i in range(3):
        kobold_zip.write(tmp_path / f"{i}.zip", torch.randn(i + 2, 32), Metadata(name=str(i)))
        active = engine.set_softprompt(tmp_path / f"{i}.zip")
        assert active.n_tokens == i + 2 and active.tensor.dtype == engine.loaded.dtype
    assert engine.loaded.model is model


def test_several_softprompts_are_concatenated(engine, tmp_path):
    kobold_zip.write(tmp_path / "a.zip", torch.randn(3, 32), Metadata(name="A"))
    kobold_zip.write(tmp_path / "b.zip", torch.randn(5, 32).to(torch.bfloat16), Metadata(name="B"))
    active = engine.set_softprompts([tmp_path / "a.zip", tmp_path / "b.zip"])
    assert active.n_tokens == 8 and active.name == "A + B"


def test_prompt_too_long_for_the_context(engine):
    with pytest.raises(ModelError, match="the model's context is 256"):
        engine.generate(list(range(5, 250)), GREEDY)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(min_p=1.5)])
def test_bad_settings_are_refused(bad):
    from kobold_desktop.engine import SettingsError

    with pytest.raises(SettingsError):
        SamplingSettings(**bad)


def test_an_ordinary_run_warns_of_nothing(arch_engine, caplog):
    """transformers 5.x renamed the cache argument and output (`past_key_values` -> `cache`);
    the old name warns now and goes in 5.40. Generation with and without a prefix-cache hit
    uses whichever name the model takes, so nothing is printed."""
    import logging
    import warnings

    _, engine = arch_engine
    logging.Logger.warning_once.cache_clear()  # transformers logs each warning once per process
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("always")
        engine.generate(PROMPT, GREEDY.with_changes(max_new_tokens=4))
        engine.generate(PROMPT + " forest", GREEDY.with_changes(max_new_tokens=4))  # extends the cached prefix
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    assert [r.getMessage() for r in caplog.records] == []
