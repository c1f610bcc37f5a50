"""Choosing where the model runs and in what precision."""

from __future__ import annotations

import torch

from kobold_desktop.engine.errors import ModelError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def choose_device(requested: str | None = None) -> torch.device:
    """CUDA when there is a GPU, then Apple's MPS, else the CPU; `requested` overrides."""
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device '{requested}' was asked for, but no CUDA GPU is available.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ModelError("device 'mps' was asked for, but Apple MPS is not available.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """bfloat16 on GPUs that support it, else float16 on GPUs; float32 on the CPU."""
    if requested and requested != "auto":
        try:
            return DTYPES[requested.lower()]
        except KeyError:
            raise ModelError(
                f"unknown dtype '{requested}'; use one of float32, float16, bfloat16."
            ) from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32
