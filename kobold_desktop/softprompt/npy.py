"""Reading and writing the `.npy` tensor inside a KoboldAI soft prompt zip.

We parse the header ourselves so that listing reads a few hundred bytes, never the
whole tensor, and so that nothing can ever be unpickled: object arrays are refused from
the header alone. bfloat16 has no numpy dtype; KoboldAI stores it as raw 2-byte void
(`V2`) whose bits are the top half of a float32.
"""

from __future__ import annotations

import ast
import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from kobold_desktop.softprompt.checks import check_shape
from kobold_desktop.softprompt.errors import (
    BadDtypeError,
    CorruptFileError,
    UnsafeFileError,
)

MAGIC = b"\x93NUMPY"
# numpy itself refuses headers over 10,000 bytes by default; a soft prompt needs ~128.
MAX_HEADER_BYTES = 10_000

_FLOAT_NAMES = {2: "float16", 4: "float32", 8: "float64"}


@dataclass(frozen=True)
class NpyHeader:
    """What the `.npy` header says, checked for everything that can be checked there."""

    version: tuple[int, int]
    descr: str
    fortran_order: bool
    shape: tuple[int, ...]
    data_offset: int  # bytes from the start of the file to the first element

    @property
    def dtype_name(self) -> str:
        """float16, float32, float64 or bfloat16."""
        dtype = np.dtype(self.descr)
        return "bfloat16" if dtype.kind == "V" else _FLOAT_NAMES[dtype.itemsize]

    @property
    def big_endian(self) -> bool:
        return np.dtype(self.descr).byteorder == ">"

    @property
    def itemsize(self) -> int:
        return np.dtype(self.descr).itemsize

    @property
    def payload_bytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.itemsize


def _check_descr(descr: object, path: Path | None) -> str:
    if not isinstance(descr, str):
        raise BadDtypeError(
            "tensor.npy holds a structured (record) array; a soft prompt must be a plain "
            "array of floats.",
            path,
        )
    try:
        dtype = np.dtype(descr)
    except TypeError as exc:
        raise BadDtypeError(f"tensor.npy has an unknown data type {descr!r}.", path) from exc
    kind = dtype.kind
    if kind == "O":
        raise UnsafeFileError(
            "tensor.npy holds pickled Python objects (an object array). Loading it would "
            "run code from the file, so it is refused; ask its author for a float tensor.",
            path,
        )
    if kind in "iub":
        raise BadDtypeError(
            f"tensor.npy holds integers ({dtype.name}); a soft prompt must hold floating "
            "point numbers (float16, bfloat16, float32 or float64).",
            path,
        )
    if kind == "c":
        raise BadDtypeError(
            f"tensor.npy holds complex numbers ({dtype.name}); a soft prompt must hold real "
            "floating point numbers.",
            path,
        )
    if kind == "V" and dtype.itemsize == 2 and dtype.fields is None:
        return descr  # bfloat16 as KoboldAI writes it
    if kind == "f" and dtype.itemsize in _FLOAT_NAMES:
        return descr
    raise BadDtypeError(
        f"tensor.npy has data type {dtype.str!r}, which is not float16, bfloat16, float32 "
        "or float64.",
        path,
    )


def read_header(stream: BinaryIO, path: Path | None = None) -> NpyHeader:
    """Parse and check the header at the start of `stream`; reads only the header."""
    prefix = stream.read(len(MAGIC) + 2)
    if len(prefix) < len(MAGIC) + 2 or not prefix.startswith(MAGIC):
        raise CorruptFileError("tensor.npy is not a NumPy .npy file (bad magic bytes).", path)
    version = (prefix[6], prefix[7])
    if version == (1, 0):
        size_field, encoding = 2, "latin1"
    elif version in ((2, 0), (3, 0)):
        size_field, encoding = 4, "latin1" if version == (2, 0) else "utf8"
    else:
        raise CorruptFileError(
            f"tensor.npy uses .npy format version {version[0]}.{version[1]}; versions 1.0 "
            "to 3.0 are supported.",
            path,
        )
    raw_len = stream.read(size_field)
    if len(raw_len) != size_field:
        raise CorruptFileError("tensor.npy is truncated inside its header.", path)
    header_len = struct.unpack("<H" if size_field == 2 else "<I", raw_len)[0]
    if header_len > MAX_HEADER_BYTES:
        raise CorruptFileError(
            f"tensor.npy declares a {header_len}-byte header; refusing anything over "
            f"{MAX_HEADER_BYTES} bytes.",
            path,
        )
    raw_header = stream.read(header_len)
    if len(raw_header) != header_len:
        raise CorruptFileError("tensor.npy is truncated inside its header.", path)
    try:
        fields = ast.literal_eval(raw_header.decode(encoding))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError) as exc:
        raise CorruptFileError("tensor.npy has an unreadable header.", path) from exc
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise CorruptFileError(
            "tensor.npy's header must have exactly 'descr', 'fortran_order' and 'shape'.", path
        )
    shape = fields["shape"]
    if not isinstance(shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CorruptFileError(f"tensor.npy has an invalid shape {shape!r}.", path)
    if not isinstance(fields["fortran_order"], bool):
        raise CorruptFileError("tensor.npy's header has a non-boolean fortran_order.", path)
    descr = _check_descr(fields["descr"], path)
    header = NpyHeader(
        version=version,
        descr=descr,
        fortran_order=fields["fortran_order"],
        shape=shape,
        data_offset=len(prefix) + size_field + header_len,
    )
    check_shape(header.shape, path)
    return header


def decode_payload(header: NpyHeader, payload: bytes, path: Path | None = None) -> torch.Tensor:
    """Turn the raw element bytes into a C-contiguous tensor.

    float16, float32 and bfloat16 keep their dtype (bit-exact); float64 becomes float32
    and big-endian data becomes native, since no model runs in either.
    """
    if len(payload) != header.payload_bytes:
        raise CorruptFileError(
            f"tensor.npy holds {len(payload)} bytes of data; its shape needs "
            f"{header.payload_bytes}.",
            path,
        )
    order = "F" if header.fortran_order else "C"
    if header.dtype_name == "bfloat16":
        bits = np.frombuffer(payload, dtype="<u2").reshape(header.shape, order=order)
        bits = np.ascontiguousarray(bits).astype("<i2", copy=True)
        return torch.from_numpy(bits).view(torch.bfloat16)
    array = np.frombuffer(payload, dtype=np.dtype(header.descr)).reshape(header.shape, order=order)
    target = np.float32 if header.dtype_name == "float64" else array.dtype.newbyteorder("=")
    return torch.from_numpy(np.array(array, dtype=target, order="C", copy=True))


def encode(tensor: torch.Tensor) -> bytes:
    """The `.npy` bytes for a 2-D float tensor (format 1.0, C order, little-endian)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        array = tensor.view(torch.int16).numpy().astype("<i2").view("V2")
    elif tensor.dtype in (torch.float16, torch.float32):
        array = tensor.numpy().astype(tensor.numpy().dtype.newbyteorder("<"))
    else:
        array = tensor.to(torch.float32).numpy()
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=(1, 0), allow_pickle=False)
    return buffer.getvalue()
