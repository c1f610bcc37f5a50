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

A member of a `bayes` mixture also needs the log-probability its soft prompt gave each
token (the posterior is their sum), so its entries carry those scores; a lookup that
needs scores only matches entries that have them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

import kobold_desktop.engine.kv as kv

DEFAULT_MAX_BYTES = 2 * 1024**3


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


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
                n = n_soft + _common(entry.ids, ids)
                if n > best_n:
                    best, best_n = key, n
            if best is None:
                return None, 0, None
            self._entries.move_to_end(best)
            entry = self._entries[best]
            scores = entry.scores[: best_n - n_soft] if scored else None
            return self.ops.prefix(entry.cache, best_n), best_n, scores

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
