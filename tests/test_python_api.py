"""The Python API in vLLM's and Aphrodite's shape: Aphrodite's soft prompt example runs with
only its imports changed."""

import pytest
import torch

from kobold_desktop.engine import Engine, SamplingSettings

from .helpers import FLOAT32, adapter_rows, greedy_reference


@pytest.fixture(scope="module")
def adapter(model_dirs, tmp_path_factory):
    """A prompt-tuning adapter saved by PEFT for the tiny Llama (which adds BOS)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("adapters") / "tweet_adapter"
    model.save_pretrained(folder)
    return folder


def alone(model_dir, prompt, settings, softprompt=None, options=None):
    engine = Engine()
    engine.load(model_dir, options) if options else engine.load(model_dir)
    active = engine.prepare_softprompts([softprompt]) if softprompt else None
    return engine, engine.generate(prompt, settings, softprompt=active)


def test_aphrodites_soft_prompt_example_runs_with_only_its_imports_changed(model_dirs, adapter):
    from kobold_desktop import LLM, SamplingParams
    from kobold_desktop.prompt_adapter.request import PromptAdapterRequest

    prompts = ["The knight rode through the dark", "Once upon a time"]
    llm = LLM(model=str(model_dirs["llama"]), enable_prompt_adapter=True, max_prompt_adapter_token=512)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, stop=["[/assistant]"]),
                           prompt_adapter_request=PromptAdapterRequest("tweet_adapter", 1, str(adapter)))
    assert len(outputs) == 2 and isinstance(outputs[0].outputs[0].text, str)
    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, repetition_penalty_range=0,
                                max_new_tokens=16, stop=("[/assistant]",))
    for prompt, output in zip(prompts, outputs):
        engine, want = alone(model_dirs["llama"], prompt, settings, adapter)
        assert output.prompt == prompt and output.prompt_token_ids == engine.encode(prompt)
        completion = output.outputs[0]
        assert (completion.text, completion.token_ids) == (want.text, list(want.token_ids))
        assert completion.finish_reason == want.finish_reason in ("length", "stop")


def test_the_api_equals_the_reference_for_a_peft_adapter(model_dirs, adapter):
    from transformers import AutoModelForCausalLM

    from kobold_desktop import LLM, PromptAdapterRequest, SamplingParams

    llm = LLM(model=str(model_dirs["llama"]), enable_prompt_adapter=True, dtype="float32")
    out = llm.generate("The knight rode", SamplingParams(temperature=0, max_tokens=20),
                       prompt_adapter_request=PromptAdapterRequest("a", 1, str(adapter), 8))[0]
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    assert out.outputs[0].token_ids == greedy_reference(model, out.prompt_token_ids, 20, rows=adapter_rows(adapter))


def test_one_adapter_per_prompt_batched_equals_each_alone(model_dirs, adapter, tmp_path):
    from kobold_desktop import LLM, PromptAdapterRequest, SamplingParams
    from kobold_desktop.softprompt import Metadata, kobold_zip

    kobold_zip.write(tmp_path / "sea.zip", torch.randn(5, 32) * 0.5, Metadata(name="sea"))
    llm = LLM(model=str(model_dirs["llama"]), enable_prompt_adapter=True, max_prompt_adapters=2, dtype="float32")
    requests = [PromptAdapterRequest("tweet", 1, str(adapter)), None, PromptAdapterRequest("sea", 2, str(tmp_path / "sea.zip"))]
    prompts = ["The knight", "Once upon a time", "In the"]
    params = SamplingParams(temperature=0, max_tokens=12)
    outputs = llm.generate(prompts, params, prompt_adapter_request=requests)
    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, repetition_penalty_range=0, max_new_tokens=12)
    for prompt, request, output in zip(prompts, requests, outputs):
        _, want = alone(model_dirs["llama"], prompt, settings, request.local_path if request else None, FLOAT32)
        assert output.outputs[0].token_ids == list(want.token_ids)


def test_n_samples_differ_and_a_seed_repeats_them(model_dirs):
    from kobold_desktop import LLM, SamplingParams

    llm = LLM(model=str(model_dirs["llama"]))
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7)
    first = llm.generate("The knight", params)[0].outputs
    again = llm.generate("The knight", params)[0].outputs
    assert [o.index for o in first] == [0, 1, 2]
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) > 1


def test_adapters_that_cannot_be_used_are_refused_clearly(model_dirs, adapter):
    from kobold_desktop import LLM, PromptAdapterRequest, SamplingParams
    from kobold_desktop.llm import PromptAdapterError

    short = LLM(model=str(model_dirs["llama"]), enable_prompt_adapter=True, max_prompt_adapter_token=4)
    with pytest.raises(PromptAdapterError, match="has 8 virtual tokens, more than max_prompt_adapter_token \\(4\\)"):
        short.generate("x", SamplingParams(), prompt_adapter_request=PromptAdapterRequest("t", 1, str(adapter)))
    off = LLM(model=str(model_dirs["llama"]))
    with pytest.raises(ValueError, match="enable_prompt_adapter=True"):
        off.generate("x", SamplingParams(), prompt_adapter_request=PromptAdapterRequest("t", 1, str(adapter)))
    with pytest.raises(PromptAdapterError, match="not the 3 its request says"):
        short.max_prompt_adapter_token = 0
        short.generate("x", SamplingParams(), prompt_adapter_request=PromptAdapterRequest("t", 2, str(adapter), 3))


def test_a_mixture_file_is_a_prompt_adapter(model_dirs, adapter, tmp_path):
    """A mixture file as `prompt_adapter_local_path`: the PEFT adapter and a KoboldAI zip,
    mixed; the output equals the engine's for the same mixture."""
    from kobold_desktop import LLM, SamplingParams
    from kobold_desktop.prompt_adapter.request import PromptAdapterRequest
    from kobold_desktop.softprompt import Metadata, kobold_zip
    from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, read_mixture, write_mixture
    import shutil

    shutil.copytree(adapter, tmp_path / "tweet_adapter")
    torch.manual_seed(2)
    kobold_zip.write(tmp_path / "z.zip", torch.randn(3, 32), Metadata(name="z"))
    write_mixture(tmp_path / "mix.json", Mixture("m", "bayes", (MixtureMember("tweet_adapter", 2),
                                                                MixtureMember("z.zip", 1))))
    llm = LLM(model=str(model_dirs["llama"]), enable_prompt_adapter=True, dtype="float32")
    out = llm.generate(["The knight"], SamplingParams(temperature=0, max_tokens=10),
                       prompt_adapter_request=PromptAdapterRequest("mix", 1, str(tmp_path / "mix.json")))
    engine = Engine()
    engine.load(model_dirs["llama"], FLOAT32)
    active = engine.prepare_mixture(read_mixture(tmp_path / "mix.json"), [tmp_path / "tweet_adapter", tmp_path / "z.zip"])
    expected = engine.generate("The knight", SamplingSettings(temperature=0, max_new_tokens=10, repetition_penalty=1.0),
                               softprompt=active)
    assert out[0].outputs[0].token_ids == list(expected.token_ids)
