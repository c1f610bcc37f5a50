"""Reading a GGUF file's metadata without llama.cpp: name, architecture, hidden size and
context length, so soft prompts can be checked against a GGUF model (and greyed with a
reason) before it is loaded, and even where the [gguf] extra is not installed.

GGUF (llama.cpp's docs/gguf.md): "GGUF", a uint32 version (2 or 3), uint64 tensor and
key-value counts, then key-value pairs, little-endian: a key (uint64 length, UTF-8), a
uint32 type, a value. Strings are a uint64 length and bytes; arrays are a uint32 element
type, a uint64 count and the elements.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from kobold_desktop.engine.errors import ModelError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    """A file that starts with the GGUF magic (or, when it cannot be read, ends in .gguf)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return path.suffix.lower() == ".gguf"
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelError("the GGUF file ends in the middle of its header.")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO, keep: bool = True) -> str | None:
    n = _read(f, "<Q")
    if n > 1 << 30:
        raise ModelError("the GGUF header has an impossible string length.")
    if not keep:
        f.seek(n, 1)
        return None
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == STRING:
        return _string(f, keep)
    if kind == ARRAY:
        inner, count = _read(f, "<I"), _read(f, "<Q")
        if inner in _SCALARS:  # skip fixed-size elements at once
            f.seek(struct.calcsize(_SCALARS[inner]) * count, 1)
        else:
            for _ in range(count):
                _value(f, inner, False)
        return None
    raise ModelError(f"the GGUF header has an unknown value type {kind}.")


def read_metadata(path: str | Path, wanted: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The header's scalar and string values (arrays are skipped). With `wanted`, reading
    stops once those keys (and the architecture) have been seen."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"'{path.name}' is not a GGUF file.")
            version = _read(f, "<I")
            if version not in (2, 3):
                raise ModelError(f"'{path.name}' is GGUF version {version}; versions 2 and 3 are read.")
            _read(f, "<Q")
            n_kv = _read(f, "<Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _string(f)
                kind = _read(f, "<I")
                meta[key] = _value(f, kind, True)
                arch = meta.get("general.architecture")
                if wanted and arch and all(k.format(arch=arch) in meta for k in wanted):
                    break
            return meta
    except OSError as exc:
        raise ModelError(f"cannot read '{path}': {exc.strerror or exc}") from exc


def gguf_info(path: str | Path) -> tuple[str, str, int, int | None]:
    """(name, architecture, hidden size, training context length) from the header."""
    path = Path(path).expanduser()
    meta = read_metadata(path, ("general.name", "{arch}.embedding_length", "{arch}.context_length"))
    arch = meta.get("general.architecture")
    hidden = meta.get(f"{arch}.embedding_length")
    if not arch or not isinstance(hidden, int):
        raise ModelError(f"'{path.name}' has no architecture or embedding length in its GGUF header.")
    context = meta.get(f"{arch}.context_length")
    return str(meta.get("general.name") or path.stem), str(arch), hidden, context if isinstance(context, int) else None
