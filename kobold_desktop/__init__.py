"""Kobold Desktop: write stories with a local language model steered by soft prompts."""

__version__ = "0.1.0"
APP_NAME = "Kobold Desktop"
APP_ID = "kobold-desktop"
