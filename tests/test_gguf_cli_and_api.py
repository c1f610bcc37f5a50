"""GGUF files from the command line and the Python API: `generate --model x.gguf`, the
GGUF flags, `model convert`, refusals (tuning, ranking, bad flags), and `LLM(model=...gguf)`."""

import json

import pytest
import torch

from kobold_desktop.cli import main
from kobold_desktop.engine import Engine, SamplingSettings
from kobold_desktop.softprompt import Metadata, kobold_zip

GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def sea(gguf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "sea.zip"
    torch.manual_seed(5)
    kobold_zip.write(path, torch.randn(4, 64) * 0.5, Metadata(name="sea"))
    return path


def test_generate_on_a_gguf_equals_the_engine(gguf_model, sea, capsys):
    code = main(["generate", "--model", str(gguf_model["f32"]), "--softprompt", str(sea), "--prompt", "Once upon",
                 "--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", "12", "--json",
                 "--threads", "1", "--context-size", "128"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    engine = Engine()
    engine.load(gguf_model["f32"])
    want = engine.generate("Once upon", GREEDY, softprompt=engine.prepare_softprompts([sea]))
    assert (data["text"], data["softprompt_tokens"]) == (want.text, 4)


def test_gguf_flags_reach_llamacpp(gguf_model):
    from kobold_desktop.cli import build_parser, load_options

    args = build_parser().parse_args(["generate", "--model", "m.gguf", "--prompt", "x", "--threads", "1",
                                      "--context-size", "128", "--gpu-layers", "0"])
    engine = Engine()
    loaded = engine.load(gguf_model["f32"], load_options(args))
    assert (loaded.model.threads, loaded.context_length, loaded.model.gpu_layers) == (1, 128, 0)
    assert engine.context_length == 128
    with pytest.raises(Exception, match="need 140 tokens; the model's context is 128"):
        engine.generate([1] * 128, SamplingSettings(max_new_tokens=12))


def test_bad_gguf_flags_exit_2(gguf_model, capsys):
    code = main(["generate", "--model", str(gguf_model["f32"]), "--prompt", "x", "--threads", "0"])
    assert code == 2 and "--threads must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["tune", "--data", "{data}", "--out", "{out}", "--steps", "1"],
                                     ["softprompt", "rank", "{sea}", "--data", "{data}"]])
def test_tuning_and_ranking_take_a_gguf(gguf_model, sea, tmp_path, capsys, command):
    """They refused a GGUF before (issue 30): now its weights are dequantized for training."""
    data = tmp_path / "story.txt"
    data.write_text("Once upon a time there was a dragon. " * 40)
    args = [a.format(data=data, out=tmp_path / "x.zip", sea=sea) for a in command]
    code = main(args + ["--model", str(gguf_model["f32"])])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "for training" in err or "from the cache" in err
    assert (tmp_path / "x.zip").exists() == (command[0] == "tune")


def test_model_convert_writes_a_gguf_that_generates_like_the_folder(gguf_model, tmp_path, capsys):
    out = tmp_path / "converted.gguf"
    assert main(["model", "convert", str(gguf_model["dir"]), str(out), "--type", "f32"]) == 0
    engine = Engine()
    engine.load(out)
    reference = Engine()
    reference.load(gguf_model["f32"])
    assert engine.generate("In the", GREEDY).token_ids == reference.generate("In the", GREEDY).token_ids
    size = out.stat().st_size
    assert main(["model", "convert", str(gguf_model["dir"]), str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err and out.stat().st_size == size
    assert main(["model", "convert", str(tmp_path), str(tmp_path / "y.gguf")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_model_convert_quantizes_with_llamacpp(gguf_model, tmp_path):
    from kobold_desktop.engine.llamacpp.header import read_metadata

    out = tmp_path / "q4.gguf"
    assert main(["model", "convert", str(gguf_model["dir"]), str(out), "--type", "Q4_K_M"]) == 0
    assert read_metadata(out)["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert Engine().load(out).backend == "llama.cpp"


def test_the_converter_recognises_a_gpt2_style_tokenizer_it_has_no_hash_for(gguf_model, tmp_path):
    from kobold_desktop.engine.llamacpp.convert import gpt2_style_pre_tokenizer
    from kobold_desktop.engine.llamacpp.header import read_metadata

    assert gpt2_style_pre_tokenizer(gguf_model["dir"]) == "gpt-2"
    assert read_metadata(gguf_model["f32"])["tokenizer.ggml.pre"] == "gpt-2"
    assert gpt2_style_pre_tokenizer(tmp_path) is None  # no tokenizer.json: the converter decides


def test_softprompt_list_greys_soft_prompts_that_do_not_fit_a_gguf(gguf_model, sea, tmp_path, capsys):
    kobold_zip.write(tmp_path / "wide.zip", torch.randn(2, 48), Metadata(name="wide"))
    (tmp_path / "sea.zip").write_bytes(sea.read_bytes())
    assert main(["softprompt", "list", "--dir", str(tmp_path), "--model", str(gguf_model["q8_0"]), "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)["softprompts"]}
    assert entries["sea"]["compatible"] is True
    assert entries["wide"]["compatible"] is False and "hidden size 48" in entries["wide"]["reason"]


def test_the_python_api_runs_a_gguf_with_a_prompt_adapter(gguf_model, sea):
    from kobold_desktop import LLM, SamplingParams
    from kobold_desktop.prompt_adapter.request import PromptAdapterRequest

    llm = LLM(model=str(gguf_model["f32"]), enable_prompt_adapter=True)
    out = llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.0),
                       prompt_adapter_request=PromptAdapterRequest("sea", 1, str(sea)))
    engine = Engine()
    engine.load(gguf_model["f32"])
    want = engine.generate("Once upon", GREEDY, softprompt=engine.prepare_softprompts([sea]))
    assert out[0].outputs[0].token_ids == list(want.token_ids)


def test_model_convert_in_the_bundle_says_it_needs_python(gguf_model, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert main(["model", "convert", str(gguf_model["dir"]), str(tmp_path / "x.gguf")]) == 2
    assert "runs from a Python install" in capsys.readouterr().err
