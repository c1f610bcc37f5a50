"""The llama.cpp backend: GGUF files, with soft prompts fed as embedding rows (no Qt).

Needs the optional `[gguf]` extra (llama-cpp-python); without it, loading a `.gguf`
raises a `ModelError` that names the extra.
"""

from kobold_desktop.engine.llamacpp.model import EXTRA_HINT, GgufModel, GgufOptions, GgufTokenizer, is_gguf

__all__ = ["EXTRA_HINT", "GgufModel", "GgufOptions", "GgufTokenizer", "is_gguf"]
