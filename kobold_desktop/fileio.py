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
