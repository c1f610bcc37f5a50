"""Choosing the device and the precision."""

import pytest
import torch

from kobold_desktop.engine import ModelError
from kobold_desktop.engine.device import choose_device, choose_dtype, cpu_has_native_bf16


def test_device_and_dtype_choice_on_this_machine():
    device = choose_device()
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")
    native = cpu_has_native_bf16()
    assert choose_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert choose_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert choose_dtype(torch.device("cpu"), "float32") == torch.float32
    with pytest.raises(ModelError, match="unknown dtype"):
        choose_dtype(torch.device("cpu"), "float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            choose_device("cuda")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpus_get_bfloat16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr("kobold_desktop.engine.device.cpu_has_native_bf16", lambda: native)
    assert choose_dtype(torch.device("cpu")) == expected


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpus_get_bfloat16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr("kobold_desktop.engine.device.cuda_has_native_bf16", lambda device=None: native)
    assert choose_dtype(torch.device("cuda")) == expected


def test_native_bfloat16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    from kobold_desktop.engine import device

    # AVX-512 BF16 without AMX measured slower than float32 (engine/device.py): not enough.
    for flags, expected in (("fpu avx512f avx512_bf16 amx_bf16 amx_tile", True), ("fpu avx2 amx_bf16", True),
                            ("fpu avx2 avx512f avx512_bf16 avx512_fp16", False), ("fpu avx2 avx512f", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        real_path = device.Path
        monkeypatch.setattr(device, "Path", lambda p: real_path(tmp_path / "cpuinfo"))
        device.cpu_has_native_bf16.cache_clear()
        try:
            assert device.cpu_has_native_bf16() is expected
        finally:
            monkeypatch.setattr(device, "Path", real_path)
            device.cpu_has_native_bf16.cache_clear()
