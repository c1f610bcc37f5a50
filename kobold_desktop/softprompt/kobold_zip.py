"""KoboldAI soft prompt zips: `tensor.npy` and an optional `meta.json` at the root.

The zip is never extracted to disk. Listing reads the central directory, `meta.json`
and the first bytes of `tensor.npy`; loading streams the tensor through a bounded
read so a zip bomb cannot fill memory.
"""

from __future__ import annotations

import json
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import torch
import zipfile_deflate64  # noqa: F401  (teaches zipfile to read Deflate64, method 9)
import zipfile

from kobold_desktop.fileio import atomic_write_with
import kobold_desktop.softprompt.npy as npy
from kobold_desktop.softprompt.checks import check_finite, check_shape, check_token_limit
from kobold_desktop.softprompt.errors import (
    CorruptFileError,
    MissingTensorError,
    SoftPromptError,
    UnsupportedFormatError,
    ZipBombError,
)
from kobold_desktop.softprompt.types import (
    DEFAULT_LIMITS,
    Limits,
    Metadata,
    SoftPrompt,
    SoftPromptFormat,
)

TENSOR_NAME = "tensor.npy"
META_NAME = "meta.json"

COMPRESSION_NAMES = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    9: "deflate64",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}

# What a damaged member can raise while it is decompressed.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CorruptFileError(
            "is not a zip file, or it is truncated or damaged (was the download cut short?).",
            path,
        ) from exc
    except OSError as exc:
        raise SoftPromptError(f"cannot be read: {exc.strerror or exc}.", path) from exc


def _member(zf: zipfile.ZipFile, name: str, path: Path) -> zipfile.ZipInfo | None:
    try:
        info = zf.getinfo(name)
    except KeyError:
        return None
    if info.flag_bits & 0x1:
        raise UnsupportedFormatError(f"{name} is encrypted; re-zip it without a password.", path)
    if info.compress_type not in COMPRESSION_NAMES:
        raise UnsupportedFormatError(
            f"{name} is compressed with ZIP method {info.compress_type}, which is not "
            "supported; re-zip it with stored, deflate, bzip2 or LZMA compression.",
            path,
        )
    return info


PEFT_CONFIG_NAME = "adapter_config.json"


def layout(zf: zipfile.ZipFile, path: Path) -> tuple[str, str]:
    """What the zip holds and where: ("kobold", prefix) for tensor.npy, ("peft", prefix)
    for a PEFT adapter, the prefix being "" (the root) or "folder/" (the zip's one
    folder, as a file manager zips a folder, tokenizer files and all). macOS's
    `__MACOSX/` entries are ignored. Several soft prompts in one zip are refused."""
    found: dict[str, str] = {}
    for name in zf.namelist():
        if name.startswith("__MACOSX/") or name.endswith("/"):
            continue
        folder, _, base = name.rpartition("/")
        if base not in (TENSOR_NAME, PEFT_CONFIG_NAME) or folder.count("/") > 0:
            continue
        prefix = folder + "/" if folder else ""
        if base == TENSOR_NAME or prefix not in found:
            found[prefix] = "kobold" if base == TENSOR_NAME else "peft"
    if "" in found and found[""] == "kobold":
        return "kobold", ""  # KoboldAI's own layout wins, whatever else is beside it
    if len(found) == 1:
        prefix, kind = next(iter(found.items()))
        return kind, prefix
    if len(found) > 1:
        names = ", ".join(sorted((p.rstrip("/") or "(the root)") for p in found))
        raise UnsupportedFormatError(
            f"holds {len(found)} soft prompts ({names}); put each in a zip of its own.", path
        )
    nested = [n for n in zf.namelist() if n.endswith("/" + TENSOR_NAME) or n.endswith("/" + PEFT_CONFIG_NAME)]
    if nested:
        raise MissingTensorError(
            f"its soft prompt is in '{nested[0].rsplit('/', 1)[0]}/', more than one folder deep; "
            "zip the soft prompt's folder itself.",
            path,
        )
    raise MissingTensorError(
        "has no tensor.npy (KoboldAI) or adapter_config.json (PEFT), at its root or in its "
        "folder, so it holds no soft prompt.",
        path,
    )


def _tensor_member(zf: zipfile.ZipFile, path: Path, prefix: str = "") -> zipfile.ZipInfo:
    info = _member(zf, prefix + TENSOR_NAME, path)
    if info is None:
        raise MissingTensorError("has no tensor.npy, so it is not a KoboldAI soft prompt.", path)
    return info


def _read_meta(zf: zipfile.ZipFile, path: Path, limits: Limits, prefix: str = "") -> Metadata:
    info = _member(zf, prefix + META_NAME, path)
    if info is None:
        return Metadata()
    if info.file_size > limits.max_meta_bytes:
        raise ZipBombError(
            f"meta.json declares {info.file_size:,} bytes; metadata over "
            f"{limits.max_meta_bytes:,} bytes is refused.",
            path,
        )
    try:
        with zf.open(info) as handle:
            data = handle.read(limits.max_meta_bytes + 1)
    except _READ_ERRORS as exc:
        raise CorruptFileError(f"meta.json is damaged ({exc}).", path) from exc
    if len(data) > limits.max_meta_bytes:
        raise ZipBombError("meta.json is larger than it declares.", path)
    return Metadata.from_json_bytes(data)


def _check_sizes(
    info: zipfile.ZipInfo, header: npy.NpyHeader, path: Path, limits: Limits
) -> None:
    check_token_limit(header.shape[0], path, limits)
    needed = header.data_offset + header.payload_bytes
    if info.file_size > needed + limits.size_slack_bytes:
        raise ZipBombError(
            f"tensor.npy declares {info.file_size:,} bytes uncompressed, but a "
            f"{header.shape[0]} x {header.shape[1]} {header.dtype_name} tensor needs only "
            f"{needed:,}; refusing a possible zip bomb.",
            path,
        )
    if info.file_size < needed:
        raise CorruptFileError(
            f"tensor.npy declares {info.file_size:,} bytes, fewer than the {needed:,} its "
            "shape needs; the file is truncated.",
            path,
        )


class _LzmaHead:
    """Decompress just the start of an LZMA member, only as many bytes as asked for.

    zipfile decodes a whole 4 KB chunk to hand back the first byte; for listing we
    need ~128 bytes, and asking LZMA for only those makes a scan ~40x cheaper.
    """

    def __init__(self, path: Path, info: zipfile.ZipInfo):
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)
            if len(local) != 30 or not local.startswith(b"PK\x03\x04"):
                raise zipfile.BadZipFile("bad local file header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            handle.seek(name_len + extra_len, 1)
            head = handle.read(min(info.compress_size, npy.MAX_HEADER_BYTES + 4096))
        # ZIP's LZMA header: version (2 bytes), properties size (2), LZMA1 properties (5).
        if len(head) < 9 or struct.unpack("<H", head[2:4])[0] != 5:
            raise lzma.LZMAError("bad LZMA header in zip")
        props = head[4]
        lc, lp, pb = props % 9, (props // 9) % 5, props // 45
        dict_size = struct.unpack("<I", head[5:9])[0]
        filters = [{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}]
        self._decompressor = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)
        self._pending = head[9:]

    def read(self, size: int) -> bytes:
        out = b""
        while len(out) < size and not self._decompressor.eof:
            data, self._pending = (self._pending, b"") if self._decompressor.needs_input else (b"", self._pending)
            if self._decompressor.needs_input and not data:
                break
            out += self._decompressor.decompress(data, max_length=size - len(out))
        return out


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> npy.NpyHeader:
    try:
        if info.compress_type == zipfile.ZIP_LZMA:
            return npy.read_header(_LzmaHead(path, info), path)
        with zf.open(info) as handle:
            return npy.read_header(handle, path)
    except SoftPromptError:
        raise
    except _READ_ERRORS as exc:
        raise CorruptFileError(f"tensor.npy is damaged ({exc}).", path) from exc


def _peft_files(zf: zipfile.ZipFile, prefix: str):
    from kobold_desktop.softprompt.peft_dir import _ZippedFolder

    return _ZippedFolder(zf, prefix)


def describe(path: Path, limits: Limits = DEFAULT_LIMITS) -> SoftPrompt:
    """Read a zip's directory, meta.json and npy header; the tensor stays compressed.
    A PEFT adapter zipped with (or without) its folder is described from its config
    and safetensors header, read from the zip."""
    with _open(path) as zf:
        kind, prefix = layout(zf, path)
        if kind == "peft":
            import kobold_desktop.softprompt.peft_dir as peft_dir

            return peft_dir.describe(path, limits, _peft_files(zf, prefix), prefix.rstrip("/") or path.stem)
        info = _tensor_member(zf, path, prefix)
        header = _read_header(zf, info, path)
        _check_sizes(info, header, path, limits)
        meta = _read_meta(zf, path, limits, prefix)
    return SoftPrompt(
        path=path,
        format=SoftPromptFormat.KOBOLDAI_ZIP,
        name=meta.name or path.stem,
        n_tokens=header.shape[0],
        hidden_size=header.shape[1],
        dtype=header.dtype_name,
        compression=COMPRESSION_NAMES[info.compress_type],
        authors=meta.authors,
        description=meta.description,
        supported=meta.supported,
        meta=meta.raw,
        warnings=meta.warnings,
        big_endian=header.big_endian,
    )


def _read_exactly(handle: BinaryIO, count: int) -> bytes:
    chunks = []
    left = count
    while left:
        chunk = handle.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def load(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[SoftPrompt, torch.Tensor]:
    """Describe and fully read a zip: CRC, sizes, and every value finite."""
    with _open(path) as zf:
        kind, prefix = layout(zf, path)
        if kind == "peft":
            import kobold_desktop.softprompt.peft_dir as peft_dir

            return peft_dir.load(path, limits, _peft_files(zf, prefix), prefix.rstrip("/") or path.stem)
    softprompt = describe(path, limits)
    with _open(path) as zf:
        info = _tensor_member(zf, path, prefix)
        try:
            with zf.open(info) as handle:
                header = npy.read_header(handle, path)
                payload = _read_exactly(handle, header.payload_bytes)
                # Drain to the end so zipfile checks the CRC; bounded by the size check.
                trailing = _read_exactly(handle, limits.size_slack_bytes + 1)
        except SoftPromptError:
            raise
        except _READ_ERRORS as exc:
            raise CorruptFileError(f"tensor.npy is damaged ({exc}).", path) from exc
    if len(trailing) > limits.size_slack_bytes:
        raise ZipBombError("tensor.npy holds far more data than its shape needs.", path)
    tensor = npy.decode_payload(header, payload, path)
    check_finite(tensor, path)
    return softprompt, tensor


def write(
    dest: Path,
    tensor: torch.Tensor,
    meta: Metadata | dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write a zip the way KoboldAI's tuners do: LZMA `tensor.npy`, stored `meta.json`."""
    if isinstance(meta, Metadata):
        meta_map = meta.to_mapping()
    else:
        meta_map = dict(meta or {})
    check_shape(tuple(tensor.shape), dest)
    tensor_bytes = npy.encode(tensor)

    def fill(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr(TENSOR_NAME, tensor_bytes, compress_type=zipfile.ZIP_LZMA)
            zf.writestr(
                META_NAME,
                json.dumps(meta_map, ensure_ascii=False, indent=1).encode("utf-8"),
                compress_type=zipfile.ZIP_STORED,
            )

    atomic_write_with(dest, fill, overwrite=overwrite)
