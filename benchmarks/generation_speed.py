"""Tokens per second: plain `model.generate` against our engine, with and without soft prompts.

One run, one model, same prompt and greedy decoding; each configuration is timed
several times and the best run counts (least disturbed by the rest of the machine).
Targets (issue 3): engine / plain generate >= 0.95; soft prompt overhead <= 5%.
The model is a random GPT-2-shaped model (hidden 512, 6 layers, 128-token prompt,
128 new tokens), big enough that the model, not Python, dominates as in real use.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from kobold_desktop.engine import Engine, SamplingSettings  # noqa: E402
from kobold_desktop.softprompt import Metadata, kobold_zip  # noqa: E402
from tests.helpers import tiny_tokenizer  # noqa: E402

NEW_TOKENS, PROMPT_TOKENS, REPEATS = 128, 128, 7


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        tokenizer: PreTrainedTokenizerFast = tiny_tokenizer()
        torch.manual_seed(0)
        config = GPT2Config(n_embd=512, n_layer=6, n_head=8, n_positions=1024, vocab_size=len(tokenizer),
                            eos_token_id=None, bos_token_id=None)
        GPT2LMHeadModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

        engine = Engine()
        engine.load(folder)
        model = engine.loaded.model
        model.generation_config.eos_token_id = None
        engine.loaded.tokenizer.eos_token = None  # measure exactly NEW_TOKENS every time
        ids = torch.randint(5, len(tokenizer), (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
        settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=NEW_TOKENS)

        def plain():
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
            assert out.shape[1] == PROMPT_TOKENS + NEW_TOKENS

        def ours(prompt=ids[0].tolist()):
            engine.prefix_cache.clear()  # every run reads its whole prompt, as model.generate does
            result = engine.generate(prompt, settings)
            assert result.generated_tokens == NEW_TOKENS, result.finish_reason

        softprompts = {}
        for n in (20, 200):
            kobold_zip.write(Path(tmp) / f"sp{n}.zip", torch.randn(n, 512) * 0.02, Metadata(name=f"sp{n}"))
            softprompts[n] = engine.prepare_softprompts([Path(tmp) / f"sp{n}.zip"])
        longer = {n: torch.randint(5, len(tokenizer), (n,)).tolist() + ids[0].tolist() for n in (20, 200)}

        def with_softprompt(n):
            def run():
                engine.prefix_cache.clear()
                result = engine.generate(ids[0].tolist(), settings, softprompt=softprompts[n])
                assert result.generated_tokens == NEW_TOKENS
            return run

        configs = {
            "model.generate": plain,
            "engine, no soft prompt": ours,
            "engine, 20-token soft prompt": with_softprompt(20),
            "engine, hard prompt +20 tokens": lambda: ours(longer[20]),
            "engine, 200-token soft prompt": with_softprompt(200),
            "engine, hard prompt +200 tokens": lambda: ours(longer[200]),
        }
        for fn in configs.values():
            fn()  # warm up
        timings = {name: float("inf") for name in configs}
        for _ in range(REPEATS):  # interleaved rounds: drift hits every configuration alike
            for name, fn in configs.items():
                start = time.perf_counter()
                fn()
                timings[name] = min(timings[name], time.perf_counter() - start)

    base = timings["model.generate"]
    print(f"model: GPT-2 shape, hidden 512, 6 layers; prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new, greedy, CPU")
    for name, seconds in timings.items():
        print(f"{name:32s} {NEW_TOKENS / seconds:8.1f} tokens/s")
    engine_ratio = base / timings["engine, no soft prompt"]
    print(f"ratio engine / model.generate:   {engine_ratio:.3f}   (target >= 0.95)")
    for n in (20, 200):
        soft = timings[f"engine, {n}-token soft prompt"]
        mechanism = soft / timings[f"engine, hard prompt +{n} tokens"] - 1
        context = soft / timings["engine, no soft prompt"] - 1
        print(f"soft prompt overhead, {n:3d} tokens: {mechanism * 100:+.1f}% vs a hard prompt {n} tokens longer "
              f"(target <= 5%); {context * 100:+.1f}% vs no soft prompt (the longer context)")


if __name__ == "__main__":
    main()
