"""Moving keys to other positions in a transformers KV cache (context shift).

A model with rotary position embeddings (RoPE) stores each key already rotated by its
position: `R(p) k`. Rotations add up, `R(d) R(p) = R(p + d)`, so a cached key moves from
position p to p + d by one more rotation, `R(d)`, without running the model again;
llama.cpp's `seq_add` does the same in its cache. Only the keys turn: values carry no
position.

Supported: models whose every layer rotates all of each head's dimensions in halves
(`rotate_half`, the Llama layout) with fixed frequencies (`inv_freq`): the architectures
in `SHIFTABLE` with RoPE types `default`, `linear`, `llama3` or `yarn` (yarn scales cos
and sin by a constant, which a pure rotation leaves as it is). Others (dynamic or long
RoPE, whose frequencies depend on the length; partial rotary; interleaved layouts; layers
without RoPE) return None from `shifter` and are trimmed exactly instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

SHIFTABLE = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                       "granite", "olmo", "olmo2"})
ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})

Rotate = Callable[[torch.Tensor, int], torch.Tensor]  # (keys [..., length, head_dim], positions to move by)


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return "per-layer"  # several RoPE kinds (sliding and full layers): not one rotation
    return str(params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default")


def refusal(model: Any) -> str | None:
    """Why this model's cached keys cannot be moved, or None when they can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", "?")
    if kind not in SHIFTABLE:
        return f"context shift supports {', '.join(sorted(SHIFTABLE))} models, not {kind}"
    rope_type = _rope_type(config)
    if rope_type not in ROPE_TYPES:
        return f"context shift cannot move keys of '{rope_type}' RoPE (its frequencies depend on the length)"
    if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return "context shift does not support partial rotary embeddings"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "context shift does not support sliding-window attention"
    if _inv_freq(model) is None:
        return f"found no rotary embedding in this {kind} model"
    return None


def _inv_freq(model: Any) -> torch.Tensor | None:
    found = [m.inv_freq for name, m in model.named_modules()
             if name.endswith("rotary_emb") and isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    return found[0] if len(found) == 1 else None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shifter(model: Any) -> Rotate | None:
    """A function that moves cached keys by d positions, or None (see `refusal`)."""
    if refusal(model) is not None:
        return None
    inv_freq = _inv_freq(model).detach().float()

    def rotate(keys: torch.Tensor, delta: int) -> torch.Tensor:
        if keys.shape[-1] != 2 * inv_freq.shape[0]:
            raise ValueError(f"keys of width {keys.shape[-1]} do not match {inv_freq.shape[0]} RoPE frequencies")
        angles = delta * inv_freq.to(keys.device)
        angles = torch.cat((angles, angles))
        k = keys.float()
        return (k * angles.cos() + rotate_half(k) * angles.sin()).to(keys.dtype)

    return rotate
