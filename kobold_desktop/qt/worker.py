"""The jobs that touch the model, run on the one thread that owns it.

The window calls these methods on the GUI thread; each queues a job on the model's
`JobRunner` and returns at once. A job emits `started`, then its own results, then
`errored` if it failed, and `finished` always comes last. The job functions never touch
a widget. Stop is a `threading.Event` the window sets directly; the engine checks it
before every token.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from pathlib import Path

from kobold_desktop.engine.active import Choice, RemoteModel, SoftPromptStatus
from kobold_desktop.engine.backend import Writer
from kobold_desktop.engine.engine import Engine
from kobold_desktop.engine.loader import LoadOptions
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.sequence import FinishReason, GenerationResult
from kobold_desktop.qt._qt import QObject, Signal
from kobold_desktop.qt.jobs import JobRunner
from kobold_desktop.qt.window_state import Job, ModelStatus
from kobold_desktop.softprompt.library import SoftPromptLibrary
from kobold_desktop.story import Story, build_context


@dataclass(frozen=True)
class RankRequest:
    softprompts: tuple[Path, ...]
    files: tuple[Path, ...] = ()  # text files to learn from
    text: str = ""  # or this text (the story)
    block_len: int = 64
    held_out_share: float = 0.25


class ModelWorker(QObject):
    started = Signal(str)  # the job: "load", "unload", "softprompt", "generate", "tune", "rank", ...
    progress = Signal(str, float)
    model_loaded = Signal(object)  # ModelStatus
    softprompt_changed = Signal(object)  # SoftPromptStatus, or None for no soft prompt
    chunk = Signal(str)
    context_built = Signal(object)  # the BuiltContext of the turn being written (before its first chunk)
    generated = Signal(object)  # GenerationResult that ended by length or stop
    cancelled = Signal(object)  # GenerationResult that the user stopped
    tune_progress = Signal(object)  # TuningProgress
    tuned = Signal(object, object)  # (Path of the new zip or mixture, or None when cancelled; the result)
    mixture_weights = Signal(object)  # a bayes mixture's member weights while text streams
    rank_progress = Signal(float, str)
    ranked = Signal(object)  # tuning.mixture.Ranking
    errored = Signal(str)  # a message for the user
    finished = Signal(str)  # the job, always last

    def __init__(self, engine: Engine | None = None):
        super().__init__()
        self.engine = engine or Engine()
        self.remote = None  # a RemoteSession while the window writes with a server
        self.cancel_event = threading.Event()
        self.library: SoftPromptLibrary | None = None  # names and a mixture's members are looked up here
        self._training_copy = None  # (the GGUF's LoadedModel, its weights dequantized for training)
        self.runner = JobRunner("model", self)
        self.runner.started.connect(self.started)
        self.runner.errored.connect(lambda _job, message: self.errored.emit(message))
        self.runner.finished.connect(self.finished)

    @property
    def busy(self) -> bool:
        return self.runner.busy

    @property
    def active(self) -> Writer:
        """What writes: the connected server, else the local engine."""
        return self.remote if self.remote is not None else self.engine

    def model_status(self) -> ModelStatus | None:
        """What the engine (or the server) really holds now."""
        if not self.active.is_loaded:
            return None
        loaded = self.active.loaded
        return ModelStatus(name=loaded.info.name, source=loaded.source, device=loaded.device_label,
                           dtype=loaded.precision, context_length=loaded.context_length,
                           hidden_size=self.active.hidden_size, remote=self.remote is not None,
                           shift_refusal=None if self.remote is not None else loaded.shift_refusal(),
                           fingerprint=None if self.remote is not None else loaded.fingerprint)

    def _report_state(self) -> None:
        self.model_loaded.emit(self.model_status())
        self.softprompt_changed.emit(self._softprompt_status())

    def _softprompt_status(self) -> SoftPromptStatus | None:
        return SoftPromptStatus.of(self.active.softprompt) if self.active.is_loaded else None

    def _run(self, job: Job, work) -> None:
        self.runner.submit(job.value, work)

    def load_model(self, source: str, options: LoadOptions = LoadOptions()) -> None:
        def work():
            gc.unfreeze()  # the model being replaced can be collected
            self.remote = None  # a local model replaces a server
            self._drop_training_copy()
            try:
                self.engine.load(source, options, progress=self.progress.emit)
            finally:  # after a failure too: the old model is gone, and the window must say so
                self._report_state()
            # What exists now (the libraries, the model) lives as long as the model: Python's
            # full collections stop walking it. A full collection of it took 300 ms here, and
            # whichever thread ran it held every other thread, the GUI's included.
            gc.freeze()

        self._run(Job.LOAD, work)

    def connect(self, url: str, api_key: str | None = None) -> None:
        """Write with a remote server instead of a local model (which is unloaded: its
        memory is the computer's again)."""
        def work():
            from kobold_desktop.engine.remote.client import RemoteSession

            self.progress.emit(f"Connecting to {url}", 0.2)
            session = RemoteSession(url, api_key or None).connect()
            gc.unfreeze()
            self.engine.unload()
            self.remote = session
            self._report_state()

        self._run(Job.CONNECT, work)

    def unload(self) -> None:
        def work():
            gc.unfreeze()
            if self.remote is not None:  # disconnect
                self.remote = None
                self._report_state()
                return  # the model's objects can be collected again
            self._drop_training_copy()
            self.engine.unload()  # waits for the engine's lock (a server request may hold it)
            self._report_state()

        self._run(Job.UNLOAD, work)

    def set_softprompt(self, choice: Choice | None) -> None:
        """A soft prompt or mixture file of the library, one of a server's models, or none."""
        def work():
            try:
                if self.remote is not None:
                    self.remote.set_softprompt(choice.name if isinstance(choice, RemoteModel) else None)
                else:
                    self.engine.set_softprompt(choice, self.library)
            finally:  # a refused soft prompt leaves the previous one active: the light says which
                self.softprompt_changed.emit(self._softprompt_status())

        self._run(Job.SOFTPROMPT, work)

    def generate(self, story: Story, settings: SamplingSettings, context_limit: int, shift: bool = False) -> None:
        def work():
            active = self.active
            self.engine.context_shift = shift
            budget = active.context_budget(settings, context_limit or None)
            built = build_context(story, active.loaded.tokenizer, budget)
            self.context_built.emit(built)
            result: GenerationResult | None = None
            for event in active.stream(built.ids, settings, self.cancel_event):
                if isinstance(event, GenerationResult):
                    result = event
                else:
                    self.chunk.emit(event.text)
                    if event.weights is not None:
                        self.mixture_weights.emit(event.weights)
            if result is not None:
                (self.cancelled if result.finish_reason is FinishReason.CANCELLED else self.generated).emit(result)

        self._run(Job.GENERATE, work)

    def tune(self, request) -> None:
        """Train a soft prompt on the loaded model and write it into the user's folder."""
        from kobold_desktop import paths
        from kobold_desktop.softprompt.library import safe_stem
        from kobold_desktop.tuning import make_blocks, read_training_text, train_softprompt
        from kobold_desktop.tuning.export import export_softprompt

        def work():
            text = "\n\n".join(read_training_text(path) for path in request.files)
            loaded = self._trainable("Tuning")
            config = request.config
            blocks = make_blocks(text, loaded.tokenizer, config.block_len, config.held_out_share, config.seed)
            stem = safe_stem(request.meta.name or "softprompt")
            if request.mixture >= 2:
                self._tune_mixture(loaded, request, blocks, stem)
                return
            checkpoint = paths.user_cache_dir() / "tuning" / f"{stem}.ckpt"
            with self.engine.lock:
                result = train_softprompt(loaded.model, loaded.tokenizer, blocks, config,
                                          progress=self.tune_progress.emit, cancel=self.cancel_event,
                                          checkpoint=checkpoint,
                                          notice=lambda message: self.progress.emit(message, 0.0))
            if result.cancelled:
                self.tuned.emit(None, result)
                return
            folder = paths.user_softprompt_dir()
            out, counter = folder / f"{stem}.zip", 2
            while out.exists():
                out, counter = folder / f"{stem} ({counter}).zip", counter + 1
            path = export_softprompt(result.tensor, out, request.meta, loaded.info.name,
                                     fingerprint=loaded.fingerprint)
            checkpoint.unlink(missing_ok=True)
            self.tuned.emit(path, result)

        self._run(Job.TUNE, work)

    def _trainable(self, what: str):
        """The loaded model's weights to train through: the model itself on transformers; for
        a GGUF, its weights dequantized by transformers (`loader.load_trainable`, cached on
        disk after the first time), loaded once and kept beside it until the model changes."""
        from kobold_desktop.engine.device import choose_device, training_dtype
        from kobold_desktop.engine.loader import LoadOptions, load_trainable

        loaded = self.engine.loaded
        if loaded.runtime.trainable:
            return loaded
        if loaded.backend != "llama.cpp":
            loaded.require_transformers(what)  # says why not
        if self._training_copy is None or self._training_copy[0] is not loaded:
            self._drop_training_copy()
            trainable = load_trainable(loaded.source, LoadOptions(dtype=training_dtype(choose_device(None))),
                                       self.progress.emit,
                                       lambda message: self.progress.emit(message[0].upper() + message[1:], 0.0))
            self._training_copy = (loaded, trainable)
        return self._training_copy[1]

    def _drop_training_copy(self) -> None:
        if self._training_copy is not None:
            self._training_copy[1].unload()
            self._training_copy = None

    def _tune_mixture(self, loaded, request, blocks, stem: str) -> None:
        """K soft prompts and their weights, trained together; K zips and a mixture file."""
        from kobold_desktop import paths
        from kobold_desktop.softprompt import Metadata
        from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, write_mixture
        from kobold_desktop.tuning.export import export_softprompt
        from kobold_desktop.tuning.mixture import train_mixture

        with self.engine.lock:
            result = train_mixture(loaded.model, loaded.tokenizer, blocks, request.config, request.mixture,
                                   progress=self.tune_progress.emit, cancel=self.cancel_event)
        if result.cancelled:
            self.tuned.emit(None, result)
            return
        folder, counter, base = paths.user_softprompt_dir(), 2, stem
        while any((folder / name).exists() for name in
                  [f"{base}.json"] + [f"{base}-{i}.zip" for i in range(1, request.mixture + 1)]):
            base, counter = f"{stem} ({counter})", counter + 1
        name = request.meta.name or stem
        zips = []
        for i, tensor in enumerate(result.tensors, 1):
            meta = Metadata(name=f"{name} {i}", authors=request.meta.authors,
                            description=request.meta.description or f"Member {i} of the mixture '{name}'.")
            zips.append(export_softprompt(tensor, folder / f"{base}-{i}.zip", meta, loaded.info.name,
                                          fingerprint=loaded.fingerprint))
        mixture = Mixture(name, "bayes", tuple(MixtureMember(z.name, round(w, 6)) for z, w in zip(zips, result.weights)))
        self.tuned.emit(write_mixture(folder / f"{base}.json", mixture), result)

    def rank(self, request: RankRequest) -> None:
        """Score soft prompts on a text and learn a mixture's weights (`softprompt rank`)."""
        from kobold_desktop.tuning import make_blocks, read_training_text
        from kobold_desktop.tuning.mixture import rank_softprompts

        def work():
            loaded = self._trainable("Learning weights")
            text = request.text or "\n\n".join(read_training_text(path) for path in request.files)
            prepared = [self.engine.prepare_softprompts([path]) for path in request.softprompts]
            blocks = make_blocks(text, loaded.tokenizer, request.block_len, request.held_out_share, 1234)
            with self.engine.lock:
                try:
                    ranking = rank_softprompts(loaded.model, blocks,
                                               [(p.name, f, p.tensor) for p, f in zip(prepared, request.softprompts)],
                                               progress=self.rank_progress.emit, cancel=self.cancel_event)
                except InterruptedError:
                    return
            self.ranked.emit(ranking)

        self._run(Job.RANK, work)
