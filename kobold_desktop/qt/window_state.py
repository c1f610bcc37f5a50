"""What the window is doing, without Qt: the job in progress and what the model thread holds.

`WindowState` is the one place the job in progress is written: `begin` when the user
clicks (so a second click cannot queue another job), `started` when the model thread
takes it, `finished` when the thread has nothing left to do. Busy and generating are
derived from it. `WindowOptions` is what the command line passes to the window.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from kobold_desktop.engine.active import SoftPromptStatus
    from kobold_desktop.engine.loader import LoadOptions


class Job(enum.StrEnum):
    """The jobs of the model thread (their values are the worker's job names)."""

    LOAD = "load"
    UNLOAD = "unload"
    CONNECT = "connect"
    SOFTPROMPT = "softprompt"
    GENERATE = "generate"
    TUNE = "tune"
    RANK = "rank"

    @property
    def cancellable(self) -> bool:
        """Stop (the cancel flag) applies to it: the flag is cleared when it begins."""
        return self in (Job.GENERATE, Job.TUNE, Job.RANK)

    @property
    def shows_progress(self) -> bool:
        return self in (Job.LOAD, Job.SOFTPROMPT, Job.UNLOAD, Job.CONNECT)


@dataclass(frozen=True)
class ModelStatus:
    """What the model thread really holds: a local model or a server's."""

    name: str
    source: str
    device: str
    dtype: str
    context_length: int
    hidden_size: int
    remote: bool = False  # a server writes (Model ▸ Connect to server…), not a local model
    shift_refusal: str | None = None  # why context shift cannot run on this model (None: it can)
    fingerprint: str | None = None  # what the model is, for "made for this model" (engine/fingerprint.py)


@dataclass
class WindowState:
    job: Job | None = None
    model: ModelStatus | None = None
    softprompt: "SoftPromptStatus | None" = None

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def generating(self) -> bool:
        return self.job is Job.GENERATE

    @property
    def can_generate(self) -> bool:
        return not self.busy and self.model is not None

    def begin(self, job: Job | str) -> Job:
        self.job = Job(job)
        return self.job

    def finished(self) -> None:
        self.job = None


@dataclass(frozen=True)
class WindowOptions:
    """What the command line asks of the window: the model and soft prompt to start with,
    how to load the model, and a screenshot to take and exit."""

    model: str | None = None
    softprompt: str | None = None
    load: "LoadOptions | None" = None
    screenshot: "Path | None" = None
