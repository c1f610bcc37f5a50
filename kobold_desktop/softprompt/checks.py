"""Checks every soft prompt passes, whatever file it came from."""

from __future__ import annotations

from pathlib import Path

import torch

from kobold_desktop.softprompt.errors import BadShapeError, NonFiniteError, TooManyTokensError
from kobold_desktop.softprompt.types import DEFAULT_LIMITS, Limits


def check_shape(shape: tuple[int, ...], path: Path | None, limits: Limits = DEFAULT_LIMITS) -> None:
    """A soft prompt is `[n_tokens, hidden_size]` with both above zero and the hidden size
    within `limits.max_hidden_size`. Checked on declared shapes, before reading data."""
    if len(shape) != 2:
        raise BadShapeError(
            f"the tensor has {len(shape)} dimension(s) {tuple(shape)}; a soft prompt must be "
            "2-D: [number of tokens, hidden size].",
            path,
        )
    if shape[0] == 0:
        raise BadShapeError("the tensor has zero tokens.", path)
    if shape[1] == 0:
        raise BadShapeError("the tensor has a hidden size of zero.", path)
    if shape[1] > limits.max_hidden_size:
        raise BadShapeError(
            f"it declares a hidden size of {shape[1]:,}; no model is that wide (the limit is "
            f"{limits.max_hidden_size:,}), so the file is damaged or made to exhaust memory.",
            path,
        )
    check_budget(shape[0] * shape[1], path, limits)


def check_budget(elements: int, path: Path | None, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse before allocating what would cost more than `limits.max_float32_bytes` as float32."""
    if elements * 4 > limits.max_float32_bytes:
        raise BadShapeError(
            f"its tensor would take {elements * 4 / 2**20:,.0f} MiB of memory; a soft prompt takes a few "
            f"MiB (the limit is {limits.max_float32_bytes >> 20} MiB), so the file is damaged or made to "
            "exhaust memory.",
            path,
        )


def check_token_limit(n_tokens: int, path: Path | None, limits: Limits) -> None:
    if n_tokens > limits.max_tokens:
        raise TooManyTokensError(
            f"has {n_tokens:,} tokens; the limit is {limits.max_tokens:,}. A soft prompt that "
            "long leaves no room for the story (the limit can be raised in the settings).",
            path,
        )


def check_finite(tensor: torch.Tensor, path: Path | None) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        row = int((~finite).any(dim=1).nonzero()[0])
        raise NonFiniteError(
            f"the tensor has {bad} NaN or infinite value(s) (first in token row {row}); the "
            "soft prompt was probably saved from a diverged training run.",
            path,
        )
