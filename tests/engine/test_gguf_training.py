"""Training on a GGUF file directly: its weights dequantized by transformers (the numbers
llama.cpp runs), cached, memory checked first; and "made for this model" by what the model
is (its fingerprint), not by its name."""

import re

import pytest
import torch

from kobold_desktop.cli import main
from kobold_desktop.engine import Engine, ModelError, SamplingSettings
from kobold_desktop.engine.fingerprint import fingerprint
from kobold_desktop.engine.llamacpp import dequantize
from kobold_desktop.engine.loader import load_model, load_trainable
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.softprompt.io import check_compatibility, describe_softprompt

from ..helpers import CORPUS, FLOAT32

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def trainable_q8(gguf_model):
    return load_trainable(gguf_model["q8_0"], FLOAT32)


def test_a_gguf_loads_for_training_as_transformers_weights_with_its_name(gguf_model, trainable_q8):
    gguf = load_model(gguf_model["q8_0"])
    assert trainable_q8.runtime.trainable and trainable_q8.backend == "transformers"
    assert trainable_q8.info.name == gguf.info.name and trainable_q8.source == str(gguf_model["q8_0"])
    assert trainable_q8.hidden_size == gguf.hidden_size and trainable_q8.info.layers == gguf.info.layers == 2
    gguf.unload()


def test_the_dequantized_weights_are_what_llamacpp_runs(gguf_model, trainable_q8):
    """q8_0 weights dequantized give logits near the ones llama.cpp computes from the same
    file (llama.cpp also rounds the activations to 8 bits in its products, hence a gap), and
    nearer them than the original float32 weights' logits, which differ by the quantization."""
    ids = [1] + list(range(40, 80))
    gguf = load_model(gguf_model["q8_0"])
    core = gguf.new_core()
    model = gguf.model
    seq = model.allocate()
    theirs = torch.from_numpy(model.decode_tokens(ids, range(len(ids)), [seq] * len(ids), [True] * len(ids)))
    model.release(seq)
    del core
    with torch.no_grad():
        ours = trainable_q8.model(torch.tensor([ids])).logits[0]
        original = load_model(gguf_model["dir"], FLOAT32).model(torch.tensor([ids])).logits[0]
    gguf.unload()
    # Measured: a mean gap of 0.024 against 0.046 from the unquantized weights (logits up to 6.7).
    assert (ours - theirs).abs().mean() < 0.6 * (original - theirs).abs().mean()
    assert (ours - theirs).abs().mean() < 0.01 * theirs.abs().max()


def test_the_second_time_comes_from_the_cache(gguf_model, monkeypatch):
    said = []
    first = dequantize.dequantized_folder(gguf_model["q8_0"], torch.float32, said.append)
    assert "dequantizing 'tiny-llama-q8_0.gguf' for training" in said[0]
    plan = dequantize.plan(gguf_model["q8_0"], torch.float32)
    assert plan.cached and plan.parameters == sum(p.numel() for p in load_model(first).model.parameters())
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("dequantized again"))
    assert dequantize.dequantized_folder(gguf_model["q8_0"], torch.float32, said.append) == first
    assert "from the cache" in said[1]


def test_not_enough_memory_is_said_before_it_starts(gguf_model, monkeypatch, tmp_path):
    monkeypatch.setattr(dequantize, "available_memory", lambda: 1024)
    with pytest.raises(ModelError, match="needs about .* of memory .* is free"):
        dequantize.dequantized_folder(gguf_model["f32"], torch.float32)


def test_without_the_gguf_package_the_extra_is_named(gguf_model, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("No module named 'gguf'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ModelError, match=r"kobold-desktop\[gguf\]"):
        dequantize.plan(gguf_model["f32"], torch.float32)


# -- fingerprints ----------------------------------------------------------------------------

def test_the_same_model_has_one_fingerprint_in_every_form(gguf_model, trainable_q8, model_dirs):
    forms = [load_model(gguf_model["dir"], FLOAT32), load_model(gguf_model["f32"]), load_model(gguf_model["q8_0"])]
    prints = {loaded.fingerprint for loaded in forms} | {trainable_q8.fingerprint}
    assert len(prints) == 1 and None not in prints
    other = load_model(model_dirs["llama"], FLOAT32)  # another Llama: same vocabulary, hidden size 32
    assert other.fingerprint not in prints
    for loaded in forms[1:]:
        loaded.unload()


def test_the_fingerprint_is_vocabulary_and_shape():
    tokens = [(0, "a"), (1, "b")]
    assert fingerprint(tokens, 64, 2) == fingerprint(reversed(tokens), 64, 2)
    assert fingerprint(tokens + [(2, "[PAD2]")], 64, 2) == fingerprint(tokens, 64, 2)  # converters' padding
    assert len({fingerprint(tokens, 64, 2), fingerprint(tokens, 64, 3), fingerprint(tokens, 32, 2),
                fingerprint([(0, "a"), (1, "c")], 64, 2)}) == 4


def test_made_for_by_fingerprint_then_by_name(tmp_path):
    def made(name, **raw):
        path = tmp_path / f"{name}.zip"
        kobold_zip.write(path, torch.randn(3, 64), Metadata(name=name, supported=("smollm2-hf",), raw=raw))
        return describe_softprompt(path)

    same = made("same", model_fingerprint="abc")
    assert check_compatibility(same, 64, "SmolLM2 135M Instruct", "abc").warnings == ()  # names differ: fine
    assert "vocabulary or shape differ" in check_compatibility(same, 64, "smollm2-hf", "xyz").warnings[0]
    old = made("old")  # made before fingerprints: the names decide, as before
    assert "may work poorly" in check_compatibility(old, 64, "SmolLM2 135M Instruct", "abc").warnings[0]
    assert check_compatibility(old, 64, "smollm2-hf", "abc").warnings == ()


# -- tuning on a GGUF ------------------------------------------------------------------------

def test_tune_on_a_gguf_lowers_held_out_loss_and_the_result_is_made_for_it(gguf_model, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(" ".join(CORPUS[:6]) * 8, encoding="utf-8")
    out = tmp_path / "made.zip"
    code = main(["tune", "--model", str(gguf_model["q8_0"]), "--data", str(data), "--out", str(out), "--steps", "30",
                 "--tokens", "4", "--block-size", "32", "--held-out", "0.2", "--lr", "0.1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Dequantizing" in err or "from the cache" in err
    found = re.search(r"held-out loss: ([\d.]+) with the soft prompt, ([\d.]+) without", err)
    assert float(found[1]) < float(found[2])
    engine = Engine()
    engine.load(gguf_model["q8_0"])
    active = engine.set_softprompt(out)
    assert active.warnings == ()  # made for this very file: no "made for ..., it may work poorly"
    assert describe_softprompt(out).made_for == engine.loaded.fingerprint
    result = engine.generate("Once upon a time", GREEDY)
    assert result.softprompt_tokens == 4
    engine.unload()


def test_rank_accepts_a_gguf(gguf_model, tmp_path, capsys):
    torch.manual_seed(1)
    for name in ("a", "b"):
        kobold_zip.write(tmp_path / f"{name}.zip", torch.randn(3, 64) * 0.3, Metadata(name=name))
    data = tmp_path / "text.txt"
    data.write_text(" ".join(CORPUS) * 2, encoding="utf-8")
    code = main(["softprompt", "rank", str(tmp_path / "a.zip"), str(tmp_path / "b.zip"), "--model",
                 str(gguf_model["q8_0"]), "--data", str(data), "--block-size", "32"])
    assert code == 0, capsys.readouterr().err


def test_softprompt_list_and_inspect_compare_fingerprints_without_loading_weights(gguf_model, tmp_path, capsys):
    import json

    from kobold_desktop.engine.fingerprint import of_source
    from kobold_desktop.engine.model_info import read_model_info

    made_for = load_model(gguf_model["dir"], FLOAT32).fingerprint
    for source in (gguf_model["dir"], gguf_model["f32"], gguf_model["q8_0"]):
        assert of_source(source, read_model_info(source)) == made_for  # tokenizer files or the GGUF header
    folder = tmp_path / "sps"
    folder.mkdir()
    kobold_zip.write(folder / "same.zip", torch.randn(3, 64), Metadata(name="same", supported=("renamed-model",),
                                                                        raw={"model_fingerprint": made_for}))
    kobold_zip.write(folder / "other.zip", torch.randn(3, 64), Metadata(name="other", supported=("tiny-llama-q8_0",),
                                                                         raw={"model_fingerprint": "0" * 16}))
    assert main(["softprompt", "list", "--dir", str(folder), "--model", str(gguf_model["q8_0"]), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["softprompts"]}
    assert rows["same"]["compatible"] and not rows["same"]["warnings"]  # another name, the same model
    assert "vocabulary or shape differ" in rows["other"]["warnings"][0]  # the same name, another model
    assert main(["softprompt", "inspect", str(folder / "same.zip"), "--model", str(gguf_model["f32"])]) == 0
    assert "warning" not in capsys.readouterr().err
