"""A random-weight Llama of real size for the benchmarks, built in memory (never downloaded).

The default shape has 317M parameters: hidden 1024, 24 layers, MLP 2816, 16 heads,
with the demo model's 4,096-token tokenizer (so every id decodes to real text).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kobold_desktop import paths  # noqa: E402
from kobold_desktop.engine import Engine  # noqa: E402
from kobold_desktop.engine.loader import LoadedModel  # noqa: E402
from kobold_desktop.engine.model_info import ModelInfo  # noqa: E402


def build_engine(dtype: torch.dtype = torch.float32, hidden: int = 1024, layers: int = 24, mlp: int = 2816,
                 heads: int = 16, kv_heads: int | None = None, context: int = 4096, device: str = "cpu",
                 eos: bool = False) -> Engine:
    """An `Engine` holding a random Llama; with `eos=False` every request runs its whole
    token budget, so timings compare like with like."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(paths.demo_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id if eos else None, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    if not eos:
        model.generation_config.eos_token_id = None
        tokenizer.eos_token = None
    info = ModelInfo(f"random-llama-{parameters(model) / 1e6:.0f}M", hidden, context, "LlamaForCausalLM")
    return Engine(LoadedModel(model, tokenizer, info, "random", dtype))


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def random_ids(n: int, vocab: int = 4096, seed: int = 1) -> list[int]:
    return torch.randint(5, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
