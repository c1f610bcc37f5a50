"""The story as one editable text, the user's and the model's words told apart.

Each piece of text carries, in its character format, which action it belongs to and who
wrote it. Typing inherits the format of the text beside it, so the user can edit
anywhere and `to_story()` rebuilds the actions from the document.
"""

from __future__ import annotations

from pathlib import Path

from kobold_desktop.qt._qt import (
    QColor,
    QFont,
    QTextCharFormat,
    QTextCursor,
    QTextEdit,
    QTextFormat,
    Signal,
)
from kobold_desktop.story import Action, Story
from kobold_desktop.story.document import MODEL, USER

ACTION_PROPERTY = QTextFormat.UserProperty + 1  # -1 for the prompt, else the action index
SOURCE_PROPERTY = QTextFormat.UserProperty + 2
PROMPT_INDEX = -1
# The writer's words stand out from the model's: blue on a light page, light blue on a dark one.
USER_COLORS = {"light": QColor("#1d4f91"), "dark": QColor("#8ab4f8")}
DEFAULT_FONT = ("Georgia", 13)


class StoryView(QTextEdit):
    paths_dropped = Signal(list)  # files dropped here go to the window, not into the text

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setAcceptRichText(False)
        self.user_color = USER_COLORS["light"]
        self.set_story_font(*DEFAULT_FONT)
        self.setPlaceholderText("Type the beginning of your story below and press Submit.")
        self.setAccessibleName("Story")

    def set_story_font(self, family: str, size: int) -> None:
        font = QFont(family)
        font.setStyleHint(QFont.Serif)
        font.setPointSize(size)
        self.setFont(font)
        self.document().setDefaultFont(font)

    def set_scheme(self, scheme: str) -> None:
        """"light" or "dark": the writer's colour for the text shown from now on."""
        self.user_color = USER_COLORS[scheme]

    # -- showing ---------------------------------------------------------------------

    def piece_format(self, index: int, source: str) -> QTextCharFormat:
        fmt = QTextCharFormat()
        fmt.setProperty(ACTION_PROPERTY, index)
        fmt.setProperty(SOURCE_PROPERTY, source)
        if source == USER:
            fmt.setForeground(self.user_color)
            fmt.setFontWeight(QFont.DemiBold)
        # the model's text has no colour of its own: it is the palette's, light or dark
        return fmt

    def show_story(self, story: Story) -> None:
        self.clear()
        cursor = QTextCursor(self.document())
        if story.prompt:
            cursor.insertText(story.prompt, self.piece_format(PROMPT_INDEX, USER))
        for index, action in enumerate(story.actions):
            cursor.insertText(action.text, self.piece_format(index, action.source))
        self.moveCursor(QTextCursor.End)

    def append_piece(self, index: int, source: str, text: str) -> None:
        """Add text to the end (streamed model text) without moving the user's view."""
        bar = self.verticalScrollBar()
        at_bottom = bar.value() >= bar.maximum() - 4
        cursor = QTextCursor(self.document())
        cursor.movePosition(QTextCursor.End)
        cursor.insertText(text, self.piece_format(index, source))
        if at_bottom:
            bar.setValue(bar.maximum())

    # -- reading back ----------------------------------------------------------------

    def to_story(self, base: Story) -> Story:
        """`base` with its prompt and actions replaced by what the document now says."""
        pieces: dict[int, list[str]] = {}
        sources: dict[int, str] = {}
        order: list[int] = []
        current = PROMPT_INDEX
        block = self.document().begin()
        first = True
        while block.isValid():
            if not first:
                pieces.setdefault(current, []).append("\n")  # the line break belongs to the text before it
                if current not in order:
                    order.append(current)
            first = False
            text = block.text()
            for fmt_range in block.textFormats():
                fmt = fmt_range.format
                index = fmt.property(ACTION_PROPERTY)
                index = PROMPT_INDEX if index is None else int(index)
                source = fmt.property(SOURCE_PROPERTY) or USER
                current = index
                sources.setdefault(index, source)
                if index not in order:
                    order.append(index)
                pieces.setdefault(index, []).append(text[fmt_range.start : fmt_range.start + fmt_range.length])
            block = block.next()
        story = Story(**{**base.__dict__})
        story.prompt = "".join(pieces.get(PROMPT_INDEX, []))
        story.actions = [
            Action("".join(pieces[i]), sources.get(i, MODEL)) for i in sorted(k for k in order if k != PROMPT_INDEX)
            if "".join(pieces[i])
        ]
        return story

    # -- drops -----------------------------------------------------------------------

    def _has_paths(self, event) -> bool:
        return event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls())

    def dragEnterEvent(self, event):
        if self._has_paths(event):
            event.acceptProposedAction()
        else:
            super().dragEnterEvent(event)

    def dragMoveEvent(self, event):
        if self._has_paths(event):
            event.acceptProposedAction()
        else:
            super().dragMoveEvent(event)

    def dropEvent(self, event):
        if self._has_paths(event):
            self.paths_dropped.emit([Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()])
            event.acceptProposedAction()
        else:
            super().dropEvent(event)

