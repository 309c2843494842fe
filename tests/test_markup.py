import pytest
from hypothesis import given, strategies as st

from markup import WORD_JOINER, escape_markdown, safe_markdown


@pytest.mark.parametrize(
    "text",
    [
        "![x](https://evil.example/p.png)",
        "![x][ref]\n\n[ref]: https://evil.example/p.png",
        "`code` ![x](http://a/b.png)",
        "```\n![kept in code](http://a/b.png)\n```",
        "\\`![x](http://a/b.png)\\`",
        "!![x](u)",
    ],
)
def test_no_image_syntax_survives(text):
    shown = safe_markdown(text)
    assert "![" not in shown
    assert shown.replace(WORD_JOINER, "") == text


@given(st.text())
def test_safe_markdown_only_adds_invisible_joiners(text):
    shown = safe_markdown(text)
    assert "![" not in shown
    assert shown.replace(WORD_JOINER, "") == text.replace(WORD_JOINER, "")


def test_escape_markdown_makes_names_literal():
    assert escape_markdown("**Ada** [x](y) #1") == r"\*\*Ada\*\* \[x\]\(y\) \#1"
