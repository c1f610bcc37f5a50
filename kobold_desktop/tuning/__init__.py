"""Creating soft prompts from the user's own writing (prompt tuning; no Qt)."""

from kobold_desktop.tuning.data import Blocks, TuningDataError, make_blocks, read_training_text
from kobold_desktop.tuning.trainer import (
    TuningConfig,
    TuningError,
    TuningProgress,
    TuningResult,
    held_out_loss,
    train_softprompt,
)

__all__ = [
    "Blocks",
    "TuningConfig",
    "TuningDataError",
    "TuningError",
    "TuningProgress",
    "TuningResult",
    "held_out_loss",
    "make_blocks",
    "read_training_text",
    "train_softprompt",
]
