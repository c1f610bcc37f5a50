"""What a way of running a model offers the engine, declared once.

A `LoadedModel` (loader.py) is a tokenizer, what we know of the model (`ModelInfo`) and a
`Backend`: transformers (`TransformersBackend`, here), llama.cpp for GGUF files
(`llamacpp.backend.GgufBackend`) or the input embeddings alone for a remote vLLM
(`remote.embeddings.EmbeddingsBackend`). The engine asks the backend for the width of a
soft prompt's rows, where they go, what the weights are stored as, and a stepping core
(`core.BaseCore`: add a request's rows, step every row once, keep or drop their caches).
The loader picks a backend by a table (`loader.BACKENDS`), never by `if` on its name.

A second shape is what the window writes with (`Writer`): the local `Engine`, or a
`remote.client.RemoteSession` that sends the story's context to a server instead.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence, runtime_checkable

import torch


if TYPE_CHECKING:
    from kobold_desktop.engine.core import BaseCore
    from kobold_desktop.engine.prefix_cache import PrefixCache
    from kobold_desktop.engine.sampling import SamplingSettings


@runtime_checkable
class Backend(Protocol):
    """One way of running a model."""

    name: str  # "transformers", "llama.cpp", "embeddings only"
    trainable: bool  # gradients through the weights (tuning, ranking): transformers only
    training_refusal: str  # why not, when not; "{file}" is the model's file name
    model: Any  # what the core runs (a transformers model, a GgufModel, an EmbeddingTable)

    @property
    def hidden_size(self) -> int:
        """The width of the input embeddings: what a soft prompt's rows must have."""

    @property
    def input_device(self) -> torch.device:
        """Where soft prompt rows go (the first layer's device when split; the host for llama.cpp)."""

    @property
    def precision(self) -> str:
        """What the weights are stored as: "bfloat16", or a GGUF type such as "Q8_0"."""

    @property
    def device_label(self) -> str:
        """Where it runs, for the window's model line."""

    def runs_on(self) -> dict[str, str]:
        """Backend, device, precision and why: what every front end reports."""

    def new_core(self, prefix_cache: "PrefixCache | None", shift: bool = False) -> "BaseCore":
        """A stepping core on this model; `shift`: reuse cached work past dropped text by
        moving it (context shift), where the model allows it."""

    def shift_refusal(self) -> str | None:
        """Why context shift cannot run on this model, or None when it can."""

    def close(self) -> None:
        """Free the weights (and any native memory)."""


class TransformersBackend:
    """A transformers causal LM on one device, or split between GPU and CPU (`device_map`)."""

    name = "transformers"
    trainable = True
    training_refusal = ""

    def __init__(self, model: Any, dtype: torch.dtype, device_map: dict[str, Any] | None = None,
                 dtype_reason: str = ""):
        self.model = model
        self.dtype = dtype
        self.device_map = device_map
        self.dtype_reason = dtype_reason  # why this precision (device.dtype_choice)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def device_label(self) -> str:
        if self.device_map:
            return "split: " + ", ".join(sorted({str(d) for d in self.device_map.values()}))
        return str(self.input_device)

    def runs_on(self) -> dict[str, str]:
        return {"backend": self.name, "device": self.device_label, "precision": self.precision,
                "why": self.dtype_reason}

    def new_core(self, prefix_cache: "PrefixCache | None", shift: bool = False) -> "BaseCore":
        from kobold_desktop.engine.core import StepCore

        return StepCore(self.model, prefix_cache, shift)

    def shift_refusal(self) -> str | None:
        import kobold_desktop.engine.rope as rope

        if self.device_map:
            return "context shift does not support a model split between devices"
        return rope.refusal(self.model)

    def close(self) -> None:
        self.model = None


@runtime_checkable
class Writer(Protocol):
    """What the window's model thread writes with: the local `Engine` or a `RemoteSession`."""

    lock: Any

    @property
    def is_loaded(self) -> bool: ...

    @property
    def loaded(self) -> Any: ...  # `LoadedModel`, or the server's `RemoteLoaded`

    @property
    def hidden_size(self) -> int: ...

    @property
    def softprompt(self) -> Any: ...  # `active.Active`, `active.RemoteModel` or None

    def context_budget(self, settings: "SamplingSettings", context_limit: int | None = None) -> int: ...

    def stream(self, prompt: Sequence[int], settings: "SamplingSettings",
               cancel: threading.Event | None = None) -> Iterator[Any]: ...
