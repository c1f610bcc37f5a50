"""Mixtures of soft prompts on the embedded demo model, with the two shipped soft prompts
(Proverbs, Laws of Leviticus) and the chapters of each style held out when they were
trained (tests/data/styles/). One run; ratios printed.

- Interleaved styles: the held-out chapters of both, alternating. The learned mixture's
  held-out loss against each single soft prompt's (target: below both).
- One style: the mixture learned on that style's chapters against the matching soft
  prompt alone (target: within 2%, i.e. a ratio of at most 1.02; it finds the right one).
- Speed: decode tokens/s of a two-member bayes ensemble against one soft prompt, greedy,
  interleaved rounds, best of each (the ensemble runs two rows a step).

Losses are mean cross-entropy per token in nats, on blocks of 64 tokens (`softprompt
rank`'s default): weights are fitted on 75% of the blocks and reported on the rest.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kobold_desktop.engine import Engine, SamplingSettings  # noqa: E402
from kobold_desktop.softprompt.mixture import Mixture, MixtureMember  # noqa: E402
from kobold_desktop.tuning import make_blocks  # noqa: E402
from kobold_desktop.tuning.mixture import rank_softprompts  # noqa: E402

STYLES = {"Proverbs": ROOT / "tests/data/styles/Proverbs.txt",
          "Laws of Leviticus": ROOT / "tests/data/styles/Laws of Leviticus.txt"}
SOFTPROMPTS = {name: ROOT / "softprompts" / f"{name}.zip" for name in STYLES}
BLOCK, HELD_OUT, ROUNDS, TOKENS = 64, 0.25, 3, 128


def chapters(path: Path) -> list[str]:
    return [c for c in path.read_text(encoding="utf-8").split("\n\n") if c.strip()]


def rank(engine: Engine, text: str):
    loaded = engine.loaded
    blocks = make_blocks(text, loaded.tokenizer, BLOCK, HELD_OUT, 1234)
    prepared = {name: engine.prepare_softprompts([path]) for name, path in SOFTPROMPTS.items()}
    return rank_softprompts(loaded.model, blocks, [(n, SOFTPROMPTS[n], p.tensor) for n, p in prepared.items()])


def report(title: str, ranking) -> dict[str, float]:
    losses = {s.name: s.loss for s in ranking.softprompts}
    weights = ", ".join(f"{s.name} {s.weight:.0%}" for s in ranking.softprompts)
    print(f"\n{title} ({ranking.held_out_blocks} held-out blocks of {ranking.block_len} tokens)")
    print(f"  no soft prompt     {ranking.none_loss:.4f}")
    for name, loss in losses.items():
        print(f"  {name:<18} {loss:.4f}")
    print(f"  learned mixture    {ranking.mixture_loss:.4f}   (weights: {weights})")
    return losses


def decode(engine: Engine, active, prompt: str) -> float:
    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=TOKENS)
    engine.prefix_cache.clear()
    start = time.perf_counter()
    result = engine.generate(prompt, settings, softprompt=active)
    return result.generated_tokens / (time.perf_counter() - start - (result.first_token_seconds or 0))


def main() -> None:
    engine = Engine()
    engine.load(ROOT / "assets" / "demo-model")
    print(f"demo model, {engine.loaded.device_label}, {str(engine.loaded.dtype).removeprefix('torch.')}")
    a, b = (chapters(p) for p in STYLES.values())
    mixed = [c for pair in zip(a, b) for c in pair] + a[len(b):] + b[len(a):]
    ranking = rank(engine, "\n\n".join(mixed))
    losses = report("Interleaved chapters of both styles", ranking)
    for name, loss in losses.items():
        print(f"  mixture / {name}: {ranking.mixture_loss / loss:.3f}  (target below 1)")
    for name, path in STYLES.items():
        ranking = rank(engine, path.read_text(encoding="utf-8"))
        losses = report(f"Chapters of {name} only", ranking)
        print(f"  mixture / {name}: {ranking.mixture_loss / losses[name]:.3f}  (target at most 1.02)")

    single = engine.prepare_softprompts([SOFTPROMPTS["Proverbs"]])
    mixture = Mixture("both", "bayes", tuple(MixtureMember(str(p), 0.5) for p in SOFTPROMPTS.values()))
    ensemble = engine.prepare_mixture(mixture, list(SOFTPROMPTS.values()))
    prompt = a[0][:400]
    decode(engine, single, prompt)  # warm up
    one, two = [], []
    for _ in range(ROUNDS):
        one.append(decode(engine, single, prompt))
        two.append(decode(engine, ensemble, prompt))
    print(f"\nDecode, {TOKENS} greedy tokens: one soft prompt {max(one):.1f} tokens/s, two-member bayes "
          f"ensemble {max(two):.1f} tokens/s: ensemble / single {max(two) / max(one):.2f}")


if __name__ == "__main__":
    main()
