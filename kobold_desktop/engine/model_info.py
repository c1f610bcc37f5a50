"""What the app needs to know about a model before (or without) loading its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kobold_desktop.engine.errors import ModelError


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what `supported` lists in meta.json compare against
    hidden_size: int
    context_length: int | None
    architecture: str
    layers: int | None = None  # transformer blocks (part of the model's fingerprint)


def model_name(model: str | Path) -> str:
    """A folder's name, or the Hugging Face id as given."""
    path = Path(model)
    return path.resolve().name if path.exists() else str(model)


def read_model_info(model: str | Path, *, trust_remote_code: bool = False) -> ModelInfo:
    """Read a model's config (a local folder, a Hugging Face id in the local cache or
    online, or a GGUF file's header) without loading its weights."""
    from transformers import AutoConfig

    if str(model).lower().endswith(".gguf") and Path(model).expanduser().is_file():
        from kobold_desktop.engine.llamacpp.header import gguf_info

        from kobold_desktop.engine.llamacpp.header import read_metadata

        name, arch, hidden, context = gguf_info(model)
        layers = read_metadata(model, ("{arch}.block_count",)).get(f"{arch}.block_count")
        return ModelInfo(name, hidden, min(context, 4096) if context else None, arch,
                         layers if isinstance(layers, int) else None)

    try:
        config = AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read the model '{model}': {str(exc).splitlines()[0]} (give a folder with "
            "config.json, or a Hugging Face id that is cached or reachable online)."
        ) from exc
    text_config = config.get_text_config()
    hidden = getattr(text_config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise ModelError(f"the model '{model}' has no hidden size in its config.")
    context = None
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            context = value
            break
    architectures = getattr(config, "architectures", None) or [config.model_type]
    layers = next((v for v in (getattr(text_config, a, None) for a in ("num_hidden_layers", "n_layer", "num_layers"))
                   if isinstance(v, int)), None)
    return ModelInfo(model_name(model), hidden, context, architectures[0], layers)
