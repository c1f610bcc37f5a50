"""How a story becomes the model's input."""

import pytest

from kobold_desktop.story import Action, ContextError, Story, WorldInfoEntry, build_context, triggered_world_info

from ..helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


def story_with(n_actions=6, **kwargs):
    actions = [Action(f" Chapter {i}: the knight rode on.", "model" if i % 2 else "user") for i in range(n_actions)]
    return Story(prompt="Once upon a time.", actions=actions, **kwargs)


def test_order_memory_world_info_story_and_authors_note(tokenizer):
    story = story_with(
        memory="The hero is Sir Bors.",
        authors_note="Write darkly.",
        authors_note_depth=2,
        world_info=[WorldInfoEntry(keys=["KNIGHT"], content="Knights serve the king."),
                    WorldInfoEntry(keys=["dragon"], content="Dragons sleep."),
                    WorldInfoEntry(keys=[], content="Magic is rare.", constant=True)],
    )
    built = build_context(story, tokenizer, budget=10_000)
    text = decode(tokenizer, built.ids)
    assert text.startswith("The hero is Sir Bors.\nKnights serve the king.\nMagic is rare.\nOnce upon a time.")
    assert "Dragons sleep." not in text
    assert text.endswith(" Chapter 3: the knight rode on.\n[Author's note: Write darkly.]\n"
                         " Chapter 4: the knight rode on. Chapter 5: the knight rode on.")
    assert built.dropped_story_tokens == 0


def test_world_info_scan_depth(tokenizer):
    story = story_with(world_info=[WorldInfoEntry(keys=["upon a time"], content="Old.")])
    assert triggered_world_info(story) == []  # the prompt is 7 pieces back; depth is 3
    story.world_info[0].scan_depth = 10
    assert [e.content for e in triggered_world_info(story)] == ["Old."]


def test_oldest_story_text_is_dropped_first(tokenizer):
    story = story_with(n_actions=20, memory="Memory stays.", authors_note="Note stays.")
    full = build_context(story, tokenizer, 10_000)
    budget = len(full.ids) - 40
    built = build_context(story, tokenizer, budget)
    assert len(built.ids) <= budget
    assert built.dropped_story_tokens >= 40
    text = decode(tokenizer, built.ids)
    assert text.startswith("Memory stays.\n")
    assert "Once upon a time" not in text
    assert text.endswith(story.actions[-1].text) and "Note stays." in text


def test_trimming_never_breaks_a_character(tokenizer):
    story = Story(prompt="日本語の文章もあります。" * 10)
    full = build_context(story, tokenizer, 10_000)
    for budget in range(5, len(full.ids)):
        text = decode(tokenizer, build_context(story, tokenizer, budget).ids)
        assert not text.startswith("\ufffd"), budget
        assert "\ufffd" not in text


def test_fixed_parts_that_do_not_fit_are_an_error(tokenizer):
    story = story_with(memory="word " * 200)
    with pytest.raises(ContextError, match="Memory, World Info and the Author's Note need"):
        build_context(story, tokenizer, budget=50)


def test_bos_comes_first(tokenizer):
    bos_tokenizer = tiny_tokenizer(add_bos=True)
    built = build_context(story_with(memory="M."), bos_tokenizer, 10_000)
    assert built.ids[0] == bos_tokenizer.bos_token_id
    assert built.ids.count(bos_tokenizer.bos_token_id) == 1


def test_story_round_trips_through_a_dict():
    story = story_with(memory="m", world_info=[WorldInfoEntry(keys=["a"], content="b", constant=True)])
    assert Story.from_dict(story.to_dict()) == story


def test_budget_accounts_for_softprompt_and_max_new_tokens(model_dirs, tmp_path):
    import torch

    from kobold_desktop.engine import Engine, SamplingSettings
    from kobold_desktop.softprompt import Metadata, kobold_zip

    engine = Engine()
    engine.load(model_dirs["gpt2"])
    settings = SamplingSettings(max_new_tokens=50)
    assert engine.context_budget(settings) == 256 - 50
    kobold_zip.write(tmp_path / "sp.zip", torch.randn(20, 32), Metadata(name="sp"))
    engine.set_softprompt(tmp_path / "sp.zip")
    assert engine.context_budget(settings) == 256 - 50 - 20
    story = story_with(n_actions=80)
    built = build_context(story, engine.loaded.tokenizer, engine.context_budget(settings))
    assert built.dropped_story_tokens > 0
    result = engine.generate(built.ids, settings.with_changes(temperature=0))
    assert result.prompt_tokens + result.softprompt_tokens + settings.max_new_tokens <= 256
