"""The stepping core: advances any number of sequences by one token per step.

There is one loop in the program, and it is this one. The window and the command line
run it with one sequence, the server with many that join and leave between steps.

- `add` runs a new sequence's prompt (only the part that no cached sequence already
  computed) and joins its cache to the running batch, left-padded to the batch's length.
- `step` picks each row's next token on the model's device (only the ids cross to the
  host, once per step), feeds them to the rows' text sides, lets finished rows leave
  (their caches go to the prefix cache), and runs the model once for the rest.

Every row is `[its soft prompt rows][its tokens]`; the attention mask hides the padding
and explicit position ids count each row from its own start, so a row computes what it
would alone. An error while picking for one request fails only that request.

A request is one row (`Sequence`) or several that share one pick: a mixture of soft
prompts runs each member as a row over the same text (each with its own cache), picks
from the mixed distribution and feeds the token to every member.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any

import torch

import kobold_desktop.engine.kv as kv
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.prefix_cache import MIN_SHIFT, PrefixCache, Shift, ShiftMatch
import kobold_desktop.engine.rope as rope
from kobold_desktop.engine.sequence import Request, Sequence


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def reuse_point(reused: int, total: int, scoring: bool) -> int:
    """How many cached positions to take: the last one is run again when the whole prompt
    is cached (its logits give the next token) or when the row scores tokens (its logits
    score the first token that is not cached)."""
    if reused >= total or (scoring and reused):
        return min(reused, total) - 1
    return reused


def usable_shift(shift: Shift, total: int, reused: int) -> Shift | None:
    """`shift` cut so the prompt's last position still runs (its logits give the next
    token), or None when it would reuse no more than `reused` positions by a plain prefix
    plus `MIN_SHIFT` (moving costs little, but it is not exact; it must be worth it)."""
    length = min(shift.length, total - 1 - shift.keep)
    if shift.keep + length < reused + MIN_SHIFT:
        return None
    return Shift(shift.keep, shift.start, length)


def find_shift(prefix_cache: PrefixCache, seq: Sequence, total: int, reused: int) -> tuple[ShiftMatch, Shift] | None:
    """The stored sequence `seq`'s prompt continues past dropped text, and the shift to
    use (`usable_shift`), or None. Scoring rows never shift (their stored scores would not
    match the moved positions), and when a plain prefix leaves too little to run the
    stored sequences are not searched at all."""
    if seq.scoring or total - 1 - reused < MIN_SHIFT:
        return None
    match = prefix_cache.lookup_shift(seq.softprompt_key, seq.n_soft, seq.prompt_ids)
    shift = usable_shift(match.shift, total, reused) if match is not None else None
    return (match, shift) if shift is not None else None


def cached_scores(reused: int, n_soft: int) -> int:
    """How many prompt tokens a scoring row's cache entry has already scored, when
    `reused` positions are taken from it."""
    return max(reused + 1 - n_soft, 0) if reused else 0


def score_tokens(logits: torch.Tensor, first: int, last: int, n_soft: int, ids: torch.Tensor) -> torch.Tensor | None:
    """log p(token) for the prompt tokens that positions first..last-1 predict: the logits
    at position p score the token at position p + 1 (a prompt token when n_soft <= p + 1 <
    n_soft + len(ids)). `logits` holds one row per position from `first`."""
    lo, hi = max(first, n_soft - 1), min(last, n_soft + len(ids) - 1)
    if hi <= lo:
        return None
    logp = torch.log_softmax(logits[lo - first: hi - first].float(), dim=-1)
    return logp.gather(1, ids[lo + 1 - n_soft: hi + 1 - n_soft, None])[:, 0]


class BaseCore(abc.ABC):
    """What every stepping core shares: the rows, picking one token per request, and
    letting finished requests leave. A backend says how prompts run (`add`), how rows
    leave (`_leave`) and how the model is run for the rows that stay (`_run`)."""

    def __init__(self) -> None:
        self.rows: list[Sequence] = []
        self.tokens_run = 0  # positions the model has been run on (prompt and generated)
        self.tokens_reused = 0  # positions taken from the prefix cache instead

    @property
    def active(self) -> bool:
        return bool(self.rows)

    @property
    def can_join(self) -> bool:
        return True

    def fits(self, request: Request) -> bool:
        """Whether `request` can join now without running out of cache memory."""
        return True

    def admit(self, waiting: Any, max_batch: int) -> None:
        """Add waiting requests (a list or deque, oldest first) while they fit: at most
        `max_batch` rows, a mixture's rows together. A request that fails to start fails
        alone."""
        while waiting and self.can_join and (
                not self.rows or (len(self.rows) + len(waiting[0].rows) <= max_batch and self.fits(waiting[0]))):
            request = waiting.popleft() if hasattr(waiting, "popleft") else waiting.pop(0)
            try:
                self.add(request)
            except Exception as exc:  # noqa: BLE001 - this request's failure is its own
                request.fail(exc)

    @abc.abstractmethod
    def add(self, request: Request) -> None:
        """Run the prompt of each of `request`'s rows and add them to the batch. Raises on
        failure (the batch is unchanged); the caller decides whom to tell."""

    @abc.abstractmethod
    def _leave(self, keep: list[int]) -> None:
        """Drop the rows not in `keep`, keeping their work for reuse where it can."""

    @abc.abstractmethod
    def _run(self, rows: list[Sequence], tokens: torch.Tensor, host_ids: list[int]) -> None:
        """Run the model once for `rows`, each fed its new token; set each row's logits."""

    @abc.abstractmethod
    def _drop_all(self) -> None:
        """Forget every row at once (the model failed)."""

    def step(self) -> list[tuple[Request, int]]:
        """Pick one token for every request (one pick for all the rows of a mixture), let
        finished requests leave, and run the model for the rows of the others. Returns
        the (request, token id) pairs picked."""
        requests = list({id(seq.owner): seq.owner for seq in self.rows}.values())
        picked, tokens = [], []
        with torch.inference_mode():
            for request in requests:
                if request.cancelled():
                    continue
                try:
                    tokens.append(request.pick())
                    picked.append(request)
                except Exception as exc:  # noqa: BLE001 - one request's failure is its own
                    request.fail(exc)
            ids = torch.cat(tokens).tolist() if tokens else []  # the one transfer to the host
        result = list(zip(picked, ids))
        token_of = {id(request): (i, token) for i, (request, token) in enumerate(result)}
        for request in requests:
            if request.done:
                continue
            if id(request) not in token_of:
                request.finish("cancelled")
                continue
            try:
                if request.feed(token_of[id(request)][1]):
                    request.finish()
            except Exception as exc:  # noqa: BLE001 - this request's failure is its own (a phrase ban's regex)
                request.fail(exc)
        keep = [(index, seq) for index, seq in enumerate(self.rows) if not seq.owner.done and not seq.owner.rewinding]
        rewinding = [request for request in requests if request.rewinding]
        self._leave([index for index, _ in keep])  # rewinding rows leave with their cache kept
        if keep:
            chosen = [token_of[id(seq.owner)] for _, seq in keep]
            self._run([seq for _, seq in keep], torch.cat([tokens[i] for i, _ in chosen]),
                      [token for _, token in chosen])
        for request in rewinding:  # a banned phrase: start again where it began, from the cache
            request.restart()
            try:
                self.add(request)
            except Exception as exc:  # noqa: BLE001 - this request's failure is its own
                request.fail(exc)
        return result

    def _advance(self, rows: list[Sequence], tokens: torch.Tensor, host_ids: list[int],
                 logits: torch.Tensor) -> None:
        """Each row has been fed its token; `logits[i]` is row i's next distribution."""
        self.tokens_run += len(rows)
        for i, seq in enumerate(rows):
            if seq.chain is not None and seq.chain.needs_history:  # only the penalties and DRY read it
                seq.history = torch.cat([seq.history, tokens[i : i + 1, None]], dim=1)
            seq.fed_ids.append(host_ids[i])
            seq.next_position += 1
            seq.logits = logits[i : i + 1]

    def _leaving(self, keep: list[int]) -> list[tuple[int, Sequence]]:
        """The (index, row) pairs of the rows not in `keep`."""
        kept = set(keep)
        return [(index, seq) for index, seq in enumerate(self.rows) if index not in kept]

    def fail_all(self, error: BaseException) -> None:
        """The model itself failed: every request hears of it, and the batch is emptied."""
        for seq in self.rows:
            seq.owner.fail(error)
        self._drop_all()

    def close(self) -> None:
        """End every request now (their rows' caches are kept for reuse)."""
        for seq in self.rows:
            seq.owner.finish("cancelled")
        self._leave([])


class StepCore(BaseCore):
    def __init__(self, model: Any, prefix_cache: PrefixCache | None = None, shift: bool = False):
        super().__init__()
        self.model = model
        # context shift: how to move cached keys (None: off, or this model cannot)
        self.rotate = rope.shifter(model) if shift and prefix_cache is not None else None
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.prefix_cache = prefix_cache
        self._extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        self._positions = _accepts(model, "position_ids")
        # transformers 5.x names the cache argument `cache`; `past_key_values` (still the
        # name before it, and in models not yet migrated) warns and goes in 5.40.
        self._cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"
        self._cache: Any = None  # the batch's DynamicCache, rows left-padded
        self._mask: torch.Tensor | None = None  # [rows, length] 1 for real positions

    @property
    def can_join(self) -> bool:
        """Whether another sequence can join now (sliding-window and other special caches
        cannot be padded and joined: their sequences run one at a time)."""
        return not self.rows or kv.is_joinable(self._cache)

    # -- joining -------------------------------------------------------------------------

    def _forward(self, mask: torch.Tensor, positions: torch.Tensor, cache: Any, **inputs: Any) -> Any:
        kwargs = {"position_ids": positions} if self._positions else {}
        return self.model(attention_mask=mask, use_cache=True, **{self._cache_arg: cache}, **inputs, **kwargs,
                          **self._extra)

    def add(self, request: Request) -> None:
        """Run the prompt of each of `request`'s rows and add them to the batch. Raises on
        failure (the batch is unchanged); the caller decides whom to tell."""
        if request.cancelled():
            request.finish("cancelled")
            return
        prepared = [self._prefill(seq) for seq in request.rows]
        if len(prepared) > 1 and not all(kv.is_joinable(cache) for cache, _ in prepared):
            raise ModelError("this model's cache (sliding-window or quantized attention) cannot hold several "
                             "rows side by side, so it cannot run a mixture of soft prompts; use one soft prompt.")
        for seq, (cache, mask) in zip(request.rows, prepared):
            self._join(seq, cache, mask)
        request.started()

    def _prefill(self, seq: Sequence) -> tuple[Any, torch.Tensor]:
        """Run what no cached sequence already ran of `seq`'s prompt; its cache and mask."""
        total = seq.n_soft + len(seq.prompt_ids)
        cache, reused, scores = (None, 0, None)
        if self.prefix_cache is not None:
            cache, reused, scores = self.prefix_cache.lookup(seq.softprompt_key, seq.n_soft, seq.prompt_ids,
                                                             scored=seq.scoring)
        if cache is not None and cache.layers[0].keys.dtype != self.embed.weight.dtype:
            cache, reused = None, 0  # computed in another precision: never mixed in
        if reuse_point(reused, total, seq.scoring) != reused:
            reused = reuse_point(reused, total, seq.scoring)
            cache = kv.prefix(cache, reused) if reused else None
        if reused == 0:
            cache = None
        seq.shifted = 0
        found = find_shift(self.prefix_cache, seq, total, reused) if self.rotate is not None else None
        if found is not None:
            match, shift = found
            if match.cache.layers[0].keys.dtype == self.embed.weight.dtype:
                cache = kv.shifted(match.cache, shift.keep, shift.start, shift.length, self.rotate)
                reused, seq.shifted = shift.reused, shift.length
        device = self.device
        with torch.inference_mode():
            ids = torch.tensor(seq.prompt_ids, dtype=torch.long, device=device)
            if reused < seq.n_soft:  # soft prompt rows still to run: go by embeddings
                embeds = self.embed(ids[None])
                rows = seq.softprompt[reused:].to(device=device, dtype=embeds.dtype)
                inputs = {"inputs_embeds": torch.cat([rows[None], embeds], dim=1)}
            else:
                inputs = {"input_ids": ids[None, reused - seq.n_soft:]}
            mask = torch.ones(1, total, dtype=torch.long, device=device)
            if seq.scoring:
                cache, logits = self._scored_prefill(seq, ids, reused, scores, cache, inputs)
            else:
                positions = torch.arange(reused, total, device=device)[None]
                out = self._forward(mask, positions, cache, **inputs)
                cache, logits = kv.returned(out), out.logits[:, -1, :]
        self.tokens_run += total - reused
        self.tokens_reused += reused
        seq.reused = reused
        seq.next_position = total
        seq.history = ids[None]
        seq.logits = logits
        return cache, mask

    SCORE_CHUNK = 256  # positions per forward pass when every position's logits are kept

    def _scored_prefill(self, seq: Sequence, ids: torch.Tensor, reused: int, cached: Any, cache: Any,
                        inputs: dict) -> tuple[Any, torch.Tensor]:
        """Prefill that also scores each prompt token: log p(token | soft prompt, tokens
        before it). Runs in chunks so that only a chunk's logits are ever held."""
        n_soft, total, device = seq.n_soft, seq.n_soft + len(seq.prompt_ids), self.device
        done = cached_scores(reused, n_soft)
        pieces = [cached[:done].to(device)] if done else []
        if reused == 0 and n_soft == 0:  # nothing predicts the very first token: it scores 0
            pieces = [torch.zeros(1, device=device)]
        (name, data), = inputs.items()
        logits = None
        for start in range(0, total - reused, self.SCORE_CHUNK):
            part = data[:, start:start + self.SCORE_CHUNK]
            first = reused + start  # position of the chunk's first input
            last = first + part.shape[1]
            mask = torch.ones(1, last, dtype=torch.long, device=device)
            positions = torch.arange(first, last, device=device)[None]
            extra = {"logits_to_keep": 0} if self._extra else {}
            kwargs = {"position_ids": positions} if self._positions else {}
            out = self.model(attention_mask=mask, use_cache=True, **{self._cache_arg: cache}, **{name: part},
                             **kwargs, **extra)
            cache = kv.returned(out)
            piece = score_tokens(out.logits[0], first, last, n_soft, ids)
            if piece is not None:
                pieces.append(piece)
            logits = out.logits[:, -1, :]
        seq.scores = pieces
        return cache, logits

    def _join(self, seq: Sequence, cache: Any, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self._cache, self._mask = [seq], cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        kv.join(self._cache, cache)
        pad = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731 - zeros on the left
        self._mask = torch.cat([pad(self._mask), pad(mask)])
        self.rows.append(seq)

    # -- stepping ------------------------------------------------------------------------

    def _leave(self, keep: list[int]) -> None:
        """Drop the rows not in `keep`, storing their caches for reuse."""
        leaving = self._leaving(keep)
        if not leaving:
            return  # the common step: every row stays, the batch is untouched
        for index, seq in leaving:
            self._store(index, seq)
        if not keep:
            self.rows, self._cache, self._mask = [], None, None
            return
        mask = self._mask[keep]
        drop = int((mask.sum(dim=0) == 0).int().cumprod(dim=0).sum())  # leading columns no row uses
        if kv.is_joinable(self._cache):
            kv.select(self._cache, torch.tensor(keep, device=self._mask.device), drop)
        else:  # a single-row cache of a kind we cannot cut: only one row is ever here
            drop = 0
        self._mask = mask[:, drop:]
        self.rows = [self.rows[i] for i in keep]

    def _store(self, index: int, seq: Sequence) -> None:
        if self.prefix_cache is None or not kv.is_joinable(self._cache):
            return
        n = seq.n_soft + len(seq.fed_ids)
        if len(self.rows) == 1 and kv.length(self._cache) == n:
            cache = self._cache  # the batch was this row alone: nothing to copy
        else:
            cache = kv.row(self._cache, index, n)
        scores = None
        if seq.scoring and seq.scores:
            scores = torch.cat(seq.scores)[: len(seq.fed_ids)].float().cpu()
        self.prefix_cache.store(seq.softprompt_key, seq.n_soft, seq.fed_ids, cache, scores)

    def _run(self, rows: list[Sequence], tokens: torch.Tensor, host_ids: list[int]) -> None:
        """One forward pass for `rows`, each fed its new token (`tokens` on the device,
        `host_ids` the same ids on the host)."""
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        positions = torch.tensor([[seq.next_position] for seq in rows], device=self.device)
        with torch.inference_mode():
            out = self._forward(self._mask, positions, self._cache, input_ids=tokens[:, None])
        self._cache = kv.returned(out)
        self._advance(rows, tokens, host_ids, out.logits[:, -1, :])

    def _drop_all(self) -> None:
        self.rows, self._cache, self._mask = [], None, None
