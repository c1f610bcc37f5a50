"""Remote backends without a remote server: the embedding table read alone from
safetensors, the rows sent to vLLM, and the mapping of our settings to vLLM's."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kobold_desktop.engine import Engine, ModelError, SamplingSettings
from kobold_desktop.engine.remote.embeddings import (
    embedding_scales,
    find_embedding_key,
    load_embeddings_only,
    read_embedding_table,
)
from kobold_desktop.engine.remote.http import Endpoint, RemoteError
from kobold_desktop.engine.remote.vllm import UnsupportedByBackend, encode_embeds, openai_endpoint, sampling_fields
from kobold_desktop.softprompt import Metadata, kobold_zip

from ..helpers import ARCHITECTURES, build_tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_table_read_alone_is_the_models_input_embeddings(model_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    table = read_embedding_table(model_dirs[arch], model.config.get_text_config().hidden_size)
    assert torch.equal(table, model.get_input_embeddings().weight.detach())


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path):
    folder = build_tiny_model(tmp_path / "llama", "llama", hidden=64)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    table = read_embedding_table(tmp_path / "sharded", 64)
    assert torch.equal(table, model.get_input_embeddings().weight.detach())


def test_the_input_embedding_is_never_the_head_or_a_position_table():
    names = {"lm_head.weight": 0, "model.decoder.embed_positions.weight": 0, "model.decoder.embed_tokens.weight": 0,
             "vision_tower.embeddings.word_embeddings.weight": 0}
    assert find_embedding_key(names) == "model.decoder.embed_tokens.weight"
    assert find_embedding_key({"lm_head.weight": 0}) is None


def test_a_folder_without_safetensors_gets_a_clear_message(tmp_path, model_dirs):
    folder = tmp_path / "bare"
    folder.mkdir()
    for file in model_dirs["llama"].iterdir():
        if file.suffix != ".safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ModelError, match="no .safetensors"):
        load_embeddings_only(folder)
    with pytest.raises(ModelError, match="no model folder"):
        load_embeddings_only(tmp_path / "missing")
    with pytest.raises(ModelError, match="GGUF"):
        load_embeddings_only(tmp_path / "model.gguf")


def test_rows_are_soft_prompt_then_tokens_with_the_bos_row(model_dirs):
    engine = Engine(load_embeddings_only(model_dirs["llama"]))
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    ids = engine.encode("Once upon a time")
    assert ids[0] == engine.loaded.tokenizer.bos_token_id
    soft = torch.randn(5, 32)
    rows = engine.loaded.model.rows(ids, soft)
    assert rows.shape == (5 + len(ids), 32)
    assert torch.equal(rows[:5], soft)
    assert torch.equal(rows[5:], model.get_input_embeddings()(torch.tensor(ids)).detach())
    assert engine.loaded.model.rows(ids).shape == (len(ids), 32)


def test_soft_prompts_are_checked_against_the_table(model_dirs, tmp_path):
    engine = Engine(load_embeddings_only(model_dirs["gpt2"]))
    kobold_zip.write(tmp_path / "ok.zip", torch.randn(3, 32), Metadata(name="ok"))
    kobold_zip.write(tmp_path / "wide.zip", torch.randn(3, 64), Metadata(name="wide"))
    assert engine.prepare_softprompts([tmp_path / "ok.zip"]).n_tokens == 3
    with pytest.raises(Exception, match="64"):
        engine.prepare_softprompts([tmp_path / "wide.zip"])


def test_gemma_rows_are_scaled_as_the_transformers_model_scales_them():
    assert embedding_scales("llama", 2048) == (1.0, 1.0)
    assert embedding_scales("gemma2", 2304) == (2304 ** 0.5, 2304 ** 0.5)  # inside the model: every row
    assert embedding_scales("gemma3_text", 1152) == (1.0, 1152 ** 0.5)  # the embedding layer: tokens only


def test_prompt_embeds_are_base64_of_torch_save():
    rows = torch.randn(4, 8, dtype=torch.bfloat16)
    back = torch.load(io.BytesIO(base64.b64decode(encode_embeds(rows))), weights_only=True)
    assert torch.equal(back, rows)


def test_sampling_maps_to_vllm_names_and_refuses_what_it_lacks():
    settings = SamplingSettings(max_new_tokens=40, temperature=0.8, top_k=0, top_p=0.9, min_p=0.05,
                                repetition_penalty=1.1, repetition_penalty_range=0, seed=5, stop=("\n",))
    assert sampling_fields(settings, 100) == {
        "max_tokens": 40, "temperature": 0.8, "top_p": 0.9, "top_k": -1, "min_p": 0.05,
        "repetition_penalty": 1.1, "stop": ["\n"], "seed": 5}
    assert sampling_fields(settings.with_changes(top_k=40), 100)["top_k"] == 40
    # a range that covers the whole text is vLLM's penalty; a shorter one is not
    assert sampling_fields(settings.with_changes(repetition_penalty_range=128), 100)
    with pytest.raises(UnsupportedByBackend, match="rep_pen_range 0"):
        sampling_fields(settings.with_changes(repetition_penalty_range=64), 100)
    assert sampling_fields(settings.with_changes(repetition_penalty=1.0, repetition_penalty_range=64), 100)
    with pytest.raises(UnsupportedByBackend, match="typical"):
        sampling_fields(settings.with_changes(typical_p=0.9), 100)


@pytest.mark.parametrize("url, base", [
    ("http://gpu-box:8000/v1", "http://gpu-box:8000/v1"),
    ("http://gpu-box:8000", "http://gpu-box:8000/v1"),
    ("http://gpu-box:8000/", "http://gpu-box:8000/v1"),
    ("gpu-box:8000/v1/", "http://gpu-box:8000/v1"),
    ("https://example.org/vllm", "https://example.org:443/vllm/v1"),
])
def test_the_vllm_address_is_taken_with_or_without_v1(url, base):
    assert openai_endpoint(url).base == base


def test_a_bad_address_is_refused():
    with pytest.raises(RemoteError, match="not a server address"):
        Endpoint.parse("ftp://x")
