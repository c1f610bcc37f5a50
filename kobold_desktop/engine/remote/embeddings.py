"""A model's input embedding table, read alone from its safetensors.

A remote backend (vLLM) runs the model; we only turn a prompt into the rows it takes,
`[soft prompt rows][token embeddings]`, so we need the tokenizer and the one tensor that
maps token ids to embeddings: for a 70B model, 1 to 2 GB instead of 140. safetensors
lets us read that tensor without touching the rest of the file (or the other shards).

`load_embeddings_only` gives a `LoadedModel` whose "model" is that table, so that the
engine's soft prompt checks (width, dtype, length against the context) work as for a
real model, and nothing else can run on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kobold_desktop.engine.backend import TransformersBackend
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.loader import LoadedModel, Progress, _is_local, _no_progress
from kobold_desktop.engine.model_info import read_model_info

# The input embedding's name in each family's checkpoints (the end of the key): Llama,
# Mistral, Qwen, Gemma, Phi-3 ("embed_tokens"), GPT-2 and GPT-J ("wte"), GPT-NeoX and
# Pythia ("embed_in"), BLOOM and Falcon ("word_embeddings"), InternLM ("tok_embeddings").
EMBEDDING_KEYS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight",
                  "tok_embeddings.weight")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Models that scale embeddings by sqrt(hidden size). vLLM scales only what it looks up
# itself, so rows we send must be scaled already, as the transformers model would:
# Gemma 1 and 2 scale every input row (soft prompt rows too) inside the model; Gemma 3
# scales the token lookups only (its embedding layer does it).
SCALE_ALL = {"gemma", "gemma2"}
SCALE_TOKENS = {"gemma3", "gemma3_text"}


def embedding_scales(model_type: str, hidden_size: int) -> tuple[float, float]:
    """(factor for soft prompt rows, factor for token rows) for this kind of model."""
    root = hidden_size ** 0.5
    if model_type in SCALE_ALL:
        return root, root
    if model_type in SCALE_TOKENS:
        return 1.0, root
    return 1.0, 1.0


def _weight_files(folder: Path) -> dict[str, Path]:
    """Every tensor name in the folder's safetensors, and the file that holds it."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read {index}: {exc}") from exc
        return {name: folder / file for name, file in weight_map.items()}
    names: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                names.update({name: file for name in handle.keys()})
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelError(f"cannot read {file.name}: {exc}") from exc
    return names


def find_embedding_key(names: dict[str, Any]) -> str | None:
    """The input embedding among a checkpoint's tensor names (never the output head; a
    multimodal model's language model before its vision tower)."""
    found = [n for n in names if n.endswith(EMBEDDING_KEYS) and not any(
        part in n for part in ("lm_head", "vision", "visual", "audio", "position"))]
    return min(found, key=lambda n: (n.count("."), len(n))) if found else None


def _download(repo: str) -> Path:
    """A Hugging Face model's config, tokenizer and the shard with its embeddings (not
    the other shards)."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise ModelError("huggingface_hub is needed to fetch a model by id.") from exc
    try:
        files = set(list_repo_files(repo))
        wanted = [f for f in files if f.endswith((".json", ".model", ".txt", ".tiktoken")) and "/" not in f]
        for name in wanted:
            hf_hub_download(repo, name)
        folder = Path(hf_hub_download(repo, "config.json")).parent
        if INDEX_FILE in files:
            weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
            key = find_embedding_key(weight_map)
            if key is not None:
                hf_hub_download(repo, weight_map[key])
        elif SINGLE_FILE in files:
            hf_hub_download(repo, SINGLE_FILE)
    except Exception as exc:  # noqa: BLE001 - network and hub errors of many kinds
        raise ModelError(f"cannot fetch '{repo}' from Hugging Face: {str(exc).splitlines()[0]}") from exc
    return folder


def read_embedding_table(folder: str | Path, hidden_size: int) -> torch.Tensor:
    """The `[vocab, hidden]` input embedding tensor, read alone from the safetensors."""
    from safetensors import safe_open

    folder = Path(folder)
    names = _weight_files(folder)
    if not names:
        raise ModelError(f"'{folder}' has no .safetensors weights; a remote backend reads the input embeddings "
                         "from them (save the model with save_pretrained, which writes safetensors).")
    key = find_embedding_key(names)
    if key is None:
        raise ModelError(f"no input embedding table in '{folder}' (looked for a tensor named "
                         f"*{', *'.join(EMBEDDING_KEYS)}).")
    file = names[key]
    try:
        with safe_open(str(file), framework="pt") as handle:
            table = handle.get_tensor(key)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot read {key} from {file.name}: {exc}") from exc
    if table.dim() != 2 or table.shape[1] != hidden_size:
        raise ModelError(f"{key} in {file.name} has shape {tuple(table.shape)}, not [vocab, {hidden_size}] as the "
                         "model's config says.")
    return table


class EmbeddingTable(torch.nn.Module):
    """Stands in for the model when another server runs it: the input embeddings and
    the config, nothing that can generate."""

    def __init__(self, table: torch.Tensor, config: Any, generation_config: Any = None):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(table, freeze=True)
        self.config = config
        self.generation_config = generation_config  # its EOS ids end a generation, as they do vLLM's
        self.softprompt_scale, self.token_scale = embedding_scales(
            getattr(config, "model_type", ""), int(table.shape[1]))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def rows(self, token_ids: list[int], softprompt: torch.Tensor | None = None) -> torch.Tensor:
        """`[soft prompt rows][token embeddings]`, as the model's first layer takes them."""
        weight = self.embed.weight
        tokens = weight[torch.tensor(token_ids, dtype=torch.long)] if token_ids else weight[:0]
        if self.token_scale != 1.0:
            tokens = tokens * self.token_scale
        if softprompt is None:
            return tokens
        soft = softprompt.to(dtype=weight.dtype, device=weight.device)
        if self.softprompt_scale != 1.0:
            soft = soft * self.softprompt_scale
        return torch.cat([soft, tokens])


class EmbeddingsBackend(TransformersBackend):
    """The `Backend` of a model another server runs: soft prompts are checked and turned
    into rows here; nothing steps."""

    name = "embeddings only"
    trainable = False
    training_refusal = "'{file}' runs on a remote server; only its input embeddings are loaded here."

    def __init__(self, model: EmbeddingTable):
        super().__init__(model, model.embed.weight.dtype)

    def new_core(self, prefix_cache: Any = None, shift: bool = False) -> Any:
        raise ModelError("this model runs on a remote server; only its input embeddings are loaded here.")

    def shift_refusal(self) -> str | None:
        return "this model runs on a remote server, which keeps its own cache"


def load_embeddings_only(source: str | Path, trust_remote_code: bool = False,
                         progress: Progress = _no_progress) -> LoadedModel:
    """The tokenizer, config and input embeddings of a model folder or Hugging Face id."""
    from transformers import AutoConfig, AutoTokenizer

    source = str(source)
    if source.lower().endswith(".gguf"):
        raise ModelError("a remote backend needs the model's transformers folder (config.json and safetensors), "
                         "not a GGUF file.")
    if _is_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelError(f"no model folder at '{source}'.")
    else:
        progress(f"Fetching {source}'s tokenizer and embeddings", 0.05)
        folder = _download(source)
    progress("Reading the model's config", 0.1)
    info = read_model_info(folder, trust_remote_code=trust_remote_code)
    if not _is_local(source):
        info = type(info)(source, info.hidden_size, info.context_length, info.architecture)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code).get_text_config()
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot load the tokenizer of '{source}': {str(exc).splitlines()[0]}") from exc
    progress("Reading the input embeddings", 0.4)
    table = read_embedding_table(folder, info.hidden_size)
    progress("Ready", 1.0)
    model = EmbeddingTable(table, config, _generation_config(folder))
    return LoadedModel(model, tokenizer, info, str(folder), table.dtype, runtime=EmbeddingsBackend(model))


def _generation_config(folder: Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None
