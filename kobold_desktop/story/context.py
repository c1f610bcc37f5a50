"""Building the model's input from a story, within a token budget.

The order, front to back (the soft prompt's rows come before all of it):

    [BOS]  Memory  World Info (triggered)  story ... [Author's Note]  last N pieces

The budget is the model's context length minus max new tokens minus the soft prompt's
tokens. Memory, World Info and the Author's Note always go in; the story fills the
rest, and its oldest text is dropped first, never in the middle of a character.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from kobold_desktop.errors import KoboldError
from kobold_desktop.story.document import Story, WorldInfoEntry

REPLACEMENT = "\ufffd"


class ContextError(KoboldError):
    """Memory, World Info and the Author's Note do not fit in the context."""


@dataclass(frozen=True)
class BuiltContext:
    ids: list[int]
    memory_tokens: int
    world_info_tokens: int
    authors_note_tokens: int
    story_tokens: int
    dropped_story_tokens: int
    triggered: list[WorldInfoEntry] = field(default_factory=list)


def triggered_world_info(story: Story) -> list[WorldInfoEntry]:
    """Constant entries, and entries with a key in the recent story (case-insensitive)."""
    chunks = story.chunks()
    found = []
    for entry in story.world_info:
        if entry.constant:
            found.append(entry)
            continue
        depth = entry.scan_depth if entry.scan_depth is not None else story.world_info_depth
        recent = "".join(chunks[-depth:] if depth > 0 else []).casefold()
        if any(key.strip() and key.strip().casefold() in recent for key in entry.keys):
            found.append(entry)
    return found


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS for Llama-style, none for GPT-2)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if plain and with_special[-len(plain):] == plain:
        return with_special[: len(with_special) - len(plain)]
    return []


def _keep_last(tokenizer: Any, ids: Sequence[int], count: int) -> list[int]:
    """The last `count` tokens or fewer, starting on a whole character."""
    if count <= 0:
        return []
    start = max(0, len(ids) - count)
    while start < len(ids) and tokenizer.decode(list(ids[start : start + 8])).startswith(REPLACEMENT):
        start += 1
    return list(ids[start:])


def _with_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def build_context(story: Story, tokenizer: Any, budget: int) -> BuiltContext:
    """Token ids for the model; `budget` is how many prompt tokens fit."""
    prefix = _leading_special_ids(tokenizer)
    triggered = triggered_world_info(story)
    memory = _encode(tokenizer, _with_newline(story.memory))
    world_info = _encode(tokenizer, "".join(_with_newline(e.content) for e in triggered if e.content))
    note = ""
    if story.authors_note.strip():
        note = "\n" + story.authors_note_template.replace("<|>", story.authors_note) + "\n"
    chunks = story.chunks()
    split = max(0, len(chunks) - max(0, story.authors_note_depth))
    before = _encode(tokenizer, "".join(chunks[:split]))
    after = _encode(tokenizer, "".join(chunks[split:]))
    note_ids = _encode(tokenizer, note)

    fixed = len(prefix) + len(memory) + len(world_info) + len(note_ids)
    room = budget - fixed
    if room < 0:
        raise ContextError(
            f"Memory, World Info and the Author's Note need {fixed} tokens, but only {budget} "
            "fit in the context; shorten them, lower max new tokens, or use a shorter soft prompt."
        )
    kept_after = after if len(after) <= room else _keep_last(tokenizer, after, room)
    kept_before = _keep_last(tokenizer, before, room - len(kept_after)) if len(kept_after) == len(after) else []
    ids = prefix + memory + world_info + kept_before + note_ids + kept_after
    return BuiltContext(
        ids=ids,
        memory_tokens=len(memory),
        world_info_tokens=len(world_info),
        authors_note_tokens=len(note_ids),
        story_tokens=len(kept_before) + len(kept_after),
        dropped_story_tokens=len(before) + len(after) - len(kept_before) - len(kept_after),
        triggered=triggered,
    )
