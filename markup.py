"""Showing people's and the model's text as Markdown without letting it load or run anything.

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
