import pytest
from hypothesis import given, settings, strategies as st

from markup import WORD_JOINER, defines_references, escape_markdown, safe_markdown, split_blocks


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


# Splitting a reply into Markdown blocks

# Lines that make every kind of block, and the lines that continue or close them.
LINES = [
    "A sentence of a paragraph.", "", "", "- a list item", "  continued in the item", "1. numbered", "   - nested",
    "```python", "```", "~~~", "    indented code", "$$", "x = y^2", "$$ inline $$", "| a | b |", "|---|---|",
    "| 1 | 2 |", "> quoted", "# Heading", "Title", "===", "---", "<div>", "</div>", "text with $math$ and `code`",
]
markdownish = st.lists(st.sampled_from(LINES), max_size=40).map("\n".join)


@pytest.mark.parametrize(
    "text, blocks",
    [
        ("Para one.\n\nPara two", ["Para one.\n\n", "Para two"]),
        ("```python\nx = 1\n\ny = 2\n```\n\nafter", ["```python\nx = 1\n\ny = 2\n```\n\n", "after"]),
        ("$$\na = b\n\nc = d\n$$\n\nafter", ["$$\na = b\n\nc = d\n$$\n\n", "after"]),
        ("Intro\n\n$$\na = b\n\nc = d", ["Intro\n\n", "$$\na = b\n\nc = d"]),  # still open: one block
        ("- a\n- b\n\n  continued\n\nafter", ["- a\n- b\n\n  continued\n\n", "after"]),
        ("Para\n\n    code\n\n    more\n\nnext", ["Para\n\n    code\n\n    more\n\n", "next"]),
        ("| a | b |\n|---|---|\n| 1 | 2 |\n\ntext", ["| a | b |\n|---|---|\n| 1 | 2 |\n\n", "text"]),
        ("See [x][r].\n\n[r]: https://example.com", ["See [x][r].\n\n[r]: https://example.com"]),
    ],
)
def test_blocks_are_what_a_markdown_parser_says(text, blocks):
    assert split_blocks(text) == blocks


SPLITS = settings(max_examples=300, deadline=None)


@SPLITS
@given(markdownish)
def test_blocks_join_back_to_the_text(text):
    assert "".join(split_blocks(text)) == text


@SPLITS
@given(markdownish, st.data())
def test_a_finished_block_stays_the_same_however_the_text_goes_on(text, data):
    """What lets finished blocks be sent once: more text never changes them."""
    cut = data.draw(st.integers(0, len(text)))
    finished = split_blocks(text[:cut])[:-1]
    assert split_blocks(text)[: len(finished)] == finished


def test_text_that_defines_link_references_is_not_split():
    assert defines_references("Words.\n\n[r]: https://example.com")
    assert defines_references("Words.\n\n[^1]: a footnote")
    assert not defines_references("Words with [a link](https://example.com) and [brackets].")
