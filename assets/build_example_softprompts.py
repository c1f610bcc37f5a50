"""Train the example soft prompts shipped in softprompts/, with the app's own tuner, on
the demo model: three styles inside the King James Bible.

    python assets/build_example_softprompts.py [--steps 300]

For each style, every 8th chapter is held out: it goes to tests/data/styles/NAME.txt,
where a test checks that the soft prompt lowers the loss on text it never saw by at
least 10% compared with no soft prompt, in 16-token windows: the start of a text, where
the style can only come from the soft prompt (later in a window the model reads the
style from the text itself, and the gain shrinks; both figures are printed here).
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
    "Proverbs": {
        "chapters": lambda book, n: book == "Prv",
        "description": "Short sayings of wisdom in the manner of the Proverbs: 'A wise son maketh a glad father'.",
        "init_text": "A wise son maketh a glad father: but a foolish son is the heaviness of his mother.",
    },
    "Laws of Leviticus": {
        "chapters": lambda book, n: book == "Lev",
        "description": "Ordinances in the manner of Leviticus: 'And the LORD spake unto Moses, saying...'.",
        "init_text": "And the LORD spake unto Moses, saying, Speak unto the children of Israel,",
    },
}
# Psalms, the genealogies and the Song of Solomon were tried too: the demo model already
# writes close to them, and their soft prompts stayed under the 10% gain asked of an example.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()

    from kobold_desktop.engine import Engine
    from kobold_desktop.softprompt import Metadata
    import contextlib

    from kobold_desktop.tuning import TuningConfig, held_out_loss, make_blocks, train_softprompt
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
        # Short blocks: the soft prompt learns to set the style where there is little text.
        config = TuningConfig(n_tokens=args.tokens, steps=args.steps, lr=0.03, batch_size=16, block_len=16,
                              init="text", init_text=style["init_text"], held_out_share=0.02, eval_every=250)
        blocks = make_blocks("\n\n".join(train), loaded.tokenizer, config.block_len, config.held_out_share, config.seed)
        result = train_softprompt(loaded.model, loaded.tokenizer, blocks, config)
        out = ROOT / "softprompts" / f"{name}.zip"
        out.unlink(missing_ok=True)
        meta = Metadata(name=name, authors=("Kobold Desktop",), description=style["description"],
                        raw={"training": f"{len(train)} chapters, {args.steps} steps; tuner of Kobold Desktop"})
        export_softprompt(result.tensor, out, meta, loaded.info.name)
        figures = []
        for window in (16, 64):
            blocks_eval = make_blocks("\n\n".join(held), loaded.tokenizer, window, 0.0, 0).train
            with_sp = held_out_loss(loaded.model, result.tensor, blocks_eval, 16, contextlib.nullcontext)
            without = held_out_loss(loaded.model, None, blocks_eval, 16, contextlib.nullcontext)
            figures.append(f"{window}-token windows {with_sp:.3f} with, {without:.3f} without "
                           f"({(with_sp / without - 1) * 100:+.1f}%)")
        print(f"{name}: {len(train)} chapters trained on, {len(held)} held out; held-out loss in " + "; ".join(figures))


if __name__ == "__main__":
    main()
