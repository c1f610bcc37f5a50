"""Our server with --backend vllm against our own engine, in one run: 8 concurrent
clients, each with its own 20-token soft prompt and 64 greedy tokens, over real HTTP.

The model is the 317M-parameter random Llama of benchmarks/_llama.py (float32), saved to
a temporary folder; vLLM (KOBOLD_VLLM_PYTHON, default .venv-vllm/bin/python: `make
test-vllm` builds it) is started on it with prompt embeddings. On this 2-core CPU both
run on the same cores, one after the other. Prints tokens/s of each and the ratio.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from _llama import ROOT, build_engine, parameters
from server_batching import CLIENTS, NEW_TOKENS, SOFT_TOKENS, throughput
from kobold_desktop.engine import Engine
from kobold_desktop.engine.remote.embeddings import load_embeddings_only
from kobold_desktop.engine.remote.vllm import VllmClient, VllmProcess
from kobold_desktop.server.config import ServeConfig
from kobold_desktop.server.http import KoboldServer
from kobold_desktop.server.service import Service
from kobold_desktop.server.vllm import VllmScheduler
from kobold_desktop.softprompt import Metadata, kobold_zip

VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--gpu-memory-utilization", "0.3",
             "--max-num-seqs", "16"]


def measure(service: Service) -> tuple[float, float]:
    server = KoboldServer(service, "127.0.0.1", 0).start()
    try:
        sequential, concurrent, counts = throughput(server.port)
    finally:
        server.stop()
    assert all(c > 0 for c in counts), counts
    return sequential, concurrent


def main() -> None:
    python = os.environ.get("KOBOLD_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
    if not Path(python).exists():
        sys.exit(f"needs vLLM: run `make test-vllm` first (or set KOBOLD_VLLM_PYTHON); no {python}")
    engine = build_engine()
    folder = Path(tempfile.mkdtemp(prefix="kobold-vllm-bench-"))
    model_dir = folder / "random-llama"
    engine.loaded.model.save_pretrained(model_dir)
    engine.loaded.tokenizer.save_pretrained(model_dir)
    adapters = {}
    for i in range(CLIENTS):
        torch.manual_seed(100 + i)
        path = folder / f"sp{i}.zip"
        kobold_zip.write(path, torch.randn(SOFT_TOKENS, engine.hidden_size) * 0.02, Metadata(name=f"sp{i}"))
        adapters[f"sp{i}"] = str(path)
    config = ServeConfig(prompt_adapters=adapters, max_prompt_adapter_token=64, max_batch=16)
    print(f"model: random Llama, {parameters(engine.loaded.model) / 1e6:.0f}M parameters, float32, CPU "
          f"({os.cpu_count()} cores); {CLIENTS} clients x {NEW_TOKENS} tokens, {SOFT_TOKENS}-token soft prompts")

    ours = Service(engine, config)
    ours_seq, ours_conc = measure(ours)
    ours.close()
    engine.unload()
    print(f"our engine:   one after another {ours_seq:6.1f} tokens/s, 8 at once {ours_conc:6.1f} tokens/s")

    process = VllmProcess(str(model_dir), python, VLLM_ARGS)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    started = time.perf_counter()
    process.start(progress=print)
    print(f"vLLM started in {time.perf_counter() - started:.0f} s")
    try:
        remote = Engine(load_embeddings_only(model_dir))
        service = Service(remote, config, VllmScheduler(remote, VllmClient(process.url)))
        vllm_seq, vllm_conc = measure(service)
    finally:
        process.stop()
    print(f"through vLLM: one after another {vllm_seq:6.1f} tokens/s, 8 at once {vllm_conc:6.1f} tokens/s")
    print(f"vLLM / ours, 8 clients at once: {vllm_conc / ours_conc:.2f}x; one after another: "
          f"{vllm_seq / ours_seq:.2f}x; batching gain: ours {ours_conc / ours_seq:.2f}x, "
          f"vLLM {vllm_conc / vllm_seq:.2f}x")


if __name__ == "__main__":
    main()
