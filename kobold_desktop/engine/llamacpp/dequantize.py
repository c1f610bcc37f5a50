"""A GGUF file's weights as a transformers model, for what needs gradients (tuning a soft
prompt, ranking soft prompts, learning a mixture's weights).

llama.cpp runs a GGUF but cannot backpropagate. transformers reads GGUF files itself
(`from_pretrained(folder, gguf_file=...)`, with the `gguf` package) and dequantizes every
tensor: the weights it trains through are exactly the numbers llama.cpp multiplies by (the
quantized values, dequantized), so a soft prompt made on them is made for this file. The
first time takes a while (about 30 s for a 135M model on 2 cores), so the result is saved
as a transformers folder in the user's cache (`dequantized/`), keyed by the file's name,
size and modification time and the precision, and the next run loads that at once. Before
it starts, the memory it needs is said and checked against what the machine has free.

transformers refuses to `save_pretrained` a model it read from a GGUF ("quantized with
gguf ... not serializable") although every weight is an ordinary tensor by then; the
quantizer's marks are dropped before saving.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kobold_desktop import paths
from kobold_desktop.engine.errors import ModelError

GGUF_PACKAGE_HINT = ("reading a GGUF file's weights for training needs the `gguf` package, part of the [gguf] "
                     "extra: pip install 'kobold-desktop[gguf]'.")
TRAINING_OVERHEAD = 1.6  # peak memory while tuning, as a multiple of the weights (activations, gradients)
DONE = "kobold-dequantized.json"


@dataclass(frozen=True)
class Plan:
    """What dequantizing a GGUF will take, said before it starts."""

    source: Path
    folder: Path  # where the transformers copy is (or will be) kept
    parameters: int
    dtype: torch.dtype
    cached: bool

    @property
    def weight_bytes(self) -> int:
        return self.parameters * torch.empty((), dtype=self.dtype).element_size()

    @property
    def need_bytes(self) -> int:
        return int(self.weight_bytes * TRAINING_OVERHEAD)

    def describe(self) -> str:
        what = f"{self.parameters / 1e6:,.0f}M parameters in {str(self.dtype).removeprefix('torch.')}"
        if self.cached:
            return f"the weights of '{self.source.name}' ({what}) were dequantized before: loading them from the cache"
        return (f"dequantizing '{self.source.name}' for training ({what}, about {gib(self.need_bytes)} of memory "
                f"with training); kept in {self.folder.parent} so the next time starts at once")


def gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def available_memory() -> int | None:
    """Bytes of memory free for a new process (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _gguf_reader():
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelError(GGUF_PACKAGE_HINT) from exc
    return GGUFReader


def count_parameters(path: Path) -> int:
    """Weights in the file (every tensor's elements), from its tensor table."""
    try:
        reader = _gguf_reader()(str(path), "r")
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - the gguf package's errors are its own
        raise ModelError(f"cannot read the tensors of '{path.name}' (a damaged or truncated file?): {exc}") from exc
    return int(sum(int(t.n_elements) for t in reader.tensors))


def cache_folder(path: Path, dtype: torch.dtype) -> Path:
    stat = path.stat()
    key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{str(dtype).removeprefix('torch.')}"
    return paths.user_cache_dir() / "dequantized" / key


def plan(path: str | Path, dtype: torch.dtype) -> Plan:
    path = Path(path).expanduser().resolve()
    folder = cache_folder(path, dtype)
    return Plan(path, folder, count_parameters(path), dtype, (folder / DONE).is_file())


def dequantized_folder(path: str | Path, dtype: torch.dtype, say: Callable[[str], None] = lambda m: None) -> Path:
    """A transformers folder holding the GGUF's weights dequantized to `dtype`, made once
    and then taken from the cache. Raises `ModelError` when memory or the `gguf` package
    is missing, or when transformers cannot read this architecture from a GGUF."""
    todo = plan(path, dtype)
    say(todo.describe())
    if todo.cached:
        return todo.folder
    free = available_memory()
    if free is not None and todo.need_bytes > free:
        raise ModelError(f"training on '{todo.source.name}' needs about {gib(todo.need_bytes)} of memory "
                         f"({todo.parameters / 1e6:,.0f}M parameters in {str(dtype).removeprefix('torch.')}); "
                         f"{gib(free)} is free. Close other programs, or train on a smaller model.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = todo.source
    try:
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except ImportError as exc:
        raise ModelError(GGUF_PACKAGE_HINT) from exc
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelError(f"transformers cannot read the weights of '{source.name}' for training: {exc}") from exc
    _forget_quantizer(model)
    partial = todo.folder.with_name(todo.folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / DONE).write_text(json.dumps({"gguf": str(source), "dtype": str(dtype),
                                                "parameters": todo.parameters}), encoding="utf-8")
        shutil.rmtree(todo.folder, ignore_errors=True)
        partial.rename(todo.folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return todo.folder


def _forget_quantizer(model) -> None:
    """Every weight is a plain tensor now: drop the marks that make transformers refuse to save."""
    model.hf_quantizer = None
    for holder in (model, getattr(model, "config", None)):
        if holder is None:
            continue
        for name in ("quantization_config", "_pre_quantization_dtype"):
            if name in getattr(holder, "__dict__", {}):
                delattr(holder, name)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    model.quantization_method = None
