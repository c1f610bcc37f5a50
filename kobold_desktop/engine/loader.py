"""Loading a causal language model and its tokenizer, and freeing them again."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kobold_desktop.engine.device import choose_device, dtype_choice
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.model_info import ModelInfo, read_model_info
from kobold_desktop.engine.llamacpp.model import is_gguf

Progress = Callable[[str, float], None]  # (what is happening, fraction done 0..1)


def _no_progress(message: str, fraction: float) -> None:
    pass


@dataclass(frozen=True)
class LoadOptions:
    device: str | None = None  # "cuda", "cuda:1", "mps", "cpu"; None/"auto" chooses
    dtype: str | None = None  # "float32", "float16", "bfloat16"; None/"auto" chooses
    # Split layers between GPU and CPU ("breakmodel"): the most GPU memory to use, e.g.
    # "6GiB". The rest of the layers stay in CPU memory.
    max_gpu_memory: str | None = None
    trust_remote_code: bool = False
    # GGUF files (llama.cpp): CPU threads, context length per sequence and layers on the
    # GPU; None chooses (physical cores; the model's context, at most 4096; all layers
    # when llama.cpp was built with CUDA or Metal).
    threads: int | None = None
    context: int | None = None
    gpu_layers: int | None = None


@dataclass
class LoadedModel:
    """A model ready to generate: weights, tokenizer and what we know about them."""

    model: Any
    tokenizer: Any
    info: ModelInfo
    source: str
    dtype: torch.dtype
    device_map: dict[str, Any] | None = field(default=None)
    dtype_reason: str = ""  # why this precision (see device.dtype_choice)

    @property
    def backend(self) -> str:
        """"transformers", or "llama.cpp" for a GGUF file."""
        return getattr(self.model, "backend", "transformers")

    @property
    def input_device(self) -> torch.device:
        """Where the input embeddings live (the first layer's device when split); llama.cpp
        takes soft prompt rows from the host."""
        if self.backend != "transformers":
            return torch.device("cpu")
        return self.model.get_input_embeddings().weight.device

    @property
    def precision(self) -> str:
        """What the weights are stored as: "bfloat16", or a GGUF type such as "Q8_0"."""
        if self.backend != "transformers":
            return self.model.precision
        return str(self.dtype).removeprefix("torch.")

    def runs_on(self) -> dict[str, str]:
        """Where and in what precision the model runs, and why: what `generate --json`, the
        server's /v1/models and start-up line, the window and --self-test all say."""
        if self.backend != "transformers":
            gpu = self.model.gpu_layers
            device = f"{gpu} layers on the GPU" if gpu else f"cpu ({self.model.cpu.variant})"
            return {"backend": "llama.cpp", "device": device, "precision": self.precision,
                    "why": self.model.cpu.describe()}
        return {"backend": "transformers", "device": self.device_label, "precision": self.precision,
                "why": self.dtype_reason}

    @property
    def hidden_size(self) -> int:
        """The width of the input embeddings: what a soft prompt's rows must have."""
        if self.backend != "transformers":
            return self.model.hidden_size
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def context_length(self) -> int:
        return self.info.context_length or 2048

    def new_core(self, prefix_cache: Any = None) -> Any:
        """A stepping core on this model (llama.cpp keeps its own prefix cache in its
        context, so `prefix_cache` is for transformers models)."""
        if self.backend != "transformers":
            from kobold_desktop.engine.llamacpp.core import LlamaCore

            return LlamaCore(self.model)
        from kobold_desktop.engine.core import StepCore

        return StepCore(self.model, prefix_cache)

    def require_transformers(self, what: str) -> None:
        """Tuning and ranking need gradients or a full forward pass: transformers only."""
        if self.backend != "transformers":
            raise ModelError(f"{what} needs the model's transformers weights (a folder with config.json); "
                             f"'{Path(self.source).name}' is a GGUF file for llama.cpp. Use the transformers "
                             "model it was converted from: a soft prompt made on it works on the GGUF too.")

    @property
    def device_label(self) -> str:
        if self.backend != "transformers":
            gpu = self.model.gpu_layers
            return f"llama.cpp, {self.model.threads} threads" + (f", {gpu} layers on the GPU" if gpu else ", CPU")
        if self.device_map:
            devices = sorted({str(d) for d in self.device_map.values()})
            return "split: " + ", ".join(devices)
        return str(self.input_device)

    def unload(self) -> None:
        """Drop the weights and give the memory back."""
        if self.model is not None and hasattr(self.model, "close"):
            self.model.close()
        self.model = None
        self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or "\\" in source


def load_model(
    source: str | Path, options: LoadOptions = LoadOptions(), progress: Progress = _no_progress
) -> LoadedModel:
    """Load a local model folder (safetensors preferred), a Hugging Face model id, or a
    GGUF file (llama.cpp)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(source)
    if source.lower().endswith(".gguf") or (Path(source).expanduser().is_file() and is_gguf(source)):
        return load_gguf(source, options, progress)
    if _is_local(source) and not Path(source).expanduser().is_dir():
        raise ModelError(f"no model folder at '{source}'.")
    if _is_local(source):
        source = str(Path(source).expanduser())
    progress("Reading the model's config", 0.05)
    info = read_model_info(source, trust_remote_code=options.trust_remote_code)
    device = choose_device(options.device)
    dtype, reason = dtype_choice(device, options.dtype)

    progress("Loading the tokenizer", 0.15)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load the tokenizer of '{source}': {str(exc).splitlines()[0]}") from exc

    progress(f"Loading the weights ({str(dtype).removeprefix('torch.')}, {device})", 0.3)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": options.trust_remote_code,
        "low_cpu_mem_usage": True,
    }
    if options.max_gpu_memory and device.type == "cuda":
        index = device.index or 0
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {index: options.max_gpu_memory, "cpu": "1024GiB"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model '{source}': {str(exc).splitlines()[0]}") from exc
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelError(
            "the model does not fit in GPU memory; set a GPU memory limit to split its layers "
            "between the GPU and the CPU, or choose a smaller model."
        ) from exc
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None:
        progress(f"Moving the model to {device}", 0.85)
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    progress("Ready", 1.0)
    return LoadedModel(model, tokenizer, info, source, dtype, device_map,
                       dtype_reason=reason)


def load_gguf(source: str | Path, options: LoadOptions = LoadOptions(), progress: Progress = _no_progress) -> LoadedModel:
    """Load a GGUF file with llama.cpp. Its name, hidden size and context length come from
    the file's metadata, so soft prompts are checked against it as for any model."""
    from kobold_desktop.engine.llamacpp.model import GgufModel, GgufOptions, GgufTokenizer

    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelError(f"no GGUF file at '{source}'.")
    progress(f"Loading {path.name} with llama.cpp", 0.2)
    model = GgufModel(path, GgufOptions(threads=options.threads, context=options.context,
                                        gpu_layers=options.gpu_layers))
    info = ModelInfo(model.name, model.hidden_size, model.context_length, model.architecture)
    progress("Ready", 1.0)
    return LoadedModel(model, GgufTokenizer(model), info, str(path), torch.float32)
