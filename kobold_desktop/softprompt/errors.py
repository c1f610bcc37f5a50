"""Why a soft prompt file was refused.

Each subclass names one reason so callers and tests can tell them apart; the message
always names the file and says what to do about it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from kobold_desktop.errors import KoboldError


class SoftPromptError(KoboldError):
    """A soft prompt file could not be read or does not fit."""

    def __init__(self, message: str, path: Path | str | None = None):
        self.path = Path(path) if path is not None else None
        self.reason = message
        prefix = f"{self.path.name}: " if self.path is not None else ""
        super().__init__(prefix + message)


class UnsupportedFormatError(SoftPromptError):
    """Not a KoboldAI zip, a PEFT prompt-tuning folder or an mkultra JSON file."""


class CorruptFileError(SoftPromptError):
    """Truncated, damaged, or not the archive it claims to be."""


class MissingTensorError(SoftPromptError):
    """The archive has no `tensor.npy` at its root."""


class UnsafeFileError(SoftPromptError):
    """The file would need unpickling arbitrary Python objects to read."""


class BadShapeError(SoftPromptError):
    """The tensor is not 2-D, or has zero rows or columns."""


class BadDtypeError(SoftPromptError):
    """Integers, complex numbers, strings... anything but floating point."""


class NonFiniteError(SoftPromptError):
    """NaN or infinity somewhere in the tensor."""


class TooManyTokensError(SoftPromptError):
    """More virtual tokens than the configured limit."""


class ZipBombError(SoftPromptError):
    """Declared or actual uncompressed size far beyond what the tensor's shape needs."""


class HiddenSizeMismatchError(SoftPromptError):
    """Made for a model with another hidden size."""


class DestinationExistsError(SoftPromptError):
    """Writing would overwrite an existing file or folder."""


class NotFoundError(SoftPromptError):
    """No soft prompt by that name or path."""


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Around a write of `path`: a full disk, a file-size limit or a writer's own failure
    (safetensors', zipfile's) becomes a SoftPromptError naming the file. Writers stage into
    a temporary file first, so nothing half-written is left. FileExistsError passes (the
    callers pick another name)."""
    try:
        yield
    except (SoftPromptError, FileExistsError):
        raise
    except OSError as exc:
        raise SoftPromptError(f"cannot be written: {exc.strerror or exc} (nothing was left half-written).",
                              path) from exc
    except Exception as exc:  # noqa: BLE001 - a writer's own error, in our words
        raise SoftPromptError(f"cannot be written ({type(exc).__name__}: {str(exc)[:120]}); nothing was left "
                              "half-written.", path) from exc
