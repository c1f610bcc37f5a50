"""The `SoftPrompt` value every part of the app passes around, and the read limits."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kobold_desktop.fileio import JsonError, parse_json



class SoftPromptFormat(str, enum.Enum):
    KOBOLDAI_ZIP = "koboldai-zip"
    PEFT = "peft"
    MKULTRA_JSON = "mkultra-json"


@dataclass(frozen=True)
class Limits:
    """What a soft prompt may be before it is refused."""

    max_tokens: int = 2048
    # Far beyond any model (the largest have 16-25k); a header declaring more is refused
    # before any tensor memory is allocated, so a tiny file cannot ask for gigabytes.
    max_hidden_size: int = 65536
    # What a soft prompt may cost once in memory as float32, whatever its file holds
    # (float64, a zero-stride view, a 1 KB zip that declares 2048 x 65536): 256 MiB is
    # 2,048 tokens of the widest models there are (about 25,000) with room to spare.
    max_float32_bytes: int = 256 << 20
    max_meta_bytes: int = 1 << 20
    # Uncompressed bytes allowed beyond what the header and shape need (npy padding).
    size_slack_bytes: int = 64 * 1024


DEFAULT_LIMITS = Limits()


# The fingerprint of the model a soft prompt was made on (engine/fingerprint.py), kept in its
# metadata: meta.json in a KoboldAI zip, our metadata entry in a PEFT adapter's safetensors.
FINGERPRINT_KEY = "model_fingerprint"


@dataclass(frozen=True)
class SoftPrompt:
    """A soft prompt file described from its headers; the tensor loads on demand.

    Building one reads only the zip directory, `meta.json` and the tensor header (or
    the PEFT config and safetensors header), so listing a thousand is cheap.
    `softprompt.io.load_softprompt(path)` reads and validates everything.
    """

    path: Path
    format: SoftPromptFormat
    name: str
    n_tokens: int
    hidden_size: int
    dtype: str  # as stored: float16, bfloat16, float32 or float64
    compression: str  # stored, deflate, deflate64, bzip2, lzma; safetensors or bin for PEFT
    authors: tuple[str, ...] = ()
    description: str = ""
    supported: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    warnings: tuple[str, ...] = ()
    big_endian: bool = False

    @property
    def author(self) -> str:
        return ", ".join(self.authors)

    @property
    def made_for(self) -> str | None:
        """The fingerprint of the model it was made on, when its metadata says."""
        value = self.meta.get(FINGERPRINT_KEY) if isinstance(self.meta, Mapping) else None
        return value if isinstance(value, str) and value else None

    @property
    def file_name(self) -> str:
        return self.path.name

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (used by `softprompt inspect --json`)."""
        return {
            "name": self.name,
            "file": self.file_name,
            "path": str(self.path),
            "format": self.format.value,
            "n_tokens": self.n_tokens,
            "hidden_size": self.hidden_size,
            "dtype": self.dtype,
            "byte_order": "big" if self.big_endian else "little",
            "compression": self.compression,
            "authors": list(self.authors),
            "description": self.description,
            "supported": list(self.supported),
            "meta": dict(self.meta),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Metadata:
    """The parsed `meta.json` (all keys optional; unknown keys kept in `raw`)."""

    name: str | None = None
    authors: tuple[str, ...] = ()
    description: str = ""
    supported: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_json_bytes(cls, data: bytes | None) -> "Metadata":
        """Parse leniently: a broken meta.json costs the metadata, not the soft prompt."""
        if data is None:
            return cls()
        try:
            raw = parse_json(data.removeprefix(b"\xef\xbb\xbf"))
        except JsonError as exc:
            return cls(warnings=(f"meta.json was ignored: {exc}.",))
        if not isinstance(raw, dict):
            return cls(warnings=("meta.json is not a JSON object; its metadata was ignored.",))
        return cls.from_mapping(raw)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "Metadata":
        name = raw.get("name")
        author = raw.get("author")
        if isinstance(author, str):
            authors: tuple[str, ...] = (author,) if author.strip() else ()
        elif isinstance(author, list):
            authors = tuple(str(a) for a in author if str(a).strip())
        elif author is None:
            authors = ()
        else:
            authors = (str(author),)
        supported = raw.get("supported")
        if isinstance(supported, str):
            supported_t: tuple[str, ...] = (supported,)
        elif isinstance(supported, list):
            supported_t = tuple(str(s) for s in supported)
        else:
            supported_t = ()
        description = raw.get("description")
        return cls(
            name=str(name).strip() or None if name is not None else None,
            authors=authors,
            description=str(description) if description is not None else "",
            supported=supported_t,
            raw=dict(raw),
        )

    def to_mapping(self) -> dict[str, Any]:
        """meta.json content: the original keys, with ours updated."""
        out = dict(self.raw)
        if self.name is not None:
            out["name"] = self.name
        if self.authors:
            out["author"] = self.authors[0] if len(self.authors) == 1 else list(self.authors)
        if self.description:
            out["description"] = self.description
        if self.supported:
            out["supported"] = list(self.supported)
        return out
