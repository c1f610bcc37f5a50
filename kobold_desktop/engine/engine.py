"""The engine: one loaded model, the active soft prompt, the prefix cache, and generation.

Everything that uses the model (the window's worker thread, the server, the command
line) goes through an `Engine`. Its lock is held for one step of the model at a time,
never while a stream waits for its reader, so the window and the server take turns
token by token and an abandoned stream holds nothing. The prefix cache keeps the work
of finished sequences so that the next turn of a story runs only its new tokens; it
is emptied whenever the model changes. Switching soft prompts never reloads the model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from kobold_desktop.engine.active import Active, ActiveMixture, ActiveSoftPrompt, Allow, Source, prepare, \
    prepare_again, prepare_mixture, prepare_softprompts
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.generate import GenerationResult, StreamEvent, collect, run_requests, stream_request
from kobold_desktop.engine.loader import LoadedModel, LoadOptions, Progress, load_model, load_trainable
from kobold_desktop.engine.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.sequence import Request
from kobold_desktop.errors import KoboldError
from kobold_desktop.softprompt.library import SoftPromptLibrary
from kobold_desktop.softprompt.mixture import Mixture
from kobold_desktop.softprompt.types import DEFAULT_LIMITS, Limits, SoftPrompt


class Engine:
    def __init__(self, loaded: LoadedModel | None = None, limits: Limits = DEFAULT_LIMITS,
                 prefix_cache_bytes: int = DEFAULT_MAX_BYTES):
        self._loaded = loaded
        self._softprompt: Active | None = None
        self.limits = limits
        self.lock = threading.RLock()
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        # Context shift: a prompt that dropped old text reuses the cache by moving what
        # follows (close to a fresh read, not exact); off: it reads everything again.
        self.context_shift = False

    # -- the model -------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None or self._loaded.model is None:
            raise ModelError("no model is loaded; load one first.")
        return self._loaded

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None and self._loaded.model is not None

    def load(self, source: str | Path, options: LoadOptions = LoadOptions(), progress: Progress | None = None,
             *, trainable: bool = False, say: Callable[[str], None] | None = None) -> LoadedModel:
        """Load a model, replacing (and freeing) the current one. The soft prompt is kept
        if it fits the new model, and dropped otherwise. `trainable`: weights to train
        through (a GGUF is dequantized by transformers, `loader.load_trainable`; `say`
        hears what that takes)."""
        with self.lock:
            previous = self._softprompt
            self.unload()
            progress = progress or (lambda m, f: None)
            self._loaded = (load_trainable(source, options, progress, say or (lambda m: None)) if trainable
                            else load_model(source, options, progress))
            if previous is not None:
                try:
                    self._softprompt = self._prepare_again(previous)
                except KoboldError:
                    self._softprompt = None
            return self._loaded

    def unload(self) -> None:
        with self.lock:
            self.prefix_cache.clear()
            self._softprompt = None
            if self._loaded is not None:
                self._loaded.unload()
            self._loaded = None

    def require(self, loaded: LoadedModel) -> None:
        """Raise unless `loaded` is still the engine's model (it may have been replaced
        or unloaded between two steps of a stream)."""
        if self._loaded is not loaded or loaded.model is None:
            raise ModelError("the model was unloaded or replaced while generating; generate again.")

    @property
    def hidden_size(self) -> int:
        return self.loaded.hidden_size

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    # -- soft prompts ------------------------------------------------------------------

    @property
    def softprompt(self) -> Active | None:
        """The active soft prompt or mixture."""
        return self._softprompt

    def _prepare_again(self, active: Active) -> Active | None:
        return prepare_again(self.loaded, active, self.limits)

    def prepare(self, source: Source, library: SoftPromptLibrary | None = None, *,
                allow: Allow | None = None) -> Active | None:
        """What a user chose (a file, a library name, several, a mixture) as rows for this
        model, without activating it (`active.prepare`)."""
        return prepare(self.loaded, source, library, limits=self.limits, allow=allow)

    def set_softprompt(self, source: Source, library: SoftPromptLibrary | None = None) -> Active | None:
        """Make this the active soft prompt (None: no soft prompt). On any error the
        previous one stays active."""
        prepared = self.prepare(source, library)
        with self.lock:
            self._softprompt = prepared
        return prepared

    def set_softprompts(self, sources: Sequence[SoftPrompt | str | Path]) -> ActiveSoftPrompt | None:
        """Several soft prompts, concatenated in order."""
        return self.set_softprompt(list(sources))

    def prepare_softprompts(self, sources: Sequence[SoftPrompt | str | Path]) -> ActiveSoftPrompt | None:
        return prepare_softprompts(self.loaded, sources, self.limits)

    def prepare_mixture(self, mixture: Mixture, paths: Sequence[str | Path]) -> ActiveMixture:
        """A mixture whose members' files are given (`paths[i]` is member i's)."""
        return prepare_mixture(self.loaded, mixture, paths, self.limits)

    def set_mixture(self, mixture: Mixture, paths: Sequence[str | Path]) -> ActiveMixture:
        prepared = self.prepare_mixture(mixture, paths)
        with self.lock:
            self._softprompt = prepared
        return prepared

    # -- generating --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.loaded.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def context_budget(self, settings: SamplingSettings, context_limit: int | None = None) -> int:
        """Prompt tokens that fit under the active soft prompt (`LoadedModel.room`)."""
        return self.loaded.room(self._softprompt, settings.max_new_tokens, context_limit)

    def stream(
        self,
        prompt: str | Sequence[int],
        settings: SamplingSettings = SamplingSettings(),
        cancel: threading.Event | None = None,
        softprompt: Active | None | str = "active",
    ) -> Iterator[StreamEvent]:
        """Stream text chunks, then the result. The prompt is used verbatim: a string is
        tokenized with the model's special tokens (BOS), a list of ids is used as is.
        A prompt that starts like an earlier sequence runs only what is new."""
        with self.lock:
            loaded = self.loaded
            active = self._softprompt if softprompt == "active" else softprompt
            prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        events: list = []
        request = loaded.new_request(prompt_ids, active, settings, events.append, cancel)
        yield from stream_request(loaded.new_core(self.prefix_cache, self.context_shift), request, events, lock=self.lock,
                                  check=lambda: self.require(loaded))

    def run(self, requests: Sequence[Request], max_batch: int = 64) -> None:
        """Run `requests` (from `loaded.new_request`) together until every one has ended,
        each reporting to its own sink. Holds the lock one step at a time."""
        loaded = self.loaded
        run_requests(loaded.new_core(self.prefix_cache, self.context_shift), requests, max_batch, lock=self.lock,
                     check=lambda: self.require(loaded))

    def generate(
        self,
        prompt: str | Sequence[int],
        settings: SamplingSettings = SamplingSettings(),
        cancel: threading.Event | None = None,
        softprompt: Active | None | str = "active",
    ) -> GenerationResult:
        return collect(self.stream(prompt, settings, cancel, softprompt))
