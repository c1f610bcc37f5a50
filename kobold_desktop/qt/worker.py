"""The one thread that owns the model.

The window sends it requests through queued signals and gets signals back; it never
touches a widget. Each job emits `started`, then its own results, then `errored` if it
failed, and `finished` always comes last. Stop is a `threading.Event` the window sets
directly; the engine checks it before every token.
"""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

from kobold_desktop.engine import Engine, LoadOptions, SamplingSettings
from kobold_desktop.errors import KoboldError
from kobold_desktop.engine.generate import GenerationResult
from kobold_desktop.qt._qt import QObject, Signal, Slot
from kobold_desktop.story import Story, build_context


@dataclass(frozen=True)
class ModelStatus:
    name: str
    source: str
    device: str
    dtype: str
    context_length: int
    hidden_size: int


@dataclass(frozen=True)
class SoftPromptStatus:
    name: str
    n_tokens: int
    paths: tuple[Path, ...]
    warnings: tuple[str, ...]


class ModelWorker(QObject):
    started = Signal(str)  # the job: "load", "softprompt" or "generate"
    progress = Signal(str, float)
    model_loaded = Signal(object)  # ModelStatus
    softprompt_changed = Signal(object)  # SoftPromptStatus, or None for no soft prompt
    chunk = Signal(str)
    generated = Signal(object)  # GenerationResult that ended by length or stop
    cancelled = Signal(object)  # GenerationResult that the user stopped
    errored = Signal(str)  # a message for the user
    finished = Signal(str)  # the job, always last

    def __init__(self, engine: Engine | None = None):
        super().__init__()
        self.engine = engine or Engine()
        self.cancel_event = threading.Event()

    def _softprompt_status(self) -> SoftPromptStatus | None:
        active = self.engine.softprompt
        if active is None:
            return None
        return SoftPromptStatus(active.name, active.n_tokens, tuple(s.path for s in active.sources), active.warnings)

    def _run(self, job: str, work) -> None:
        self.started.emit(job)
        try:
            work()
        except KoboldError as exc:
            self.errored.emit(str(exc))
        except Exception as exc:  # a bug: keep the app alive, show it, log the traceback
            traceback.print_exc()
            self.errored.emit(f"Unexpected error ({type(exc).__name__}): {exc}")
        finally:
            self.finished.emit(job)

    @Slot(str, object)
    def load_model(self, source: str, options: LoadOptions) -> None:
        def work():
            loaded = self.engine.load(source, options, progress=self.progress.emit)
            self.model_loaded.emit(
                ModelStatus(
                    name=loaded.info.name,
                    source=loaded.source,
                    device=loaded.device_label,
                    dtype=str(loaded.dtype).removeprefix("torch."),
                    context_length=loaded.context_length,
                    hidden_size=self.engine.hidden_size,
                )
            )
            self.softprompt_changed.emit(self._softprompt_status())

        self._run("load", work)

    @Slot(object)
    def set_softprompt(self, path: Path | None) -> None:
        def work():
            self.engine.set_softprompt(path)
            self.softprompt_changed.emit(self._softprompt_status())

        self._run("softprompt", work)

    @Slot(object, object, int)
    def generate(self, story: Story, settings: SamplingSettings, context_limit: int) -> None:
        def work():
            budget = self.engine.context_budget(settings, context_limit or None)
            built = build_context(story, self.engine.loaded.tokenizer, budget)
            result: GenerationResult | None = None
            for event in self.engine.stream(built.ids, settings, self.cancel_event):
                if isinstance(event, GenerationResult):
                    result = event
                else:
                    self.chunk.emit(event.text)
            if result is not None:
                (self.cancelled if result.finish_reason == "cancelled" else self.generated).emit(result)

        self._run("generate", work)
