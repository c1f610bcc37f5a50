"""The KV caches of finished sequences, kept so that the next request reuses their work.

A story grows by a sentence per turn: the next request is the last one plus a little.
Each entry is the cache of `[soft prompt rows][token ids]` that a sequence ran; a new
request looks for the entry sharing the longest prefix with it and runs only the rest
(llama.cpp's server and mlx-lm's prompt cache do the same). Entries are keyed by the
soft prompt's fingerprint too, because its rows come first: another soft prompt shares
nothing. An LRU bounded in bytes; the newest entry is always kept, since it is the one
the window's next turn needs and its memory was in use a moment ago anyway.

The cache objects are a backend's: transformers KV caches by default (`kv`), or handles
to llama.cpp sequences, whose `ops` say how long one is, how much memory it holds and
how to take a prefix of it; `on_evict` hears of each entry that is dropped (llama.cpp
frees its sequence).

With context shift on (`lookup_shift`), a stored sequence is also reused past a gap: when
the new prompt keeps the stored one's start (the soft prompt, BOS, memory) and then goes
on the way the stored one went on later (the oldest story text was dropped), the kept
start stays, the gap goes and what follows moves back (`Shift`), as KoboldCpp's
ContextShift does. The moved keys were computed after the dropped text, so the result is
close to a fresh read, not equal to it; the backend moves them (`kv.shifted`, llama.cpp's
`seq_add`).

A member of a `bayes` mixture also needs the log-probability its soft prompt gave each
token (the posterior is their sum), so its entries carry those scores; a lookup that
needs scores only matches entries that have them.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

import kobold_desktop.engine.kv as kv

DEFAULT_MAX_BYTES = 2 * 1024**3
MIN_SHIFT = 32  # tokens a moved span must have: below that, reading them again costs little


@dataclass(frozen=True)
class Shift:
    """How a stored sequence is reused past a gap, in positions (soft prompt rows
    included): its first `keep` stay where they are, `start..start+length` move back to
    `keep..keep+length`, and `keep..start` (the text the new prompt dropped) goes."""

    keep: int
    start: int
    length: int

    @property
    def removed(self) -> int:
        return self.start - self.keep

    @property
    def reused(self) -> int:
        return self.keep + self.length


@dataclass(frozen=True)
class ShiftMatch:
    cache: Any  # the stored entry's cache (whole; the backend cuts and moves it)
    shift: Shift
    ids: tuple[int, ...]  # the stored entry's token ids
    key: int  # the entry's key in the cache (for `take`)


@dataclass
class _Entry:
    softprompt_key: str | None
    n_soft: int
    ids: tuple[int, ...]
    cache: Any
    nbytes: int
    scores: Any = None  # float tensor on the CPU, one log-probability per id, or None

    @property
    def n_positions(self) -> int:
        return self.n_soft + len(self.ids)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _as_bytes(ids: Sequence[int]) -> bytes:
    return array("i", ids).tobytes()


def find_span(old: Sequence[int], new: Sequence[int], min_len: int = MIN_SHIFT) -> tuple[int, int, int] | None:
    """Where `new` goes on the way `old` went on after a gap: (common, start, length) with
    `old[:common] == new[:common]` and `old[start:start+length] == new[common:common+length]`,
    start > common, the longest such span of at least `min_len` tokens; or None."""
    common = common_prefix(old, new)
    if len(new) - common < min_len or len(old) - common - 1 < min_len:
        return None
    hay, needle = _as_bytes(old), _as_bytes(new[common:common + min_len])
    width = array("i").itemsize
    best = None
    at = hay.find(needle, (common + 1) * width)
    while at >= 0:
        if at % width == 0:  # a whole token, not bytes that straddle two
            start = at // width
            length = min_len + common_prefix(old[start + min_len:], new[common + min_len:])
            if best is None or length > best[2]:
                best = (common, start, length)
            at = hay.find(needle, at + width)
        else:
            at = hay.find(needle, at + 1)
    return best


class PrefixCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entries: int = 16, ops: Any = None,
                 on_evict: Callable[[Any], None] | None = None):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.ops: ModuleType | Any = ops or kv  # is_joinable, length, nbytes, prefix
        self._on_evict = on_evict or (lambda cache: None)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            self._on_evict(entry.cache)

    def evict_oldest(self) -> bool:
        """Drop the least recently used entry; False when there is none."""
        with self._lock:
            if not self._entries:
                return False
            _, entry = self._entries.popitem(last=False)
        self._on_evict(entry.cache)
        return True

    def lookup(self, softprompt_key: str | None, n_soft: int, ids: Sequence[int],
               scored: bool = False) -> tuple[Any, int, Any]:
        """The cache of the longest stored prefix of `[soft prompt][ids]`, its length in
        positions (soft prompt rows included) and, when `scored`, the scores of its ids;
        or (None, 0, None). The cache returned is a new object over the stored tensors;
        growing it never changes the entry."""
        best, best_n = None, 0
        with self._lock:
            for key, entry in self._entries.items():
                if entry.softprompt_key != softprompt_key or entry.n_soft != n_soft:
                    continue
                if scored and entry.scores is None:
                    continue
                n = n_soft + common_prefix(entry.ids, ids)
                if n > best_n:
                    best, best_n = key, n
            if best is None:
                return None, 0, None
            self._entries.move_to_end(best)
            entry = self._entries[best]
            scores = entry.scores[: best_n - n_soft] if scored else None
            return self.ops.prefix(entry.cache, best_n), best_n, scores

    def lookup_shift(self, softprompt_key: str | None, n_soft: int, ids: Sequence[int],
                     min_len: int = MIN_SHIFT) -> ShiftMatch | None:
        """The stored sequence that reuses the most positions of `[soft prompt][ids]` by
        a shift (`find_span`), or None. The entry is left as it is."""
        best: ShiftMatch | None = None
        with self._lock:
            for key, entry in self._entries.items():
                if entry.softprompt_key != softprompt_key or entry.n_soft != n_soft:
                    continue
                span = find_span(entry.ids, ids, min_len)
                if span is None:
                    continue
                common, start, length = span
                shift = Shift(n_soft + common, n_soft + start, length)
                if best is None or shift.reused > best.shift.reused:
                    best = ShiftMatch(entry.cache, shift, entry.ids, key)
            if best is not None:
                self._entries.move_to_end(best.key)
        return best

    def take(self, match: ShiftMatch) -> bool:
        """Remove the matched entry without freeing its cache (the caller now owns it);
        False when it is gone already."""
        with self._lock:
            return self._entries.pop(match.key, None) is not None

    def drop_sharing(self, softprompt_key: str | None, n_soft: int, ids: Sequence[int], beyond: int) -> None:
        """Drop every entry that starts like `[soft prompt][ids]` for more than `beyond`
        positions (llama.cpp shares such positions' cells between sequences)."""
        with self._lock:
            dropped = [self._entries.pop(key) for key, e in list(self._entries.items())
                       if e.softprompt_key == softprompt_key and e.n_soft == n_soft
                       and n_soft + common_prefix(e.ids, ids) > beyond]
        for entry in dropped:
            self._on_evict(entry.cache)

    def store(self, softprompt_key: str | None, n_soft: int, ids: Sequence[int], cache: Any,
              scores: Any = None) -> None:
        """Keep `cache`, which holds exactly `n_soft + len(ids)` positions of one row
        (and `scores`, one per id, if given)."""
        ops = self.ops
        if not ops.is_joinable(cache) or ops.length(cache) != n_soft + len(ids):
            self._on_evict(cache)
            return
        if scores is not None and len(scores) != len(ids):
            scores = None
        entry = _Entry(softprompt_key, n_soft, tuple(ids), cache, ops.nbytes(cache), scores)
        dropped = []
        with self._lock:
            # An entry that is a prefix of the new one can give nothing the new one cannot
            # (unless it has scores and the new one does not).
            for key in [k for k, e in self._entries.items()
                        if e.softprompt_key == softprompt_key and e.n_soft == n_soft
                        and (scores is not None or e.scores is None)
                        and len(e.ids) <= len(entry.ids) and entry.ids[: len(e.ids)] == e.ids]:
                dropped.append(self._entries.pop(key))
            self._entries[self._next] = entry
            self._next += 1
            while len(self._entries) > 1 and (self.nbytes > self.max_bytes or len(self._entries) > self.max_entries):
                dropped.append(self._entries.popitem(last=False)[1])
        for old in dropped:
            self._on_evict(old.cache)
