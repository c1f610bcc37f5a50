"""Aggregate throughput of the server: 8 concurrent clients with 8 different soft prompts,
against the same 8 requests one after another.

A small random GPT-2-shaped model (hidden 256, 4 layers) on this machine's CPU; each
request asks for 64 greedy tokens with its own 20-token soft prompt, over real HTTP on
127.0.0.1. Target (issue 7): at least 3x.
"""

from __future__ import annotations

import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from kobold_desktop.engine import Engine  # noqa: E402
from kobold_desktop.server.config import ServeConfig  # noqa: E402
from kobold_desktop.server.http import KoboldServer  # noqa: E402
from kobold_desktop.server.service import Service  # noqa: E402
from kobold_desktop.softprompt import Metadata, kobold_zip  # noqa: E402
from tests.helpers import tiny_tokenizer  # noqa: E402

CLIENTS, NEW_TOKENS, SOFT_TOKENS, HIDDEN = 8, 64, 20, 256


def request(port: int, name: str, prompt: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}),
        {"Content-Type": "application/json"})
    body = json.loads(conn.getresponse().read())
    return body["usage"]["completion_tokens"]


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        tokenizer = tiny_tokenizer()
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=4, n_head=4, n_positions=512, vocab_size=len(tokenizer),
                                   bos_token_id=None, eos_token_id=None)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        adapters = {}
        for i in range(CLIENTS):
            kobold_zip.write(Path(tmp) / f"sp{i}.zip", torch.randn(SOFT_TOKENS, HIDDEN) * 0.05, Metadata(name=f"sp{i}"))
            adapters[f"sp{i}"] = str(Path(tmp) / f"sp{i}.zip")
        engine = Engine()
        engine.load(folder)
        engine.loaded.tokenizer.eos_token = None  # every request makes exactly NEW_TOKENS tokens
        server = KoboldServer(Service(engine, ServeConfig(prompt_adapters=adapters, max_prompt_adapters=CLIENTS)),
                              "127.0.0.1", 0).start()
        port = server.httpd.server_address[1]
        jobs = [(f"sp{i}", f"Story number {i} begins when the knight") for i in range(CLIENTS)]
        request(port, *jobs[0])  # warm up

        start = time.perf_counter()
        sequential_tokens = sum(request(port, *job) for job in jobs)
        sequential_s = time.perf_counter() - start

        counts = [0] * CLIENTS

        def client(i: int) -> None:
            counts[i] = request(port, *jobs[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        before = len(server.service.scheduler.batch_sizes)
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - start
        batches = server.service.scheduler.batch_sizes[before:]
        server.stop()

    seq_rate, conc_rate = sequential_tokens / sequential_s, sum(counts) / concurrent_s
    print(f"model: GPT-2 shape, hidden {HIDDEN}, 4 layers, CPU; {CLIENTS} requests x {NEW_TOKENS} tokens, "
          f"each with its own {SOFT_TOKENS}-token soft prompt")
    print(f"one after another: {seq_rate:8.1f} tokens/s ({sequential_s:.2f} s)")
    print(f"{CLIENTS} concurrent clients: {conc_rate:8.1f} tokens/s ({concurrent_s:.2f} s; batch sizes {batches})")
    print(f"ratio concurrent / sequential: {conc_rate / seq_rate:.2f}x   (target >= 3x)")


if __name__ == "__main__":
    main()
