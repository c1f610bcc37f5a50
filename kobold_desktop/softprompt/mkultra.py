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
from pathlib import Path
from typing import Any

import torch

from kobold_desktop.softprompt.checks import check_finite, check_shape, check_token_limit
from kobold_desktop.softprompt.errors import (
    BadDtypeError,
    CorruptFileError,
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


def _check_declared_sizes(data: bytes) -> None:
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


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _TensorOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
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
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CorruptFileError("is too large to be an mkultra soft prompt.", path)
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedFormatError(
            f"is not readable JSON ({exc}), so it is not an mkultra soft prompt.", path
        ) from exc
    if not isinstance(document, dict) or not isinstance(document.get("tensor"), str):
        raise UnsupportedFormatError(
            "is JSON without a 'tensor' field, so it is not an mkultra soft prompt.", path
        )
    try:
        raw = base64.b64decode(document["tensor"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CorruptFileError("its 'tensor' field is not valid base64.", path) from exc
    try:
        tensor = _TensorOnlyUnpickler(raw, path).load()
    except UnsafeFileError:
        raise
    except _DeclaredTooLarge as exc:
        raise CorruptFileError(f"its pickled tensor {exc}; refused before allocating it.", path) from exc
    except pickle.UnpicklingError as exc:
        if "truncated" in str(exc):
            raise CorruptFileError("its pickled tensor is truncated (was the download cut short?).", path) from exc
        raise UnsafeFileError(
            f"its pickled tensor holds something other than plain tensors ({exc}); refused.",
            path,
        ) from exc
    except (EOFError, ValueError, TypeError, RuntimeError, AttributeError, MemoryError) as exc:
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
