"""Writing a trained soft prompt where the library (and other tools) find it."""

from __future__ import annotations

from pathlib import Path

import torch

from kobold_desktop import paths
from kobold_desktop.softprompt import Metadata, kobold_zip, peft_dir
from kobold_desktop.softprompt.errors import DestinationExistsError
from kobold_desktop.softprompt.types import FINGERPRINT_KEY


def output_path(out: Path | str) -> Path:
    """A bare file name goes into the user's soft prompt folder, so it is in the library
    at once; a path with a folder is used as given."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        out = out.with_name(out.name + ".zip")
    if out.parent == Path("."):
        return paths.user_softprompt_dir() / out.name
    return out


def export_softprompt(
    tensor: torch.Tensor,
    out: Path | str,
    meta: Metadata,
    model_name: str,
    peft_out: Path | str | None = None,
    fingerprint: str | None = None,
) -> Path:
    """Write the KoboldAI zip (meta.json's `supported` names the base model, and
    `model_fingerprint` says what it is, engine/fingerprint.py) and, if asked, a PEFT
    adapter folder. Never overwrites."""
    zip_path = output_path(out)
    raw = {**meta.raw, **({FINGERPRINT_KEY: fingerprint} if fingerprint else {})}
    meta = Metadata(name=meta.name or zip_path.stem, authors=meta.authors, description=meta.description,
                    supported=(model_name,), raw=raw)
    if peft_out is not None and Path(peft_out).exists():
        raise DestinationExistsError("already exists; choose another folder for the PEFT adapter.", Path(peft_out))
    try:
        kobold_zip.write(zip_path, tensor, meta, overwrite=False)
    except FileExistsError as exc:
        raise DestinationExistsError("already exists; choose another name.", zip_path) from exc
    if peft_out is not None:
        peft_dir.write(Path(peft_out), tensor, meta, base_model=model_name)
    return zip_path
