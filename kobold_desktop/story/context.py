"""Building the model's input from a story, within a token budget.

The order, front to back (the soft prompt's rows come before all of it):

    [BOS]  Memory  World Info (triggered)  story ... [Author's Note]  last N pieces

World Info entries with a `depth` go into the story before its last `depth` pieces (with
the Author's Note when the depths are equal, the entries first) instead of at the top: an
entry that comes and goes then changes only the end of the prompt, and the turn still
reuses the cached start. At the top the model takes it as background; near the end it
weighs it more, as it does the Author's Note.

The budget is the model's context length minus max new tokens minus the soft prompt's
tokens. Memory, World Info and the Author's Note always go in; the story fills the
rest, and its oldest text is dropped first, never in the middle of a character.

Past the context the story is trimmed in blocks (`trim_in_blocks`): what is dropped is a
whole number of blocks of a quarter of the room, so the kept story starts at the same
token turn after turn until it has grown by a block, and every one of those turns reuses
the cache of the turn before (a few tokens' trim each turn would change the start every
turn and make the model read everything again). Right after a block goes the story fills
three quarters of the room or more: a quarter is small enough that the model keeps most of
the story, large enough that a turn of 80 to 100 tokens re-reads once in every few turns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from kobold_desktop.errors import KoboldError
from kobold_desktop.story.document import Story, WorldInfoEntry

REPLACEMENT = "\ufffd"
BLOCK_SHARE = 0.25  # the story is trimmed in blocks of this share of the room (see above)


def trim_in_blocks(total: int, room: int, share: float = BLOCK_SHARE) -> int:
    """How many of `total` tokens to drop from the front so the rest fits in `room`: a whole
    number of blocks of `share` of the room (0 or less: exactly the excess)."""
    excess = total - room
    if excess <= 0:
        return 0
    block = max(1, int(room * share)) if share > 0 else 1
    return min(total, block * math.ceil(excess / block))


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


def build_context(story: Story, tokenizer: Any, budget: int, block_share: float = BLOCK_SHARE) -> BuiltContext:
    """Token ids for the model; `budget` is how many prompt tokens fit. `block_share` 0
    trims exactly what does not fit (the start then moves every turn)."""
    prefix = _leading_special_ids(tokenizer)
    triggered = triggered_world_info(story)
    memory = _encode(tokenizer, _with_newline(story.memory))
    top = [e for e in triggered if e.depth is None]
    world_info = _encode(tokenizer, "".join(_with_newline(e.content) for e in top if e.content))
    note = ""
    if story.authors_note.strip():
        note = "\n" + story.authors_note_template.replace("<|>", story.authors_note) + "\n"
    chunks = story.chunks()
    # What goes into the story, by how many pieces from its end: World Info placed at a depth,
    # then the Author's Note.
    inserts: dict[int, str] = {}
    for entry in triggered:
        if entry.depth is not None and entry.content:
            depth = min(entry.depth, len(chunks))
            inserts[depth] = inserts.get(depth, "\n") + _with_newline(entry.content)
    note_depth = min(max(0, story.authors_note_depth), len(chunks))
    if note:
        inserts[note_depth] = inserts.get(note_depth, "") + (note if note_depth not in inserts else note.lstrip("\n"))
    segments: list[tuple[bool, list[int]]] = []  # (part of the story, ids), front to back
    start = 0
    for depth in sorted(inserts, reverse=True):
        split = len(chunks) - depth
        segments.append((True, _encode(tokenizer, "".join(chunks[start:split]))))
        segments.append((False, _encode(tokenizer, inserts[depth])))
        start = split
    segments.append((True, _encode(tokenizer, "".join(chunks[start:]))))
    inserted = sum(len(ids) for is_story, ids in segments if not is_story)
    note_ids = _encode(tokenizer, note)

    fixed = len(prefix) + len(memory) + len(world_info) + inserted
    room = budget - fixed
    if room < 0:
        raise ContextError(
            f"Memory, World Info and the Author's Note need {fixed} tokens, but only {budget} "
            "fit in the context; shorten them, lower max new tokens, or use a shorter soft prompt."
        )
    total = sum(len(ids) for is_story, ids in segments if is_story)
    drop = trim_in_blocks(total, room, block_share)
    kept: list[int] = []
    for is_story, ids in segments:
        if is_story and drop:
            gone = min(drop, len(ids))
            drop -= gone
            ids = _keep_last(tokenizer, ids, len(ids) - gone) if gone else ids
        kept += ids
    ids = prefix + memory + world_info + kept
    story_tokens = len(kept) - inserted
    return BuiltContext(
        ids=ids,
        memory_tokens=len(memory),
        world_info_tokens=len(world_info) + inserted - len(note_ids),
        authors_note_tokens=len(note_ids),
        story_tokens=story_tokens,
        dropped_story_tokens=total - story_tokens,
        triggered=triggered,
    )


def turn_report(built: BuiltContext, prompt_tokens: int, cached_tokens: int | None, shifted_tokens: int = 0) -> str:
    """What a turn did with the story, for the status bar: whether it was trimmed and by how
    much, whether the cache was shifted, and how much the model read (the rest came from the
    cache of the turn before)."""
    parts = []
    if built.dropped_story_tokens:
        parts.append(f"story trimmed by {built.dropped_story_tokens} tokens (in blocks)")
    if shifted_tokens:
        parts.append(f"cache shifted ({shifted_tokens} tokens moved back, close to a fresh read)")
    if cached_tokens is not None:
        new = max(0, prompt_tokens - cached_tokens)
        parts.append(f"read {new} new tokens, {cached_tokens} from the cache" if cached_tokens
                     else f"read all {prompt_tokens} tokens")
    return "; ".join(parts)
