"""Story files: our own JSON format, and stories saved by KoboldAI-Client.

Saving is atomic (a temporary file, flushed, then renamed over the old one), so a crash
or a full disk never destroys the previous save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kobold_desktop.errors import KoboldError
from kobold_desktop.fileio import atomic_write_bytes
from kobold_desktop.story.document import AUTHORS_NOTE_TEMPLATE, MODEL, Action, Story, WorldInfoEntry

FORMAT = "kobold-desktop-story"
VERSION = 1
MAX_STORY_BYTES = 256 << 20


class StoryFileError(KoboldError):
    """A story file could not be read or written."""


def save_story(story: Story, path: Path | str) -> None:
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, **story.to_dict()}
    try:
        atomic_write_bytes(path, json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"))
    except OSError as exc:
        raise StoryFileError(f"could not save {path.name}: {exc.strerror or exc}; the previous save is intact.") from exc


def load_story(path: Path | str) -> Story:
    """Read one of our story files or a KoboldAI-Client story (.json)."""
    return read_story(path)[0]


def read_story(path: Path | str) -> tuple[Story, bool]:
    """The story, and whether the file is in our own format (False: imported from KoboldAI)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_STORY_BYTES:
            raise StoryFileError(f"{path.name} is too large to be a story file.")
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise StoryFileError(f"{path.name} does not exist.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoryFileError(f"{path.name} is not a story file (it is not readable JSON).") from exc
    if not isinstance(data, dict):
        raise StoryFileError(f"{path.name} is not a story file.")
    if data.get("format") == FORMAT:
        if int(data.get("version", 0)) > VERSION:
            raise StoryFileError(f"{path.name} was saved by a newer Kobold Desktop; update the app to open it.")
        try:
            return Story.from_dict(data), True
        except (TypeError, ValueError) as exc:
            raise StoryFileError(f"{path.name} is damaged ({exc}).") from exc
    if isinstance(data.get("actions"), (list, dict)) and isinstance(data.get("prompt", ""), str):
        story = from_koboldai(data)
        story.title = story.title or path.stem
        return story, False
    raise StoryFileError(f"{path.name} is JSON, but neither a Kobold Desktop nor a KoboldAI story.")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def from_koboldai(data: dict[str, Any]) -> Story:
    """A story saved by KoboldAI-Client's "Save" (its .json story format)."""
    actions = data.get("actions", [])
    if isinstance(actions, dict):  # some versions keep actions keyed by index
        actions = [actions[k] for k in sorted(actions, key=lambda k: int(k))]
    entries = []
    for wi in data.get("worldinfo") or []:
        if not isinstance(wi, dict):
            continue
        keys = [k.strip() for k in _text(wi.get("key")).split(",") if k.strip()]
        entries.append(WorldInfoEntry(keys=keys, content=_text(wi.get("content")),
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
