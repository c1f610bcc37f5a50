"""On a GPU: decode speed of a 1B-class random Llama in bfloat16 against the memory-bandwidth
bound, plus device placement, prefix reuse and batching. Run it whenever a GPU is at hand
and record the figures with the GPU's name in the README.

Decoding one sequence reads every weight once per token, so tokens/s can be at most
bandwidth / weight bytes. The bandwidth is measured here (a large device-to-device copy,
read plus write), and the data-sheet figure is printed beside it where the card is known.
Target (issue 11): at least 50% of the bound.

Without a CUDA GPU it says so and measures nothing (exit 0), so `make bench` runs anywhere.
"""

from __future__ import annotations

import time

import torch

from _llama import build_engine, parameters, random_ids
from kobold_desktop.engine import SamplingSettings
from kobold_desktop.engine.device import choose_dtype, cuda_has_native_bf16

# Data-sheet memory bandwidth in GB/s, by a piece of the name torch reports.
DATASHEET = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
             "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
             "L40S": 864, "L4": 300, "A10G": 600, "A10": 600, "T4": 320, "RTX 4090": 1008, "RTX 3090": 936}
NEW_TOKENS, PROMPT = 256, 128


def measured_bandwidth(device: torch.device) -> float:
    """GB/s of a 2 GiB device-to-device copy (bytes read plus bytes written)."""
    src = torch.empty(2**30, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / seconds / 1e9


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing measured (run benchmarks/gpu.py on a machine with one)")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    dtype = choose_dtype(device)
    print(f"GPU: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}; native bfloat16: "
          f"{cuda_has_native_bf16(device)}; default dtype: {str(dtype).removeprefix('torch.')}")
    bandwidth = measured_bandwidth(device)
    sheet = next((gbs for key, gbs in DATASHEET.items() if key in name), None)
    print(f"memory bandwidth: {bandwidth:.0f} GB/s measured" + (f", {sheet} GB/s data sheet" if sheet else ""))

    # TinyLlama-1.1B's shape (grouped-query attention), with the demo model's 4,096-token vocabulary.
    engine = build_engine(torch.bfloat16, hidden=2048, layers=22, mlp=5632, heads=32, kv_heads=4, context=4096,
                          device="cuda")
    model = engine.loaded.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    placed = {str(p.device) for p in model.parameters()}
    print(f"model: random Llama, {parameters(model) / 1e9:.2f}B parameters, bfloat16, {weight_bytes / 1e9:.2f} GB of "
          f"weights on {', '.join(sorted(placed))}")

    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=NEW_TOKENS)
    prompt = [engine.loaded.tokenizer.bos_token_id] + random_ids(PROMPT - 1)
    engine.generate(prompt, settings.with_changes(max_new_tokens=16))  # warm up kernels
    best = float("inf")
    for _ in range(3):
        engine.prefix_cache.clear()
        torch.cuda.synchronize()
        result = engine.generate(prompt, settings)
        best = min(best, (result.seconds - result.first_token_seconds) / (result.generated_tokens - 1))
    tokens_per_s = 1 / best
    for label, gbs in (("measured", bandwidth), ("data sheet", sheet)):
        if gbs:
            bound = gbs * 1e9 / weight_bytes
            print(f"decode: {tokens_per_s:.0f} tokens/s; bound at {label} bandwidth {bound:.0f} tokens/s; "
                  f"ratio {tokens_per_s / bound:.2f}   (target >= 0.50)")

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    plain = NEW_TOKENS / (time.perf_counter() - start)
    print(f"model.generate: {plain:.0f} tokens/s (prompt included); engine / model.generate {tokens_per_s / plain:.2f}")

    story = [engine.loaded.tokenizer.bos_token_id] + random_ids(1500, seed=3)
    engine.prefix_cache.clear()
    engine.generate(story, settings.with_changes(max_new_tokens=40))
    cached = [t.device.type for layer in next(iter(engine.prefix_cache._entries.values())).cache.layers
              for t in (layer.keys,)]
    again = engine.generate(story + random_ids(40, seed=4), settings.with_changes(max_new_tokens=1))
    engine.prefix_cache.clear()
    cold = engine.generate(story + random_ids(40, seed=4), settings.with_changes(max_new_tokens=1))
    print(f"prefix reuse at 1,500 tokens: first token {again.first_token_seconds * 1000:.1f} ms with reuse, "
          f"{cold.first_token_seconds * 1000:.1f} ms recomputed; cache on {set(cached)}")

    from kobold_desktop.engine.core import StepCore
    from kobold_desktop.engine.sequence import Sequence

    for batch in (1, 8, 32):
        core = StepCore(model)
        for i in range(batch):
            core.add(Sequence(random_ids(PROMPT, seed=10 + i), None, settings))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(64):
            core.step()
        torch.cuda.synchronize()
        print(f"batch {batch:2d}: {batch * 64 / (time.perf_counter() - start):7.0f} tokens/s in all")
        core.close()


if __name__ == "__main__":
    main()
