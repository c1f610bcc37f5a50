"""The soft prompts the app knows: the user's folder plus the bundled examples.

Scanning reads only headers and is cached by (size, mtime), so refreshing after a
change re-reads only what changed. Imports validate first and then copy the zip (never
extracted) or the PEFT folder in under a safe, unique name; nothing is ever
overwritten. Names a user typed are never joined onto a folder as given.
"""

from __future__ import annotations

import re
import shutil
import threading
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from kobold_desktop import paths
from kobold_desktop.fileio import publish, staged_dir, staged_file
from kobold_desktop.settings import Settings
import kobold_desktop.softprompt.kobold_zip as kobold_zip
import kobold_desktop.softprompt.peft_dir as peft_dir
from kobold_desktop.softprompt.errors import (
    writing,
    DestinationExistsError,
    NotFoundError,
    SoftPromptError,
)
from kobold_desktop.softprompt.io import (
    Compatibility,
    check_compatibility,
    describe_softprompt,
    load_softprompt,
    metadata_of,
)
from kobold_desktop.softprompt.mixture import Mixture, is_mixture_file, read_mixture, resolve_member
from kobold_desktop.softprompt.types import DEFAULT_LIMITS, Limits, SoftPrompt, SoftPromptFormat

if TYPE_CHECKING:
    import torch

SELECTION_KEY = "softprompt.selected"

_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {
    f"lpt{i}" for i in range(1, 10)
}
_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')


def safe_stem(name: str, fallback: str = "softprompt") -> str:
    """A file name stem that is the same on every OS and can never leave its folder."""
    stem = unicodedata.normalize("NFC", name)
    stem = _UNSAFE_CHARS.sub("_", stem)
    stem = re.sub(r"\.{2,}", ".", stem)
    stem = stem.strip(" .")[:100].strip(" .")
    if stem.lower().endswith(".zip"):
        stem = stem[:-4].rstrip(" .")
    if not stem or stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        stem = f"{stem}_" if stem else fallback
    return stem


@dataclass(frozen=True)
class LibraryEntry:
    """One file or folder in a library folder: a soft prompt, a mixture of soft prompts,
    or why it is neither."""

    path: Path
    folder: Path
    writable: bool
    softprompt: SoftPrompt | None = None
    error: SoftPromptError | None = None
    mixture: Mixture | None = None
    members: tuple["LibraryEntry | None", ...] = ()  # a mixture's members as found (None: missing)

    @property
    def valid(self) -> bool:
        return self.softprompt is not None or self.mixture is not None

    @property
    def is_mixture(self) -> bool:
        return self.mixture is not None

    @property
    def name(self) -> str:
        if self.mixture is not None:
            return self.mixture.name
        return self.softprompt.name if self.softprompt else self.path.name

    @property
    def n_tokens(self) -> int:
        """Soft prompt rows (a mixture's longest member's); 0 when unreadable."""
        if self.mixture is not None:
            return max((m.softprompt.n_tokens for m in self.members if m is not None), default=0)
        return self.softprompt.n_tokens if self.softprompt else 0

    @property
    def file_name(self) -> str:
        return self.path.name

    def compatibility(self, hidden_size: int | None, model_name: str | None = None,
                      fingerprint: str | None = None) -> Compatibility:
        if self.mixture is not None:
            warnings: list[str] = []
            for member, found in zip(self.mixture.members, self.members):
                if found is None:
                    return Compatibility(False, f"member '{member.softprompt}' is missing")
                compat = found.compatibility(hidden_size, model_name, fingerprint)
                if not compat.ok:
                    return Compatibility(False, f"member '{member.softprompt}': {compat.reason}")
                warnings += compat.warnings
            return Compatibility(True, "", tuple(warnings))
        if self.softprompt is None:
            return Compatibility(False, self.error.reason if self.error else "unreadable")
        return check_compatibility(self.softprompt, hidden_size, model_name, fingerprint)

    def to_dict(self) -> dict:
        if self.mixture is not None:
            data = {"name": self.name, "path": str(self.path), "file": self.file_name, "format": "mixture",
                    "mode": self.mixture.mode,
                    "members": [{"softprompt": m.softprompt, "weight": w, "found": found is not None}
                                for m, w, found in zip(self.mixture.members, self.mixture.weights, self.members)],
                    "n_tokens": self.n_tokens,
                    "warnings": []}
        elif self.softprompt:
            data = self.softprompt.to_dict()
        else:
            data = {"name": self.name, "path": str(self.path), "file": self.file_name}
        data["writable"] = self.writable
        data["valid"] = self.valid
        if self.error is not None:
            data["error"] = self.error.reason
        return data


def same_file(a: Path, b: Path) -> bool:
    """The same file, however the paths are written (relative, `..`, a symlink)."""
    if a == b:
        return True
    try:
        if a.name != b.name and not (a.is_symlink() or b.is_symlink()):
            return False  # the common case, with no path resolution: the panel asks this of every row
        return a.resolve() == b.resolve()
    except OSError:
        return False


def resolve_softprompt(name_or_path: str | Path, library: "SoftPromptLibrary | None" = None) -> Path:
    """`SoftPromptLibrary.resolve` on the default library (the user's folder and the examples)."""
    return (library or SoftPromptLibrary()).resolve(name_or_path)


def _is_candidate(path: Path) -> bool:
    if path.name.startswith("."):
        return False  # hidden files, and our own half-written `.name.part` files
    if path.is_dir():
        return peft_dir.is_peft_dir(path)
    return path.suffix.lower() in (".zip", ".json")


def _stamp(path: Path) -> tuple[int, int]:
    """Size and newest mtime: changes whenever the soft prompt's content can have."""
    if path.is_dir():
        stats = [p.stat() for p in path.iterdir() if p.is_file()]
        return (sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class SoftPromptLibrary:
    """Soft prompts from the user's folder (writable) and read-only extra folders."""

    def __init__(
        self,
        user_folder: Path | None = None,
        extra_folders: Sequence[Path] | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        settings: Settings | None = None,
    ):
        self.user_folder = Path(user_folder) if user_folder else paths.user_softprompt_dir()
        self.user_folder.mkdir(parents=True, exist_ok=True)
        if extra_folders is None:
            extra_folders = [paths.bundled_softprompt_dir()]
        self.extra_folders = [Path(f) for f in extra_folders]
        self.limits = limits
        self._settings = settings
        self._cache: dict[Path, tuple[tuple[int, int], LibraryEntry]] = {}
        self._entries: list[LibraryEntry] = []
        # Scans may run on the window's file runner and the GUI thread at once; one at a time.
        self._lock = threading.RLock()

    @property
    def folders(self) -> list[Path]:
        seen: list[Path] = []
        for folder in [self.user_folder, *self.extra_folders]:
            if folder.resolve() not in [s.resolve() for s in seen]:
                seen.append(folder)
        return seen

    @property
    def entries(self) -> list[LibraryEntry]:
        """The result of the last scan (scan first)."""
        return list(self._entries)

    def scan(self) -> list[LibraryEntry]:
        """List every soft prompt in the folders, reading only what changed since last time."""
        with self._lock:
            return self._scan()

    def _scan(self) -> list[LibraryEntry]:
        fresh: dict[Path, tuple[tuple[int, int], LibraryEntry]] = {}
        for folder in self.folders:
            writable = folder.resolve() == self.user_folder.resolve()
            try:
                candidates = sorted(p for p in folder.iterdir() if _is_candidate(p))
            except OSError:
                continue  # a missing bundled folder is not an error
            for path in candidates:
                try:
                    stamp = _stamp(path)
                except OSError:
                    continue  # deleted while we looked
                cached = self._cache.get(path)
                if cached and cached[0] == stamp:
                    fresh[path] = cached
                    continue
                try:
                    if is_mixture_file(path):
                        entry = LibraryEntry(path, folder, writable, mixture=read_mixture(path))
                    else:
                        entry = LibraryEntry(path, folder, writable, describe_softprompt(path, self.limits))
                except SoftPromptError as exc:
                    entry = LibraryEntry(path, folder, writable, error=exc)
                fresh[path] = (stamp, entry)
        self._cache = fresh
        by_path = {path: entry for path, (_, entry) in fresh.items()}
        entries = [self._with_members(entry, by_path) for entry in by_path.values()]
        self._entries = sorted(entries, key=lambda e: (not e.writable, e.name.casefold(), e.file_name))
        return self.entries

    def _with_members(self, entry: LibraryEntry, by_path: dict[Path, LibraryEntry]) -> LibraryEntry:
        """A mixture's members, found by the loaders' rule (`mixture.resolve_member`):
        beside it first, then in every library folder. The file the loader would read is
        the one shown; None when it is missing or unreadable."""
        if entry.mixture is None:
            return entry
        members = []
        for member in entry.mixture.members:
            try:
                found = by_path.get(resolve_member(entry.mixture, member, self.folders))
            except SoftPromptError:  # missing, or a link out of the folders
                found = None
            members.append(found if found is not None and found.softprompt is not None else None)
        return replace(entry, members=tuple(members))

    refresh = scan

    def resolve(self, name_or_path: str | Path) -> Path:
        """A soft prompt given as a path (zip, PEFT folder, mkultra or mixture .json) or by
        its name in the library: the one way every command, the window and the server
        turn what a user typed into a file."""
        path = Path(name_or_path).expanduser()
        if path.exists():
            return path
        return self.find(name_or_path).path

    def _lookup(self, path: Path) -> LibraryEntry | None:
        """The scanned entry of a file: the one matching rule (`same_file`) every lookup uses."""
        if not self._entries:
            self.scan()
        return next((entry for entry in self._entries if same_file(entry.path, path)), None)

    def entry_for(self, path: Path | str) -> LibraryEntry:
        """The library's entry for a file, or (for a file outside the library folders) an
        entry described the same way, read-only."""
        path = Path(path)
        entry = self._lookup(path)
        if entry is not None:
            return entry
        try:
            if is_mixture_file(path):
                entry = LibraryEntry(path, path.parent, False, mixture=read_mixture(path))
                return self._with_members(entry, {e.path: e for e in self._entries})
            return LibraryEntry(path, path.parent, False, describe_softprompt(path, self.limits))
        except SoftPromptError as exc:
            return LibraryEntry(path, path.parent, False, error=exc)

    def find(self, name_or_path: str | Path) -> LibraryEntry:
        """A soft prompt by path, by name, or by file name (case-insensitive)."""
        candidate = Path(name_or_path)
        entry = self._lookup(candidate) if candidate.exists() else None
        if entry is not None:
            return entry
        if not self._entries:
            self.scan()
        wanted = str(name_or_path).casefold()
        for key in (
            lambda e: e.name.casefold(),
            lambda e: e.file_name.casefold(),
            lambda e: e.path.stem.casefold(),
        ):
            for entry in self._entries:
                if key(entry) == wanted:
                    return entry
        raise NotFoundError(
            f"no soft prompt named '{name_or_path}' in {', '.join(str(f) for f in self.folders)}."
        )

    # -- changing the user's folder ------------------------------------------------------

    def _unique_path(self, stem: str, suffix: str) -> Path:
        stem = safe_stem(stem)
        candidate = self.user_folder / f"{stem}{suffix}"
        counter = 2
        while candidate.exists():
            candidate = self.user_folder / f"{stem} ({counter}){suffix}"
            counter += 1
        return candidate

    def free_path(self, name: str, suffix: str) -> Path:
        """A path in the user's folder for a new file: a safe name that is not taken."""
        return self._unique_path(name, suffix)

    def _entry_for(self, path: Path) -> LibraryEntry:
        self.scan()
        entry = self._lookup(path)
        if entry is None:
            raise NotFoundError("vanished right after it was written.", path)
        return entry

    def import_path(self, source: Path | str) -> LibraryEntry:
        """Validate `source` fully, then copy it into the user's folder.

        Zips (KoboldAI's, or a zipped PEFT adapter) are copied byte for byte (never
        extracted), PEFT folders keep only their config and weights, mkultra JSON becomes a
        KoboldAI zip (no pickles kept).
        """
        source = Path(source)
        if is_mixture_file(source):
            return self._import_mixture(source)
        softprompt, tensor = load_softprompt(source, self.limits)
        stem = source.stem if source.is_file() else source.name
        for _attempt in range(100):
            try:
                with writing(self.user_folder / stem):
                    dest = self._write_import(source, softprompt, tensor, stem)
            except FileExistsError:
                continue  # another process took the name between our check and the write
            return self._entry_for(dest)
        raise DestinationExistsError("could not find a free file name.", source)

    def _write_import(self, source: Path, softprompt: SoftPrompt, tensor: torch.Tensor, stem: str) -> Path:
        if softprompt.format is SoftPromptFormat.KOBOLDAI_ZIP or (
                source.is_file() and source.suffix.lower() == ".zip"):  # a zipped PEFT adapter too
            dest = self._unique_path(stem, ".zip")
            with staged_file(dest) as tmp:
                shutil.copyfile(source, tmp)
                publish(tmp, dest, overwrite=False)
        elif softprompt.format is SoftPromptFormat.PEFT:
            dest = self._unique_path(stem, "")
            with staged_dir(dest) as tmp:
                for name in (peft_dir.CONFIG_NAME, peft_dir.SAFETENSORS_NAME, peft_dir.BIN_NAME):
                    if (source / name).is_file():
                        shutil.copyfile(source / name, tmp / name)
                publish(tmp, dest, overwrite=False)
        else:
            dest = self._unique_path(stem, ".zip")
            kobold_zip.write(dest, tensor, metadata_of(softprompt), overwrite=False)
        return dest

    def _import_mixture(self, source: Path) -> LibraryEntry:
        """A mixture file is checked and copied as it is (its members are found by name)."""
        read_mixture(source)
        for _attempt in range(100):
            dest = self._unique_path(source.stem, ".json")
            try:
                with writing(dest), staged_file(dest) as tmp:
                    shutil.copyfile(source, tmp)
                    publish(tmp, dest, overwrite=False)
            except FileExistsError:
                continue
            return self._entry_for(dest)
        raise DestinationExistsError("could not find a free file name.", source)

    def import_paths(self, sources: Iterable[Path | str]) -> tuple[list[LibraryEntry], list[SoftPromptError]]:
        """Import each source; one bad file never stops the others."""
        imported, rejected = [], []
        for source in sources:
            try:
                imported.append(self.import_path(source))
            except SoftPromptError as exc:
                rejected.append(exc)
        return imported, rejected

    def _require_writable(self, entry: LibraryEntry) -> None:
        if not entry.writable or entry.path.parent.resolve() != self.user_folder.resolve():
            raise SoftPromptError(
                "is one of the bundled examples and cannot be changed; import a copy first.",
                entry.path,
            )

    def rename(self, entry: LibraryEntry, new_name: str) -> LibraryEntry:
        """Give a soft prompt in the user's folder a new file name (made safe and unique)."""
        self._require_writable(entry)
        suffix = entry.path.suffix if entry.path.is_file() else ""
        dest = self._unique_path(new_name, suffix)
        try:
            publish(entry.path, dest, overwrite=False)
        except FileExistsError as exc:
            raise DestinationExistsError("already exists; choose another name.", dest) from exc
        if self._selected_path() is not None and same_file(self._selected_path(), entry.path):
            self._store_selection(dest)
        return self._entry_for(dest)

    def delete(self, entry: LibraryEntry) -> None:
        """Remove a soft prompt from the user's folder (bundled ones cannot be deleted)."""
        self._require_writable(entry)
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink(missing_ok=True)
        if self._selected_path() is not None and same_file(self._selected_path(), entry.path):
            self._store_selection(None)
        self.scan()

    # -- the remembered selection ----------------------------------------------------------

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings()
        return self._settings

    def _selected_path(self) -> Path | None:
        value = self.settings.get(SELECTION_KEY)
        return Path(value) if isinstance(value, str) else None

    def _store_selection(self, path: Path | None) -> None:
        self.settings.set(SELECTION_KEY, str(path) if path else None)

    def remember_selection(self, entry: LibraryEntry | None) -> None:
        """Remember the chosen soft prompt (None for "[None]") across restarts."""
        self._store_selection(entry.path if entry else None)

    def remembered_selection(self) -> LibraryEntry | None:
        """The remembered soft prompt, if it is still in the library and readable."""
        path = self._selected_path()
        entry = self._lookup(path) if path is not None else None
        return entry if entry is not None and entry.valid else None
