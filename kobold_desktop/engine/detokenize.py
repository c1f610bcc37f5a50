"""Turning a stream of token ids into a stream of text, and finding stop sequences.

Byte-level tokenizers split one character over several tokens; SentencePiece drops the
leading space of a piece decoded alone. So we decode a short window that starts a few
tokens back (including the end of the prompt) and emit only text that has grown and
does not end in a half character (U+FFFD), as text-generation-inference does.
"""

from __future__ import annotations

from typing import Any, Sequence

from kobold_desktop.errors import KoboldError

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = (), context_tokens: int = 6):
        self._tokenizer = tokenizer
        self._tokens = list(context_ids)[-context_tokens:] if context_tokens else []
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def _decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(
            tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """The new text this token completes ("" while a character is still partial)."""
        self._tokens.append(token_id)
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, even a broken character."""
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._tokens)
        return new_text[len(prefix_text) :]


class StopSequences:
    """Holds back text that might be the start of a stop sequence, so a stop sequence
    is never shown, and reports when one is complete."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what is safe to show now. Sets `stopped` at a stop sequence."""
        if not self._stops:
            return text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            safe = self._pending[: min(hits)]
            self._pending = ""
            self.stopped = True
            return safe
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(stop[:k]):
                    hold = k
                    break
        safe = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return safe

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


# A regular expression with no bound on its length is looked for within this many characters.
UNBOUNDED_PHRASE_CHARS = 256
# One search of the held-back text may take this long: a pattern that backtracks without end
# ("/(a|aa)+$/", sent to a shared server) fails its own request instead of stalling the batch.
SEARCH_SECONDS = 0.05


class PhraseBanError(KoboldError):
    """A banned phrase's regular expression took too long to check."""

    status = 422


class PhraseBans:
    """Banned phrases, case-insensitive: plain text, or a regular expression written
    between slashes (`/\\bsuddenly\\b/`). `search` finds the earliest match; `longest` is how
    many characters a match can span, which is how much text must be held back."""

    def __init__(self, phrases: Sequence[str]):
        import re

        import regex  # the `re` syntax, with a time limit on a search (transformers depends on it)

        parts, longest = [], 1
        for phrase in phrases:
            if len(phrase) > 2 and phrase.startswith("/") and phrase.endswith("/"):
                source = phrase[1:-1]
                width = re._parser.parse(source, re.IGNORECASE).getwidth()[1]  # type: ignore[attr-defined]
                longest = max(longest, min(width, UNBOUNDED_PHRASE_CHARS))
            else:
                source = re.escape(phrase)
                longest = max(longest, len(phrase))
            parts.append(f"(?:{source})")
        self.longest = longest
        self._phrases = tuple(phrases)
        if parts:
            re.compile("|".join(parts), re.IGNORECASE)  # the check: Python's own syntax
        self._pattern = regex.compile("|".join(parts), regex.IGNORECASE | regex.V0) if parts else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def search(self, text: str) -> int | None:
        """Where the earliest banned phrase in `text` starts, or None."""
        if self._pattern is None:
            return None
        try:
            found = self._pattern.search(text, timeout=SEARCH_SECONDS)
        except TimeoutError as exc:
            raise PhraseBanError("a banned phrase's regular expression takes too long to check (it backtracks "
                                 "without end); write it more simply, e.g. without a repeat inside a repeat.") from exc
        return found.start() if found else None


def check_phrases(phrases: Sequence[str]) -> str | None:
    """Why these banned phrases cannot be used (a bad regular expression), or None."""
    import re

    try:
        PhraseBans(phrases)
    except (re.error, OverflowError, RecursionError) as exc:
        return f"a banned phrase is not a valid regular expression: {exc}"
    return None
