"""Training text for a soft prompt: read it, cut it into token blocks, hold some out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kobold_desktop.errors import KoboldError

MAX_TEXT_BYTES = 512 << 20


class TuningDataError(KoboldError):
    """The training text is missing, unreadable or too short."""


def read_training_text(path: Path | str) -> str:
    """A .txt file, a folder of .txt files, or a story (.json, ours or KoboldAI's)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise TuningDataError(f"{path} has no .txt files to learn from.")
        return "\n\n".join(read_training_text(f) for f in files)
    if not path.is_file():
        raise TuningDataError(f"{path} does not exist.")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise TuningDataError(f"{path.name} is larger than {MAX_TEXT_BYTES >> 20} MB; split it up.")
    if path.suffix.lower() == ".json":
        from kobold_desktop.story.files import StoryFileError, load_story

        try:
            return load_story(path).text
        except StoryFileError as exc:
            raise TuningDataError(str(exc)) from exc
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TuningDataError(f"{path.name} is not UTF-8 text.") from exc
    except OSError as exc:
        raise TuningDataError(f"cannot read {path.name}: {exc.strerror or exc}.") from exc


@dataclass(frozen=True)
class Blocks:
    train: torch.Tensor  # [n, block_len] token ids
    held_out: torch.Tensor  # [m, block_len]

    @property
    def n_train_tokens(self) -> int:
        return self.train.numel()


def make_blocks(text: str, tokenizer: Any, block_len: int, held_out_share: float, seed: int) -> Blocks:
    """Tokenize, cut into whole blocks, shuffle with the seed, keep a share for evaluation."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_blocks = len(ids) // block_len
    if n_blocks < 2:
        raise TuningDataError(
            f"the text has {len(ids):,} tokens; at least {2 * block_len:,} are needed for blocks of "
            f"{block_len} (use more text or a smaller block size)."
        )
    blocks = torch.tensor(ids[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(n_blocks * held_out_share)) if held_out_share > 0 else 0
    n_held = min(n_held, n_blocks - 1)
    return Blocks(train=blocks[order[n_held:]], held_out=blocks[order[:n_held]])
