"""GGUF models through llama.cpp against the transformers engine, on a model of real size.

    python benchmarks/gguf_speed.py [--layers 24] [--rounds 2]

A random Llama of 317M parameters (benchmarks/_llama.py's shape) is saved, converted by
`kobold-desktop model convert` to f16, q8_0 and q4_K_M, and run:
- decode tokens/s: 128 new tokens after a 128-token prompt;
- time to first token with a 1,500-token prompt (nothing cached);
- a story's next turn: five turns, each adding 24 tokens of the writer's and generating
  16, starting from a 1,500-token story, with each backend's prefix reuse; the wait is the
  time to the first new token (median of the turns after the first); then five turns of
  "Generate more" (no new text from the writer).
The same GGUF files run through llama-cpp-python's own `Llama.generate` as the baseline
for our llama.cpp backend. Rounds interleave the backends; medians are printed, then the
ratios against the targets:
- ours within 10% of llama-cpp-python on the same file (decode and first token);
- q4_K_M decodes at least 8x our transformers float32 engine;
- "Generate more" at a 1,500-token story under 0.1 s with q8_0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _llama import build_engine, parameters, random_ids  # noqa: E402

from kobold_desktop.engine import Engine, LoadOptions, SamplingSettings  # noqa: E402
from kobold_desktop.engine.llamacpp.convert import convert  # noqa: E402

DECODE, PROMPT, STORY, TURNS, ADDED, PER_TURN = 128, 128, 1500, 5, 24, 16
THREADS = None  # llama.cpp's default: the physical cores


def greedy(n: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=n, temperature=0, repetition_penalty=1.0, top_p=1.0)


def decode_rate(result) -> float:
    return (result.generated_tokens - 1) / (result.seconds - result.first_token_seconds)


def clear(engine: Engine) -> None:
    if engine.loaded.backend == "llama.cpp":
        engine.loaded.model.prefix_cache.clear()
    engine.prefix_cache.clear()


def ours(engine: Engine) -> dict[str, float]:
    """Our engine (either backend): decode rate, first token at 1,500, the turn waits."""
    clear(engine)
    decode = decode_rate(engine.generate(random_ids(PROMPT, seed=2), greedy(DECODE)))
    clear(engine)
    first = engine.generate(random_ids(STORY, seed=3), greedy(1)).first_token_seconds
    clear(engine)  # as llama-cpp-python's reset: the story's turns start with nothing cached
    story, waits = random_ids(STORY, seed=4), {"turn": [], "more": []}
    for kind, added in (("turn", ADDED), ("more", 0)):  # the writer adds text; "Generate more"
        for turn in range(TURNS):
            result = engine.generate(story, greedy(PER_TURN))
            waits[kind].append(result.first_token_seconds)
            story = story + list(result.token_ids) + random_ids(added, seed=10 + turn)
    return {"decode": decode, "first": first, "turn": statistics.median(waits["turn"][1:]),
            "more": statistics.median(waits["more"])}


def direct(llm) -> dict[str, float]:
    """llama-cpp-python's high-level API on the same file, greedy, as its users call it."""
    def run(tokens: list[int], n: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, count = None, 0
        for _ in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=False):
            count += 1
            if first is None:
                first = time.perf_counter() - start
            if count == n:
                break
        return first, time.perf_counter() - start, count

    llm.reset()
    first, total, count = run(random_ids(PROMPT, seed=2), DECODE)
    decode = (count - 1) / (total - first)
    llm.reset()
    first_story = run(random_ids(STORY, seed=3), 1)[0]
    llm.reset()
    story, waits = random_ids(STORY, seed=4), {"turn": [], "more": []}
    for kind, added in (("turn", ADDED), ("more", 0)):
        for turn in range(TURNS):  # Llama.generate (reset=True) reuses the longest prefix it evaluated last
            tokens = []
            start = time.perf_counter()
            wait = None
            for token in llm.generate(story, top_k=1, temp=0.0, repeat_penalty=1.0):
                wait = wait if wait is not None else time.perf_counter() - start
                tokens.append(token)
                if len(tokens) == PER_TURN:
                    break
            waits[kind].append(wait)
            story = story + tokens + random_ids(added, seed=10 + turn)
    return {"decode": decode, "first": first_story, "turn": statistics.median(waits["turn"][1:]),
            "more": statistics.median(waits["more"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the llama.cpp runs (transformers: 1)")
    args = parser.parse_args()
    from llama_cpp import Llama

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "random-llama"
        engine = build_engine(torch.float32, layers=args.layers, context=2048)
        loaded = engine.loaded
        n_params = parameters(loaded.model)
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        print(f"random Llama, {n_params / 1e6:.0f}M parameters; {torch.get_num_threads()} torch threads")
        files = {}
        for kind in ("f16", "q8_0", "q4_k_m"):
            start = time.perf_counter()
            files[kind] = convert(folder, Path(tmp) / f"model-{kind}.gguf", kind)
            print(f"converted to {kind} in {time.perf_counter() - start:.0f} s "
                  f"({files[kind].stat().st_size / 2**20:.0f} MiB)", flush=True)

        results: dict[str, list[dict[str, float]]] = {}
        print("transformers float32 ...", flush=True)
        results["transformers float32"] = [ours(engine)]
        engine.unload()
        print("transformers bfloat16 ...", flush=True)
        bf16 = Engine()
        bf16.load(folder, LoadOptions(dtype="bfloat16"))
        results["transformers bfloat16"] = [ours(bf16)]
        bf16.unload()
        for _ in range(args.rounds):
            for kind, path in files.items():
                print(f"llama.cpp {kind} ...", flush=True)
                gguf = Engine()
                gguf.load(path, LoadOptions(context=2048, threads=THREADS))
                gguf.loaded.tokenizer.eos_token_id = None  # a random model: run the whole budget
                results.setdefault(f"ours, llama.cpp {kind}", []).append(ours(gguf))
                threads = gguf.loaded.model.threads
                gguf.unload()
                llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
                results.setdefault(f"llama-cpp-python {kind}", []).append(direct(llm))
                llm.close()

    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    base = med["transformers float32"]["decode"]
    print(f"\n{'':32} {'decode tok/s':>12} {'vs f32':>7} {'1st token @1500':>16} {'next turn':>10} "
          f"{'generate more':>14}")
    for name, m in med.items():
        print(f"{name:32} {m['decode']:12.1f} {m['decode'] / base:6.1f}x {m['first']:15.2f}s {m['turn']:9.3f}s "
              f"{m['more']:13.3f}s")
    print("\nours / llama-cpp-python on the same file (target: decode >= 0.90, first token time <= 1.10):")
    for kind in files:
        a, b = med[f"ours, llama.cpp {kind}"], med[f"llama-cpp-python {kind}"]
        print(f"  {kind:7} decode {a['decode'] / b['decode']:.2f}   first token {a['first'] / b['first']:.2f}   "
              f"next turn {a['turn'] / b['turn']:.2f}   generate more {a['more'] / b['more']:.2f}")
    q4 = med["ours, llama.cpp q4_k_m"]["decode"] / base
    turn = med["ours, llama.cpp q8_0"]["more"]
    print(f"q4_K_M decode / transformers float32: {q4:.1f}x (target >= 8x)")
    print(f"q8_0 'Generate more' at a {STORY}-token story: {turn * 1000:.0f} ms (target < 100 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
