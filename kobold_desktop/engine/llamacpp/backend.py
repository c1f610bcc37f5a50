"""llama.cpp as a `Backend` (engine/backend.py): a GGUF file's facts and its stepping core."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kobold_desktop.engine.llamacpp.model import GgufModel

if TYPE_CHECKING:
    from kobold_desktop.engine.core import BaseCore
    from kobold_desktop.engine.prefix_cache import PrefixCache


class GgufBackend:
    name = "llama.cpp"
    trainable = False
    # llama.cpp cannot train; tuning and ranking read a GGUF's weights through transformers
    # instead (`loader.load_trainable`), so this is said only where that is not offered.
    training_refusal = ("'{file}' is a GGUF file for llama.cpp, which cannot train; load it for training "
                        "(kobold-desktop tune and softprompt rank do).")

    def __init__(self, model: GgufModel):
        self.model = model

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def input_device(self) -> torch.device:
        return torch.device("cpu")  # llama.cpp takes soft prompt rows from the host

    @property
    def precision(self) -> str:
        return self.model.precision

    @property
    def device_label(self) -> str:
        gpu = self.model.gpu_layers
        return f"llama.cpp, {self.model.threads} threads" + (f", {gpu} layers on the GPU" if gpu else ", CPU")

    def runs_on(self) -> dict[str, str]:
        gpu = self.model.gpu_layers
        device = f"{gpu} layers on the GPU" if gpu else f"cpu ({self.model.cpu.variant})"
        return {"backend": self.name, "device": device, "precision": self.precision,
                "why": self.model.cpu.describe()}

    def new_core(self, prefix_cache: "PrefixCache | None", shift: bool = False) -> "BaseCore":
        """llama.cpp keeps its own prefix cache in its context: `prefix_cache` is unused."""
        from kobold_desktop.engine.llamacpp.core import LlamaCore

        return LlamaCore(self.model, shift)

    def shift_refusal(self) -> str | None:
        return self.model.shift_refusal()

    def close(self) -> None:
        self.model.close()
