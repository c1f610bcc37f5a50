"""The cost of the full sampler chain (issue 27's target: decoding at most 10% slower than
with the plain chain, on a 300M model in the default precision).

1. End to end: the 317M random Llama of `_llama.py` (float32 on a CPU, the default there)
   writes 64 tokens after a 256-token prompt, with the plain chain (temperature, top-p,
   repetition penalty: the defaults) and with every sampler on (DRY, XTC, top-a, TFS,
   typical, dynamic temperature, smoothing, top-n-sigma, presence/frequency penalties and
   the slope, top-k, min-p, logit bias, three banned phrases). Best of 3 each.
2. The chain alone on logits as wide as real vocabularies (49,152: SmolLM2; 151,936:
   Qwen), per token, against the forward step measured in 1: the share of a step the
   samplers take with a real vocabulary (the demo tokenizer has 4,096 tokens).

Prints the CPU flags that matter and the ratios.
"""

from __future__ import annotations

import platform
import time

import torch

from _llama import build_engine

from kobold_desktop.engine.samplers import SamplerChain
from kobold_desktop.engine.sampling import SamplingSettings

NEW, PROMPT, REPEATS = 64, 256, 3
PLAIN = SamplingSettings(max_new_tokens=NEW, seed=1)
FULL = PLAIN.with_changes(
    top_k=100, top_p=0.95, min_p=0.02, typical_p=0.97, top_a=0.05, tfs=0.98, top_n_sigma=3.0, dynatemp_range=0.3,
    smoothing_factor=0.1, xtc_probability=0.5, xtc_threshold=0.1, dry_multiplier=0.8, presence_penalty=0.1,
    frequency_penalty=0.1, repetition_penalty_slope=0.7, logit_bias=((5, -1.0), (17, 0.5)),
    banned_phrases=("suddenly", "/shivers? down/", "barely above a whisper"))


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return platform.processor()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def best(engine, prompt, settings) -> float:
    times = []
    for _ in range(REPEATS):
        engine.prefix_cache.clear()
        result = engine.generate(prompt, settings)
        assert result.generated_tokens == NEW
        times.append(result.seconds - (result.first_token_seconds or 0.0))
    return min(times)


def chain_cost(vocab: int, settings: SamplingSettings) -> float:
    """Seconds per pick for a 1,024-token history on `vocab`-wide logits."""
    torch.manual_seed(0)
    chain = SamplerChain(settings)
    history = torch.randint(0, vocab, (1, 1024))
    logits = torch.randn(1, vocab) * 3
    generator = torch.Generator().manual_seed(0)
    chain.pick(history, logits, generator)
    start = time.perf_counter()
    for _ in range(50):
        chain.pick(history, logits, generator)
    return (time.perf_counter() - start) / 50


def main() -> None:
    print(f"CPU: {platform.machine()}, {torch.get_num_threads()} threads, flags: {cpu_flags()}")
    engine = build_engine()
    prompt = list(range(10, 10 + PROMPT))
    plain, full = best(engine, prompt, PLAIN), best(engine, prompt, FULL)
    step = plain / (NEW - 1)
    print(f"317M Llama, float32: {NEW - 1} decode steps plain {plain:.2f} s ({step * 1000:.0f} ms/token), "
          f"every sampler on {full:.2f} s: ratio {full / plain:.3f} (target <= 1.10)")
    for vocab in (4096, 49152, 151936):
        cost_plain, cost_full = chain_cost(vocab, PLAIN), chain_cost(vocab, FULL)
        print(f"chain alone, vocab {vocab:>6}: plain {cost_plain * 1000:.2f} ms, full {cost_full * 1000:.2f} ms per "
              f"token; the full chain's extra is {100 * (cost_full - cost_plain) / step:.1f}% of a 317M step")


if __name__ == "__main__":
    main()
