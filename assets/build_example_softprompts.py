"""Train the example soft prompts shipped in softprompts/, with the app's own tuner, on
the demo model: three styles inside the King James Bible.

    python assets/build_example_softprompts.py [--steps 300]

For each style, every 8th chapter is held out: it goes to tests/data/styles/NAME.txt,
where a test checks that the soft prompt lowers the loss on text it never saw by at
least 10% compared with no soft prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "assets"))

from build_demo_model import bible_text, chapters  # noqa: E402

STYLES = {
    "Psalms": {
        "chapters": lambda book, n: book == "Psa",
        "description": "Songs and prayers in the poetry of the Psalms: parallel lines, praise and lament.",
        "init_text": "Praise ye the LORD. O give thanks unto the LORD; for he is good:",
    },
    "Proverbs": {
        "chapters": lambda book, n: book == "Prv",
        "description": "Short sayings of wisdom in the manner of the Proverbs: 'A wise son maketh a glad father'.",
        "init_text": "A wise son maketh a glad father: but a foolish son is the heaviness of his mother.",
    },
    "Genealogies": {
        "chapters": lambda book, n: (book, n) in {("Ge", 5), ("Ge", 10), ("Ge", 11), ("Ge", 25), ("Ge", 36),
                                                  ("Mat", 1), ("Ezra", 2), ("Neh", 7), ("Neh", 11), ("Neh", 12)}
        or (book == "1Chr" and n <= 9),
        "description": "Lists of generations, who begat whom and how long they lived.",
        "init_text": "And Seth lived an hundred and five years, and begat Enos:",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()

    from kobold_desktop.engine import Engine
    from kobold_desktop.softprompt import Metadata
    from kobold_desktop.tuning import TuningConfig, make_blocks, train_softprompt
    from kobold_desktop.tuning.export import export_softprompt

    engine = Engine()
    loaded = engine.load(ROOT / "assets" / "demo-model")
    all_chapters = []
    current, number = None, 0
    for book, text in chapters(bible_text()):
        number = number + 1 if book == current else 1
        current = book
        all_chapters.append((book, number, text))
    eval_dir = ROOT / "tests" / "data" / "styles"
    eval_dir.mkdir(parents=True, exist_ok=True)
    for name, style in STYLES.items():
        picked = [text for book, n, text in all_chapters if style["chapters"](book, n)]
        held = picked[3::8]
        train = [t for i, t in enumerate(picked) if (i - 3) % 8 != 0]
        (eval_dir / f"{name}.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
        config = TuningConfig(n_tokens=args.tokens, steps=args.steps, lr=0.03, batch_size=8, block_len=128,
                              init="text", init_text=style["init_text"], held_out_share=0.05, eval_every=50)
        blocks = make_blocks("\n\n".join(train), loaded.tokenizer, config.block_len, config.held_out_share, config.seed)
        result = train_softprompt(loaded.model, loaded.tokenizer, blocks, config)
        out = ROOT / "softprompts" / f"{name}.zip"
        out.unlink(missing_ok=True)
        meta = Metadata(name=name, authors=("Kobold Desktop",), description=style["description"],
                        raw={"training": f"{len(train)} chapters, {args.steps} steps; tuner of Kobold Desktop"})
        export_softprompt(result.tensor, out, meta, loaded.info.name)
        print(f"{name}: {len(train)} chapters to train, {len(held)} held out; loss "
              f"{result.held_out_loss:.3f} with, {result.baseline_held_out_loss:.3f} without "
              f"({(result.held_out_loss / result.baseline_held_out_loss - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
