"""Batched generation with a different soft prompt per row equals each request alone."""

import pytest
import torch

from kobold_desktop.engine import Engine, GenerationResult, SamplingSettings, TextChunk
from kobold_desktop.engine.batch import BatchRequest, generate_batch
from kobold_desktop.softprompt import Metadata, kobold_zip

from ..helpers import ARCHITECTURES

GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=16)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batch_equals_each_request_alone(model_dirs, tmp_path, arch):
    engine = Engine()
    engine.load(model_dirs[arch])
    hidden = engine.hidden_size
    softprompts = [None]
    for n in (3, 7, 12):
        kobold_zip.write(tmp_path / f"{n}.zip", torch.randn(n, hidden), Metadata(name=str(n)))
        softprompts.append(engine.prepare_softprompts([tmp_path / f"{n}.zip"]))
    prompts = ["The knight", "Once upon a time there was a", "In", "She opened the door and saw"]
    settings = [GREEDY, GREEDY.with_changes(max_new_tokens=5), GREEDY.with_changes(stop=("e",)),
                SamplingSettings(temperature=0.9, top_k=20, max_new_tokens=10, seed=11)]
    alone = [engine.generate(p, s, softprompt=sp) for p, s, sp in zip(prompts, settings, softprompts)]

    events = [[] for _ in prompts]
    requests = [BatchRequest(engine.encode(p), sp.tensor if sp else None, s, events[i].append)
                for i, (p, s, sp) in enumerate(zip(prompts, settings, softprompts))]
    generate_batch(engine.loaded.model, engine.loaded.tokenizer, requests)
    for i, expected in enumerate(alone):
        result = events[i][-1]
        assert isinstance(result, GenerationResult)
        assert result.token_ids == expected.token_ids, (arch, i)
        assert (result.text, result.finish_reason) == (expected.text, expected.finish_reason)
        assert "".join(e.text for e in events[i] if isinstance(e, TextChunk)) == result.text
        assert result.softprompt_tokens == (softprompts[i].n_tokens if softprompts[i] else 0)
