"""KV cache operations (engine/kv.py) on hand-made caches: each result checked position by position."""

import torch

import kobold_desktop.engine.kv as kv


def make_cache(batch: int, length: int, layers: int = 2, heads: int = 2, dim: int = 3, start: float = 0.0):
    """Keys hold their own coordinates (value = start + row*1000 + position), values their negatives."""
    pairs = []
    for layer in range(layers):
        positions = torch.arange(length, dtype=torch.float32)
        rows = torch.arange(batch, dtype=torch.float32)[:, None] * 1000
        grid = (start + rows + positions + layer * 100)[:, None, :, None].expand(batch, heads, length, dim).clone()
        pairs.append((grid, -grid))
    return kv._build(pairs)


def test_length_and_bytes():
    cache = make_cache(1, 5)
    assert kv.length(cache) == 5
    assert kv.nbytes(cache) == 2 * 2 * (1 * 2 * 5 * 3) * 4  # layers, keys and values, elements, float32


def test_a_prefix_is_a_view_of_the_first_positions_and_leaves_the_source_alone():
    cache = make_cache(1, 6)
    cut = kv.prefix(cache, 4)
    assert kv.length(cut) == 4 and kv.length(cache) == 6
    assert torch.equal(cut.layers[1].keys, cache.layers[1].keys[:, :, :4])
    assert cut.layers[0].keys.data_ptr() == cache.layers[0].keys.data_ptr()  # no copy


def test_row_takes_the_last_positions_of_one_row_as_a_copy():
    cache = make_cache(3, 5)
    one = kv.row(cache, 1, 2)
    assert one.layers[0].keys.shape == (1, 2, 2, 3)
    assert one.layers[0].keys[0, 0, :, 0].tolist() == [1003.0, 1004.0]
    assert one.layers[0].keys.data_ptr() != cache.layers[0].keys.data_ptr()


def test_select_keeps_rows_and_drops_shared_padding():
    cache = make_cache(3, 5)
    kv.select(cache, torch.tensor([2, 0]), drop_front=1)
    assert cache.layers[0].keys.shape == (2, 2, 4, 3)
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [2001.0, 1.0]


def test_join_left_pads_the_shorter_side_with_zeros():
    batch, new = make_cache(1, 4), make_cache(1, 2, start=0.5)
    kv.join(batch, new)
    keys = batch.layers[0].keys
    assert keys.shape == (2, 2, 4, 3)
    assert keys[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert keys[1, 0, :, 0].tolist() == [0.0, 0.0, 0.5, 1.5]  # two zeros of padding, then its own
    longer = make_cache(1, 6, start=0.25)
    kv.join(batch, longer)
    assert batch.layers[0].keys.shape == (3, 2, 6, 3)
    assert batch.layers[0].keys[0, 0, :2, 0].tolist() == [0.0, 0.0]  # the batch was padded this time


def test_only_full_attention_dynamic_caches_are_joinable():
    from transformers import DynamicCache

    assert kv.is_joinable(make_cache(1, 3))
    assert not kv.is_joinable(DynamicCache())  # no layers yet
    assert not kv.is_joinable(None)


def test_returned_reads_either_name_of_the_cache_field():
    assert kv.returned({"cache": 1, "past_key_values": None}) == 1
    assert kv.returned({"past_key_values": 2}) == 2
