"""Blending soft prompts: the weighted average of same-shape soft prompts, as a new one.

Unlike a mixture (which runs every member and mixes their predictions), a blend is one
ordinary soft prompt: as fast as any other, but only meaningful between soft prompts of
the same length and width, ideally tuned from the same start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

import kobold_desktop.softprompt.kobold_zip as kobold_zip
from kobold_desktop.softprompt.errors import DestinationExistsError, SoftPromptError
from kobold_desktop.softprompt.io import load_softprompt
from kobold_desktop.softprompt.types import DEFAULT_LIMITS, Limits, Metadata, SoftPrompt


class BlendError(SoftPromptError):
    """The soft prompts cannot be averaged (different shapes, bad weights)."""


def blend(paths: Sequence[Path], weights: Sequence[float], limits: Limits = DEFAULT_LIMITS
          ) -> tuple[torch.Tensor, list[SoftPrompt]]:
    """sum_i w_i * rows_i / sum_i w_i, in float32. Refuses different lengths or widths."""
    if len(paths) < 2:
        raise BlendError("give at least two soft prompts to blend.")
    if len(weights) != len(paths):
        raise BlendError(f"{len(paths)} soft prompts but {len(weights)} weights; give one weight each.")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise BlendError("weights must be 0 or more, and not all 0.")
    loaded = [load_softprompt(Path(p), limits) for p in paths]
    first, first_tensor = loaded[0]
    for softprompt, tensor in loaded[1:]:
        if tensor.shape[1] != first_tensor.shape[1]:
            raise BlendError(f"'{softprompt.name}' has hidden size {tensor.shape[1]} and '{first.name}' "
                             f"{first_tensor.shape[1]}: they are for different models and cannot be blended.")
        if tensor.shape[0] != first_tensor.shape[0]:
            raise BlendError(f"'{softprompt.name}' has {tensor.shape[0]} tokens and '{first.name}' "
                             f"{first_tensor.shape[0]}: only soft prompts of the same length can be blended "
                             "(a mixture can combine any lengths).")
    total = float(sum(weights))
    out = sum((w / total) * t.float() for (_, t), w in zip(loaded, weights))
    return out, [s for s, _ in loaded]


def write_blend(paths: Sequence[Path], weights: Sequence[float], out: Path, limits: Limits = DEFAULT_LIMITS,
                name: str | None = None) -> Path:
    """Blend and write a KoboldAI zip (never overwriting)."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise BlendError("the blend is written as a KoboldAI zip; give --out a name ending in .zip.", out)
    if out.exists():
        raise DestinationExistsError("already exists; choose another name.", out)
    tensor, sources = blend(paths, weights, limits)
    total = float(sum(weights))
    recipe = " + ".join(f"{s.name} {w / total:.0%}" for s, w in zip(sources, weights))
    supported = tuple(dict.fromkeys(m for s in sources for m in s.supported))
    meta = Metadata(name=name or out.stem, description=f"Blend of {recipe}.", supported=supported,
                    raw={"blend": [{"name": s.name, "weight": w / total} for s, w in zip(sources, weights)]})
    try:
        kobold_zip.write(out, tensor, meta, overwrite=False)
    except FileExistsError as exc:
        raise DestinationExistsError("already exists; choose another name.", out) from exc
    return out
