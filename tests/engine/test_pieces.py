"""The small parts: detokenizing, stop sequences, samplers, loading and unloading."""

import gc
import weakref

import pytest
import torch

from kobold_desktop.engine import Engine, ModelError
from kobold_desktop.engine.detokenize import IncrementalDetokenizer, StopSequences
from kobold_desktop.engine.device import choose_device, choose_dtype
from kobold_desktop.engine.sampling import RangedRepetitionPenalty

from ..helpers import tiny_tokenizer

TEXT = "日本語の文章 and café 🐉✨ naïve"


def test_multibyte_characters_split_across_tokens_never_show_as_mojibake():
    tokenizer = tiny_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    singles = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles)  # the test text really splits characters
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Prompt:", add_special_tokens=False)["input_ids"])
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == TEXT


def test_leading_space_survives_incremental_decoding():
    tokenizer = tiny_tokenizer()
    prompt = tokenizer("Once upon", add_special_tokens=False)["input_ids"]
    cont = tokenizer(" a time", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detok.add(i) for i in cont) + detok.flush() == " a time"


def test_stop_sequences_are_held_back_across_chunks():
    stops = StopSequences(["\nYou:", "THE END"])
    shown = [stops.feed(t) for t in ["Hello", " there\n", "Yo", "u: what"]]
    assert shown == ["Hello", " there", "", ""]
    assert stops.stopped
    partial = StopSequences(["THE END"])
    assert partial.feed("and THE EN") == "and "
    assert partial.feed("chanted") == "THE ENchanted" and not partial.stopped
    assert StopSequences([]).feed("x") == "x"


def test_ranged_repetition_penalty_only_touches_recent_tokens():
    scores = torch.tensor([[2.0, 2.0, -2.0, 2.0]])
    history = torch.tensor([[0, 3, 2]])
    out = RangedRepetitionPenalty(2.0, window=2)(history, scores.clone())
    assert out.tolist() == [[2.0, 2.0, -4.0, 1.0]]  # token 0 is out of the window
    out = RangedRepetitionPenalty(2.0, window=0)(history, scores.clone())
    assert out.tolist() == [[1.0, 2.0, -4.0, 1.0]]


def test_device_and_dtype_choice_on_this_machine():
    device = choose_device()
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")
    assert choose_dtype(torch.device("cpu")) == torch.float32
    assert choose_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        choose_dtype(torch.device("cpu"), "float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            choose_device("cuda")


def test_load_reports_progress_and_unload_frees(model_dirs):
    engine = Engine()
    steps = []
    loaded = engine.load(model_dirs["gpt2"], progress=lambda message, fraction: steps.append((message, fraction)))
    fractions = [f for _, f in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(steps) >= 4
    assert loaded.info.hidden_size == 32 and loaded.dtype == torch.float32
    assert engine.context_length == 256
    ref = weakref.ref(loaded.model)
    del loaded
    engine.unload()
    gc.collect()
    assert ref() is None and not engine.is_loaded
    with pytest.raises(ModelError, match="no model is loaded"):
        engine.generate("x")


def test_missing_folder_and_offline_hub_id_give_clear_errors(tmp_path):
    engine = Engine()
    with pytest.raises(ModelError, match="no model folder"):
        engine.load(tmp_path / "nothing-here")
    with pytest.raises(ModelError, match="cannot read the model 'kobold-test/no-such-model'"):
        engine.load("kobold-test/no-such-model")


def test_trust_remote_code_is_off_by_default():
    from kobold_desktop.engine import LoadOptions

    assert LoadOptions().trust_remote_code is False
