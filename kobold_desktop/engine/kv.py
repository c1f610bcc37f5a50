"""Operations on a transformers KV cache: cut a prefix, take one row, join rows.

The stepping core keeps one `DynamicCache` for its running batch, rows left-padded to a
common length (TGI's causal-LM batches do the same). A row joins by padding the shorter
side on the left with zeros that the attention mask hides; a row leaves by dropping it
from the batch dimension. Only caches whose every layer is a plain `DynamicLayer`
(full attention, `[batch, heads, length, head_dim]`) can be cut and joined; sliding-window
and quantized caches are left alone and their sequences run one at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def returned(out: Any) -> Any:
    """The cache a forward pass returned. transformers 5.x calls the field `cache`; reading
    the older name `past_key_values` from such an output warns, so look up whichever is set."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def is_joinable(cache: Any) -> bool:
    """True when every layer is a full-attention `DynamicLayer` holding tensors."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def length(cache: Any) -> int:
    return int(cache.layers[0].keys.shape[-2])


def nbytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _build(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for keys, values in pairs:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefix(cache: Any, n: int) -> DynamicCache:
    """A new cache holding the first `n` positions (views: the source is never changed,
    because the model grows a cache by concatenation, never in place)."""
    return _build([(k[:, :, :n], v[:, :, :n]) for k, v in _pairs(cache)])


def shifted(cache: Any, keep: int, start: int, length: int, rotate: Any) -> DynamicCache:
    """A new one-row cache: the first `keep` positions, then positions start..start+length
    moved back to keep.. (`rotate(keys, keep - start)` turns their keys; `rope.shifter`).
    The source is not changed."""
    delta = keep - start
    pairs = []
    for k, v in _pairs(cache):
        moved = rotate(k[:, :, start:start + length], delta)
        pairs.append((torch.cat([k[:, :, :keep], moved], dim=2),
                      torch.cat([v[:, :, :keep], v[:, :, start:start + length]], dim=2)))
    return _build(pairs)


def row(cache: Any, index: int, n: int) -> DynamicCache:
    """Row `index`'s last `n` positions (its real tokens) as a batch of one, copied so the
    batch's memory can be freed."""
    return _build([(k[index : index + 1, :, -n:].clone(), v[index : index + 1, :, -n:].clone())
                   for k, v in _pairs(cache)])


def select(cache: Any, indices: torch.Tensor, drop_front: int = 0) -> None:
    """Keep only these rows, and drop the first `drop_front` positions (padding all rows share)."""
    for layer in cache.layers:
        layer.keys = layer.keys[indices, :, drop_front:]
        layer.values = layer.values[indices, :, drop_front:]


def _pad_left(tensor: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return tensor
    shape = list(tensor.shape)
    shape[2] = n
    return torch.cat([tensor.new_zeros(shape), tensor], dim=2)


def join(batch: Any, new: Any) -> None:
    """Append `new`'s rows to `batch` (in place), left-padding whichever is shorter."""
    size = max(length(batch), length(new))
    pad_batch, pad_new = size - length(batch), size - length(new)
    for layer, (k, v) in zip(batch.layers, _pairs(new)):
        layer.keys = torch.cat([_pad_left(layer.keys, pad_batch), _pad_left(k, pad_new)], dim=0)
        layer.values = torch.cat([_pad_left(layer.values, pad_batch), _pad_left(v, pad_new)], dim=0)
