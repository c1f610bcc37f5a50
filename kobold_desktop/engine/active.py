"""The active soft prompt: the one shape in which a chosen soft prompt reaches the engine.

Whatever the user chose (a soft prompt file, several to concatenate, a mixture file, a
mixture built on the command line, or one of a connected server's models) becomes one of
the types here by one function, `prepare`, with one rule for finding a mixture's members
(`softprompt.mixture.resolve_member`). The window, the server, the Python API and the
command line all call it. `SoftPromptStatus.of` is what the window shows of it.

    active = prepare(loaded, "Proverbs.zip", library)   # or a mixture file, a list, a Mixture
    request = active.request(prompt_ids, settings, sink, ...)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import torch

from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.mixture import MixedSequence
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.sequence import Sequence as Row
from kobold_desktop.engine.sequence import Sink, softprompt_fingerprint
from kobold_desktop.errors import KoboldError
from kobold_desktop.softprompt.io import describe_softprompt, load_softprompt, require_compatible
from kobold_desktop.softprompt.library import SoftPromptLibrary, same_file
from kobold_desktop.softprompt.mixture import Mixture, MixtureError, is_mixture_file, mixture_label, read_mixture, \
    resolve_members
from kobold_desktop.softprompt.types import DEFAULT_LIMITS, Limits, SoftPrompt

if TYPE_CHECKING:
    from kobold_desktop.engine.loader import LoadedModel


@dataclass(frozen=True)
class ActiveSoftPrompt:
    """Soft prompt rows ready for the model: cast to its dtype, on its input device.
    Several soft prompts given together are concatenated in order."""

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

    @property
    def files(self) -> tuple[Path, ...]:
        """The files the user chose, in order."""
        return tuple(s.path for s in self.sources)

    def request(self, prompt_ids: Sequence[int], settings: SamplingSettings, sink: Sink | None = None,
                cancel: threading.Event | None = None, *, tokenizer: Any = None, eos: frozenset[int] = frozenset(),
                generator: torch.Generator | None = None) -> Row:
        return Row(prompt_ids, self.tensor, settings, sink, cancel, tokenizer=tokenizer, eos=eos,
                   softprompt_key=self.key, generator=generator)


@dataclass(frozen=True)
class ActiveMixture:
    """A mixture ready for the model: each member's rows prepared, weights normalized."""

    mixture: Mixture
    members: tuple[ActiveSoftPrompt, ...]
    weights: tuple[float, ...]
    paths: tuple[Path, ...]  # each member's file, for preparing again on another model
    warnings: tuple[str, ...] = ()
    key: str | None = None  # a mixture's rows are cached per member

    @property
    def mode(self) -> str:
        return self.mixture.mode

    @property
    def name(self) -> str:
        """What the light reads: "Mixture: Proverbs 70% + Laws of Leviticus 30%"."""
        return mixture_label([m.name for m in self.members], self.weights)

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def n_tokens(self) -> int:
        """The longest member's rows: what the context must leave room for."""
        return max(m.n_tokens for m in self.members)

    @property
    def sources(self) -> tuple[SoftPrompt, ...]:
        return tuple(s for m in self.members for s in m.sources)

    @property
    def files(self) -> tuple[Path, ...]:
        """The mixture's own file (a mixture built on the command line has none: its members)."""
        return (self.mixture.path,) if self.mixture.path is not None else self.paths

    def request(self, prompt_ids: Sequence[int], settings: SamplingSettings, sink: Sink | None = None,
                cancel: threading.Event | None = None, *, tokenizer: Any = None, eos: frozenset[int] = frozenset(),
                generator: torch.Generator | None = None) -> MixedSequence:
        return MixedSequence(prompt_ids, [(m.tensor, m.key) for m in self.members], self.weights, self.mode,
                             settings, sink, cancel, tokenizer=tokenizer, eos=eos, generator=generator)


Active = Union[ActiveSoftPrompt, ActiveMixture]


@dataclass(frozen=True)
class RemoteModel:
    """One of a connected server's models chosen as the soft prompt: the rows live on the
    server, which is asked for this model by name."""

    name: str
    n_tokens: int = 0
    warnings: tuple[str, ...] = ()


# What a user picks in a list: a file of the library (or given by path), or a server's model.
Choice = Union[Path, RemoteModel]
# What `prepare` takes: a path or library name, several of them (concatenated), a mixture
# (its members looked up by the one rule), or nothing.
Source = Union[str, Path, Mixture, Sequence[Union[str, Path]], None]
Allow = Callable[[Path], None]


def same_choice(a: Choice | None, b: Choice | None) -> bool:
    """The same file however its path is written (`library.same_file`), or the same server model."""
    if isinstance(a, RemoteModel) or isinstance(b, RemoteModel):
        return isinstance(a, RemoteModel) and isinstance(b, RemoteModel) and a.name == b.name
    if a is None or b is None:
        return a is None and b is None
    return same_file(Path(a), Path(b))  # raises for a file the caller may not read (the server's folder rule)


def prepare(loaded: "LoadedModel", source: Source, library: SoftPromptLibrary | None = None, *,
            limits: Limits = DEFAULT_LIMITS, allow: Allow | None = None) -> Active | None:
    """The one way from what a user chose to rows the model can use.

    A name is looked up in `library` (the user's folder and the examples when None); a
    mixture file's members are found beside it, then in the library's folders. `allow` is
    asked about every file before it is read, a mixture's members included."""
    if source is None or (isinstance(source, (list, tuple)) and not source):
        return None
    lookup = library if library is not None else _DefaultLibrary()
    if isinstance(source, Mixture):
        members = resolve_members(source, lookup.folders)
        for member in members:
            if allow is not None:
                allow(member)
        return prepare_mixture(loaded, source, members, limits)
    given = list(source) if isinstance(source, (list, tuple)) else [source]
    files = [item if isinstance(item, Path) and item.exists() else lookup.resolve(item) for item in given]
    mixtures = [f for f in files if is_mixture_file(f)]
    if mixtures and len(files) > 1:
        raise MixtureError("a mixture file cannot be concatenated with other soft prompts; give it alone.",
                           mixtures[0])
    for file in files:
        if allow is not None:
            allow(file)
    if mixtures:
        return prepare(loaded, read_mixture(files[0]), lookup, limits=limits, allow=allow)
    return prepare_softprompts(loaded, files, limits)


class _DefaultLibrary:
    """The default library, made only when a name or a mixture's members are looked up (it
    creates the user's folder)."""

    _library: SoftPromptLibrary | None = None

    def _get(self) -> SoftPromptLibrary:
        if self._library is None:
            self._library = SoftPromptLibrary()
        return self._library

    @property
    def folders(self) -> list[Path]:
        return self._get().folders

    def resolve(self, name_or_path: str | Path) -> Path:
        return self._get().resolve(name_or_path)


def prepare_softprompts(loaded: "LoadedModel", sources: Sequence[SoftPrompt | str | Path],
                        limits: Limits = DEFAULT_LIMITS) -> ActiveSoftPrompt | None:
    """Load, check and cast soft prompt files (concatenated in order) for this model."""
    if not sources:
        return None
    described, tensors, warnings = [], [], []
    for source in sources:
        path = source.path if isinstance(source, SoftPrompt) else Path(source)
        # The header first: a soft prompt for another width is refused before its data is
        # read. mkultra files have no header (describing one loads it), so they are loaded
        # once and checked after.
        if path.suffix.lower() != ".json":
            require_compatible(describe_softprompt(path, limits), loaded.hidden_size)
        softprompt, tensor = load_softprompt(path, limits)
        warnings += require_compatible(softprompt, loaded.hidden_size, loaded.info.name, loaded.fingerprint)
        described.append(softprompt)
        tensors.append(tensor)
    tensor = torch.cat([t.to(torch.float32) if t.dtype != tensors[0].dtype else t for t in tensors])
    tensor = tensor.to(dtype=loaded.dtype, device=loaded.input_device)
    if tensor.shape[0] >= loaded.context_length:
        raise ModelError(
            f"the soft prompt has {tensor.shape[0]} tokens, as many as the model's whole "
            f"context ({loaded.context_length}); choose a shorter one."
        )
    return ActiveSoftPrompt(tuple(described), tensor, tuple(warnings), softprompt_fingerprint(tensor))


def prepare_mixture(loaded: "LoadedModel", mixture: Mixture, paths: Sequence[str | Path],
                    limits: Limits = DEFAULT_LIMITS) -> ActiveMixture:
    """Every member (`paths[i]` is member i's file) loaded and checked. Members of weight 0
    are left out; a member that cannot be used is refused with its name in the message."""
    if len(paths) != len(mixture.members):
        raise MixtureError(f"mixture '{mixture.name}' has {len(mixture.members)} members but "
                           f"{len(paths)} files were given.", mixture.path)
    members, weights, used, warnings = [], [], [], []
    for member, path in zip(mixture.members, paths):
        if member.weight <= 0:
            continue
        try:
            prepared = prepare_softprompts(loaded, [path], limits)
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


def prepare_again(loaded: "LoadedModel", active: Active, limits: Limits = DEFAULT_LIMITS) -> Active | None:
    """The same soft prompt for another model (after the model changed)."""
    if isinstance(active, ActiveMixture):
        return prepare_mixture(loaded, active.mixture, active.paths, limits)
    return prepare_softprompts(loaded, active.sources, limits)


@dataclass(frozen=True)
class SoftPromptStatus:
    """What the window shows of the active soft prompt: the light's text, the rows of the
    list it marks (`chosen`), and a mixture's members."""

    name: str
    n_tokens: int
    chosen: tuple[Choice, ...]  # what the user picked: the files (a mixture's own file), or a server model
    warnings: tuple[str, ...] = ()
    members: tuple[str, ...] = ()  # a mixture's member names
    weights: tuple[float, ...] = ()  # and their weights
    mode: str | None = None  # "bayes" or "fixed" for a mixture

    @property
    def is_mixture(self) -> bool:
        return self.mode is not None

    @property
    def first(self) -> Choice | None:
        return self.chosen[0] if self.chosen else None

    def shows(self, choice: Choice | None) -> bool:
        """Whether a row of the list (a library file or a server model) is what is active."""
        return choice is not None and any(same_choice(chosen, choice) for chosen in self.chosen)

    @classmethod
    def of(cls, active: Active | RemoteModel | None) -> "SoftPromptStatus | None":
        if active is None:
            return None
        if isinstance(active, RemoteModel):
            return cls(active.name, active.n_tokens, (active,))
        if isinstance(active, ActiveMixture):
            return cls(active.name, active.n_tokens, active.files, active.warnings, active.member_names,
                       active.weights, active.mode)
        return cls(active.name, active.n_tokens, active.files, active.warnings)
