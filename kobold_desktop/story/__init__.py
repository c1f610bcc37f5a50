"""The story document and how it becomes the model's input (no Qt)."""

from kobold_desktop.story.context import BuiltContext, ContextError, build_context, triggered_world_info
from kobold_desktop.story.document import Action, Story, WorldInfoEntry

__all__ = [
    "Action",
    "BuiltContext",
    "ContextError",
    "Story",
    "WorldInfoEntry",
    "build_context",
    "triggered_world_info",
]
