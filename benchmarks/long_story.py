"""A story three times the context, continued for 20 turns: positions the model runs and
time to the first token per turn, with the story trimmed exactly (a few tokens each turn,
as before) and in blocks (story/context.py), each without and with context shift (the
cache moved past the dropped text, `Engine.context_shift`; exact trimming with shift is
KoboldCpp's way: it shifts every turn). The 317M random Llama of `_llama.py` in the
default precision here (float32 on this CPU), with a 1,024-token context (4x shorter than
its maximum, so the exact run ends in minutes on 2 cores), 32 new tokens a turn.
Target (issue 29): the median turn at least 10x faster than a full read with blocks.
"""

from __future__ import annotations

import statistics
import time

from _llama import build_engine

from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.story import Action, Story, build_context

TURNS, NEW, CONTEXT = 20, 32, 1024


def play(engine, block_share: float, shift: bool = False) -> tuple[list[int], list[float]]:
    settings = SamplingSettings(max_new_tokens=NEW, temperature=0, repetition_penalty=1.0)
    tokenizer = engine.loaded.tokenizer
    line = "And the LORD spake unto Moses, saying, Speak unto the children of Israel. "
    story = Story(prompt=line * (3 * CONTEXT // len(tokenizer(line)["input_ids"])))
    engine.prefix_cache.clear()
    engine.context_shift = shift
    ran, first = [], []
    for turn in range(TURNS):
        story.actions.append(Action(f" On the {turn + 1}th day they went on.", "user"))
        built = build_context(story, tokenizer, engine.context_budget(settings), block_share)
        start = time.perf_counter()
        result = engine.generate(built.ids, settings)
        first.append(result.first_token_seconds or (time.perf_counter() - start))
        ran.append(result.prompt_tokens - result.cached_tokens)
        story.actions.append(Action(result.text, "model"))
    return ran, first


def line(name: str, ran: list[int], first: list[float]) -> str:
    return (f"  {name:<24} positions run per turn median {statistics.median(ran):4.0f} (max {max(ran):4d}), "
            f"time to first token median {statistics.median(first):5.2f} s (max {max(first):5.2f} s), "
            f"full reads {sum(r > CONTEXT // 2 for r in ran)} of {TURNS}")


def main() -> None:
    import sys

    engine = build_engine(context=CONTEXT)
    runs = {"exact trimming": (0, False), "block trimming": (0.25, False),
            "exact trimming + shift": (0, True), "block trimming + shift": (0.25, True)}
    results = {name: play(engine, share, shift) for name, (share, shift) in runs.items()}
    print(f"{TURNS} turns of a story 3x the {CONTEXT}-token context, 317M Llama float32, {NEW} new tokens a turn "
          f"({sys.platform}):")
    for name, (ran, first) in results.items():
        print(line(name, ran, first))
    full = statistics.median(results["exact trimming"][1])
    for name in list(runs)[1:]:
        print(f"  median first token, {name}: {full / statistics.median(results[name][1]):.1f}x faster than a "
              "full read" + (" (target >= 10x)" if name == "block trimming" else ""))


if __name__ == "__main__":
    main()
