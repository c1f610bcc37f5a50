"""The stepping core on llama.cpp: each row is a llama.cpp sequence (`seq_id`) of one
shared context, and one step decodes every row's new token in one batch.

Picking, feeding, stop sequences, mixtures and sampling are the shared `BaseCore`'s: the
logits llama.cpp returns become torch tensors on the CPU and go through the same sampler
chain as the transformers backend's. What differs is how prompts run and where work is
kept: a row's soft prompt runs as a batch of embeddings at positions 0..n-1, then its
tokens; a finished row's sequence stays in the context as a prefix cache entry, and a
later row that starts the same way copies its cells (`llama_memory_seq_cp`) and decodes
only what is new. With context shift on, a row whose prompt dropped old text takes over
the stored sequence it continues and moves its cells (`GgufModel.shift`), when no other
sequence shares the cells that move.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kobold_desktop.engine.core import BaseCore, cached_scores, find_shift, reuse_point, score_tokens
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.llamacpp.model import GgufModel, SeqHandle
from kobold_desktop.engine.prefix_cache import Shift, ShiftMatch, common_prefix
from kobold_desktop.engine.sequence import Request, Sequence


def _need(seq: Sequence) -> int:
    return seq.n_soft + len(seq.prompt_ids) + seq.settings.max_new_tokens


class LlamaCore(BaseCore):
    def __init__(self, model: GgufModel, shift: bool = False):
        super().__init__()
        self.model = model
        self.shift = shift and model.shift_refusal() is None
        self._seq_ids: dict[int, int] = {}  # id(row) -> llama.cpp seq_id
        self._reserved: dict[int, int] = {}  # id(row) -> cells promised to it

    def fits(self, request: Request) -> bool:
        need = sum(_need(seq) for seq in request.rows)
        if not self.rows and need > self.model.cells:
            return True  # alone it still gets its chance (and a clear error if it is too long)
        return self.model.make_room(need) and self.model.free_sequences >= len(request.rows)

    def add(self, request: Request) -> None:
        if request.cancelled():
            request.finish("cancelled")
            return
        done: list[Sequence] = []
        try:
            for seq in request.rows:
                self._prefill(seq)
                done.append(seq)
        except BaseException:
            for seq in done:
                self._forget(seq, keep=False)
            raise
        self.rows.extend(request.rows)
        request.started()

    def _prefill(self, seq: Sequence) -> None:
        model = self.model
        total = seq.n_soft + len(seq.prompt_ids)
        if total + seq.settings.max_new_tokens > model.cells:
            raise ModelError(f"this request needs {total + seq.settings.max_new_tokens} tokens of llama.cpp's "
                             f"cache, which holds {model.cells}; load the model with a larger context.")
        if seq.softprompt is not None and seq.softprompt.shape[1] != model.hidden_size:
            raise ModelError(f"the soft prompt is {seq.softprompt.shape[1]} wide; this model's embeddings are "
                             f"{model.hidden_size}.")
        seq_id = model.allocate()  # first: it may drop a stored sequence, never the one found below
        handle, reused, scores = (None, 0, None)
        if not model.sliding:
            handle, reused, scores = model.prefix_cache.lookup(seq.softprompt_key, seq.n_soft, seq.prompt_ids,
                                                               scored=seq.scoring)
        reused = reuse_point(reused, total, seq.scoring) if reused else 0
        seq.shifted = 0
        shifted = self._try_shift(seq, total, reused)
        if shifted is not None:
            model.release(seq_id)
            seq_id, reused = shifted
        elif reused:
            model.copy(handle.seq_id, seq_id, reused)  # before make_room, which may drop the source
        self._seq_ids[id(seq)] = seq_id
        model.running[seq_id] = seq
        model.make_room(_need(seq))
        model.reserved += _need(seq)
        self._reserved[id(seq)] = _need(seq)
        try:
            logits, pieces = self._run_prompt(seq, seq_id, reused, scores)
        except BaseException:
            self._forget(seq, keep=False)
            raise
        self.tokens_run += total - reused
        self.tokens_reused += reused
        seq.reused = reused
        seq.next_position = total
        seq.history = torch.tensor(seq.prompt_ids, dtype=torch.long)[None]
        seq.logits = logits
        if seq.scoring:
            seq.scores = pieces

    def _try_shift(self, seq: Sequence, total: int, reused: int) -> tuple[int, int] | None:
        """Context shift: take over the stored sequence `seq` continues past dropped text
        and move its cells; (its seq_id, positions reused) or None."""
        model = self.model
        found = find_shift(model.prefix_cache, seq, total, reused) if self.shift and not model.sliding else None
        if found is None:
            return None
        match, shift = found
        if not self._movable(seq, match, shift) or not model.prefix_cache.take(match):
            return None
        model.prefix_cache.drop_sharing(seq.softprompt_key, seq.n_soft, match.ids, shift.start)
        seq_id = match.cache.seq_id
        model.shift(seq_id, shift.keep, shift.start, shift.length)
        seq.shifted = shift.length
        return seq_id, shift.reused

    def _movable(self, seq: Sequence, match: ShiftMatch, shift: Shift) -> bool:
        """Whether no running row shares the cells that would move (rows that began as a
        copy of the stored sequence's start share its cells that far)."""
        return not any(row.softprompt_key == seq.softprompt_key and row.n_soft == seq.n_soft
                       and row.n_soft + common_prefix(row.fed_ids, match.ids) > shift.start
                       for row in self.model.running.values())

    def _run_prompt(self, seq: Sequence, seq_id: int, reused: int, cached: Any) -> tuple[torch.Tensor, list]:
        """Decode positions reused.. of `[soft prompt][prompt]` in batches; the last
        position's logits and, for a scoring row, the prompt tokens' scores."""
        model, n_soft = self.model, seq.n_soft
        total = n_soft + len(seq.prompt_ids)
        ids = torch.tensor(seq.prompt_ids, dtype=torch.long)
        pieces: list[torch.Tensor] = []
        if seq.scoring:
            done = cached_scores(reused, n_soft)
            pieces = [cached[:done]] if done else []
            if reused == 0 and n_soft == 0:  # nothing predicts the very first token: it scores 0
                pieces = [torch.zeros(1)]
        soft = None if seq.softprompt is None else seq.softprompt.detach().to("cpu", torch.float32).numpy()
        logits = None
        first = reused
        while first < total:
            # a batch holds either embeddings or tokens: the soft prompt's rows, then tokens
            last = min(first + model.n_batch, n_soft if first < n_soft else total)
            want = [seq.scoring or p == total - 1 for p in range(first, last)]
            if first < n_soft:
                out = model.decode_embeds(soft[first:last], first, seq_id, want)
            else:
                out = model.decode_tokens(seq.prompt_ids[first - n_soft:last - n_soft], range(first, last),
                                          [seq_id] * (last - first), want)
            if len(out):
                rows = torch.from_numpy(out)
                if seq.scoring:
                    piece = score_tokens(rows, first, last, n_soft, ids)
                    if piece is not None:
                        pieces.append(piece)
                logits = rows[-1:]
            first = last
        return logits, pieces

    def _run(self, rows: list[Sequence], tokens: torch.Tensor, host_ids: list[int]) -> None:
        model = self.model
        out = []
        for start in range(0, len(rows), model.n_batch):
            part = rows[start:start + model.n_batch]
            out.append(model.decode_tokens(host_ids[start:start + len(part)], [seq.next_position for seq in part],
                                           [self._seq_ids[id(seq)] for seq in part], [True] * len(part)))
        logits = torch.from_numpy(np.concatenate(out))
        self._advance(rows, tokens.cpu(), host_ids, logits)

    def _leave(self, keep: list[int]) -> None:
        leaving = self._leaving(keep)
        for _, seq in leaving:
            self._forget(seq, keep=True)
        if leaving:
            self.rows = [self.rows[i] for i in keep]

    def _forget(self, seq: Sequence, keep: bool) -> None:
        """The row has ended: its sequence goes to the prefix cache (or is freed)."""
        model = self.model
        model.reserved -= self._reserved.pop(id(seq), 0)
        seq_id = self._seq_ids.pop(id(seq), None)
        if seq_id is None:
            return
        model.running.pop(seq_id, None)
        if not keep or model.sliding:
            model.release(seq_id)
            return
        scores = None
        if seq.scoring and seq.scores:
            scores = torch.cat(seq.scores)[: len(seq.fed_ids)].float().cpu()
        model.prefix_cache.store(seq.softprompt_key, seq.n_soft, seq.fed_ids,
                                 SeqHandle(seq_id, seq.n_soft + len(seq.fed_ids)), scores)

    def _drop_all(self) -> None:
        for seq in self.rows:
            self._forget(seq, keep=False)
        self.rows = []
