"""Mixture files: a named set of soft prompts with weights, kept in the soft prompt folder.

    {"name": "Scripture", "mode": "bayes",
     "members": [{"softprompt": "Proverbs.zip", "weight": 0.7},
                 {"softprompt": "Leviticus.zip", "weight": 0.3}]}

Members are named by file name only (never a path: a mixture file from elsewhere cannot
make us read anything outside the soft prompt folders). A member is looked for beside
the mixture file first, then in the library's folders. `mode` is "bayes" (the weights
are a prior that the text updates) or "fixed". Weights need not sum to 1; they are
normalized. Unknown keys are kept when the file is rewritten.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from kobold_desktop.fileio import JsonError, atomic_write_bytes, parse_json, read_limited
from kobold_desktop.softprompt.errors import NotFoundError, SoftPromptError, writing

MODES = ("bayes", "fixed")
MAX_FILE_BYTES = 1 << 20
MAX_MEMBERS = 32


class MixtureError(SoftPromptError):
    """A mixture file is malformed, or one of its members cannot be used."""


@dataclass(frozen=True)
class MixtureMember:
    softprompt: str  # a file name (or, for a mixture built on the command line, a path)
    weight: float


@dataclass(frozen=True)
class Mixture:
    name: str
    mode: str
    members: tuple[MixtureMember, ...]
    path: Path | None = None  # the file it was read from
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def weights(self) -> tuple[float, ...]:
        """Normalized to sum to 1."""
        total = sum(m.weight for m in self.members)
        return tuple(m.weight / total for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "name": self.name, "mode": self.mode,
                "members": [{"softprompt": m.softprompt, "weight": m.weight} for m in self.members]}

    @property
    def label(self) -> str:
        return mixture_label([Path(m.softprompt).stem for m in self.members], self.weights)


def mixture_label(names: Sequence[str], weights: Sequence[float]) -> str:
    """"Mixture: Proverbs 70% + Laws of Leviticus 30%"."""
    return "Mixture: " + " + ".join(f"{n} {round(w * 100)}%" for n, w in zip(names, weights))


def _fail(message: str, path: Path | None) -> MixtureError:
    return MixtureError(message, path)


def parse_mixture(data: Any, path: Path | None = None, *, paths_allowed: bool = False) -> Mixture:
    """Check a mixture's JSON object strictly; every problem gets a message that says
    what to change."""
    if not isinstance(data, dict):
        raise _fail("a mixture file holds one JSON object with 'name', 'mode' and 'members'.", path)
    name = data.get("name", path.stem if path else "Mixture")
    if not isinstance(name, str) or not name.strip():
        raise _fail("'name' must be a non-empty string.", path)
    mode = data.get("mode", "bayes")
    if mode not in MODES:
        raise _fail(f"'mode' must be one of {', '.join(MODES)}, not {mode!r}.", path)
    members = data.get("members")
    if not isinstance(members, list) or not members:
        raise _fail("'members' must be a non-empty list of {\"softprompt\": FILE, \"weight\": W}.", path)
    if len(members) > MAX_MEMBERS:
        raise _fail(f"a mixture has at most {MAX_MEMBERS} members, this one {len(members)}.", path)
    parsed = []
    for i, member in enumerate(members, 1):
        if not isinstance(member, dict):
            raise _fail(f"member {i} must be an object with 'softprompt' and 'weight'.", path)
        softprompt, weight = member.get("softprompt"), member.get("weight", 1.0)
        if not isinstance(softprompt, str) or not softprompt.strip():
            raise _fail(f"member {i} needs 'softprompt': the soft prompt's file name.", path)
        if not paths_allowed and (Path(softprompt).name != softprompt or softprompt in (".", "..")
                                  or "\\" in softprompt):
            raise _fail(f"member {i} names '{softprompt}'; members are file names without folders "
                        "(put the soft prompt beside the mixture file or in your soft prompt folder).", path)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise _fail(f"member {i}'s weight must be a number of 0 or more, not {weight!r}.", path)
        parsed.append(MixtureMember(softprompt, float(weight)))
    total = sum(m.weight for m in parsed)
    if total <= 0:
        raise _fail("at least one member needs a weight above 0.", path)
    if not math.isfinite(total):
        raise _fail("the members' weights add up to more than a number can hold; use weights like 0.3 and 0.7.",
                    path)
    extra = {k: v for k, v in data.items() if k not in ("name", "mode", "members")}
    return Mixture(name.strip(), mode, tuple(parsed), path, extra)


def _read_json(path: Path) -> Any:
    try:
        data = read_limited(path, MAX_FILE_BYTES)
        if len(data) > MAX_FILE_BYTES:
            raise _fail(f"is larger than {MAX_FILE_BYTES >> 20} MiB; a mixture file is a few lines.", path)
        return parse_json(data)
    except JsonError as exc:
        raise _fail(f"is not a mixture file: {exc}.", path) from exc
    except OSError as exc:
        raise _fail(f"cannot be read: {exc.strerror or exc}", path) from exc


def read_mixture(path: Path | str) -> Mixture:
    path = Path(path)
    return parse_mixture(_read_json(path), path)


def is_mixture_file(path: Path) -> bool:
    """A small `.json` whose object has 'members' (mkultra's JSON soft prompts have
    'tensor' instead)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = read_limited(path, MAX_FILE_BYTES)
        if len(data) > MAX_FILE_BYTES:
            return False
        data = parse_json(data)
    except (OSError, JsonError):
        return False
    return isinstance(data, dict) and "members" in data and "tensor" not in data


def write_mixture(path: Path | str, mixture: Mixture, *, overwrite: bool = False) -> Path:
    """Write atomically (never half a file); refuse to overwrite unless asked."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise _fail("a mixture file's name ends in .json.", path)
    data = json.dumps(mixture.to_dict(), ensure_ascii=False, indent=1) + "\n"
    try:
        with writing(path):
            atomic_write_bytes(path, data.encode("utf-8"), overwrite=overwrite)
    except FileExistsError as exc:
        raise MixtureError("already exists; choose another name.", path) from exc
    return path


def member_places(mixture: Mixture, folders: Iterable[Path]) -> list[Path]:
    """Where a mixture's members are looked for, in order: beside the mixture file, then
    each library folder."""
    return ([mixture.path.parent] if mixture.path is not None else []) + [Path(f) for f in folders]


def resolve_member(mixture: Mixture, member: MixtureMember, folders: Iterable[Path]) -> Path:
    """The file of one member: a path as given (command-line mixtures), else the first of
    `member_places` that has it. The one rule: the library's list and every loader find
    the same file."""
    given = Path(member.softprompt).expanduser()
    if mixture.path is None and given.exists():
        return given
    places = member_places(mixture, folders)
    for folder in places:
        candidate = Path(folder) / member.softprompt
        if candidate.exists():
            # A link is followed, then checked: a member is a file in these folders, never
            # one a link points to elsewhere (a shared mixture must not read other files).
            real = candidate.resolve()
            if not any(real.is_relative_to(Path(place).resolve()) for place in places):
                raise MixtureError(f"mixture '{mixture.name}': its member '{member.softprompt}' is a link to "
                                   f"{real}, outside the soft prompt folders; copy the file in instead.",
                                   mixture.path)
            return candidate
    where = ", ".join(str(p) for p in places) or "no folder"
    raise NotFoundError(f"mixture '{mixture.name}': its member '{member.softprompt}' is missing "
                        f"(looked in {where}).", mixture.path)


def resolve_members(mixture: Mixture, folders: Iterable[Path]) -> list[Path]:
    folders = list(folders)
    return [resolve_member(mixture, m, folders) for m in mixture.members]
