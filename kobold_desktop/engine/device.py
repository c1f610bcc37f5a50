"""Choosing where the model runs and in what precision.

bfloat16 only where the hardware computes it fast: emulated bfloat16 is slower than
float16 on older GPUs. On CPUs, torch's bfloat16 matrix products are fast with AMX
(Sapphire Rapids and later, where the OS enables it); with AVX-512 BF16 alone they
are not: on this project's CI machines (a Xeon that shows avx512_bf16 but no AMX) a
317M-parameter Llama decoded at 0.99x and read a 1,500-token prompt at 0.68x the speed
of float32 (benchmarks/engine_core.py), and a bare 1500x1024x2816 product ran at 164
against 301 GFLOP/s. So CPUs default to bfloat16 only with AMX.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

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


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """x86 CPUs with AMX bfloat16 tiles (read from Linux's /proc/cpuinfo; elsewhere False)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\bamx_bf16\b", text) is not None


def cuda_has_native_bf16(device: torch.device | None = None) -> bool:
    """Ampere and newer: bfloat16 in hardware, not emulated."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no such argument and does not emulate
        return torch.cuda.is_bf16_supported()


def training_dtype(device: torch.device, requested: str | None = None) -> str | None:
    """The precision to train in (a `LoadOptions.dtype`): gradients want float32 on a CPU
    (bfloat16 there is for reading, not for learning); GPUs tune float32 weights under
    autocast, or float16 weights with loss scaling, so they choose as for reading (None)."""
    if requested:
        return requested
    return "float32" if device.type == "cpu" else None


def choose_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """GPUs: bfloat16 where native, else float16. CPUs: bfloat16 with AMX, else float32.
    Apple MPS: float16. `requested` overrides."""
    return dtype_choice(device, requested)[0]


def dtype_choice(device: torch.device, requested: str | None = None) -> tuple[torch.dtype, str]:
    """`choose_dtype`'s answer and why, in words for `generate --json`, the server and
    --self-test (bfloat16 on a CPU changes the text: greedy tokens part from float32's)."""
    if requested and requested != "auto":
        try:
            dtype = DTYPES[requested.lower()]
        except KeyError:
            raise ModelError(
                f"unknown dtype '{requested}'; use one of float32, float16, bfloat16."
            ) from None
        return dtype, f"{str(dtype).removeprefix('torch.')}: asked for"
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return torch.bfloat16, "bfloat16: native on this GPU"
        return torch.float16, "float16: this GPU has no native bfloat16"
    if device.type == "mps":
        return torch.float16, "float16: Apple GPUs"
    if cpu_has_native_bf16():
        return torch.bfloat16, ("bfloat16: this CPU has AMX, which reads prompts about 2.4x faster in it; greedy "
                                "text differs from float32's (use --dtype float32 for the same text as on other CPUs)")
    return torch.float32, "float32: this CPU has no AMX (bfloat16 would be slower here)"
