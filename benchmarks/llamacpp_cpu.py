"""llama.cpp's CPU variants and buffer types: what avoiding the AMX crash costs.

    python benchmarks/llamacpp_cpu.py [--layers 24]

A random Llama of 317M parameters (benchmarks/_llama.py's shape) is converted to q4_1 and
q8_0 and run, each configuration in its own process (a process loads one CPU variant):
- the variant `make`'s build picks here (best non-AMX, with the CPU repacks);
- the same with the extra buffer types off (`use_extra_bufts = False`: what the issue's
  first workaround did, which also loses the repacks);
- the x86-64-v3 level (haswell: AVX2), what a bundle runs on an older CPU;
- the AMX variant (sapphirerapids), llama.cpp's own choice on AMX CPUs, where it crashes:
  run only where the CPU has AMX, and reported as a crash if it crashes.
Prompt: tokens/s reading a 512-token prompt (first token, nothing cached). Decode: tokens/s
for 64 new tokens after a 32-token prompt. Medians of --rounds; ratios against the first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _llama import build_engine, parameters  # noqa: E402

from kobold_desktop.engine.llamacpp import cpu  # noqa: E402
from kobold_desktop.engine.llamacpp.convert import convert  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
from _llama import random_ids
from kobold_desktop.engine import Engine, SamplingSettings
from kobold_desktop.engine.llamacpp.model import cpu_backend
greedy = lambda n: SamplingSettings(max_new_tokens=n, temperature=0, repetition_penalty=1.0, top_p=1.0)
engine = Engine(); engine.load(sys.argv[1])
prompt, decode = [], []
for r in range(int(sys.argv[2])):
    engine.loaded.model.prefix_cache.clear(); engine.prefix_cache.clear()
    result = engine.generate(random_ids(512, seed=10 + r), greedy(1))
    prompt.append(512 / result.first_token_seconds)
    engine.loaded.model.prefix_cache.clear(); engine.prefix_cache.clear()
    result = engine.generate(random_ids(32, seed=20 + r), greedy(64))
    decode.append((result.generated_tokens - 1) / (result.seconds - result.first_token_seconds))
backend = cpu_backend()
print(json.dumps({"prompt": prompt, "decode": decode, "variant": backend.variant,
                  "buffers": list(backend.extra_buffer_types)}))
"""


def cpu_flags() -> str:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "f16c", "fma")))
    return " ".join(flags)


def run(model: Path, rounds: int, env: dict[str, str]) -> dict | str:
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(rounds), str(Path(__file__).parent)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    if done.returncode < 0:
        return f"crashed ({signal.Signals(-done.returncode).name})"
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "random-llama"
        engine = build_engine(torch.float32, layers=args.layers, context=2048)
        engine.loaded.model.save_pretrained(folder)
        engine.loaded.tokenizer.save_pretrained(folder)
        print(f"random Llama, {parameters(engine.loaded.model) / 1e6:.0f}M parameters", flush=True)
        engine.unload()
        files = {kind: convert(folder, Path(tmp) / f"model-{kind}.gguf", kind) for kind in ("q4_1", "q8_0")}
        has_amx = "amx_int8" in cpu_flags()
        configs = [("picked (repacks on)", {}), ("picked, extra buffers off", {cpu.EXTRA_BUFFERS_ENV: "0"}),
                   ("haswell (x86-64-v3)", {cpu.ENV: "haswell"})]
        if has_amx:
            configs.append(("sapphirerapids (AMX, llama.cpp's default)", {cpu.ENV: "sapphirerapids"}))
        rows = []
        for kind, model in files.items():
            base = None
            for name, env in configs:
                out = run(model, args.rounds, env)
                if isinstance(out, str):
                    rows.append(f"| {kind} | {name} | {out} | | | |")
                    continue
                pp, tg = statistics.median(out["prompt"]), statistics.median(out["decode"])
                base = base or (pp, tg)
                rows.append(f"| {kind} | {name}: {out['variant']} [{', '.join(out['buffers']) or 'none'}] "
                            f"| {pp:.0f} | {pp / base[0]:.2f}x | {tg:.1f} | {tg / base[1]:.2f}x |")
                print(rows[-1], flush=True)
        if not has_amx:
            print("This CPU has no AMX: llama.cpp's AMX variant (the crashing default) cannot run here.")
        print("| weights | CPU code [extra buffer types] | prompt tok/s | ratio | decode tok/s | ratio |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
