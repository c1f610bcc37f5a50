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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch

from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.generate import (
    GenerationResult,
    StreamEvent,
    collect,
    stream_request,
)
from kobold_desktop.engine.loader import LoadedModel, LoadOptions, Progress, load_model
from kobold_desktop.engine.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.mixture import ActiveMixture
from kobold_desktop.engine.sequence import Request, Sink, eos_token_ids, softprompt_fingerprint
from kobold_desktop.engine.sequence import Sequence as Row
from kobold_desktop.errors import KoboldError
from kobold_desktop.softprompt.mixture import Mixture, MixtureError
from kobold_desktop.softprompt import (
    DEFAULT_LIMITS,
    Limits,
    SoftPrompt,
    describe_softprompt,
    load_softprompt,
    require_compatible,
)


@dataclass(frozen=True)
class ActiveSoftPrompt:
    """Soft prompt rows ready for the model: cast to its dtype, on its input device."""

    sources: tuple[SoftPrompt, ...]
    tensor: torch.Tensor
    warnings: tuple[str, ...] = ()
    key: str | None = None  # fingerprint of the rows: equal rows may share cached work

    @property
    def name(self) -> str:
        return " + ".join(s.name for s in self.sources)

    @property
    def n_tokens(self) -> int:
        return int(self.tensor.shape[0])

    def request(self, prompt_ids: Sequence[int], settings: SamplingSettings, sink: Sink | None = None,
                cancel: threading.Event | None = None, *, tokenizer: Any = None, eos: set[int] = frozenset(),
                generator: torch.Generator | None = None) -> Row:
        return Row(prompt_ids, self.tensor, settings, sink, cancel, tokenizer=tokenizer, eos=eos,
                   softprompt_key=self.key, generator=generator)


Active = Union[ActiveSoftPrompt, ActiveMixture]


def make_request(active: Active | None, prompt_ids: Sequence[int], settings: SamplingSettings,
                 sink: Sink | None = None, cancel: threading.Event | None = None, *, tokenizer: Any = None,
                 eos: set[int] = frozenset(), generator: torch.Generator | None = None) -> Request:
    """The core's request for a prompt under a soft prompt, a mixture, or neither."""
    if active is None:
        return Row(prompt_ids, None, settings, sink, cancel, tokenizer=tokenizer, eos=eos, generator=generator)
    return active.request(prompt_ids, settings, sink, cancel, tokenizer=tokenizer, eos=eos, generator=generator)


class Engine:
    def __init__(self, loaded: LoadedModel | None = None, limits: Limits = DEFAULT_LIMITS,
                 prefix_cache_bytes: int = DEFAULT_MAX_BYTES):
        self._loaded = loaded
        self._softprompt: Active | None = None
        self.limits = limits
        self.lock = threading.RLock()
        self.prefix_cache = PrefixCache(prefix_cache_bytes)

    # -- the model -------------------------------------------------------------------

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None or self._loaded.model is None:
            raise ModelError("no model is loaded; load one first.")
        return self._loaded

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None and self._loaded.model is not None

    def load(self, source: str | Path, options: LoadOptions = LoadOptions(), progress: Progress | None = None) -> LoadedModel:
        """Load a model, replacing (and freeing) the current one. The soft prompt is kept
        if it fits the new model, and dropped otherwise."""
        with self.lock:
            previous = self._softprompt
            self.unload()
            self._loaded = load_model(source, options, progress or (lambda m, f: None))
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
        if isinstance(active, ActiveMixture):
            return self.prepare_mixture(active.mixture, active.paths)
        return self.prepare_softprompts(active.sources)

    def prepare_softprompts(self, sources: Sequence[SoftPrompt | str | Path]) -> ActiveSoftPrompt | None:
        """Load, check and cast soft prompts for this model without activating them.
        Several are concatenated in order."""
        if not sources:
            return None
        loaded = self.loaded
        described, tensors, warnings = [], [], []
        for source in sources:
            path = source.path if isinstance(source, SoftPrompt) else Path(source)
            # The header first: a soft prompt for another width is refused before its
            # data is read. mkultra files have no header (describing one loads it), so
            # they are loaded once and checked after.
            if path.suffix.lower() != ".json":
                require_compatible(describe_softprompt(path, self.limits), self.hidden_size)
            softprompt, tensor = load_softprompt(path, self.limits)
            warnings += require_compatible(softprompt, self.hidden_size, loaded.info.name)
            described.append(softprompt)
            tensors.append(tensor)
        tensor = torch.cat([t.to(torch.float32) if t.dtype != tensors[0].dtype else t for t in tensors])
        tensor = tensor.to(dtype=loaded.dtype, device=loaded.input_device)
        if tensor.shape[0] >= self.context_length:
            raise ModelError(
                f"the soft prompt has {tensor.shape[0]} tokens, as many as the model's whole "
                f"context ({self.context_length}); choose a shorter one."
            )
        return ActiveSoftPrompt(tuple(described), tensor, tuple(warnings), softprompt_fingerprint(tensor))

    def set_softprompts(self, sources: Sequence[SoftPrompt | str | Path]) -> ActiveSoftPrompt | None:
        """Make these the active soft prompt (none: no soft prompt). On any error the
        previous one stays active."""
        prepared = self.prepare_softprompts(sources)
        with self.lock:
            self._softprompt = prepared
        return prepared

    def set_softprompt(self, source: SoftPrompt | str | Path | None) -> ActiveSoftPrompt | None:
        return self.set_softprompts([] if source is None else [source])

    def prepare_mixture(self, mixture: Mixture, paths: Sequence[str | Path]) -> ActiveMixture:
        """Load and check every member (`paths[i]` is member i's file) without activating
        the mixture. Members of weight 0 are left out; a member that cannot be used is
        refused with its name in the message."""
        self.loaded  # no model: say so, not that a member failed
        if len(paths) != len(mixture.members):
            raise MixtureError(f"mixture '{mixture.name}' has {len(mixture.members)} members but "
                               f"{len(paths)} files were given.", mixture.path)
        members, weights, used, warnings = [], [], [], []
        for member, path in zip(mixture.members, paths):
            if member.weight <= 0:
                continue
            try:
                prepared = self.prepare_softprompts([path])
            except KoboldError as exc:
                reason = getattr(exc, "reason", str(exc))
                raise MixtureError(f"mixture '{mixture.name}': member '{Path(member.softprompt).name}' cannot be "
                                   f"used: {reason}", mixture.path) from exc
            members.append(prepared)
            weights.append(member.weight)
            used.append(Path(path))
            warnings += prepared.warnings
        total = sum(weights)
        return ActiveMixture(mixture, tuple(members), tuple(w / total for w in weights), tuple(used),
                             tuple(warnings))

    def set_mixture(self, mixture: Mixture, paths: Sequence[str | Path]) -> ActiveMixture:
        """Make a mixture the active soft prompt. On any error the previous one stays."""
        prepared = self.prepare_mixture(mixture, paths)
        with self.lock:
            self._softprompt = prepared
        return prepared

    # -- generating --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.loaded.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def context_budget(self, settings: SamplingSettings, context_limit: int | None = None) -> int:
        """Prompt tokens that fit: context length (or a smaller limit the user set) minus
        max new tokens minus the active soft prompt's tokens."""
        active = self._softprompt
        context = min(self.context_length, context_limit) if context_limit else self.context_length
        return context - settings.max_new_tokens - (active.n_tokens if active else 0)

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
            total = len(prompt_ids) + (active.n_tokens if active else 0) + settings.max_new_tokens
            if total > self.context_length:
                raise ModelError(
                    f"the prompt ({len(prompt_ids)} tokens), soft prompt "
                    f"({active.n_tokens if active else 0}) and max new tokens "
                    f"({settings.max_new_tokens}) need {total} tokens; the model's context is "
                    f"{self.context_length}."
                )
        events: list = []
        request = make_request(active, prompt_ids, settings, events.append, cancel, tokenizer=loaded.tokenizer,
                               eos=eos_token_ids(loaded.model, loaded.tokenizer))
        yield from stream_request(loaded.model, request, events, lock=self.lock, check=lambda: self.require(loaded),
                                  core=loaded.new_core(self.prefix_cache))

    def run(self, sequences: Sequence[Request], max_batch: int = 64) -> None:
        """Run `sequences` together until every one has ended (rows join as others leave),
        each reporting to its own sink. Holds the lock one step at a time."""
        loaded = self.loaded
        core = loaded.new_core(self.prefix_cache)
        waiting = list(sequences)
        try:
            while waiting or core.active:
                with self.lock:
                    self.require(loaded)
                    core.admit(waiting, max_batch)
                    if core.active:
                        core.step()
        except BaseException as exc:
            core.fail_all(exc if isinstance(exc, Exception) else ModelError("stopped"))
            for row in waiting:
                row.fail(exc)
            raise

    def generate(
        self,
        prompt: str | Sequence[int],
        settings: SamplingSettings = SamplingSettings(),
        cancel: threading.Event | None = None,
        softprompt: Active | None | str = "active",
    ) -> GenerationResult:
        return collect(self.stream(prompt, settings, cancel, softprompt))
