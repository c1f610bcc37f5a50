"""One entry point for every format: describe, load, check against a model, convert."""

from __future__ import annotations

import re

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

import kobold_desktop.softprompt.kobold_zip as kobold_zip
import kobold_desktop.softprompt.mkultra as mkultra
import kobold_desktop.softprompt.peft_dir as peft_dir
from kobold_desktop.fileio import require_regular_file
from kobold_desktop.softprompt.errors import (
    CorruptFileError,
    SoftPromptError,
    writing,
    DestinationExistsError,
    HiddenSizeMismatchError,
    NotFoundError,
    UnsupportedFormatError,
)
from kobold_desktop.softprompt.types import DEFAULT_LIMITS, Limits, Metadata, SoftPrompt, SoftPromptFormat

ZIP_SUFFIX = ".zip"
T = TypeVar("T")


@dataclass(frozen=True)
class FormatHandler:
    """What the app can do with one format: describe it from its headers, load and
    validate it whole, and (unless it is read-only) write it."""

    format: SoftPromptFormat
    describe: Callable[[Path, Limits], SoftPrompt]
    load: Callable[[Path, Limits], tuple[SoftPrompt, torch.Tensor]]
    write: Callable[[Path, torch.Tensor, Metadata], object] | None = None


def _write_zip(path: Path, tensor: torch.Tensor, meta: Metadata) -> None:
    try:
        kobold_zip.write(path, tensor, meta, overwrite=False)
    except FileExistsError as exc:
        raise DestinationExistsError("already exists; choose a new name.", path) from exc


# The one table of formats. A zip holding a PEFT adapter is read by the zip handler.
FORMATS: dict[SoftPromptFormat, FormatHandler] = {
    SoftPromptFormat.KOBOLDAI_ZIP: FormatHandler(SoftPromptFormat.KOBOLDAI_ZIP, kobold_zip.describe,
                                                 kobold_zip.load, _write_zip),
    SoftPromptFormat.PEFT: FormatHandler(SoftPromptFormat.PEFT, peft_dir.describe, peft_dir.load, peft_dir.write),
    # mkultra files have no header to read: describing one loads it (and it is never written).
    SoftPromptFormat.MKULTRA_JSON: FormatHandler(SoftPromptFormat.MKULTRA_JSON,
                                                 lambda path, limits: mkultra.load(path, limits)[0], mkultra.load),
}


def format_of(path: Path) -> SoftPromptFormat:
    """Which format a file or folder is in, from its kind, suffix and first bytes."""
    if not path.exists():
        raise NotFoundError("does not exist.", path)
    if not path.is_dir():
        try:
            require_regular_file(path)
        except OSError as exc:
            raise UnsupportedFormatError("is not a regular file (a pipe, a device or a socket); "
                                         "it was not read.", path) from exc
    if path.is_dir():
        if peft_dir.is_peft_dir(path):
            return SoftPromptFormat.PEFT
        raise UnsupportedFormatError(
            "is a folder without adapter_config.json, so it is not a PEFT adapter.", path
        )
    if path.suffix.lower() == ".json":
        return SoftPromptFormat.MKULTRA_JSON
    if path.suffix.lower() == ZIP_SUFFIX:
        return SoftPromptFormat.KOBOLDAI_ZIP
    with open(path, "rb") as handle:
        if handle.read(4) == b"PK\x03\x04":
            return SoftPromptFormat.KOBOLDAI_ZIP
    raise UnsupportedFormatError(
        "is not a soft prompt: expected a KoboldAI .zip, a PEFT prompt-tuning folder or an "
        "mkultra .json file.",
        path,
    )


def destination_format(dst: Path) -> SoftPromptFormat:
    """What `convert` writes: a KoboldAI zip for a `.zip` name, else a PEFT adapter folder."""
    return SoftPromptFormat.KOBOLDAI_ZIP if dst.suffix.lower() == ZIP_SUFFIX else SoftPromptFormat.PEFT


def _guarded(read: Callable[[], T], path: Path) -> T:
    """Run a reader so that a file, however damaged or hostile, gives a SoftPromptError and
    nothing else. The format readers check what they know to check (sizes, views, dtypes);
    this catches what the libraries under them raise for damage nobody foresaw (zipfile,
    zlib, lzma, safetensors, torch's unpickler), so no stranger's exception reaches a user."""
    try:
        return read()
    except SoftPromptError:
        raise
    except MemoryError as exc:
        raise CorruptFileError("needs more memory than a soft prompt can; refused.", path) from exc
    except OSError as exc:
        raise CorruptFileError(f"cannot be read: {exc.strerror or exc}.", path) from exc
    except Exception as exc:  # noqa: BLE001 - see the docstring: damage shows as our error
        raise CorruptFileError(f"is damaged and cannot be read ({type(exc).__name__}).", path) from exc


def describe_softprompt(path: Path | str, limits: Limits = DEFAULT_LIMITS) -> SoftPrompt:
    """Describe a soft prompt from its headers (cheap; the tensor is not decompressed)."""
    path = Path(path)
    return _guarded(lambda: FORMATS[format_of(path)].describe(path, limits), path)


def load_softprompt(
    path: Path | str, limits: Limits = DEFAULT_LIMITS
) -> tuple[SoftPrompt, torch.Tensor]:
    """Read and fully validate a soft prompt: the description and its tensor."""
    path = Path(path)
    return _guarded(lambda: FORMATS[format_of(path)].load(path, limits), path)


@dataclass(frozen=True)
class Compatibility:
    ok: bool
    reason: str = ""
    warnings: tuple[str, ...] = ()


def _model_matches(supported: str, model_name: str) -> bool:
    def norm(name: str) -> str:  # "Demo Model" (a GGUF's general.name) is "demo-model"
        return re.sub(r"[\s_-]+", "-", name.strip().rstrip("/").lower())

    a, b = norm(supported), norm(model_name)
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def check_compatibility(
    softprompt: SoftPrompt, hidden_size: int | None, model_name: str | None = None, fingerprint: str | None = None
) -> Compatibility:
    """Whether a soft prompt fits a model: hidden size must match. Whether it was made for
    this model only warns: by the model's fingerprint (its vocabulary and shape,
    engine/fingerprint.py) when both are known, else by the names in `supported`."""
    if hidden_size is not None and softprompt.hidden_size != hidden_size:
        return Compatibility(
            False,
            f"made for a model with hidden size {softprompt.hidden_size}; this model has "
            f"{hidden_size}",
        )
    warnings: tuple[str, ...] = ()
    if fingerprint and softprompt.made_for:
        if softprompt.made_for != fingerprint:
            made_for = ", ".join(softprompt.supported) or "another model"
            warnings = (f"made for {made_for}, whose vocabulary or shape differ from "
                        f"{model_name or 'this model'}'s; it may work poorly with this model.",)
        return Compatibility(True, warnings=warnings)
    if model_name and softprompt.supported:
        if not any(_model_matches(s, model_name) for s in softprompt.supported):
            warnings = (
                f"made for {', '.join(softprompt.supported)}, not {model_name}; it may work "
                "poorly with this model.",
            )
    return Compatibility(True, warnings=warnings)


def require_compatible(
    softprompt: SoftPrompt, hidden_size: int, model_name: str | None = None, fingerprint: str | None = None
) -> tuple[str, ...]:
    """Raise `HiddenSizeMismatchError` if it cannot work; return the warnings otherwise."""
    result = check_compatibility(softprompt, hidden_size, model_name, fingerprint)
    if not result.ok:
        raise HiddenSizeMismatchError(result.reason + ".", softprompt.path)
    return result.warnings


def metadata_of(softprompt: SoftPrompt) -> Metadata:
    """The soft prompt's metadata as it should be written to another format."""
    meta = Metadata.from_mapping(softprompt.meta)
    return Metadata(
        name=softprompt.name,
        authors=softprompt.authors,
        description=softprompt.description,
        supported=softprompt.supported,
        raw=meta.raw,
    )


def convert(src: Path | str, dst: Path | str, limits: Limits = DEFAULT_LIMITS) -> SoftPrompt:
    """Convert between formats without loss: `dst` ending in .zip is a KoboldAI zip,
    anything else becomes a PEFT adapter folder. Never overwrites `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise DestinationExistsError("already exists; choose a new name.", dst)
    softprompt, tensor = load_softprompt(src, limits)
    with writing(dst):
        FORMATS[destination_format(dst)].write(dst, tensor, metadata_of(softprompt))
    return describe_softprompt(dst, limits)
