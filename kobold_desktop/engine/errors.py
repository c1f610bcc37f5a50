"""Errors the engine raises for the user to act on."""

from kobold_desktop.errors import KoboldError


class ModelError(KoboldError):
    """A model could not be found, read or loaded."""
