"""Model loading and generation (no Qt)."""

from kobold_desktop.engine.active import ActiveMixture, ActiveSoftPrompt, RemoteModel, SoftPromptStatus
from kobold_desktop.engine.engine import Engine
from kobold_desktop.engine.mixture import MixedSequence
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.prefix_cache import PrefixCache
from kobold_desktop.engine.sequence import FinishReason, GenerationResult, TextChunk
from kobold_desktop.engine.loader import ContextOverflow, LoadedModel, LoadOptions, load_model
from kobold_desktop.engine.sampling import SamplingSettings, SettingsError

__all__ = [
    "ActiveMixture",
    "ActiveSoftPrompt",
    "ContextOverflow",
    "Engine",
    "FinishReason",
    "GenerationResult",
    "LoadOptions",
    "LoadedModel",
    "MixedSequence",
    "ModelError",
    "PrefixCache",
    "RemoteModel",
    "SamplingSettings",
    "SettingsError",
    "SoftPromptStatus",
    "TextChunk",
    "load_model",
]
