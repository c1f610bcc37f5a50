"""Model loading and generation (no Qt)."""

from kobold_desktop.engine.engine import ActiveSoftPrompt, Engine
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.generate import CancelCriteria, GenerationResult, TextChunk
from kobold_desktop.engine.loader import LoadedModel, LoadOptions, load_model
from kobold_desktop.engine.sampling import SamplingSettings, SettingsError

__all__ = [
    "ActiveSoftPrompt",
    "CancelCriteria",
    "Engine",
    "GenerationResult",
    "LoadOptions",
    "LoadedModel",
    "ModelError",
    "SamplingSettings",
    "SettingsError",
    "TextChunk",
    "load_model",
]
