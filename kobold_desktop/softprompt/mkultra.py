"""mkultra's JSON soft prompts: `{"metadata": {...}, "tensor": base64(pickle(tensor))}`.

A pickle can run any code, so we never hand it to `pickle.loads`. A restricted
unpickler resolves only the three names a pickled torch tensor uses; the storage bytes
inside go through `torch.load(weights_only=True)`. Anything else in the stream (a
call to `os.system`, say) is refused before it runs.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import json
import pickle
import pickletools
import struct
from pathlib import Path
from typing import Any

import torch

from kobold_desktop.fileio import JsonError, parse_json, read_limited
from kobold_desktop.softprompt.checks import check_budget, check_finite, check_shape, check_token_limit
from kobold_desktop.softprompt.errors import (
    BadDtypeError,
    CorruptFileError,
    SoftPromptError,
    UnsafeFileError,
    UnsupportedFormatError,
)
from kobold_desktop.softprompt.types import (
    DEFAULT_LIMITS,
    Limits,
    Metadata,
    SoftPrompt,
    SoftPromptFormat,
)

MAX_FILE_BYTES = 256 << 20


_ITEM_BYTES = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "DoubleStorage": 8}


class _DeclaredTooLarge(ValueError):
    pass


class _StorageSizes(pickle.Unpickler):
    """Reads a legacy storage save's pickles without building anything, summing the bytes
    its storages declare (torch allocates them before it reads a byte of data)."""

    def __init__(self, handle: io.BytesIO):
        super().__init__(handle)
        self.declared = 0

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _ITEM_BYTES:
            return name
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a tensor's storage")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int)):
            raise pickle.UnpicklingError("unexpected persistent id in a tensor's storage")
        self.declared += pid[4] * _ITEM_BYTES.get(pid[1], 8)
        return None


# Protocol 5's out-of-band buffers and bytearrays: torch never writes them, and with them
# a damaged pickle made CPython free a bytearray still exported to a buffer (found by the
# fuzz suite: "deallocated bytearray object has exported buffers").
_REFUSED_OPCODES = frozenset({"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER"})


def _scan(handle: Any, pickles: int = 1) -> None:
    """Walk `pickles` pickles' opcodes without running any; refuse the buffer opcodes."""
    for _ in range(pickles):
        for opcode, _arg, _pos in pickletools.genops(handle):
            if opcode.name in _REFUSED_OPCODES:
                raise pickle.UnpicklingError(f"unexpected {opcode.name} in a tensor's pickle")


def _check_declared_sizes(data: bytes) -> None:
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a tensor's storage is not plain bytes")
    _scan(io.BytesIO(data), pickles=4)
    handle = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info: plain values only
        _StorageSizes(handle).load()
    sizes = _StorageSizes(handle)
    sizes.load()
    if sizes.declared > len(data):
        raise _DeclaredTooLarge(f"declares {sizes.declared:,} bytes of tensor data but holds {len(data):,}")


def _load_storage_bytes(data: bytes) -> Any:
    # torch pickles a storage as the bytes of a (legacy) torch.save; weights_only
    # restricts that inner load to tensors and plain containers. Most mkultra files were
    # made on Colab GPUs, so the storage names "cuda:0": map it to the CPU, always.
    _check_declared_sizes(data)
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


class _BadView(ValueError):
    pass


def _checked_rebuild(limits: Limits) -> Any:
    """torch's `_rebuild_tensor_v2` after checking the view against the stored bytes.

    A pickled tensor is a storage plus a view (offset, size, stride). torch builds it with
    `set_`, which silently grows a storage too small for the view, so a view reaching past
    the stored data would come back filled with whatever the process's memory held (and be
    written into the library). A zero or tiny stride can make a few bytes cost gigabytes.
    Both are refused here, before the tensor exists."""

    def rebuild(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) <= 4 and all(isinstance(v, int) for v in size + stride)):
            raise _BadView("its tensor's view is not a plain offset, size and stride")
        if offset < 0 or any(v < 0 for v in size + stride):
            raise _BadView("its tensor's view has a negative offset, size or stride")
        elements = 1
        for v in size:
            elements *= v
        check_budget(elements, None, limits)
        stored = storage.size() if hasattr(storage, "size") else len(storage)
        if elements:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= stored:
                raise _BadView(f"its tensor's view reaches element {last:,} of a storage of {stored:,}: "
                               "past the data the file holds")
        return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, *rest)

    return rebuild


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _TensorOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path, limits: Limits = DEFAULT_LIMITS):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._rebuild = _checked_rebuild(limits)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"its pickled tensor refers to '{module}.{name}', which a soft prompt never "
                "needs; it may be malicious, so it was not unpickled.",
                self._path,
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError("its pickled tensor uses persistent ids; refused.", self._path)


def looks_like_mkultra(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def load(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[SoftPrompt, torch.Tensor]:
    """Read an mkultra file safely; its tensor is always fully validated."""
    try:
        data = read_limited(path, MAX_FILE_BYTES)
        if len(data) > MAX_FILE_BYTES:
            raise CorruptFileError("is too large to be an mkultra soft prompt.", path)
        document = parse_json(data)
    except JsonError as exc:
        raise UnsupportedFormatError(f"is not an mkultra soft prompt: {exc}.", path) from exc
    except OSError as exc:
        raise UnsupportedFormatError(f"cannot be read: {exc.strerror or exc}.", path) from exc
    if not isinstance(document, dict) or not isinstance(document.get("tensor"), str):
        raise UnsupportedFormatError(
            "is JSON without a 'tensor' field, so it is not an mkultra soft prompt.", path
        )
    try:
        raw = base64.b64decode(document["tensor"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CorruptFileError("its 'tensor' field is not valid base64.", path) from exc
    try:
        _scan(io.BytesIO(raw))
        tensor = _TensorOnlyUnpickler(raw, path, limits).load()
    except SoftPromptError as exc:
        if exc.path is None:  # the budget check, made before the path was at hand
            raise type(exc)(exc.reason, path) from None
        raise
    except _BadView as exc:
        raise CorruptFileError(f"{exc}; refused (such a file would carry uninitialised memory).", path) from exc
    except _DeclaredTooLarge as exc:
        raise CorruptFileError(f"its pickled tensor {exc}; refused before allocating it.", path) from exc
    except pickle.UnpicklingError as exc:
        if "truncated" in str(exc):
            raise CorruptFileError("its pickled tensor is truncated (was the download cut short?).", path) from exc
        raise UnsafeFileError(
            f"its pickled tensor holds something other than plain tensors ({exc}); refused.",
            path,
        ) from exc
    except (EOFError, ValueError, TypeError, RuntimeError, AttributeError, MemoryError, AssertionError,
            OverflowError, IndexError, KeyError, struct.error) as exc:
        # torch's own message gives advice for its API (map_location...), not for a user.
        raise CorruptFileError(
            "its pickled tensor is damaged or truncated (was the download cut short?).", path
        ) from exc
    if not isinstance(tensor, torch.Tensor):
        raise UnsupportedFormatError("its 'tensor' field does not hold a tensor.", path)
    tensor = tensor.detach()
    # mkultra keeps the batch dimension of `inputs_embeds`: [1, n_tokens, hidden].
    while tensor.dim() > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    check_shape(tuple(tensor.shape), path, limits)
    if not tensor.is_floating_point():
        raise BadDtypeError(f"its tensor holds {tensor.dtype} values, not floats.", path)
    if tensor.dtype == torch.float64:
        tensor = tensor.to(torch.float32)
    tensor = tensor.contiguous()
    check_token_limit(tensor.shape[0], path, limits)
    check_finite(tensor, path)
    meta_raw = document.get("metadata")
    meta = Metadata.from_mapping(meta_raw if isinstance(meta_raw, dict) else {})
    softprompt = SoftPrompt(
        path=path,
        format=SoftPromptFormat.MKULTRA_JSON,
        name=meta.name or path.stem,
        n_tokens=tensor.shape[0],
        hidden_size=tensor.shape[1],
        dtype=str(tensor.dtype).removeprefix("torch."),
        compression="pickle",
        authors=meta.authors,
        description=meta.description,
        supported=meta.supported,
        meta=meta.raw,
    )
    return softprompt, tensor
