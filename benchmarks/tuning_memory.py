"""Prompt tuning: training speed and peak memory, with and without gradient checkpointing.

Each configuration runs in a fresh process on the same random GPT-2-shaped model
(hidden 512, 6 layers, ~25M parameters), batch 4 x 256 tokens, 20 soft prompt tokens:
  inference    a forward pass of the batch, no gradients (the baseline)
  tune         soft prompt training steps (frozen model)
  tune+gc      the same with activation checkpointing
  finetune     full fine-tuning of every weight with AdamW (what prompt tuning avoids)
Peak memory above the loaded model is sampled every 2 ms (RSS on the CPU;
torch.cuda.max_memory_allocated on a GPU). The printed ratios are ours vs inference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HIDDEN, LAYERS, BATCH, BLOCK, TOKENS, STEPS = 512, 6, 4, 256, 20, 6


def build_model(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.helpers import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=8, n_positions=1024,
                               vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class PeakSampler:
    def __init__(self):
        import psutil
        import torch

        self.process = psutil.Process()
        self.cuda = torch.cuda.is_available()
        self.base = self._now()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _now(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else self.process.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(0.002)

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        self.peak = max(self.peak, self._now())


def child(mode: str, folder: str) -> None:
    import torch

    from kobold_desktop.engine import Engine
    from kobold_desktop.tuning import Blocks, TuningConfig, train_softprompt

    torch.manual_seed(0)
    engine = Engine()
    loaded = engine.load(folder)
    model = loaded.model
    ids = torch.randint(5, 300, (BATCH * (STEPS + 2), BLOCK))
    blocks = Blocks(train=ids, held_out=ids[:0])
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if mode == "inference":
            with torch.no_grad():
                for i in range(STEPS):
                    model(input_ids=ids[i * BATCH:(i + 1) * BATCH].to(model.device))
        elif mode in ("tune", "tune+gc"):
            config = TuningConfig(n_tokens=TOKENS, steps=STEPS, batch_size=BATCH, block_len=BLOCK, held_out_share=0,
                                  gradient_checkpointing=mode == "tune+gc", eval_every=10**9)
            train_softprompt(model, loaded.tokenizer, blocks, config)
        else:  # full fine-tuning, for contrast
            model.train()
            model.requires_grad_(True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for i in range(STEPS):
                batch = ids[i * BATCH:(i + 1) * BATCH].to(model.device)
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "peak_mb": (sampler.peak - sampler.base) / 2**20, "weights_mb": weights_mb,
                      "tokens_per_second": STEPS * BATCH * BLOCK / seconds}))


def main() -> None:
    if len(sys.argv) == 3:
        child(sys.argv[1], sys.argv[2])
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        for mode in ("inference", "tune", "tune+gc", "finetune"):
            out = subprocess.run([sys.executable, __file__, mode, tmp], capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    weights = results["inference"]["weights_mb"]
    rows_mb = TOKENS * HIDDEN * 4 * 3 / 2**20  # the rows, their gradient... and two AdamW moments (~3x)
    print(f"model: GPT-2 shape, hidden {HIDDEN}, {LAYERS} layers, weights {weights:.0f} MB; batch {BATCH} x {BLOCK} "
          f"tokens; soft prompt {TOKENS} tokens")
    print(f"soft prompt parameters + AdamW state: {rows_mb * 1024:.0f} KB ({rows_mb / weights * 100:.3f}% of the weights)")
    for mode, r in results.items():
        print(f"{mode:10s} {r['tokens_per_second']:8.0f} tokens/s   peak above the loaded model {r['peak_mb']:7.1f} MB")
    inference = results["inference"]["peak_mb"]
    for mode in ("tune", "tune+gc", "finetune"):
        r = results[mode]
        print(f"ratio {mode:9s} / inference: memory {r['peak_mb'] / inference:5.2f}x, "
              f"speed {r['tokens_per_second'] / results['inference']['tokens_per_second']:5.2f}x")
    print(f"gradient checkpointing saves {(1 - results['tune+gc']['peak_mb'] / results['tune']['peak_mb']) * 100:.0f}% "
          f"of the tuning memory at {results['tune']['tokens_per_second'] / results['tune+gc']['tokens_per_second']:.2f}x the time")


if __name__ == "__main__":
    main()
