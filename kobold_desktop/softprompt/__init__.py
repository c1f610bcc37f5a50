"""Soft prompt files: read every format, refuse bad files clearly, keep a library.

No Qt here; the window, the engine and the command line all build on this package.
"""

from kobold_desktop.softprompt.errors import SoftPromptError
from kobold_desktop.softprompt.io import (
    Compatibility,
    check_compatibility,
    convert,
    describe_softprompt,
    load_softprompt,
    require_compatible,
)
from kobold_desktop.softprompt.types import DEFAULT_LIMITS, Limits, Metadata, SoftPrompt, SoftPromptFormat

__all__ = [
    "Compatibility",
    "DEFAULT_LIMITS",
    "Limits",
    "Metadata",
    "SoftPrompt",
    "SoftPromptError",
    "SoftPromptFormat",
    "check_compatibility",
    "convert",
    "describe_softprompt",
    "load_softprompt",
    "require_compatible",
]
