"""Prompt tuning: it learns, it leaves the model alone, it resumes exactly."""

import threading

import pytest
import torch

from kobold_desktop.engine import SamplingSettings
from kobold_desktop.softprompt import Metadata, kobold_zip, peft_dir
from kobold_desktop.tuning import (
    TuningConfig,
    TuningDataError,
    TuningError,
    make_blocks,
    read_training_text,
    train_softprompt,
)
from kobold_desktop.tuning.trainer import initial_rows

from .conftest import PATTERN

FAST = TuningConfig(n_tokens=16, steps=200, lr=0.1, batch_size=4, block_len=32, eval_every=50, init="vocab")


def blocks_for(engine, config=FAST, text=PATTERN * 600):
    return make_blocks(text, engine.loaded.tokenizer, config.block_len, config.held_out_share, config.seed)


def pattern_share(engine, softprompt_path, seeds=4):
    pattern = set(engine.loaded.tokenizer(PATTERN, add_special_tokens=False)["input_ids"])
    engine.set_softprompt(softprompt_path)
    hits = total = 0
    for seed in range(seeds):
        result = engine.generate(" dragon", SamplingSettings(temperature=0.7, top_p=1.0, repetition_penalty=1.0,
                                                             max_new_tokens=30, seed=seed))
        hits += sum(t in pattern for t in result.token_ids)
        total += len(result.token_ids)
    return hits / total


def test_tuning_learns_the_pattern(tune_engine, tmp_path):
    result = train_softprompt(tune_engine.loaded.model, tune_engine.loaded.tokenizer, blocks_for(tune_engine), FAST)
    assert result.steps_done == 200 and not result.cancelled
    assert result.held_out_loss < 0.5 * result.baseline_held_out_loss
    kobold_zip.write(tmp_path / "tuned.zip", result.tensor, Metadata(name="tuned"))
    without, with_sp = pattern_share(tune_engine, None), pattern_share(tune_engine, tmp_path / "tuned.zip")
    assert with_sp > 0.5 and with_sp > without + 0.4


def test_model_weights_are_bit_identical_and_get_no_gradients(tune_engine):
    model = tune_engine.loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TuningConfig(n_tokens=4, steps=5, batch_size=2, block_len=16, eval_every=5)
    train_softprompt(model, tune_engine.loaded.tokenizer, blocks_for(tune_engine, config), config)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())  # as the engine had it


def test_same_seed_same_soft_prompt(tune_engine):
    config = TuningConfig(n_tokens=4, steps=8, batch_size=2, block_len=16, eval_every=4)
    blocks = blocks_for(tune_engine, config)
    a = train_softprompt(tune_engine.loaded.model, tune_engine.loaded.tokenizer, blocks, config)
    b = train_softprompt(tune_engine.loaded.model, tune_engine.loaded.tokenizer, blocks, config)
    assert torch.equal(a.tensor, b.tensor)


def test_cancel_then_resume_gives_the_uninterrupted_result(tune_engine, tmp_path):
    config = TuningConfig(n_tokens=4, steps=30, batch_size=2, block_len=16, eval_every=10, checkpoint_every=5)
    blocks = blocks_for(tune_engine, config)
    model, tokenizer = tune_engine.loaded.model, tune_engine.loaded.tokenizer
    straight = train_softprompt(model, tokenizer, blocks, config)

    cancel = threading.Event()
    checkpoint = tmp_path / "run.ckpt"
    seen = []

    def progress(p):
        seen.append(p)
        if p.step == 17:
            cancel.set()

    first = train_softprompt(model, tokenizer, blocks, config, progress, cancel, checkpoint)
    assert first.cancelled and first.steps_done == 17 and checkpoint.exists()
    assert seen[-1].seconds_left > 0 and seen[-1].tokens_per_second > 0
    resumed = train_softprompt(model, tokenizer, blocks, config, checkpoint=checkpoint)
    assert resumed.steps_done == 30 and not resumed.cancelled
    assert torch.equal(resumed.tensor, straight.tensor)
    other = TuningConfig(n_tokens=4, steps=30, batch_size=2, block_len=16, eval_every=10, lr=0.5)
    fresh = train_softprompt(model, tokenizer, blocks, other, checkpoint=checkpoint)
    assert fresh.steps_done == 30  # a checkpoint from other settings is not mixed in


def test_an_exported_peft_adapter_is_read_by_peft_and_the_engine_as_trained(tune_engine, tune_model_dir, tmp_path):
    """PEFT only reads the adapter (its loader is what users' tools use); the logits are
    checked from first principles: the trained rows before the prompt's embeddings."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = TuningConfig(n_tokens=6, steps=10, batch_size=2, block_len=16)
    result = train_softprompt(tune_engine.loaded.model, tune_engine.loaded.tokenizer, blocks_for(tune_engine, config), config)
    peft_dir.write(tmp_path / "adapter", result.tensor, Metadata(name="t"), base_model=str(tune_model_dir))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tune_model_dir), str(tmp_path / "adapter"))
    torch.testing.assert_close(peft_model.get_prompt_embedding_to_save("default"), result.tensor.float(), rtol=0, atol=0)
    ids = torch.tensor([tune_engine.encode(" the dragon and the knight")])
    model = AutoModelForCausalLM.from_pretrained(tune_model_dir).eval()
    with torch.no_grad():
        embeds = torch.cat([result.tensor.float()[None], model.get_input_embeddings()(ids)], dim=1)
        want = model(inputs_embeds=embeds).logits[:, -ids.shape[1]:]
        tune_engine.set_softprompt(tmp_path / "adapter")
        engine_model = tune_engine.loaded.model
        got = engine_model(inputs_embeds=torch.cat([tune_engine.softprompt.tensor[None],
                                                    engine_model.get_input_embeddings()(ids)], dim=1)).logits[:, -ids.shape[1]:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_initialisations(tune_engine):
    model, tokenizer = tune_engine.loaded.model, tune_engine.loaded.tokenizer
    ids = tokenizer(" the knight", add_special_tokens=False)["input_ids"]
    rows = initial_rows(model, tokenizer, TuningConfig(n_tokens=len(ids) * 2 + 1, init="text", init_text=" the knight"))
    weight = model.get_input_embeddings().weight
    expected = weight[torch.tensor((ids * 3)[: len(ids) * 2 + 1])]
    assert torch.equal(rows, expected.detach())
    assert initial_rows(model, tokenizer, TuningConfig(n_tokens=5, init="vocab")).shape == (5, 64)
    random_rows = initial_rows(model, tokenizer, TuningConfig(n_tokens=5, init="random"))
    assert random_rows.shape == (5, 64) and 0.2 < random_rows.std() / weight.std() < 5


def test_adafactor_and_gradient_accumulation(tune_engine):
    config = TuningConfig(n_tokens=4, steps=6, batch_size=2, grad_accum=2, block_len=16, optimizer="adafactor",
                          gradient_checkpointing=True)
    result = train_softprompt(tune_engine.loaded.model, tune_engine.loaded.tokenizer, blocks_for(tune_engine, config), config)
    assert result.steps_done == 6 and torch.isfinite(result.tensor).all()
    assert not tune_engine.loaded.model.training  # back as the engine had it


def test_gradient_checkpointing_really_recomputes(tune_engine):
    model = tune_engine.loaded.model
    attention = model.transformer.h[0].attn  # submodules run again when a layer is recomputed
    calls = []
    handle = attention.register_forward_hook(lambda *args: calls.append(1))
    try:
        counts = {}
        for flag in (False, True):
            calls.clear()
            config = TuningConfig(n_tokens=4, steps=3, batch_size=2, block_len=16, held_out_share=0,
                                  gradient_checkpointing=flag)
            train_softprompt(model, tune_engine.loaded.tokenizer, blocks_for(tune_engine, config), config)
            counts[flag] = len(calls)
    finally:
        handle.remove()
    assert counts[True] == 2 * counts[False]  # every layer runs again in the backward pass


@pytest.mark.parametrize("bad", [dict(n_tokens=0), dict(lr=0), dict(optimizer="sgd"), dict(held_out_share=0.9)])
def test_bad_settings(bad):
    with pytest.raises(TuningError):
        TuningConfig(**bad)


def test_training_text_sources(tmp_path, tune_engine):
    (tmp_path / "a.txt").write_text("First file.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Second file.")
    assert read_training_text(tmp_path) == "First file.\n\nSecond file."
    from kobold_desktop.story import Action, Story
    from kobold_desktop.story.files import save_story

    save_story(Story(prompt="Once.", actions=[Action(" Then.")]), tmp_path / "s.json")
    assert read_training_text(tmp_path / "s.json") == "Once. Then."
    with pytest.raises(TuningDataError, match="at least"):
        make_blocks("too short", tune_engine.loaded.tokenizer, 64, 0.1, 0)
    with pytest.raises(TuningDataError, match="does not exist"):
        read_training_text(tmp_path / "missing.txt")
    blocks = make_blocks(PATTERN * 400, tune_engine.loaded.tokenizer, 16, 0.1, 0)
    assert blocks.held_out.shape[0] == round((blocks.train.shape[0] + blocks.held_out.shape[0]) * 0.1)


def test_held_out_loss_scores_the_same_tokens_with_and_without(tune_engine):
    """The first token of a block has no text before it: without a soft prompt it cannot
    be scored, so with one it must not be either, or the two losses are not comparable."""
    from contextlib import nullcontext

    from kobold_desktop.tuning import held_out_loss

    model = tune_engine.loaded.model
    blocks = blocks_for(tune_engine, TuningConfig(block_len=16)).train[:6]
    scored = []
    original = model.forward

    def spy(*args, **kwargs):
        scored.append(int((kwargs["labels"][:, 1:] != -100).sum()))  # what the shifted loss scores
        return original(*args, **kwargs)

    model.forward = spy
    try:
        held_out_loss(model, model.get_input_embeddings().weight[:2].detach(), blocks, 3, nullcontext)
        with_softprompt, scored[:] = sum(scored), []
        held_out_loss(model, None, blocks, 3, nullcontext)
        without = sum(scored)
    finally:
        del model.forward
    assert with_softprompt == without == blocks.shape[0] * (blocks.shape[1] - 1)


def test_float16_tuning_scales_the_loss(tune_model_dir, monkeypatch):
    """float16 gradients underflow; a float16 model tunes through a gradient scaler."""
    from kobold_desktop.engine import Engine, LoadOptions
    from kobold_desktop.tuning import trainer

    engine = Engine()
    engine.load(tune_model_dir, LoadOptions(dtype="float16"))
    scales = []
    real = trainer.grad_scaler_for

    def recording(model, config):
        scaler = real(model, config)
        original = scaler.scale
        scaler.scale = lambda loss: scales.append(scaler.get_scale()) or original(loss)
        return scaler

    monkeypatch.setattr(trainer, "grad_scaler_for", recording)
    config = TuningConfig(n_tokens=4, steps=3, batch_size=2, block_len=16, init="vocab")
    result = train_softprompt(engine.loaded.model, engine.loaded.tokenizer, blocks_for(engine, config), config)
    assert result.steps_done == 3 and torch.isfinite(result.tensor).all()
    assert len(scales) == 3 and all(scale > 1 for scale in scales)


def test_float32_and_bfloat16_tuning_need_no_scaler(tune_engine):
    from kobold_desktop.tuning.trainer import grad_scaler_for

    assert not grad_scaler_for(tune_engine.loaded.model, FAST).is_enabled()


def test_a_checkpoint_resumes_only_for_the_same_text_and_model(tune_engine, model_dirs, tmp_path):
    """Keyed by settings, text and model: other text, another model of the same width, or
    another width each start fresh and say so (another width used to crash on resume)."""
    from kobold_desktop.engine import Engine

    from ..helpers import FLOAT32, build_tiny_model

    config = TuningConfig(n_tokens=4, steps=8, batch_size=2, block_len=16, eval_every=4, checkpoint_every=2)
    model, tokenizer = tune_engine.loaded.model, tune_engine.loaded.tokenizer
    blocks = blocks_for(tune_engine, config)
    checkpoint = tmp_path / "run.ckpt"

    def cut_at_5(p):
        if p.step == 5:
            cancel.set()

    def start(model, tokenizer, blocks):
        notices = []
        cancel.clear()
        result = train_softprompt(model, tokenizer, blocks, config, cut_at_5, cancel, checkpoint,
                                  notice=notices.append)
        return result, notices

    cancel = threading.Event()
    assert start(model, tokenizer, blocks)[0].steps_done == 5
    other_text = blocks_for(tune_engine, config, text=" the sea and the ship" * 600)
    result, notices = start(model, tokenizer, other_text)
    assert result.steps_done == 5 and notices == ["The saved tuning progress was made on other text; starting fresh."]

    same_width = Engine()
    same_width.load(build_tiny_model(tmp_path / "other", "gpt2", hidden=64, seed=7), FLOAT32)
    result, notices = start(same_width.loaded.model, same_width.loaded.tokenizer, other_text)
    assert result.steps_done == 5 and notices == ["The saved tuning progress was made with another model; starting fresh."]

    narrow = Engine()
    narrow.load(model_dirs["gpt2"], FLOAT32)  # hidden 32
    result, notices = start(narrow.loaded.model, narrow.loaded.tokenizer, other_text)
    assert result.steps_done == 5 and "another model" in notices[0]

    resumed_notices = []
    resumed = train_softprompt(narrow.loaded.model, narrow.loaded.tokenizer, other_text, config,
                               checkpoint=checkpoint, notice=resumed_notices.append)
    assert resumed.steps_done == 8 and resumed_notices == []  # the same text and model resume
