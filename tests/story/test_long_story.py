"""Stories longer than the context: trimmed in blocks, the start stays put for several turns,
so a turn reads only what is new; what the model sees is exactly the prompt it is given."""

import statistics

import pytest

from kobold_desktop.engine import Engine, SamplingSettings
from kobold_desktop.story import Action, Story, build_context
from kobold_desktop.story.context import trim_in_blocks

from ..helpers import FLOAT32, greedy_reference

# Turns small against the room, as 100-token turns are against a 2,048-token context.
TURN = SamplingSettings(max_new_tokens=6, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def engine(model_dirs):
    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    return engine


def test_blocks_are_whole_quarters_of_the_room():
    assert trim_in_blocks(90, 100) == 0
    assert trim_in_blocks(101, 100) == 25 and trim_in_blocks(125, 100) == 25 and trim_in_blocks(126, 100) == 50
    assert trim_in_blocks(101, 100, share=0) == 1  # exactly the excess


def play(engine, turns, block_share, shift=False):
    """A story written turn by turn past the context (a 256-token model): the positions the
    model ran each turn, and each turn's prompt."""
    story = Story(prompt="Once upon a time, in a land of rivers and hills, a knight set out. " * 8)
    tokenizer = engine.loaded.tokenizer
    engine.prefix_cache.clear()
    engine.context_shift = shift
    ran, prompts = [], []
    for turn in range(turns):
        story.actions.append(Action(f" Day {turn}.", "user"))
        built = build_context(story, tokenizer, engine.context_budget(TURN), block_share)
        result = engine.generate(built.ids, TURN)
        ran.append(result.prompt_tokens - result.cached_tokens)
        prompts.append(built.ids)
        story.actions.append(Action(result.text, "model"))
    return ran, prompts


def test_past_the_context_most_turns_read_only_what_is_new(engine):
    blocks, prompts = play(engine, 16, block_share=0.25)
    exact, _ = play(engine, 16, block_share=0)
    full = len(prompts[-1])
    assert all(len(p) > engine.context_budget(TURN) * 0.7 for p in prompts[4:])  # past the context
    assert statistics.median(exact[4:]) > 0.9 * full  # trimmed a little every turn: read everything again
    assert statistics.median(blocks[4:]) < 0.35 * full  # in blocks: the start stays, the cache is reused
    starts = {tuple(p[:16]) for p in prompts[4:]}
    assert len(starts) < len(prompts[4:]) / 2  # the start moved in blocks, not every turn


def test_with_context_shift_the_turns_where_a_block_goes_read_only_what_is_new_too(model_dirs):
    engine = Engine()
    engine.load(model_dirs["llama"], FLOAT32)  # a RoPE model: it can shift
    blocks, prompts = play(engine, 16, block_share=0.25)
    shifted, _ = play(engine, 16, block_share=0.25, shift=True)
    full = len(prompts[-1])
    assert max(blocks[4:]) > 0.7 * full  # without: a turn where a block went read everything again
    assert max(shifted[4:]) < 0.35 * full  # with: it moved the cache instead
    engine.unload()


def test_the_model_sees_exactly_the_prompt_it_is_given(engine):
    """A turn that reused the cache writes what a fresh read of the same prompt writes."""
    _, prompts = play(engine, 10, block_share=0.25)
    last = prompts[-1]
    with_cache = engine.generate(last, TURN).token_ids  # its start is cached from the turn before
    model = engine.loaded.model
    assert list(with_cache) == greedy_reference(model, last, TURN.max_new_tokens, eos_id=-1)[: len(with_cache)]


def test_the_status_bar_says_what_a_turn_did(engine):
    from kobold_desktop.story.context import turn_report

    story = Story(prompt="Once upon a time, in a land of rivers and hills, a knight set out. " * 20)
    built = build_context(story, engine.loaded.tokenizer, engine.context_budget(TURN))
    assert built.dropped_story_tokens > 0
    said = turn_report(built, len(built.ids), 150)
    assert f"story trimmed by {built.dropped_story_tokens} tokens" in said
    assert f"read {len(built.ids) - 150} new tokens, 150 from the cache" in said
    assert "cache shifted (120 tokens moved back" in turn_report(built, len(built.ids), 150, 120)
    assert "shifted" not in said
    assert "read all 200 tokens" in turn_report(build_context(Story(prompt="Hi."), engine.loaded.tokenizer, 100), 200, 0)


def test_world_info_placed_near_the_end_leaves_the_cached_start_alone(engine):
    """An entry at the top shifts everything after it when it comes and goes; placed before
    the last pieces (as the Author's Note) it changes only the prompt's end."""
    from kobold_desktop.story import WorldInfoEntry

    def prompts(depth):
        story = Story(prompt="Once upon a time a knight rode out. " * 3,
                      actions=[Action(" He rode on.", "model"), Action(" A dragon!", "user"),
                               Action(" The dragon slept.", "model")],
                      world_info=[WorldInfoEntry(keys=["dragon"], content="Dragons breathe fire.", depth=depth)])
        tokenizer = engine.loaded.tokenizer
        with_entry = build_context(story, tokenizer, 200).ids
        story.actions = story.actions[:1]  # the key is gone: so is the entry
        return with_entry, build_context(story, tokenizer, 200).ids

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    top_with, top_without = prompts(None)
    near_with, near_without = prompts(2)
    assert common(top_with, top_without) <= 2  # the entry came first: nothing after it matches
    assert common(near_with, near_without) > len(near_without) - 8  # only the end differs
    tokenizer = engine.loaded.tokenizer
    assert tokenizer.decode(near_with).index("Dragons breathe fire.") > tokenizer.decode(near_with).index("He rode on")


def test_the_placement_travels_with_the_story_file(tmp_path):
    from kobold_desktop.story import WorldInfoEntry
    from kobold_desktop.story.files import load_story, save_story

    story = Story(prompt="x", world_info=[WorldInfoEntry(keys=["a"], content="A.", depth=2), WorldInfoEntry()],
                  world_info_new_depth=4)
    save_story(story, tmp_path / "s.json")
    read = load_story(tmp_path / "s.json")
    assert [e.depth for e in read.world_info] == [2, None] and read.world_info_new_depth == 4

