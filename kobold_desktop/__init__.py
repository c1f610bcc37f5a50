"""Kobold Desktop: write stories with a local language model steered by soft prompts."""

__version__ = "0.1.0"
APP_NAME = "Kobold Desktop"
APP_ID = "kobold-desktop"

# The Python API in vLLM's and Aphrodite's shape, imported only when asked for (it loads torch).
_API = {"LLM": "kobold_desktop.llm", "SamplingParams": "kobold_desktop.llm", "RequestOutput": "kobold_desktop.llm",
        "CompletionOutput": "kobold_desktop.llm", "PromptAdapterRequest": "kobold_desktop.prompt_adapter.request"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kobold_desktop' has no attribute '{name}'")
