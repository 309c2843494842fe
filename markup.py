"""Showing people's and the model's text as Markdown: safely, and in blocks.

Safely: nothing a message says can load or run anything.

``st.markdown`` never renders raw HTML unless told to, and we never tell it to.
What Markdown itself can still do is load a remote image: ``![](https://...)``
would be a tracking pixel on every viewer's screen. A word joiner (U+2060, an
invisible character) between ``!`` and ``[`` stops that syntax everywhere,
including the cases a regex cannot tell apart from code, while the text looks
exactly the same, in code blocks too. Links whose scheme is not http, https or
mailto (``data:``, ``javascript:``) get the same joiner before the scheme, which
turns them into harmless relative links; Streamlit itself already empties
``javascript:`` links.
"""

from __future__ import annotations

import re

from markdown_it import MarkdownIt
from mdit_py_plugins.dollarmath import dollarmath_plugin

WORD_JOINER = "\u2060"
IMAGE_START = re.compile(r"!(?=\[)")
# The start of a link destination (inline, reference definition or autolink)
# whose scheme is not a plain web or mail one: data:, javascript:, and the
# same spelled with entities such as "&#106;avascript:".
ODD_LINK_START = re.compile(
    r"(\]\(\s*<?|\]:[ \t]*<?|<)(?=[^\s()<>]*?:)(?!(?:https?|mailto):)", re.IGNORECASE
)
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$&])")


def safe_markdown(text: str) -> str:
    """``text`` as Markdown that renders the same but cannot show an image or odd link."""
    text = IMAGE_START.sub("!" + WORD_JOINER, text)
    return ODD_LINK_START.sub(lambda m: m.group(1) + WORD_JOINER, text)


def escape_markdown(text: str) -> str:
    """``text`` shown literally inside Markdown (for names)."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


# In blocks: a reply being written is drawn as one element per top-level
# Markdown block, so that finished blocks are sent to the browser once and
# only the block being written is drawn again. The blocks are found by a
# Markdown parser (CommonMark with tables and $$ math, as Streamlit renders
# it), never at blank lines alone: fenced and indented code, loose lists and
# math keep their blank lines inside one block.
_PARSER = MarkdownIt("commonmark").enable(["table", "strikethrough"]).use(dollarmath_plugin, allow_blank_lines=True)
MATH_FENCE = re.compile(r" {0,3}\$\$")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]\n]+\]:", re.MULTILINE)  # [label]: url, [^note]: text


def split_blocks(text: str) -> list[str]:
    """``text`` cut into its top-level Markdown blocks, which join back to it.

    Every block but the last is finished: more text cannot change how it
    renders. The last one may still grow; it always holds the line being
    written, which may yet turn out to continue the block before it ("1" of
    "1. next item"). Text that cannot be split that way (it defines link
    references or footnotes, which blocks before them use) comes back whole.
    """
    if defines_references(text):
        return [text]
    complete = text[: text.rfind("\n") + 1]  # whole lines only
    tokens = _PARSER.parse(complete)
    lines = complete.splitlines(keepends=True)
    starts = sorted({t.map[0] for t in tokens if t.level == 0 and t.nesting >= 0 and t.map})
    if (open_math := _unclosed_math(lines, tokens)) is not None:
        # A $$ block whose closing line has not arrived parses as paragraphs for
        # now: the block it opens in runs to the end.
        starts = [start for start in starts if start <= open_math]
    # The line being written starts a block of its own once a blank line is
    # before it and its first character cannot make it a list item or indented.
    partial = text[len(complete):]
    still_open = open_math is not None or any(  # a code or HTML block with no end yet runs on
        t.type in ("fence", "html_block") and t.map and t.map[1] >= len(lines) for t in tokens
    )
    if lines and not lines[-1].strip() and partial[:1] not in ("", *" \t0123456789-*+") and not still_open:
        starts.append(len(lines))
    # st.markdown dedents its text: a block that starts indented (indented
    # code) stays with the block before it.
    starts = [start for start in starts[1:] if ([*lines, partial][start])[:1] not in (" ", "\t")]
    offsets = [0]
    for line in [*lines, partial]:
        offsets.append(offsets[-1] + len(line))
    cuts = [0, *(offsets[start] for start in starts), len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a] or [text]


def defines_references(text: str) -> bool:
    """Whether ``text`` may define a link reference or footnote, which earlier blocks can use."""
    return REFERENCE_DEFINITION.search(text) is not None


def _unclosed_math(lines: list[str], tokens) -> int | None:
    """The line where a $$ block opens and is not yet closed (outside code and HTML).

    A line that starts with $$ opens one, unless it also ends with $$ after
    more (a one-line block); the next line that ends with $$ closes it. The
    parser sees such a block only once it is closed.
    """
    verbatim = set()  # lines of code and HTML blocks, where $$ means nothing
    for token in tokens:
        if token.type in ("fence", "code_block", "html_block") and token.map:
            verbatim.update(range(*token.map))
    math = None
    for number, line in enumerate(lines):
        stripped = line.strip()
        if math is not None:
            if stripped.endswith("$$"):
                math = None
        elif number not in verbatim and MATH_FENCE.match(line) and (stripped == "$$" or not stripped.endswith("$$")):
            math = number
    return math
