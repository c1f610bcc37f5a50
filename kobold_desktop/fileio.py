"""Writing files so that a crash, a full disk or a name clash never destroys anything.

Everything is written to a temporary file in the destination folder first, flushed to
disk, and only then moved into place: either the old file or the new one is there,
never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def staged_file(dest: Path) -> Iterator[Path]:
    """A temporary path beside `dest`; removed on error or if never published."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        yield tmp_path
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def publish(staged: Path, dest: Path, *, overwrite: bool) -> None:
    """Move a fully written file or folder into place.

    With `overwrite=False` an existing `dest` raises FileExistsError and is left alone
    (a hard link for files makes the check and the move one atomic step).
    """
    if staged.is_file():
        _fsync(staged)
        if overwrite:
            os.replace(staged, dest)
            return
        try:
            os.link(staged, dest)
        except (AttributeError, NotImplementedError, PermissionError):
            # File systems without hard links (FAT, some network shares): check, then rename.
            if dest.exists():
                raise FileExistsError(dest) from None
            os.rename(staged, dest)
            return
        staged.unlink()
        return
    if dest.exists():
        if not overwrite:
            raise FileExistsError(dest)
        raise IsADirectoryError(dest)
    os.rename(staged, dest)


def atomic_write_bytes(dest: Path, data: bytes, *, overwrite: bool = True) -> None:
    with staged_file(dest) as tmp:
        tmp.write_bytes(data)
        publish(tmp, dest, overwrite=overwrite)


def atomic_write_with(dest: Path, write: Callable[[Path], None], *, overwrite: bool) -> None:
    """Call `write(tmp_path)` to fill a staged file, then publish it to `dest`."""
    with staged_file(dest) as tmp:
        write(tmp)
        publish(tmp, dest, overwrite=overwrite)


# -- reading files from outside -------------------------------------------------------------

MAX_JSON_DEPTH = 64  # objects and arrays inside one another; no file of ours nests past 10


class JsonError(ValueError):
    """A JSON document that is malformed or beyond our limits, in words for a user."""


def _depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(data: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> object:
    """json.loads with limits: nesting at most `max_depth` deep, numbers Python can hold
    (integers of over 4,300 digits and floats beyond float64 are refused, not rounded to
    infinity), UTF-8 text. Raises JsonError, and nothing else, for bad input."""
    import json
    import math

    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise JsonError(f"it is not UTF-8 text (byte {exc.start})") from None
    if _depth(text) > max_depth:
        raise JsonError(f"it nests deeper than {max_depth} levels")

    def parse_float(value: str) -> float:
        number = float(value)
        if not math.isfinite(number):
            raise JsonError(f"the number {value[:40]} is beyond what a float can hold")
        return number

    def parse_constant(name: str) -> float:
        raise JsonError(f"it holds {name}, which is not JSON")

    try:
        return json.loads(text, parse_float=parse_float, parse_constant=parse_constant)
    except JsonError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonError(f"it is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # integers past Python's digit limit
        raise JsonError(f"it holds a number too long to read ({str(exc)[:80]})") from None


def require_regular_file(path: Path) -> None:
    """Only regular files are read: a pipe would hang the reader and a device (a link to
    /dev/zero) would never end. Raises NotRegularFileError (an OSError) with a plain message."""
    import stat

    mode = os.stat(path).st_mode  # follows links: what would actually be read
    if not stat.S_ISREG(mode):
        kind = "a pipe" if stat.S_ISFIFO(mode) else "a device" if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) \
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise NotRegularFileError(f"'{path.name}' is {kind}, not a file; it was not read.")


class NotRegularFileError(OSError):
    """A pipe, device or socket where a file was expected."""


def read_limited(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` (limit + 1 are read, so callers can tell)."""
    require_regular_file(path)
    with open(path, "rb") as handle:
        return handle.read(limit + 1)
