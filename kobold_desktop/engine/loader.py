"""Loading a causal language model and its tokenizer, and freeing them again."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from kobold_desktop.engine.backend import Backend, TransformersBackend
from kobold_desktop.engine.device import choose_device, dtype_choice
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.llamacpp.header import is_gguf
from kobold_desktop.engine.model_info import ModelInfo, read_model_info
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.sequence import Request, Sink, eos_token_ids
from kobold_desktop.engine.sequence import Sequence as Row

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


def room(context_length: int, active: Any, max_new_tokens: int, context_limit: int | None = None) -> int:
    """Prompt tokens that fit: the context (or a smaller limit the user set) less the soft
    prompt's rows (`active.n_tokens`; None: none) and the tokens to generate. The one
    context-fit rule, for local models and servers alike."""
    context = min(context_length, context_limit) if context_limit else context_length
    return context - max_new_tokens - (active.n_tokens if active is not None else 0)


@dataclass
class LoadedModel:
    """A model ready to generate: a tokenizer, what we know of the model, and the backend
    that runs it. Everything that differs between backends is the backend's (backend.py)."""

    model: Any
    tokenizer: Any
    info: ModelInfo
    source: str
    dtype: torch.dtype
    device_map: dict[str, Any] | None = field(default=None)
    dtype_reason: str = ""  # why this precision (see device.dtype_choice)
    runtime: Backend | None = None  # transformers unless the loader gives another

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = TransformersBackend(self.model, self.dtype, self.device_map, self.dtype_reason)

    @property
    def backend(self) -> str:
        """"transformers", "llama.cpp" (a GGUF file) or "embeddings only" (a remote vLLM)."""
        return self.runtime.name

    @property
    def input_device(self) -> torch.device:
        return self.runtime.input_device

    @property
    def precision(self) -> str:
        return self.runtime.precision

    def runs_on(self) -> dict[str, str]:
        """Where and in what precision the model runs, and why: what `generate --json`, the
        server's /v1/models and start-up line, the window and --self-test all say."""
        return self.runtime.runs_on()

    @property
    def hidden_size(self) -> int:
        return self.runtime.hidden_size

    @property
    def device_label(self) -> str:
        return self.runtime.device_label

    @property
    def context_length(self) -> int:
        return self.info.context_length or 2048

    @property
    def fingerprint(self) -> str | None:
        """What the model is (`engine/fingerprint.py`): its vocabulary and shape, hashed."""
        if "_fingerprint" not in self.__dict__:
            from kobold_desktop.engine.fingerprint import of_tokenizer

            self.__dict__["_fingerprint"] = (of_tokenizer(self.tokenizer, self.hidden_size, self.info.layers)
                                             if self.tokenizer is not None else None)
        return self.__dict__["_fingerprint"]

    @property
    def eos_ids(self) -> frozenset[int]:
        """The tokens that end a generation: the one EOS rule (sequence.eos_token_ids)."""
        return frozenset(eos_token_ids(self.model, self.tokenizer))

    def new_core(self, prefix_cache: Any = None, shift: bool = False) -> Any:
        """A stepping core on this model (llama.cpp keeps its own prefix cache in its
        context, so `prefix_cache` is for transformers models); `shift` turns on context
        shift where the model allows it (`shift_refusal`)."""
        return self.runtime.new_core(prefix_cache, shift)

    def shift_refusal(self) -> str | None:
        """Why context shift cannot run on this model, or None when it can."""
        return self.runtime.shift_refusal()

    def room(self, active: Any, max_new_tokens: int, context_limit: int | None = None) -> int:
        """Prompt tokens that fit under `active` (see `room`)."""
        return room(self.context_length, active, max_new_tokens, context_limit)

    def check_fits(self, prompt_tokens: int, active: Any, max_new_tokens: int) -> None:
        """Raise `ContextOverflow` unless the prompt fits the context with the soft prompt
        and the tokens to generate."""
        if prompt_tokens > self.room(active, max_new_tokens):
            raise ContextOverflow(prompt_tokens, active.n_tokens if active is not None else 0, max_new_tokens,
                                  self.context_length)

    def new_request(self, prompt_ids: Sequence[int], active: Any, settings: SamplingSettings,
                    sink: Sink | None = None, cancel: threading.Event | None = None, *,
                    generator: torch.Generator | None = None, logprobs: int | None = None) -> Request:
        """The core's request for a prompt under a soft prompt, a mixture, or neither,
        with this model's tokenizer and EOS tokens. Raises `ContextOverflow` when the
        prompt, the soft prompt and the tokens to generate do not fit the context."""
        self.check_fits(len(prompt_ids), active, settings.max_new_tokens)
        settings.check_vocab(len(self.tokenizer))
        if active is None:
            request = Row(prompt_ids, None, settings, sink, cancel, tokenizer=self.tokenizer, eos=self.eos_ids,
                          generator=generator)
        else:
            request = active.request(prompt_ids, settings, sink, cancel, tokenizer=self.tokenizer, eos=self.eos_ids,
                                     generator=generator)
        request.want_logprobs(logprobs)
        return request

    def require_transformers(self, what: str) -> None:
        """Tuning and ranking need gradients or a full forward pass: transformers only."""
        if not self.runtime.trainable:
            raise ModelError(f"{what} needs the model's transformers weights (a folder with config.json); "
                             + self.runtime.training_refusal.format(file=Path(self.source).name))

    def unload(self) -> None:
        """Drop the weights and give the memory back."""
        if self.runtime is not None:
            self.runtime.close()
        self.model = None
        self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class ContextOverflow(ModelError):
    """The prompt, the soft prompt and the tokens to generate need more than the context."""

    def __init__(self, prompt: int, softprompt: int, new_tokens: int, context: int):
        self.prompt, self.softprompt, self.new_tokens, self.context = prompt, softprompt, new_tokens, context
        self.total = prompt + softprompt + new_tokens
        super().__init__(f"the prompt ({prompt} tokens), soft prompt ({softprompt}) and max new tokens "
                         f"({new_tokens}) need {self.total} tokens; the model's context is {context}.")


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or "\\" in source


def _is_gguf_source(source: str) -> bool:
    return source.lower().endswith(".gguf") or (Path(source).expanduser().is_file() and is_gguf(source))


def load_model(
    source: str | Path, options: LoadOptions = LoadOptions(), progress: Progress = _no_progress
) -> LoadedModel:
    """Load a local model folder (safetensors preferred), a Hugging Face model id, or a
    GGUF file (llama.cpp): the first backend in `BACKENDS` that takes the source."""
    source = str(source)
    for _name, takes, load in BACKENDS:
        if takes(source):
            return load(source, options, progress)
    raise ModelError(f"no backend loads '{source}'.")  # the last entry takes everything


def load_transformers(source: str, options: LoadOptions = LoadOptions(),
                      progress: Progress = _no_progress) -> LoadedModel:
    """A transformers model folder or Hugging Face id, on the chosen device and precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    return LoadedModel(model, tokenizer, info, source, dtype, device_map, dtype_reason=reason)


def load_gguf(source: str | Path, options: LoadOptions = LoadOptions(), progress: Progress = _no_progress) -> LoadedModel:
    """Load a GGUF file with llama.cpp. Its name, hidden size and context length come from
    the file's metadata, so soft prompts are checked against it as for any model."""
    from kobold_desktop.engine.llamacpp.backend import GgufBackend
    from kobold_desktop.engine.llamacpp.model import GgufModel, GgufOptions, GgufTokenizer

    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelError(f"no GGUF file at '{source}'.")
    progress(f"Loading {path.name} with llama.cpp", 0.2)
    model = GgufModel(path, GgufOptions(threads=options.threads, context=options.context,
                                        gpu_layers=options.gpu_layers))
    layers = model.meta(f"{model.architecture}.block_count")
    info = ModelInfo(model.name, model.hidden_size, model.context_length, model.architecture,
                     int(layers) if layers and layers.isdigit() else None)
    progress("Ready", 1.0)
    return LoadedModel(model, GgufTokenizer(model), info, str(path), torch.float32, runtime=GgufBackend(model))


def load_trainable(source: str | Path, options: LoadOptions = LoadOptions(), progress: Progress = _no_progress,
                   say: Callable[[str], None] = lambda message: None) -> LoadedModel:
    """A model to train through (tuning, ranking, mixture weights): transformers weights.
    A GGUF file is dequantized by transformers (`llamacpp/dequantize.py`: exactly the numbers
    llama.cpp runs, cached after the first time) and keeps the file's name and source, so
    what is made on it is made for the GGUF. `say` hears what that will take first."""
    source = str(source)
    if not _is_gguf_source(source):
        return load_model(source, options, progress)
    from kobold_desktop.engine.llamacpp.dequantize import dequantized_folder
    from kobold_desktop.engine.llamacpp.header import gguf_info

    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelError(f"no GGUF file at '{source}'.")
    name = gguf_info(path)[0]
    dtype, _ = dtype_choice(choose_device(options.device), options.dtype)
    progress(f"Reading the weights of {path.name} for training", 0.05)
    folder = dequantized_folder(path, dtype, say)
    loaded = load_transformers(str(folder), replace(options, dtype=str(dtype).removeprefix("torch.")), progress)
    loaded.info = replace(loaded.info, name=name)
    loaded.source = str(path)
    return loaded


# Which backend loads a source: the first whose test takes it. (The embeddings-only
# backend for a remote vLLM is chosen by `serve --backend vllm`, not by the source.)
BACKENDS: tuple[tuple[str, Callable[[str], bool], Callable[..., LoadedModel]], ...] = (
    ("llama.cpp", _is_gguf_source, load_gguf),
    ("transformers", lambda source: True, load_transformers),
)
