"""Story files: our own JSON format; stories saved by KoboldAI-Client and KoboldAI United;
World Info from SillyTavern, KoboldAI Lite and KoboldAI.

Saving is atomic (a temporary file, flushed, then renamed over the old one), so a crash
or a full disk never destroys the previous save.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from kobold_desktop.errors import KoboldError
from kobold_desktop.fileio import JsonError, atomic_write_bytes, parse_json, read_limited
from kobold_desktop.story.document import AUTHORS_NOTE_TEMPLATE, MODEL, USER, Action, Story, WorldInfoEntry

FORMAT = "kobold-desktop-story"
VERSION = 1
MAX_STORY_BYTES = 256 << 20


class StoryFileError(KoboldError):
    """A story file could not be read or written."""


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which Python keeps as a lone
    surrogate that no file can hold: it becomes U+FFFD, the replacement character, so the
    story still saves (and shows where the broken character was)."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def save_story(story: Story, path: Path | str) -> None:
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, **story.to_dict()}
    text = without_lone_surrogates(json.dumps(data, ensure_ascii=False, indent=1))
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as exc:
        raise StoryFileError(f"could not save {path.name}: {exc.strerror or exc}; the previous save is intact.") from exc


class StoryRead(NamedTuple):
    story: Story
    ours: bool  # False: imported (KoboldAI-Client, KoboldAI United); save it in our format elsewhere
    notices: tuple[str, ...] = ()  # what the import left out, for the user


def load_story(path: Path | str) -> Story:
    """Read one of our story files or an imported story (.json)."""
    return read_story(path).story


def _read_json(path: Path) -> Any:
    try:
        data = read_limited(path, MAX_STORY_BYTES)
        if len(data) > MAX_STORY_BYTES:
            raise StoryFileError(f"{path.name} is too large to be a story file.")
        return parse_json(data.removeprefix(b"\xef\xbb\xbf"))
    except FileNotFoundError as exc:
        raise StoryFileError(f"{path.name} does not exist.") from exc
    except JsonError as exc:
        raise StoryFileError(f"{path.name} is not a story file (it is not readable JSON: {exc}).") from exc
    except OSError as exc:
        raise StoryFileError(f"{path.name} cannot be read: {exc.strerror or exc}.") from exc


def read_story(path: Path | str) -> StoryRead:
    """Read and fully check a story: ours, a KoboldAI-Client .json, or a KoboldAI United
    save (its folder, or the story.json inside it). Nothing is returned unless the whole
    file is valid, so a bad file can never replace the story that is open."""
    path = Path(path)
    if path.is_dir() and (path / "story.json").is_file():
        path = path / "story.json"  # KoboldAI United saves a story as a folder
    data = _read_json(path)
    if not isinstance(data, dict):
        raise StoryFileError(f"{path.name} is not a story file.")
    title = path.parent.name if path.name == "story.json" else path.stem
    if data.get("format") == FORMAT:
        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StoryFileError(f"{path.name} is damaged: its version is {json.dumps(version)}, not a number.")
        if version > VERSION:
            raise StoryFileError(f"{path.name} was saved by a newer Kobold Desktop; update the app to open it.")
        try:
            return StoryRead(_ours(data), True)
        except _Invalid as exc:
            raise StoryFileError(f"{path.name} is damaged: {exc}.") from exc
    try:
        if data.get("file_version") == 2 and isinstance(data.get("actions"), dict) and "actions" in data["actions"]:
            story, notices = from_united(data)
            story.title = story.title or title
            return StoryRead(story, False, notices)
        if isinstance(data.get("actions"), (list, dict)) and isinstance(data.get("prompt", ""), str):
            story = from_koboldai(data)
            story.title = story.title or title
            return StoryRead(story, False)
    except _Invalid as exc:
        raise StoryFileError(f"{path.name} is a KoboldAI story, but damaged: {exc}.") from exc
    raise StoryFileError(f"{path.name} is JSON, but neither a Kobold Desktop nor a KoboldAI story.")


class _Invalid(ValueError):
    """A field of a story file has the wrong type or value (the message names it)."""


def _str(data: dict, key: str, default: str = "", where: str = "") -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise _Invalid(f"'{where}{key}' is {json.dumps(value)[:40]}, not text")
    return without_lone_surrogates(value)


def _int(data: dict, key: str, default: int | None, low: int, high: int, where: str = "") -> int | None:
    value = data.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _Invalid(f"'{where}{key}' is {json.dumps(value)[:40]}, not a whole number from {low} to {high}")
    return value


def _list(data: dict, key: str, where: str = "") -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise _Invalid(f"'{where}{key}' is not a list")
    return value


def _ours(data: dict[str, Any]) -> Story:
    actions = []
    for i, item in enumerate(_list(data, "actions")):
        if not isinstance(item, dict):
            raise _Invalid(f"'actions[{i}]' is not an object")
        source = _str(item, "source", MODEL, f"actions[{i}].")
        if source not in (USER, MODEL):
            raise _Invalid(f"'actions[{i}].source' is {json.dumps(source)}, not \"user\" or \"model\"")
        actions.append(Action(_str(item, "text", "", f"actions[{i}]."), source))
    entries = []
    for i, item in enumerate(_list(data, "world_info")):
        where = f"world_info[{i}]."
        if not isinstance(item, dict):
            raise _Invalid(f"'world_info[{i}]' is not an object")
        keys = _list(item, "keys", where)
        if not all(isinstance(k, str) for k in keys):
            raise _Invalid(f"'{where}keys' holds something other than text")
        constant = item.get("constant", False)
        if not isinstance(constant, bool):
            raise _Invalid(f"'{where}constant' is not true or false")
        entries.append(WorldInfoEntry(keys=[without_lone_surrogates(k) for k in keys], content=_str(item, "content", "", where), constant=constant,
                                      scan_depth=_int(item, "scan_depth", None, 0, 1000, where),
                                      comment=_str(item, "comment", "", where),
                                      depth=_int(item, "depth", None, 0, 1000, where)))
    return Story(
        title=_str(data, "title"),
        prompt=_str(data, "prompt"),
        actions=actions,
        memory=_str(data, "memory"),
        authors_note=_str(data, "authors_note"),
        authors_note_template=_str(data, "authors_note_template", AUTHORS_NOTE_TEMPLATE),
        authors_note_depth=_int(data, "authors_note_depth", 3, 0, 1000),
        world_info=entries,
        world_info_depth=_int(data, "world_info_depth", 3, 0, 1000),
        world_info_new_depth=_int(data, "world_info_new_depth", None, 0, 1000),
        sampling=_sampling(data),
    )


def _sampling(data: dict[str, Any]) -> dict[str, Any] | None:
    """The sampler settings saved with a story: an object of settings, checked when they are
    shown (a bad value there leaves the current settings and says so)."""
    value = data.get("sampling")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _Invalid("'sampling' is not an object of sampler settings")
    return value


def _text(value: Any) -> str:
    return without_lone_surrogates(value) if isinstance(value, str) else ""


def _keys(value: Any) -> list[str]:
    """Keys as a list (United, SillyTavern) or a comma-separated string (KoboldAI, Lite)."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else []
    return [without_lone_surrogates(k.strip()) for k in items if isinstance(k, str) and k.strip()]


def from_koboldai(data: dict[str, Any]) -> Story:
    """A story saved by KoboldAI-Client's "Save" (its .json story format)."""
    actions = data.get("actions", [])
    if isinstance(actions, dict):  # some versions keep actions keyed by index
        try:
            actions = [actions[k] for k in sorted(actions, key=lambda k: int(k))]
        except ValueError as exc:
            raise _Invalid("its actions are keyed by something other than numbers") from exc
    entries = []
    world_info = data.get("worldinfo")
    for wi in world_info if isinstance(world_info, list) else []:
        if not isinstance(wi, dict):
            continue
        entries.append(WorldInfoEntry(keys=_keys(wi.get("key")), content=_text(wi.get("content")),
                                      constant=bool(wi.get("constant")), comment=_text(wi.get("comment"))))
    return Story(
        prompt=_text(data.get("prompt")),
        # KoboldAI does not record who wrote an action; its actions are the model's turns
        # and the user's edits mixed, so they come in as the model's.
        actions=[Action(_text(a), MODEL) for a in actions if _text(a)],
        memory=_text(data.get("memory")),
        authors_note=_text(data.get("authorsnote")),
        authors_note_template=_text(data.get("anotetemplate")) or AUTHORS_NOTE_TEMPLATE,
        world_info=entries,
    )


BASE64_PICKLE = "base64:"


def from_united(data: dict[str, Any]) -> tuple[Story, tuple[str, ...]]:
    """A KoboldAI United story (`story.json`, `file_version` 2). United stores some values as
    `"base64:..."` pickles; those are never unpickled (a pickle can run code): they are
    skipped, and the notices name them."""
    skipped = sorted(k for k, v in data.items() if isinstance(v, str) and v.startswith(BASE64_PICKLE))
    register = data["actions"]
    actions_by_index = register.get("actions") if isinstance(register, dict) else None
    if not isinstance(actions_by_index, dict):
        raise _Invalid("'actions.actions' is not an object")
    try:
        order = sorted(actions_by_index, key=lambda k: int(k))
    except ValueError as exc:
        raise _Invalid("its actions are keyed by something other than numbers") from exc
    actions = []
    for key in order:
        item = actions_by_index[key]
        text = _text(item.get("Selected Text")) if isinstance(item, dict) else ""
        if text:
            actions.append(Action(text, MODEL))  # United does not record who wrote a piece either
    entries = []
    wi = data.get("worldinfo_v2")
    wi_entries = wi.get("entries") if isinstance(wi, dict) else None
    if isinstance(wi_entries, dict):
        for item in wi_entries.values():
            if isinstance(item, dict):
                entries.append(WorldInfoEntry(keys=_keys(item.get("key")), content=_text(item.get("content")),
                                              constant=bool(item.get("constant")),
                                              comment=_text(item.get("title")) or _text(item.get("comment"))))
    depth = data.get("andepth", 3)
    story = Story(
        title=_text(data.get("story_name")) if data.get("story_name") != "New Game" else "",
        prompt=_text(data.get("prompt")),
        actions=actions,
        memory=_text(data.get("memory")),
        authors_note=_text(data.get("authornote")),
        authors_note_template=_text(data.get("authornotetemplate")) or AUTHORS_NOTE_TEMPLATE,
        authors_note_depth=depth if isinstance(depth, int) and not isinstance(depth, bool) and 0 <= depth <= 1000 else 3,
        world_info=entries,
    )
    notices = ()
    if skipped:
        notices = (f"Skipped {len(skipped)} setting(s) that KoboldAI United stored as Python pickles, which are "
                   f"never opened because they could run code: {', '.join(skipped)}.",)
    return story, notices


def read_world_info(path: Path | str) -> list[WorldInfoEntry]:
    """World Info from a SillyTavern lorebook (`{"entries": {...}}`), a KoboldAI Lite or
    KoboldAI-Client export (a list of entries), or a KoboldAI United export
    (`{"folders", "entries"}`). Disabled entries are left out."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("entries"), (dict, list)):
        items = data["entries"]
    elif isinstance(data, list):
        items = data
    else:
        raise StoryFileError(f"{path.name} is not a World Info file (SillyTavern, KoboldAI Lite or KoboldAI).")
    items = list(items.values()) if isinstance(items, dict) else items
    entries = []
    for item in items:
        if not isinstance(item, dict) or item.get("disable") is True or item.get("widisabled") is True:
            continue
        keys = _keys(item.get("key", item.get("keys")))
        content = _text(item.get("content"))
        if not keys and not content:
            continue
        entries.append(WorldInfoEntry(keys=keys, content=content, constant=bool(item.get("constant")),
                                      comment=_text(item.get("comment")) or _text(item.get("title"))))
    if not entries and items:
        raise StoryFileError(f"{path.name} holds no World Info entries we can read.")
    return entries
