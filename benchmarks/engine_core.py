"""The engine core on a real-size model: story continuation with prefix reuse, decode speed
against plain `model.generate`, and float32 against bfloat16. One run, ratios printed.

Model: a random-weight Llama of 317M parameters (benchmarks/_llama.py) on this machine's CPU.

- Story continuation (issue 11): a 1,500-token story, then five turns; each turn the
  model writes 30 tokens and the writer adds 10 (40 new tokens a turn). Time to first
  token per turn with the prefix cache against the same prompt recomputed from scratch.
  Target: at least 20x.
- Decode: 128 greedy tokens after a 128-token prompt, the engine against
  `model.generate` (interleaved rounds, best of each). Target: at least 1.0.
- Precision: decode tokens/s and a 1,500-token prompt's time in bfloat16 against
  float32 (the default is bfloat16 only on CPUs with AMX; see engine/device.py).
"""

from __future__ import annotations

import time

import torch

from _llama import build_engine, parameters, random_ids
from kobold_desktop.engine import SamplingSettings

STORY, TURNS, MODEL_TOKENS, WRITER_TOKENS = 1500, 5, 30, 10
DECODE_PROMPT, DECODE_TOKENS, ROUNDS = 128, 128, 3


def greedy(n: int) -> SamplingSettings:
    return SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=n)


def story_continuation(engine) -> tuple[list[float], list[float]]:
    bos = engine.loaded.tokenizer.bos_token_id
    story = [bos] + random_ids(STORY)
    engine.prefix_cache.clear()
    prompts, reuse = [], []
    first = engine.generate(story, greedy(MODEL_TOKENS))  # the story's first reading: paid once either way
    story += list(first.token_ids) + random_ids(WRITER_TOKENS, seed=100)
    warm = engine.generate(story, greedy(MODEL_TOKENS))  # one untimed turn: the first reuse meets cold kernels
    story += list(warm.token_ids) + random_ids(WRITER_TOKENS, seed=99)
    for turn in range(TURNS):
        prompts.append(list(story))
        result = engine.generate(story, greedy(MODEL_TOKENS))
        assert result.cached_tokens > 0 and result.generated_tokens == MODEL_TOKENS
        reuse.append(result.first_token_seconds)
        story += list(result.token_ids) + random_ids(WRITER_TOKENS, seed=101 + turn)
    recompute = []
    for prompt in prompts:
        engine.prefix_cache.clear()
        result = engine.generate(prompt, greedy(1))
        assert result.cached_tokens == 0
        recompute.append(result.first_token_seconds)
    return reuse, recompute


def decode_speed(engine) -> tuple[float, float]:
    model = engine.loaded.model
    ids = torch.tensor([[engine.loaded.tokenizer.bos_token_id] + random_ids(DECODE_PROMPT - 1, seed=7)])

    def plain() -> None:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, pad_token_id=0)
        assert out.shape[1] == DECODE_PROMPT + DECODE_TOKENS

    def ours() -> None:
        engine.prefix_cache.clear()
        assert engine.generate(ids[0].tolist(), greedy(DECODE_TOKENS)).generated_tokens == DECODE_TOKENS

    best = {"plain": float("inf"), "ours": float("inf")}
    for _ in range(ROUNDS):  # interleaved: drift hits both alike
        for name, fn in (("plain", plain), ("ours", ours)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return DECODE_TOKENS / best["plain"], DECODE_TOKENS / best["ours"]


def precision(engine) -> dict[str, tuple[float, float]]:
    """(decode tokens/s, seconds for a 1,500-token prompt) for float32, then bfloat16."""
    bos = engine.loaded.tokenizer.bos_token_id
    prompt = [bos] + random_ids(STORY, seed=9)
    figures = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine.loaded.model.to(dtype)
        engine.loaded.dtype = dtype
        engine.prefix_cache.clear()
        engine.generate(prompt[:64], greedy(4))  # warm up this dtype
        engine.prefix_cache.clear()
        read = engine.generate(prompt, greedy(1)).first_token_seconds
        engine.prefix_cache.clear()
        decode = engine.generate(prompt[:DECODE_PROMPT], greedy(64))
        figures[str(dtype).removeprefix("torch.")] = (64 / (decode.seconds - decode.first_token_seconds) * 63 / 64,
                                                      read)
    return figures


def main() -> None:
    engine = build_engine(torch.float32)
    print(f"model: random Llama, {parameters(engine.loaded.model) / 1e6:.0f}M parameters, float32, CPU "
          f"({torch.get_num_threads()} threads)")
    engine.generate(random_ids(32), greedy(4))  # warm up

    reuse, recompute = story_continuation(engine)
    print(f"\nstory continuation: {STORY}-token story, {TURNS} turns of {MODEL_TOKENS + WRITER_TOKENS} new tokens")
    for turn, (r, c) in enumerate(zip(reuse, recompute), 1):
        print(f"  turn {turn}: first token after {r:6.3f} s with reuse, {c:6.3f} s recomputed  ({c / r:5.1f}x)")
    mean_reuse, mean_recompute = sum(reuse) / TURNS, sum(recompute) / TURNS
    print(f"ratio recompute / reuse (mean time to first token): {mean_recompute / mean_reuse:.1f}x   (target >= 20x)")

    plain, ours = decode_speed(engine)
    print(f"\ndecode, {DECODE_TOKENS} tokens after {DECODE_PROMPT}: model.generate {plain:.1f} tokens/s, "
          f"engine {ours:.1f} tokens/s")
    print(f"ratio engine / model.generate: {ours / plain:.3f}   (target >= 1.0)")

    figures = precision(engine)
    (d32, r32), (d16, r16) = figures["float32"], figures["bfloat16"]
    print(f"\nprecision: float32 decodes {d32:.1f} tokens/s and reads {STORY} tokens in {r32:.2f} s; "
          f"bfloat16 {d16:.1f} tokens/s and {r16:.2f} s")
    print(f"ratio bfloat16 / float32: decode {d16 / d32:.2f}x, prompt {r32 / r16:.2f}x")


if __name__ == "__main__":
    main()
