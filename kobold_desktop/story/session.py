"""The writing session: what Submit, Generate more, Retry, Undo and Redo do to a story,
and what goes to the model. No Qt: the window shows a `StorySession` and feeds it the
model's text; tests and other front ends drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kobold_desktop.story.document import MODEL, USER, Action, Story


def copy_story(story: Story) -> Story:
    return Story.from_dict(story.to_dict())


@dataclass(frozen=True)
class Turn:
    """One generation: the story as the model must see it, and where its text goes."""

    story: Story
    index: int  # the model's action being written


class StorySession:
    def __init__(self, story: Story | None = None):
        self.story = story or Story()
        self.redo_stack: list[Action] = []
        self.turn: Turn | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def generating(self) -> bool:
        return self.turn is not None

    @property
    def can_generate_more(self) -> bool:
        return bool(self.story.text)

    @property
    def can_retry(self) -> bool:
        return bool(self.story.actions) and self.story.actions[-1].source == MODEL

    @property
    def can_undo(self) -> bool:
        return not self.generating and bool(self.story.actions)

    @property
    def can_redo(self) -> bool:
        return not self.generating and bool(self.redo_stack)

    def replace(self, story: Story) -> None:
        """Another story (New, Open, a recovered one): nothing to redo."""
        self.story, self.redo_stack, self.turn = story, [], None

    # -- the writer's moves -----------------------------------------------------------------

    def add_user_text(self, text: str) -> bool:
        """What the writer typed goes into the story (the prompt, when the story is empty).
        Returns whether anything was added."""
        if not text:
            return False
        if not self.story.text:
            self.story.prompt = text
        else:
            if not self.story.text[-1].isspace() and not text[0].isspace() and text[0].isalnum():
                text = " " + text  # keep words apart, as KoboldAI does
            self.story.actions.append(Action(text, USER))
        self.redo_stack.clear()
        return True

    def drop_last_model_action(self) -> bool:
        """Retry: the model's last action goes (it is written again)."""
        if not self.can_retry:
            return False
        self.story.actions.pop()
        return True

    def undo(self) -> bool:
        if not self.can_undo:
            return False
        self.redo_stack.append(self.story.actions.pop())
        return True

    def redo(self) -> bool:
        if not self.can_redo:
            return False
        self.story.actions.append(self.redo_stack.pop())
        return True

    # -- the model's turn -------------------------------------------------------------------

    def begin_turn(self) -> Turn:
        """The story as it is goes to the model; an empty action waits for its text."""
        if self.turn is not None:
            raise RuntimeError("the model is already writing")
        request = copy_story(self.story)
        self.story.actions.append(Action("", MODEL))
        self.turn = Turn(request, len(self.story.actions) - 1)
        return self.turn

    def add_text(self, text: str) -> None:
        """Streamed text from the model."""
        if self.turn is not None and text:
            self.story.actions[self.turn.index].text += text

    def settle(self, text: str) -> bool:
        """The whole result: the action holds exactly it. True if the stream disagreed."""
        if self.turn is None:
            return False
        action = self.story.actions[self.turn.index]
        if action.text == text:
            return False
        action.text = text
        return True

    def end_turn(self) -> None:
        """The model is done (or failed): an action it wrote nothing into goes."""
        if self.turn is None:
            return
        index, self.turn = self.turn.index, None
        if index < len(self.story.actions) and not self.story.actions[index].text:
            del self.story.actions[index]

    def streamed_copy(self) -> Story:
        """The story with what has streamed so far (to save while the model writes)."""
        story = copy_story(self.story)
        if self.turn is not None and self.turn.index < len(story.actions) and not story.actions[self.turn.index].text:
            del story.actions[self.turn.index]
        return story
