"""Tiny random models for tests: built from transformers configs, never downloaded."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Once upon a time there was a little dragon who lived in a cave by the sea.",
    "The knight rode through the dark forest, and the wind howled in the trees.",
    "In the beginning God created the heaven and the earth.",
    "She opened the door and saw the café was empty; a naïve smile crossed her face.",
    "日本語の文章もあります。 Ünïcödé characters: ß, ø, é, 🐉 and ✨ appear too.",
    "He said: \"We shall go north at dawn,\" and the others agreed.",
] * 4

ARCHITECTURES = ("gpt2", "llama", "gpt_neox", "opt", "bloom")


def _float32():
    from kobold_desktop.engine import LoadOptions

    return LoadOptions(dtype="float32")


# Tests that compare with a float32 reference (transformers, PEFT, a request run alone)
# load in float32: on CPUs with native bfloat16 the default would be bfloat16.
FLOAT32 = _float32()


def tiny_tokenizer(add_bos: bool = False):
    """A byte-level BPE tokenizer (like GPT-2's) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>")


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import BloomConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    common = dict(vocab_size=vocab_size, eos_token_id=0, bos_token_id=1, initializer_range=0.2)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=hidden, ffn_dim=hidden * 2, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=hidden, pad_token_id=2, **common)
    if arch == "bloom":
        return BloomConfig(hidden_size=hidden, n_layer=2, n_head=4, **common)
    raise ValueError(arch)


def build_tiny_model(folder: Path, arch: str = "gpt2", hidden: int = 32, seed: int = 0, add_bos: bool | None = None,
                     layers: int = 2) -> Path:
    """Save a tiny random model and its tokenizer to `folder`; Llama's adds BOS."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(add_bos=(arch == "llama") if add_bos is None else add_bos)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), hidden, layers))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_gpt2(folder: Path | None = None, hidden: int = 32, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=128, vocab_size=96)
    model = GPT2LMHeadModel(config).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


def greedy_reference(model, ids, max_new_tokens: int, rows=None, eos_id: int = 0) -> list[int]:
    """Greedy decoding from first principles, the reference every equality test uses: each
    step runs the whole sequence again with no cache, on `inputs_embeds` = [soft prompt
    rows][token embeddings] (positions count the rows, as PEFT's prompt tuning defines),
    and takes the most likely token; stops before EOS. Nothing here depends on a library's
    generate, which changes between releases."""
    import torch

    embed = model.get_input_embeddings()
    tokens, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = embed(torch.tensor([tokens], dtype=torch.long))
            if rows is not None:
                x = torch.cat([rows[None].to(x.dtype), x], dim=1)
            mask = torch.ones(x.shape[:2], dtype=torch.long)
            logits = model(inputs_embeds=x, attention_mask=mask, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == eos_id:
                break
            out.append(token)
            tokens.append(token)
    return out


def adapter_rows(folder):
    """The prompt-tuning rows exactly as a PEFT adapter folder stores them."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))["prompt_embeddings"]
