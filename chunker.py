"""Deciding when a streamed reply is worth a database write: about once per sentence.

Tokens arrive a few characters at a time. Writing each one would cost a commit
per token; waiting for the whole reply would leave other viewers with nothing
to see. ``SentenceChunker`` sits between the two: it buffers tokens and hands
out a chunk at each sentence end (``。！？`` included, which Chinese and
Japanese write with no space after), or when a long run without one (a code
block, a list) has gone on for ``max_chars`` characters or ``max_wait_s``
seconds. Joining every chunk it returns, then ``flush()``, gives back exactly
the text that was fed in, however it was split into tokens.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable

# Sentence punctuation (with closing quotes or brackets) before whitespace; the
# ideographic full stop, exclamation and question marks of Chinese and Japanese,
# which no space follows; or a newline.
SENTENCE_END = re.compile(r"""[.!?]+["'”’)\]]*(?=\s)|[。！？｡．]+[」』）”’"')\]]*(?=[^」』）”’"')\]])|\n""")
CJK_MARKS = "。！？｡．"
WORD_BEFORE = re.compile(r"[(\[\"'“‘]*(\S*)$")
LAST_SPACE = re.compile(r".*\s", re.DOTALL)
# Words whose trailing dot rarely ends a sentence.
ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "cf", "vs", "dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "no", "fig"}
)


def _width(text: str) -> int:
    """Characters, counting wide ones (Chinese, Japanese, Korean) twice: a sentence of
    ten ideographs says about as much as forty Latin letters."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


class SentenceChunker:
    """Turns a token stream into persist-ready chunks at sentence boundaries."""

    def __init__(
        self,
        min_chars: int = 20,
        max_chars: int = 200,
        max_wait_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._buffer = ""
        self._since: float | None = None  # when the oldest buffered character arrived

    @property
    def pending(self) -> str:
        """Text fed in but not yet handed out."""
        return self._buffer

    def feed(self, piece: str) -> list[str]:
        """Add a token; return the chunks (often none) that are now ready to persist."""
        if not piece:
            return []
        if not self._buffer:
            self._since = self._clock()
        self._buffer += piece
        chunks = []
        while (cut := self._cut_point()) is not None:
            chunks.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            self._since = self._clock() if self._buffer else None
        return chunks

    def flush(self) -> str:
        """Everything still buffered (the last chunk of a reply); may be empty."""
        rest, self._buffer, self._since = self._buffer, "", None
        return rest

    def _cut_point(self) -> int | None:
        buffer = self._buffer
        sentence_end = self._last_sentence_end(buffer)
        if sentence_end is not None:
            return sentence_end
        if len(buffer) >= self.max_chars:
            return self._word_end(buffer[: self.max_chars], self.min_chars) or self.max_chars
        if self._since is not None and self._clock() - self._since >= self.max_wait_s:
            return self._word_end(buffer, 1) or len(buffer)
        return None

    def _last_sentence_end(self, buffer: str) -> int | None:
        last = None
        for match in SENTENCE_END.finditer(buffer):
            if _width(buffer[: match.end()]) >= self.min_chars and self._ends_sentence(buffer, match):
                last = match.end()
        return last

    @staticmethod
    def _ends_sentence(buffer: str, match: re.Match) -> bool:
        mark = match.group()
        if mark == "\n" or mark[0] in "!?" or mark[0] in CJK_MARKS:
            return True
        if mark.startswith(".."):  # an ellipsis trails off mid-sentence more often than not
            return False
        word = WORD_BEFORE.search(buffer, 0, match.start()).group(1)
        if word.isdigit():  # "1." in a numbered list
            return False
        if len(word) == 1 and word.isalpha():  # an initial: "J. R. R. Tolkien"
            return False
        return word.casefold() not in ABBREVIATIONS

    @staticmethod
    def _word_end(text: str, at_least: int) -> int | None:
        """Cut after the last whitespace, so a forced chunk does not split a word."""
        match = LAST_SPACE.match(text)
        return match.end() if match and match.end() >= at_least else None
