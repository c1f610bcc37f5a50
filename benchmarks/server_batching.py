"""The server under load, over real HTTP on 127.0.0.1, with a 317M-parameter random Llama
in float32 on this machine's CPU (benchmarks/_llama.py). One run, ratios printed.

- Throughput: 8 concurrent clients, each with its own 20-token soft prompt and 64 greedy
  tokens, against the same 8 requests one after another. Target (issue 11): at least 5x.
  The ceiling is printed beside it: what an 8-row decode step costs against a 1-row step
  on this CPU (the matrix products of 8 rows cost over twice those of one here), measured
  on the stepping core without HTTP.
- Head-of-line: a 16-token request sent while a 256-token request runs, against the same
  request alone. Continuous batching lets it join the running batch and leave when done;
  static batches made it wait for the long one. Target: at most 2x its time alone.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from _llama import build_engine, parameters
from kobold_desktop.server.config import ServeConfig
from kobold_desktop.server.http import KoboldServer
from kobold_desktop.server.service import Service
from kobold_desktop.softprompt import Metadata, kobold_zip

CLIENTS, NEW_TOKENS, SOFT_TOKENS = 8, 64, 20
LONG_TOKENS, SHORT_TOKENS = 256, 16


def request(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    conn.request("POST", "/v1/completions", json.dumps({"temperature": 0, **body}),
                 {"Content-Type": "application/json"})
    return json.loads(conn.getresponse().read())


def throughput(port: int) -> tuple[float, float, list[int]]:
    jobs = [{"model": f"sp{i}", "prompt": f"Story number {i} begins when the knight", "max_tokens": NEW_TOKENS}
            for i in range(CLIENTS)]
    request(port, jobs[0])  # warm up
    start = time.perf_counter()
    sequential_tokens = sum(request(port, job)["usage"]["completion_tokens"] for job in jobs)
    sequential = sequential_tokens / (time.perf_counter() - start)

    counts = [0] * CLIENTS

    def client(i: int) -> None:
        counts[i] = request(port, jobs[i])["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sequential, sum(counts) / (time.perf_counter() - start), counts


def head_of_line(port: int) -> tuple[float, float]:
    short = {"prompt": "And the dragon said", "max_tokens": SHORT_TOKENS}
    start = time.perf_counter()
    request(port, short)
    alone = time.perf_counter() - start

    started = threading.Event()

    def long() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": "In the beginning", "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True}),
            {"Content-Type": "application/json"})
        for line in conn.getresponse():
            if line.startswith(b"data: {"):
                started.set()

    thread = threading.Thread(target=long)
    thread.start()
    started.wait()
    time.sleep(1.0)  # well into the long request
    start = time.perf_counter()
    request(port, short)
    beside_long = time.perf_counter() - start
    thread.join()
    return alone, beside_long


def step_costs(engine) -> tuple[float, float]:
    """Seconds per decode step with 1 row and with CLIENTS rows, each with a soft prompt."""
    from kobold_desktop.engine import SamplingSettings
    from kobold_desktop.engine.core import StepCore
    from kobold_desktop.engine.sequence import Sequence

    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=1000)
    costs = []
    for rows in (1, CLIENTS):
        core = StepCore(engine.loaded.model)
        for i in range(rows):
            core.add(Sequence(engine.encode(f"Story number {i} begins"),
                              torch.randn(SOFT_TOKENS, engine.hidden_size) * 0.02, settings))
        core.step()
        start = time.perf_counter()
        for _ in range(16):
            core.step()
        costs.append((time.perf_counter() - start) / 16)
        core.close()
    return costs[0], costs[1]


def main() -> None:
    engine = build_engine(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {}
        for i in range(CLIENTS):
            path = Path(tmp) / f"sp{i}.zip"
            kobold_zip.write(path, torch.randn(SOFT_TOKENS, engine.hidden_size) * 0.02, Metadata(name=f"sp{i}"))
            adapters[f"sp{i}"] = str(path)
        service = Service(engine, ServeConfig(prompt_adapters=adapters, max_prompt_adapters=CLIENTS))
        server = KoboldServer(service, "127.0.0.1", 0).start()
        port = server.port
        try:
            sizes: list[int] = []
            service.scheduler.on_step = sizes.append
            sequential, concurrent, counts = throughput(port)
            service.scheduler.on_step = None
            alone, beside_long = head_of_line(port)
        finally:
            server.stop()
    one_row, all_rows = step_costs(engine)

    print(f"model: random Llama, {parameters(engine.loaded.model) / 1e6:.0f}M parameters, float32, CPU")
    print(f"\n{CLIENTS} requests x {NEW_TOKENS} tokens, each with its own {SOFT_TOKENS}-token soft prompt:")
    print(f"  one after another: {sequential:7.1f} tokens/s")
    print(f"  {CLIENTS} concurrent clients: {concurrent:7.1f} tokens/s (largest batch {max(sizes)}, tokens {counts})")
    print(f"ratio concurrent / sequential: {concurrent / sequential:.2f}x   (target >= 5x)")
    print(f"  ceiling on this machine: a decode step of {CLIENTS} rows takes {all_rows * 1000:.0f} ms against "
          f"{one_row * 1000:.0f} ms for one row, so batching can give at most {CLIENTS * one_row / all_rows:.2f}x "
          "before the prompts are counted")
    print(f"\nhead-of-line: a {SHORT_TOKENS}-token request took {alone:.2f} s alone and {beside_long:.2f} s while a "
          f"{LONG_TOKENS}-token request ran")
    print(f"ratio beside / alone: {beside_long / alone:.2f}   (target <= 2)")


if __name__ == "__main__":
    main()
