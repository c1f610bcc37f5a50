"""Context shift: a prompt that dropped old text reuses the stored sequence it continues by
moving what follows back (RoPE rotation of the cached keys), on transformers and llama.cpp.

The exact reference: in a model of ONE layer the keys and values in the cache depend only on
each token and its position (nothing before the first attention mixes positions), so a
shifted cache is exactly the cache a fresh read of the shorter prompt makes, and the greedy
text after a shift must equal a fresh read's, token for token. A wrong rotation (none, the
wrong sign, the wrong layout) gives other keys and other text; one test checks that the
comparison notices. With more layers the shift is close to a fresh read, not equal; there
our transformers shift is compared with llama.cpp's own (`llama_memory_seq_add`).
"""

import pytest
import torch

import kobold_desktop.engine.rope as rope
from kobold_desktop.engine import Engine, LoadOptions, SamplingSettings
from kobold_desktop.engine.core import usable_shift
from kobold_desktop.engine.prefix_cache import MIN_SHIFT, PrefixCache, Shift, find_span

from ..helpers import FLOAT32, build_tiny_model

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
ONE = SamplingSettings(max_new_tokens=1, temperature=0)


def story_parts(seed=0):
    """K (kept head: BOS and memory), A (the dropped oldest text), B (what stays), C (new)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(2, 390, (n,), generator=g).tolist()  # noqa: E731
    return [1] + draw(10), draw(40), draw(80), draw(5)


# -- finding the span ----------------------------------------------------------------------

def test_find_span_finds_what_stayed_after_the_dropped_text():
    K, A, B, C = story_parts()
    assert find_span(K + A + B, K + B + C) == (len(K), len(K) + len(A), len(B))


def test_find_span_takes_the_longest_and_needs_min_len():
    K, A, B, C = story_parts()
    old = K + A + B[:MIN_SHIFT + 8] + C + B  # B's start appears twice; the whole B only later
    assert find_span(old, K + B + C) == (len(K), len(K + A + C) + MIN_SHIFT + 8, len(B))
    assert find_span(K + A + B[:MIN_SHIFT - 1], K + B[:MIN_SHIFT - 1] + C) is None
    assert find_span(K + A, K + C) is None


def test_find_span_only_matches_whole_tokens():
    # Little-endian, [0x01000000, 0x02] is the bytes 00 00 00 01 02 00 00 00, which hold token
    # 0x0201's bytes (01 02 00 00) three bytes in: a byte search must not take that for a token.
    assert find_span([7, 0x01000000, 0x02, 9], [7, 0x0201], min_len=1) is None
    assert find_span([7, 0x01000000, 0x0201, 9], [7, 0x0201], min_len=1) == (1, 2, 1)
    assert find_span([5, 9, 9, 9, 9, 1, 2, 3, 4], [5, 1, 2, 3, 4], min_len=4) == (1, 5, 4)


def test_usable_shift_keeps_the_last_position_to_run_and_must_be_worth_it():
    shift = Shift(keep=10, start=50, length=100)
    assert usable_shift(shift, total=100, reused=0) == Shift(10, 50, 89)  # 99 positions reused, the last runs
    assert usable_shift(shift, total=200, reused=90) is None  # a plain prefix reuses almost as much


def test_prefix_cache_lookup_shift_take_and_drop_sharing():
    K, A, B, C = story_parts()
    evicted = []
    cache = PrefixCache(ops=_Ops, on_evict=evicted.append)
    cache.store(None, 0, K + A + B, ("story", len(K + A + B)))
    cache.store(None, 0, K + A + B[:50] + C, ("branch", len(K + A) + 55))
    cache.store(None, 0, K + C, ("other", len(K + C)))
    match = cache.lookup_shift(None, 0, K + B + C)
    assert match.cache[0] == "story" and match.shift == Shift(len(K), len(K + A), len(B))
    assert cache.lookup_shift("another soft prompt", 0, K + B + C) is None
    assert cache.take(match) and not cache.take(match)
    cache.drop_sharing(None, 0, match.ids, match.shift.start)  # "branch" shares cells past the start
    assert [c[0] for c in evicted] == ["branch"] and len(cache) == 1


class _Ops:
    is_joinable = staticmethod(lambda c: True)
    length = staticmethod(lambda c: c[1])
    nbytes = staticmethod(lambda c: c[1])
    prefix = staticmethod(lambda c, n: (c[0], n))


# -- transformers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("shift") / "llama-1", "llama", hidden=64, layers=1)


def shifted_and_fresh(folder, options=FLOAT32, shift=True, seed=0):
    K, A, B, C = story_parts(seed)
    engine, fresh = Engine(), Engine()
    engine.load(folder, options)
    fresh.load(folder, options)
    engine.context_shift = shift
    engine.generate(K + A + B, ONE)  # the earlier turn, kept in the prefix cache
    after = engine.generate(K + B + C, GREEDY)
    read = fresh.generate(K + B + C, GREEDY)
    engine.unload()
    fresh.unload()
    return after, read, (K, A, B, C)


def test_transformers_shift_equals_a_fresh_read_in_one_layer(one_layer):
    after, read, (K, A, B, C) = shifted_and_fresh(one_layer)
    assert after.shifted_tokens == len(B) and after.cached_tokens == len(K) + len(B)
    assert read.cached_tokens == 0
    assert after.token_ids == read.token_ids


def test_the_comparison_notices_a_wrong_rotation(one_layer, monkeypatch):
    """Without turning the keys (or turning them the wrong way) the text differs: the test
    above would fail if the rotation were wrong."""
    for wrong in (lambda keys, delta: keys, lambda keys, delta: right(keys, -delta)):
        right = rope.shifter(_model(one_layer))
        monkeypatch.setattr(rope, "shifter", lambda model, wrong=wrong: wrong)
        after, read, _ = shifted_and_fresh(one_layer)
        assert after.shifted_tokens and after.token_ids != read.token_ids


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_shift_is_off_by_default_and_exact(one_layer):
    after, read, (K, A, B, C) = shifted_and_fresh(one_layer, shift=False)
    assert after.shifted_tokens == 0 and after.cached_tokens == len(K)
    assert after.token_ids == read.token_ids


def test_models_without_movable_keys_fall_back_to_exact(model_dirs):
    from transformers import AutoModelForCausalLM

    for arch in ("gpt2", "gpt_neox", "opt", "bloom"):
        assert rope.refusal(AutoModelForCausalLM.from_pretrained(model_dirs[arch])) is not None
    assert rope.refusal(AutoModelForCausalLM.from_pretrained(model_dirs["llama"])) is None
    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    assert "gpt2" in engine.loaded.shift_refusal()
    engine.context_shift = True
    K, A, B, C = story_parts()
    engine.generate(K + A + B, ONE)
    assert engine.generate(K + B + C, GREEDY).shifted_tokens == 0


def test_rotation_composes_like_positions(one_layer):
    """R(d) R(p) k == R(p + d) k, with the model's own frequencies."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _model(one_layer)
    rotary = model.model.rotary_emb
    k = torch.randn(1, 2, 5, 16)
    at = lambda p: apply_rotary_pos_emb(k, k, *rotary(k, torch.tensor([p]))[:2])[0]  # noqa: E731
    turn = rope.shifter(model)
    assert torch.allclose(turn(at(list(range(40, 45))), -30), at(list(range(10, 15))), atol=1e-5)


# -- llama.cpp -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_layer_gguf(one_layer, tmp_path_factory):
    from ..conftest import require_llama_cpp

    require_llama_cpp()
    from kobold_desktop.engine.llamacpp.convert import convert

    return convert(one_layer, tmp_path_factory.mktemp("shift-gguf") / "llama-1-f32.gguf", "f32")


def test_llamacpp_shift_equals_a_fresh_read_in_one_layer(one_layer_gguf):
    after, read, (K, A, B, C) = shifted_and_fresh(one_layer_gguf, options=LoadOptions())
    assert after.shifted_tokens == len(B) and after.token_ids == read.token_ids


def test_llamacpp_shift_runs_only_the_new_tokens(one_layer_gguf):
    K, A, B, C = story_parts()
    engine = Engine()
    engine.load(one_layer_gguf)
    engine.context_shift = True
    model = engine.loaded.model
    engine.generate(K + A + B, ONE)
    before = model.tokens_decoded
    result = engine.generate(K + B + C, GREEDY)
    # C's tokens, then one per generated token but the last (never fed)
    assert model.tokens_decoded - before == len(C) + len(result.token_ids) - 1
    again = engine.generate(K + B + C, GREEDY)  # the shifted sequence is stored and reused as is
    assert again.token_ids == result.token_ids and again.shifted_tokens == 0
    engine.unload()


def test_llamacpp_shift_leaves_sequences_that_shared_its_cells_correct(one_layer_gguf):
    """A stored sequence that began as a copy of the one being moved shares its cells; moving
    them would move that sequence's positions too. It is dropped instead, and reading it
    again gives what a fresh engine gives."""
    K, A, B, C = story_parts()
    branch = K + A + B[:50] + C
    engine, fresh = Engine(), Engine()
    engine.load(one_layer_gguf)
    fresh.load(one_layer_gguf)
    engine.context_shift = True
    engine.generate(K + A + B, ONE)
    engine.generate(branch, ONE)  # copies K + A + B[:50] from the first
    assert engine.generate(K + B + C, GREEDY).shifted_tokens == len(B)
    assert engine.generate(branch, GREEDY).token_ids == fresh.generate(branch, GREEDY).token_ids
    engine.unload()
    fresh.unload()


def test_llamacpp_does_not_move_cells_a_running_row_shares(one_layer_gguf):
    from kobold_desktop.engine.llamacpp.core import LlamaCore

    K, A, B, C = story_parts()
    engine = Engine()
    engine.load(one_layer_gguf)
    loaded = engine.loaded
    engine.generate(K + A + B, ONE)
    core = LlamaCore(loaded.model, shift=True)
    events = []
    running = loaded.new_request(K + A + B + C, None, GREEDY, events.append)
    core.add(running)  # copies K + A + B from the stored sequence, and keeps generating
    moved = loaded.new_request(K + B + C, None, GREEDY, events.append)
    core.add(moved)
    assert moved.shifted == 0 and moved.reused == len(K)
    while core.active:
        core.step()
    engine.unload()


def test_transformers_shift_matches_llamacpps_own_shift(gguf_model):
    """Two layers: a shift is not a fresh read, but ours and llama.cpp's are the same
    operation on the same weights and give the same greedy text."""
    ours, _, (K, A, B, C) = shifted_and_fresh(gguf_model["dir"])
    theirs, _, _ = shifted_and_fresh(gguf_model["f32"], options=LoadOptions())
    assert ours.shifted_tokens == theirs.shifted_tokens == len(B)
    assert ours.token_ids == theirs.token_ids
