"""Tiny random models for tests: built from a transformers config, never downloaded."""

from __future__ import annotations

from pathlib import Path


def tiny_gpt2(folder: Path | None = None, hidden: int = 32, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=128, vocab_size=96)
    model = GPT2LMHeadModel(config).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model
