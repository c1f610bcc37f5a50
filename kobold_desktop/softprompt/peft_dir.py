"""PEFT prompt-tuning adapters: a folder with `adapter_config.json` and the weights.

The weights are one tensor, `prompt_embeddings` `[num_virtual_tokens, token_dim]`, in
`adapter_model.safetensors` or, in older adapters, `adapter_model.bin` (read only with
`torch.load(weights_only=True)`, which cannot run code). PEFT has no place for a name or
description, so we keep KoboldAI's `meta.json` content in the safetensors metadata.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kobold_desktop.fileio import JsonError, parse_json, publish, read_limited, require_regular_file, staged_dir
from kobold_desktop.softprompt.checks import check_finite, check_shape, check_token_limit
from kobold_desktop.softprompt.errors import (
    BadShapeError,
    BadDtypeError,
    CorruptFileError,
    DestinationExistsError,
    MissingTensorError,
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

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
TENSOR_KEY = "prompt_embeddings"
META_KEY = "kobold_desktop.meta"
PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


MAX_CONFIG_BYTES = 1 << 20


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


class _Folder:
    """The adapter's files in a folder."""

    def __init__(self, path: Path):
        self.path = path

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read(self, name: str, limit: int) -> bytes:
        return read_limited(self.path / name, limit)

    def safetensors(self, name: str):
        require_regular_file(self.path / name)
        return safe_open(str(self.path / name), framework="pt")


class _ZippedFolder:
    """The adapter's files inside a zip (at its root or in its one folder), read from the
    zip in memory; nothing is extracted."""

    def __init__(self, zf: Any, prefix: str):
        self.zf, self.prefix = zf, prefix

    def exists(self, name: str) -> bool:
        return (self.prefix + name) in self.zf.namelist()

    def read(self, name: str, limit: int) -> bytes:
        with self.zf.open(self.prefix + name) as handle:
            return handle.read(limit + 1)

    def safetensors(self, name: str):
        return _ZippedSafetensors(self.zf, self.prefix + name)


class _ZippedSafetensors:
    """`safe_open`'s few calls we use, over a zip member: describing reads only the
    header; the tensor is read whole only when asked for, and only if the member is no
    bigger than its header says (safetensors' own loader then parses it)."""

    MAX_HEADER_BYTES = 1 << 20

    def __init__(self, zf: Any, member: str):
        self.zf, self.member = zf, member
        with zf.open(member) as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SafetensorError("the file is too short to be safetensors")
            self._header_size = int.from_bytes(prefix, "little")
            if self._header_size > self.MAX_HEADER_BYTES:
                raise SafetensorError("its header is implausibly large")
            raw = handle.read(self._header_size)
        try:
            self._header = parse_json(raw)
        except JsonError as exc:
            raise SafetensorError(f"its header is not JSON ({exc})") from exc
        if not isinstance(self._header, dict):
            raise SafetensorError("its header is not a JSON object")

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def keys(self) -> list[str]:
        return [k for k in self._header if k != "__metadata__"]

    def metadata(self) -> dict[str, str]:
        return self._header.get("__metadata__") or {}

    def get_slice(self, key: str):
        entry = self._header[key]
        return _Slice(tuple(entry.get("shape", ())), entry.get("dtype", ""))

    def get_tensor(self, key: str) -> torch.Tensor:
        from safetensors.torch import load as load_bytes

        ends = [e.get("data_offsets", [0, 0])[1] for k, e in self._header.items()
                if k != "__metadata__" and isinstance(e, dict)]
        size = 8 + self._header_size + max(ends, default=0)
        if self.zf.getinfo(self.member).file_size > size:
            raise SafetensorError("the file holds more data than its header declares")
        with self.zf.open(self.member) as handle:
            return load_bytes(handle.read(size + 1))[key]


class _Slice:
    def __init__(self, shape: tuple[int, ...], dtype: str):
        self._shape, self._dtype = shape, dtype

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._dtype


def _read_config(files: Any, path: Path) -> dict[str, Any]:
    try:
        if not files.exists(CONFIG_NAME):
            raise FileNotFoundError(CONFIG_NAME)
        data = files.read(CONFIG_NAME, MAX_CONFIG_BYTES)
        if len(data) > MAX_CONFIG_BYTES:
            raise CorruptFileError(f"{CONFIG_NAME} is far too large for an adapter config.", path)
        config = parse_json(data)
    except FileNotFoundError as exc:
        raise UnsupportedFormatError(
            f"is a folder without {CONFIG_NAME}, so it is not a PEFT adapter.", path
        ) from exc
    except JsonError as exc:
        raise CorruptFileError(f"{CONFIG_NAME} is not usable: {exc}.", path) from exc
    except OSError as exc:
        raise CorruptFileError(f"{CONFIG_NAME} cannot be read: {exc.strerror or exc}.", path) from exc
    if not isinstance(config, dict):
        raise CorruptFileError(f"{CONFIG_NAME} is not a JSON object.", path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PROMPT_PEFT_TYPES:
        raise UnsupportedFormatError(
            f"is a PEFT {peft_type or 'adapter of unknown type'}, not a prompt-tuning "
            "adapter; only PROMPT_TUNING and P_TUNING adapters are soft prompts.",
            path,
        )
    submodules = config.get("num_transformer_submodules")
    if submodules is not None and (isinstance(submodules, bool) or not isinstance(submodules, int)):
        raise CorruptFileError(f"{CONFIG_NAME} has num_transformer_submodules {str(submodules)[:40]!r}; "
                               "it must be a whole number (1 for causal language models).", path)
    if (submodules or 1) != 1:
        raise UnsupportedFormatError(
            "was trained for an encoder-decoder model (num_transformer_submodules is 2); "
            "only causal language models are supported.",
            path,
        )
    return config


def _weights_file(files: Any, path: Path) -> str:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if files.exists(name):
            return name
    raise MissingTensorError(
        f"has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}.", path
    )


def _load_bin(files: Any, path: Path, limits: Limits = DEFAULT_LIMITS) -> dict[str, torch.Tensor]:
    # The largest tensor the limits allow, plus room for the pickle around it.
    most = limits.max_tokens * limits.max_hidden_size * 8 + (1 << 20)
    try:
        data = files.read(BIN_NAME, most)
        if len(data) > most:
            raise CorruptFileError(f"{BIN_NAME} is larger than any soft prompt can be.", path)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{BIN_NAME} contains Python objects that are not plain tensors; loading it could "
            "run code, so it is refused.",
            path,
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{BIN_NAME} is damaged ({exc}).", path) from exc
    if not isinstance(state, dict):
        raise CorruptFileError(f"{BIN_NAME} does not hold a dictionary of tensors.", path)
    return state


def _header(files: Any, path: Path) -> tuple[tuple[int, ...], str, Metadata, str]:
    """(shape, dtype name, metadata, compression) without reading the tensor data."""
    weights = _weights_file(files, path)
    if weights == SAFETENSORS_NAME:
        try:
            with files.safetensors(weights) as handle:
                if TENSOR_KEY not in handle.keys():
                    raise MissingTensorError(
                        f"{SAFETENSORS_NAME} has no '{TENSOR_KEY}' tensor.", path
                    )
                tensor_slice = handle.get_slice(TENSOR_KEY)
                shape = tuple(tensor_slice.get_shape())
                st_dtype = tensor_slice.get_dtype()
                file_meta = handle.metadata() or {}
        except SafetensorError as exc:
            raise CorruptFileError(f"{SAFETENSORS_NAME} is damaged ({exc}).", path) from exc
        if st_dtype not in _SAFETENSORS_DTYPES:
            raise BadDtypeError(
                f"'{TENSOR_KEY}' holds {st_dtype} values; a soft prompt must hold floats.", path
            )
        raw_meta = file_meta.get(META_KEY)
        meta = Metadata.from_json_bytes(raw_meta.encode("utf-8")) if raw_meta else Metadata()
        return shape, _SAFETENSORS_DTYPES[st_dtype], meta, "safetensors"
    tensor = _load_bin(files, path).get(TENSOR_KEY)
    if not isinstance(tensor, torch.Tensor):
        raise MissingTensorError(f"{BIN_NAME} has no '{TENSOR_KEY}' tensor.", path)
    if tensor.layout != torch.strided:
        raise BadShapeError(f"'{TENSOR_KEY}' in {BIN_NAME} is stored as a {tensor.layout} tensor; a soft "
                            "prompt is a plain (strided) one.", path)
    if tensor.dtype not in _DTYPE_NAMES:
        raise BadDtypeError(
            f"'{TENSOR_KEY}' holds {tensor.dtype} values; a soft prompt must hold floats.", path
        )
    return tuple(tensor.shape), _DTYPE_NAMES[tensor.dtype], Metadata(), "bin"


def describe(path: Path, limits: Limits = DEFAULT_LIMITS, files: Any = None, name: str | None = None) -> SoftPrompt:
    """Read the adapter's config and tensor header (from `files`: the folder at `path`
    by default, or a folder inside the zip at `path`)."""
    files = files or _Folder(path)
    config = _read_config(files, path)
    shape, dtype_name, meta, compression = _header(files, path)
    check_shape(shape, path, limits)
    n_tokens, hidden = shape
    declared = (config.get("num_virtual_tokens"), config.get("token_dim"))
    if declared[0] not in (None, n_tokens) or declared[1] not in (None, hidden):
        raise CorruptFileError(
            f"{CONFIG_NAME} declares {declared[0]} virtual tokens of size {declared[1]}, but "
            f"'{TENSOR_KEY}' is {n_tokens} x {hidden}.",
            path,
        )
    check_token_limit(n_tokens, path, limits)
    base_model = config.get("base_model_name_or_path")
    supported = meta.supported or ((str(base_model),) if base_model else ())
    return SoftPrompt(
        path=path,
        format=SoftPromptFormat.PEFT,
        name=meta.name or name or path.name,
        n_tokens=n_tokens,
        hidden_size=hidden,
        dtype=dtype_name,
        compression=compression,
        authors=meta.authors,
        description=meta.description,
        supported=supported,
        meta=meta.raw,
        warnings=meta.warnings,
    )


def load(path: Path, limits: Limits = DEFAULT_LIMITS, files: Any = None,
         name: str | None = None) -> tuple[SoftPrompt, torch.Tensor]:
    files = files or _Folder(path)
    softprompt = describe(path, limits, files, name)
    weights = _weights_file(files, path)
    if weights == SAFETENSORS_NAME:
        try:
            with files.safetensors(weights) as handle:
                tensor = handle.get_tensor(TENSOR_KEY)
        except SafetensorError as exc:
            raise CorruptFileError(f"{SAFETENSORS_NAME} is damaged ({exc}).", path) from exc
    else:
        tensor = _load_bin(files, path, limits)[TENSOR_KEY]
    if tensor.dtype == torch.float64:
        tensor = tensor.to(torch.float32)
    tensor = tensor.contiguous()
    check_finite(tensor, path)
    return softprompt, tensor


def write(
    dest: Path,
    tensor: torch.Tensor,
    meta: Metadata | None = None,
    *,
    base_model: str | None = None,
) -> None:
    """Write an adapter folder that `PeftModel.from_pretrained` loads as-is."""
    meta = meta or Metadata()
    check_shape(tuple(tensor.shape), dest)
    if dest.exists():
        raise DestinationExistsError("already exists; choose another name.", dest)
    n_tokens, hidden = tensor.shape
    supported = base_model or (meta.supported[0] if meta.supported else None)
    config = {
        "task_type": "CAUSAL_LM",
        "peft_type": "PROMPT_TUNING",
        "auto_mapping": None,
        "base_model_name_or_path": supported,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": n_tokens,
        "token_dim": hidden,
        "num_transformer_submodules": 1,
        "num_attention_heads": None,
        "num_layers": None,
        "modules_to_save": None,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    with staged_dir(dest) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(
            {TENSOR_KEY: tensor.detach().cpu().contiguous()},
            str(tmp / SAFETENSORS_NAME),
            metadata={"format": "pt", META_KEY: json.dumps(meta.to_mapping())},
        )
        try:
            publish(tmp, dest, overwrite=False)
        except FileExistsError as exc:
            raise DestinationExistsError("already exists; choose another name.", dest) from exc
