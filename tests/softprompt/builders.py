"""Soft prompt files built byte by byte, good and bad, for the tests."""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

METHODS = {
    "stored": zipfile.ZIP_STORED,
    "deflate": zipfile.ZIP_DEFLATED,
    "bzip2": zipfile.ZIP_BZIP2,
    "lzma": zipfile.ZIP_LZMA,
}


def npy_bytes(array: np.ndarray, version=(1, 0), allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=allow_pickle)
    return buffer.getvalue()


def bf16_array(tensor: torch.Tensor) -> np.ndarray:
    """bfloat16 the way KoboldAI stores it: raw 2-byte void."""
    return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("V2")


def make_zip(
    path: Path,
    tensor_npy: bytes | None,
    meta: dict | bytes | None = None,
    compression: str = "lzma",
    tensor_name: str = "tensor.npy",
) -> Path:
    if compression == "deflate64":
        return make_deflate64_zip(path, tensor_npy, meta)
    with zipfile.ZipFile(path, "w") as zf:
        if tensor_npy is not None:
            zf.writestr(tensor_name, tensor_npy, compress_type=METHODS[compression])
        if meta is not None:
            data = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
            zf.writestr("meta.json", data, compress_type=zipfile.ZIP_STORED)
    return path


def make_deflate64_zip(path: Path, tensor_npy: bytes, meta: dict | None = None) -> Path:
    """A zip whose tensor.npy uses method 9 (Deflate64), as 7-Zip and Windows write it.

    A raw deflate stream without length-258 matches (zlib emits those only for long
    repeats, absent from random floats) decodes identically as Deflate64, so we write
    zlib's stream and label it method 9. Stdlib zipfile alone cannot read the result.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressed = compressor.compress(tensor_npy) + compressor.flush()
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("tensor.npy")
        info.compress_type = zipfile.ZIP_STORED
        zf.writestr(info, compressed)
        if meta is not None:
            zf.writestr("meta.json", json.dumps(meta))
    # Rewrite the entry's method, CRC and sizes in the local and central headers.
    data = bytearray(path.read_bytes())
    crc = zlib.crc32(tensor_npy)
    local = data.find(b"PK\x03\x04")
    struct.pack_into("<H", data, local + 8, 9)
    struct.pack_into("<III", data, local + 14, crc, len(compressed), len(tensor_npy))
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<H", data, central + 10, 9)
    struct.pack_into("<III", data, central + 16, crc, len(compressed), len(tensor_npy))
    path.write_bytes(bytes(data))
    return path


def set_declared_size(path: Path, member: str, size: int) -> None:
    """Make the zip's headers lie about a member's uncompressed size."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    local = data.find(b"PK\x03\x04" + b"\x00" * 0)
    while local != -1:
        name_len = struct.unpack_from("<H", data, local + 26)[0]
        if data[local + 30 : local + 30 + name_len] == name:
            struct.pack_into("<I", data, local + 22, size)
        local = data.find(b"PK\x03\x04", local + 4)
    central = data.find(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46 : central + 46 + name_len] == name:
            struct.pack_into("<I", data, central + 24, size)
        central = data.find(b"PK\x01\x02", central + 4)
    path.write_bytes(bytes(data))


def random_tensor(n_tokens=5, hidden=16, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, hidden, generator=generator).to(dtype)


def softprompt_zip(path: Path, tensor: torch.Tensor | None = None, meta=None, compression="lzma") -> Path:
    tensor = random_tensor() if tensor is None else tensor
    array = bf16_array(tensor) if tensor.dtype == torch.bfloat16 else tensor.numpy()
    return make_zip(path, npy_bytes(array), meta, compression)


def mkultra_json(path: Path, tensor: torch.Tensor, metadata: dict | None = None) -> Path:
    payload = base64.b64encode(pickle.dumps(tensor, protocol=4)).decode("ascii")
    path.write_text(json.dumps({"metadata": metadata or {"name": "mk"}, "tensor": payload}))
    return path


class Exploit:
    """Unpickling this would create a file: proof that it ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_mkultra_json(path: Path, marker: Path) -> Path:
    payload = base64.b64encode(pickle.dumps(Exploit(marker), protocol=4)).decode("ascii")
    path.write_text(json.dumps({"metadata": {"name": "evil"}, "tensor": payload}))
    return path
