"""A story: the opening prompt, the actions that follow, and what steers the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

USER, MODEL = "user", "model"
AUTHORS_NOTE_TEMPLATE = "[Author's note: <|>]"


@dataclass
class Action:
    """One piece of the story, written by the user or by the model."""

    text: str
    source: str = MODEL


@dataclass
class WorldInfoEntry:
    """Background text that enters the context when one of its keys appears in the
    recent story (or always, when constant)."""

    keys: list[str] = field(default_factory=list)
    content: str = ""
    constant: bool = False
    scan_depth: int | None = None  # actions to search; None uses the story's setting
    comment: str = ""
    # Where it goes: None at the top with Memory; N before the last N pieces of the story (as
    # the Author's Note), so that an entry coming and going leaves the cached start alone.
    depth: int | None = None


@dataclass
class Story:
    title: str = ""
    prompt: str = ""
    actions: list[Action] = field(default_factory=list)
    memory: str = ""
    authors_note: str = ""
    authors_note_template: str = AUTHORS_NOTE_TEMPLATE
    authors_note_depth: int = 3  # inserted before the last N pieces of the story
    world_info: list[WorldInfoEntry] = field(default_factory=list)
    world_info_depth: int = 3  # how many recent pieces World Info keys are searched in
    world_info_new_depth: int | None = None  # where new entries go (WorldInfoEntry.depth)
    # The sampler settings the story was written with (SamplingSettings.to_dict() and the
    # context size); the window shows them again when the story is opened.
    sampling: dict[str, Any] | None = None

    def chunks(self) -> list[str]:
        """The story's pieces in order: the prompt, then every action."""
        pieces = [self.prompt] if self.prompt else []
        return pieces + [a.text for a in self.actions]

    @property
    def text(self) -> str:
        return "".join(self.chunks())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Story":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["actions"] = [Action(**a) for a in data.get("actions", [])]
        fields["world_info"] = [WorldInfoEntry(**w) for w in data.get("world_info", [])]
        return cls(**fields)
