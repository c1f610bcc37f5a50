"""A story three times the context, continued for 20 turns: positions the model runs and
time to the first token per turn, with the story trimmed exactly (a few tokens each turn,
as before) and in blocks (story/context.py). The 317M random Llama of `_llama.py` in the
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


def play(engine, block_share: float) -> tuple[list[int], list[float]]:
    settings = SamplingSettings(max_new_tokens=NEW, temperature=0, repetition_penalty=1.0)
    tokenizer = engine.loaded.tokenizer
    line = "And the LORD spake unto Moses, saying, Speak unto the children of Israel. "
    story = Story(prompt=line * (3 * CONTEXT // len(tokenizer(line)["input_ids"])))
    engine.prefix_cache.clear()
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


def main() -> None:
    engine = build_engine(context=CONTEXT)
    exact_ran, exact_first = play(engine, 0)
    block_ran, block_first = play(engine, 0.25)
    print(f"{TURNS} turns of a story 3x the {CONTEXT}-token context, 317M Llama float32:")
    print(f"  exact trimming: positions run per turn median {statistics.median(exact_ran):.0f}, "
          f"time to first token median {statistics.median(exact_first):.2f} s")
    print(f"  block trimming: positions run per turn median {statistics.median(block_ran):.0f}, "
          f"time to first token median {statistics.median(block_first):.2f} s "
          f"(re-reads: {sum(r > CONTEXT // 2 for r in block_ran)} of {TURNS})")
    print(f"  median first token: {statistics.median(exact_first) / statistics.median(block_first):.1f}x faster "
          "with blocks (target >= 10x)")


if __name__ == "__main__":
    main()
