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


@pytest.mark.parametrize(
    "text",
    [
        "[x](data:text/html;base64,AAAA)",
        "[x]( javascript:alert(1))",
        "[x](<data:text/html,hi>)",
        "[x](&#106;avascript:alert(1))",
        "[x][r]\n\n[r]: data:text/html,hi",
        "<data:text/html,hi>",
        "[x](VBScript:msgbox)",
    ],
)
def test_odd_link_schemes_are_broken(text):
    shown = safe_markdown(text)
    assert WORD_JOINER in shown
    assert shown.replace(WORD_JOINER, "") == text


@pytest.mark.parametrize(
    "text",
    ["[x](https://example.com)", "[x](http://a/b:c)", "[x](mailto:a@b.c)", "<https://example.com>",
     "data: 42", "```yaml\ndata: 1\n```", "a < b: c"],
)
def test_ordinary_text_and_web_links_are_untouched(text):
    assert safe_markdown(text) == text


def test_escape_markdown_makes_names_literal():
    assert escape_markdown("**Ada** [x](y) #1") == r"\*\*Ada\*\* \[x\]\(y\) \#1"
