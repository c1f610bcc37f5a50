"""Model loading and generation (no Qt)."""

from kobold_desktop.engine.engine import ActiveSoftPrompt, Engine, make_request
from kobold_desktop.engine.mixture import ActiveMixture, MixedSequence
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.prefix_cache import PrefixCache
from kobold_desktop.engine.sequence import CancelCriteria, GenerationResult, TextChunk
from kobold_desktop.engine.loader import LoadedModel, LoadOptions, load_model
from kobold_desktop.engine.sampling import SamplingSettings, SettingsError

__all__ = [
    "ActiveMixture",
    "ActiveSoftPrompt",
    "MixedSequence",
    "make_request",
    "CancelCriteria",
    "Engine",
    "GenerationResult",
    "LoadOptions",
    "LoadedModel",
    "ModelError",
    "PrefixCache",
    "SamplingSettings",
    "SettingsError",
    "TextChunk",
    "load_model",
]
