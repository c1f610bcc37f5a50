"""Soft prompts as vLLM/Aphrodite "prompt adapters" (the Python API's request type)."""

from kobold_desktop.prompt_adapter.request import PromptAdapterRequest

__all__ = ["PromptAdapterRequest"]
