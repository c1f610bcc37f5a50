"""Loading and unloading models: progress, freeing, clear errors, offline hub ids, GPU splits."""

import gc
import weakref

import pytest
import torch

from kobold_desktop.engine import Engine, ModelError, SamplingSettings
from kobold_desktop.engine.device import choose_dtype


def test_load_reports_progress_and_unload_frees(model_dirs):
    engine = Engine()
    steps = []
    loaded = engine.load(model_dirs["gpt2"], progress=lambda message, fraction: steps.append((message, fraction)))
    fractions = [f for _, f in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(steps) >= 4
    assert loaded.info.hidden_size == 32 and loaded.dtype == choose_dtype(torch.device("cpu"))
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


def test_hub_id_loads_from_the_local_cache_offline(model_dirs, tmp_path, monkeypatch):
    """A Hugging Face id works without network when the cache has it."""
    import shutil

    snapshot = tmp_path / "hub" / "models--kobold-test--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(model_dirs["gpt2"], snapshot)
    (tmp_path / "hub" / "models--kobold-test--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--kobold-test--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    engine = Engine()
    loaded = engine.load("kobold-test/tiny")
    assert loaded.info.name == "kobold-test/tiny" and loaded.info.hidden_size == 32
    assert engine.generate("Once", SamplingSettings(max_new_tokens=3)).generated_tokens > 0


def test_gpu_memory_limit_splits_layers_with_accelerate(model_dirs, monkeypatch):
    """With a GPU memory limit the model is loaded with device_map='auto' and max_memory
    (accelerate places what does not fit on the CPU). Checked without a GPU by
    intercepting the load."""
    from transformers import AutoModelForCausalLM

    from kobold_desktop.engine import LoadOptions, loader

    captured = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(source, **kwargs):
        captured.update(kwargs)
        kwargs.pop("device_map", None), kwargs.pop("max_memory", None)
        model = real(source, **kwargs)
        model.hf_device_map = {"transformer.h.0": 0, "transformer.h.1": "cpu"}
        return model

    monkeypatch.setattr(loader, "choose_device", lambda requested=None: torch.device("cuda", 0))
    monkeypatch.setattr(loader, "dtype_choice", lambda device, requested=None: (torch.float32, "float32: asked for"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    loaded = loader.load_model(model_dirs["gpt2"], LoadOptions(max_gpu_memory="6GiB"))
    assert captured["device_map"] == "auto"
    assert captured["max_memory"] == {0: "6GiB", "cpu": "1024GiB"}
    assert loaded.device_label == "split: 0, cpu"
