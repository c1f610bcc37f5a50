"""The prefix cache (engine/prefix_cache.py) with stand-in caches: longest match, soft prompt
keys, prefixes replaced by what extends them, eviction by count and by bytes."""

from dataclasses import dataclass

import pytest

from kobold_desktop.engine.prefix_cache import PrefixCache


@dataclass
class Fake:
    """A cache of `n` positions, `size` bytes each."""

    n: int
    size: int = 10
    joinable: bool = True


class Ops:
    @staticmethod
    def is_joinable(cache):
        return cache.joinable

    @staticmethod
    def length(cache):
        return cache.n

    @staticmethod
    def nbytes(cache):
        return cache.n * cache.size

    @staticmethod
    def prefix(cache, n):
        return Fake(n, cache.size)


@pytest.fixture
def cache():
    evicted = []
    store = PrefixCache(max_bytes=10_000, max_entries=4, ops=Ops, on_evict=evicted.append)
    store.evicted = evicted
    return store


def test_the_longest_common_prefix_is_found_for_the_same_soft_prompt_only(cache):
    cache.store(None, 0, [1, 2, 3, 4], Fake(4))
    cache.store("sp", 2, [1, 2, 9], Fake(5))
    got, n, _ = cache.lookup(None, 0, [1, 2, 3, 7, 8])
    assert n == 3 and got.n == 3
    got, n, _ = cache.lookup("sp", 2, [1, 2, 3])
    assert n == 4 and got.n == 4  # two soft prompt rows and two common ids
    assert cache.lookup("other", 2, [1, 2, 9]) == (None, 0, None)
    assert cache.lookup("sp", 3, [1, 2, 9]) == (None, 0, None)  # other rows, other positions


def test_a_stored_prefix_is_replaced_by_what_extends_it(cache):
    first = Fake(2)
    cache.store(None, 0, [1, 2], first)
    cache.store(None, 0, [1, 2, 3], Fake(3))
    assert len(cache) == 1 and cache.evicted == [first]


def test_a_cache_of_the_wrong_length_or_not_joinable_is_not_kept(cache):
    wrong, special = Fake(5), Fake(3, joinable=False)
    cache.store(None, 0, [1, 2, 3], wrong)
    cache.store(None, 0, [1, 2, 3], special)
    assert len(cache) == 0 and cache.evicted == [wrong, special]


def test_the_least_recently_used_entry_goes_first(cache):
    for i in range(4):
        cache.store(None, 0, [i, 100], Fake(2))
    cache.lookup(None, 0, [0, 100])  # entry 0 is used again
    cache.store(None, 0, [9, 100], Fake(2))
    assert len(cache) == 4
    assert cache.lookup(None, 0, [1, 100])[1] == 0  # entry 1 was the oldest unused
    assert cache.lookup(None, 0, [0, 100])[1] == 2


def test_the_byte_budget_evicts_but_keeps_the_newest_entry():
    small = PrefixCache(max_bytes=50, ops=Ops)
    small.store(None, 0, [1, 2, 3], Fake(3))  # 30 bytes
    small.store(None, 0, [7, 8, 9], Fake(3))  # 60 in all: the first goes
    assert len(small) == 1 and small.nbytes == 30
    small.store(None, 0, list(range(10)), Fake(10))  # alone over the budget: still kept
    assert len(small) == 1 and small.nbytes == 100


def test_scores_are_kept_per_id_and_asked_for_explicitly(cache):
    cache.store(None, 0, [1, 2, 3], Fake(3))
    assert cache.lookup(None, 0, [1, 2], scored=True) == (None, 0, None)  # none stored
    cache.store(None, 0, [1, 2, 3], Fake(3), scores=[0.1, 0.2, 0.3])
    got, n, scores = cache.lookup(None, 0, [1, 2, 5], scored=True)
    assert n == 2 and list(scores) == [0.1, 0.2]
    cache.clear()
    assert len(cache) == 0
