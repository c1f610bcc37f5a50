"""What a model is, for "made for this model": a fingerprint of its vocabulary and shape.

A soft prompt's rows only mean something to the model whose embeddings they were learned
against. Names are a poor test: the same weights are "SmolLM2-135M-Instruct" as a folder,
"SmolLM2 135M Instruct" in a GGUF header, and whatever a folder was renamed to, while two
different models can share a name. The fingerprint is a hash of what decides whether rows
carry over: every token of the vocabulary with its id, the hidden size and the number of
layers. The same model as a transformers folder, a GGUF of any quantization, or a GGUF's
weights dequantized for training has the same fingerprint; a fine-tune with the same
vocabulary and shape does too (soft prompts do carry over between those, more or less).

Converters pad a GGUF's vocabulary to the embedding size with `[PAD123]` placeholders that
the original tokenizer does not have; those are left out.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterable

_PLACEHOLDER = re.compile(r"\[PAD\d+\]|<dummy\d+>")


def fingerprint(tokens: Iterable[tuple[int, str]], hidden_size: int, layers: int | None) -> str:
    """The hash of (id, token) pairs, the hidden size and the layer count: 16 hex digits."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"hidden={hidden_size};layers={layers}\n".encode())
    for token_id, token in sorted(tokens):
        if not _PLACEHOLDER.fullmatch(token):
            digest.update(f"{token_id}\t{token}\n".encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()


def of_tokenizer(tokenizer: Any, hidden_size: int, layers: int | None) -> str | None:
    """A loaded tokenizer's (transformers', or our GGUF one's `get_vocab`) fingerprint, or
    None when it cannot list its vocabulary."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return fingerprint(((int(i), str(t)) for t, i in vocab.items()), hidden_size, layers)


def of_source(model: str | Path, info: Any) -> str | None:
    """A model's fingerprint without loading its weights (`softprompt list --model`): its
    tokenizer (a folder or a Hugging Face id in the cache), or a GGUF header's vocabulary
    (with the `gguf` package). None when neither can be read: names decide then."""
    path = Path(str(model)).expanduser()
    try:
        if path.is_file():
            from gguf import GGUFReader

            reader = GGUFReader(str(path), "r")
            field = reader.fields.get("tokenizer.ggml.tokens")
            if field is None:
                return None
            tokens = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            return fingerprint(enumerate(tokens), info.hidden_size, info.layers)
        from transformers import AutoTokenizer

        return of_tokenizer(AutoTokenizer.from_pretrained(str(model)), info.hidden_size, info.layers)
    except Exception:  # noqa: BLE001 - another library's failure only means "compare by name"
        return None

