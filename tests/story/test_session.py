"""The writing session without a window: what Submit, Generate more, Retry, Undo and Redo
do to the story and what goes to the model."""

import pytest

from kobold_desktop.story import Action, Story
from kobold_desktop.story.session import StorySession


def test_the_first_submit_is_the_prompt_and_later_ones_are_actions_kept_apart():
    session = StorySession()
    assert session.add_user_text("Once upon a time")
    assert session.story.prompt == "Once upon a time" and session.story.actions == []
    assert session.add_user_text("the end")
    assert session.story.actions == [Action(" the end", "user")]  # a space keeps the words apart
    assert session.add_user_text(", said she")  # punctuation joins as it is
    assert session.story.actions[-1].text == ", said she"
    assert not session.add_user_text("")


def test_a_turn_sends_the_story_as_it_was_and_streams_into_a_new_action():
    session = StorySession(Story(prompt="The dragon"))
    turn = session.begin_turn()
    assert turn.story == Story(prompt="The dragon")  # a copy: streaming never changes what the model reads
    assert session.generating and session.story.actions == [Action("", "model")]
    session.add_text(" woke")
    session.add_text(" up.")
    assert turn.story.actions == [] and session.story.text == "The dragon woke up."
    assert not session.settle(" woke up.")  # the result agrees with the stream
    session.end_turn()
    assert not session.generating and session.story.actions == [Action(" woke up.", "model")]
    with pytest.raises(RuntimeError):
        session.begin_turn() and session.begin_turn()


def test_a_turn_that_wrote_nothing_leaves_no_empty_action():
    session = StorySession(Story(prompt="Hi"))
    session.begin_turn()
    assert session.streamed_copy() == Story(prompt="Hi")  # saving mid-turn: no empty action in the file
    session.end_turn()
    assert session.story.actions == []


def test_settle_repairs_a_stream_that_disagrees_with_the_result():
    session = StorySession(Story(prompt="A"))
    session.begin_turn()
    session.add_text(" b")
    assert session.settle(" bc")
    session.end_turn()
    assert session.story.text == "A bc"


def test_retry_drops_only_the_models_last_action():
    session = StorySession(Story(prompt="A", actions=[Action(" b", "model")]))
    assert session.can_retry and session.drop_last_model_action()
    assert session.story.actions == []
    session.add_user_text("mine")
    assert not session.can_retry and not session.drop_last_model_action()
    assert session.story.actions == [Action(" mine", "user")]


def test_undo_and_redo_walk_the_actions_and_new_text_clears_redo():
    session = StorySession(Story(prompt="A", actions=[Action(" b", "model"), Action(" c", "user")]))
    assert session.undo() and session.undo()
    assert session.story.actions == [] and not session.undo()
    assert session.redo() and session.story.actions == [Action(" b", "model")]
    session.add_user_text("d")
    assert not session.can_redo and not session.redo()
    session.begin_turn()
    assert not session.can_undo and not session.undo()  # never while the model writes
    session.end_turn()


def test_replace_forgets_what_could_be_redone():
    session = StorySession(Story(prompt="A", actions=[Action(" b")]))
    session.undo()
    session.replace(Story(prompt="Other"))
    assert session.story.prompt == "Other" and not session.can_redo and not session.generating
