"""PEFT prompt-tuning adapters: a folder with `adapter_config.json` and the weights.

The weights are one tensor, `prompt_embeddings` `[num_virtual_tokens, token_dim]`, in
`adapter_model.safetensors` or, in older adapters, `adapter_model.bin` (read only with
`torch.load(weights_only=True)`, which cannot run code). PEFT has no place for a name or
description, so we keep KoboldAI's `meta.json` content in the safetensors metadata.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kobold_desktop.fileio import publish, staged_dir
from kobold_desktop.softprompt.checks import check_finite, check_shape, check_token_limit
from kobold_desktop.softprompt.errors import (
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


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UnsupportedFormatError(
            f"is a folder without {CONFIG_NAME}, so it is not a PEFT adapter.", path
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{CONFIG_NAME} is not valid JSON ({exc}).", path) from exc
    if not isinstance(config, dict):
        raise CorruptFileError(f"{CONFIG_NAME} is not a JSON object.", path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PROMPT_PEFT_TYPES:
        raise UnsupportedFormatError(
            f"is a PEFT {peft_type or 'adapter of unknown type'}, not a prompt-tuning "
            "adapter; only PROMPT_TUNING and P_TUNING adapters are soft prompts.",
            path,
        )
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedFormatError(
            "was trained for an encoder-decoder model (num_transformer_submodules is 2); "
            "only causal language models are supported.",
            path,
        )
    return config


def _weights_file(path: Path) -> Path:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (path / name).is_file():
            return path / name
    raise MissingTensorError(
        f"has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}.", path
    )


def _load_bin(weights: Path, path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
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


def _header(path: Path) -> tuple[tuple[int, ...], str, Metadata, str]:
    """(shape, dtype name, metadata, compression) without reading the tensor data."""
    weights = _weights_file(path)
    if weights.name == SAFETENSORS_NAME:
        try:
            with safe_open(str(weights), framework="pt") as handle:
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
    tensor = _load_bin(weights, path).get(TENSOR_KEY)
    if not isinstance(tensor, torch.Tensor):
        raise MissingTensorError(f"{BIN_NAME} has no '{TENSOR_KEY}' tensor.", path)
    if tensor.dtype not in _DTYPE_NAMES:
        raise BadDtypeError(
            f"'{TENSOR_KEY}' holds {tensor.dtype} values; a soft prompt must hold floats.", path
        )
    return tuple(tensor.shape), _DTYPE_NAMES[tensor.dtype], Metadata(), "bin"


def describe(path: Path, limits: Limits = DEFAULT_LIMITS) -> SoftPrompt:
    """Read the adapter's config and tensor header."""
    config = _read_config(path)
    shape, dtype_name, meta, compression = _header(path)
    check_shape(shape, path)
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
        name=meta.name or path.name,
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


def load(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[SoftPrompt, torch.Tensor]:
    softprompt = describe(path, limits)
    weights = _weights_file(path)
    if weights.name == SAFETENSORS_NAME:
        try:
            with safe_open(str(weights), framework="pt") as handle:
                tensor = handle.get_tensor(TENSOR_KEY)
        except SafetensorError as exc:
            raise CorruptFileError(f"{SAFETENSORS_NAME} is damaged ({exc}).", path) from exc
    else:
        tensor = _load_bin(weights, path)[TENSOR_KEY]
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
