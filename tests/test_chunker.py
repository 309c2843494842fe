from hypothesis import given, settings, strategies as st

from chunker import SentenceChunker


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def chunk_all(pieces, **options):
    chunker = SentenceChunker(**options)
    chunks = [chunk for piece in pieces for chunk in chunker.feed(piece)]
    rest = chunker.flush()
    return chunks + ([rest] if rest else [])


def by_char(text, **options):
    return chunk_all(list(text), **options)


@st.composite
def text_and_split(draw):
    alphabet = st.sampled_from(list("abc XYZ.!?\n\t3,e.g…\"')") + ["é", "🙂", "\u200b", "漢", "。", "！", "？", "」"])
    text = draw(st.text(alphabet=alphabet, max_size=600) | st.text(max_size=300))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=80)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return text, pieces


@settings(max_examples=400, deadline=None)
@given(text_and_split())
def test_chunks_join_back_to_the_text_however_it_is_split(case):
    text, pieces = case
    chunks = chunk_all(pieces)
    assert "".join(chunks) == text
    assert all(chunks)  # no empty writes


@settings(max_examples=200, deadline=None)
@given(text_and_split())
def test_no_chunk_is_longer_than_the_limit_unless_one_piece_was(case):
    text, pieces = case
    longest_piece = max((len(p) for p in pieces), default=0)
    for chunk in chunk_all(pieces, max_chars=200):
        assert len(chunk) <= max(200, longest_piece)


def test_chinese_and_japanese_sentences_end_at_their_own_marks_with_no_space_after():
    chinese = "今天天气很好。我们去公园散步吧！你觉得怎么样？好的，那就这么定了。"
    assert by_char(chinese) == ["今天天气很好。我们去公园散步吧！", "你觉得怎么样？好的，那就这么定了。"]
    japanese = "これはテストです。「本当にそうですか？」と彼は聞いた。はい、そうです！ありがとう。"
    # A closing bracket stays with its sentence.
    assert by_char(japanese) == ["これはテストです。「本当にそうですか？」", "と彼は聞いた。はい、そうです！", "ありがとう。"]


def test_cuts_at_sentence_ends():
    text = "Hello there, my friend! How are you doing today? I am fine, thanks.\nNext line here."
    assert by_char(text) == [
        "Hello there, my friend!",
        " How are you doing today?",
        " I am fine, thanks.\n",
        "Next line here.",
    ]


def test_waits_for_the_whitespace_after_a_full_stop():
    chunker = SentenceChunker()
    assert chunker.feed("This sentence is long enough.") == []
    assert chunker.feed(" And") == ["This sentence is long enough."]
    assert chunker.pending == " And"


def test_short_sentences_are_joined_up_to_the_minimum():
    assert by_char("Hi. Yes. Okay then, let us go. Fine.") == ["Hi. Yes. Okay then, let us go.", " Fine."]


def test_numbers_abbreviations_initials_and_ellipses_do_not_split():
    text = (
        "The value of pi is 3.14 and e.g. Dr. Smith and J. R. Tolkien agree, "
        "or not... who knows. Then i.e. this."
    )
    assert by_char(text) == [
        "The value of pi is 3.14 and e.g. Dr. Smith and J. R. Tolkien agree, or not... who knows.",
        " Then i.e. this.",
    ]


def test_numbered_list_items_are_not_sentence_ends():
    text = "Steps to follow:\n1. Open the app and look around.\n2. Send a message."
    chunks = by_char(text)
    assert not any(chunk.endswith("1.") or chunk.endswith("2.") for chunk in chunks)
    assert "".join(chunks) == text


def test_quotes_and_brackets_stay_with_their_sentence():
    assert by_char('She said "this is the end." (And it was.) Done now.') == [
        'She said "this is the end."',
        " (And it was.) Done now.",
    ]


def test_long_text_without_boundaries_is_forced_at_max_chars_on_a_word_end():
    words = " ".join(f"word{i}" for i in range(100))  # no punctuation at all
    chunks = by_char(words)
    assert "".join(chunks) == words
    assert all(len(chunk) <= 200 for chunk in chunks)
    assert all(chunk.endswith(" ") for chunk in chunks[:-1])  # no word split
    assert len(chunks) >= 3


def test_one_long_word_is_forced_at_max_chars():
    chunks = by_char("x" * 450)
    assert [len(c) for c in chunks] == [200, 200, 50]


def test_forced_after_max_wait_without_a_boundary():
    clock = FakeClock()
    chunker = SentenceChunker(max_wait_s=1.0, clock=clock)
    assert chunker.feed("def main(") == []
    clock.now = 0.5
    assert chunker.feed("args) ") == []
    clock.now = 1.2
    assert chunker.feed("-> None") == ["def main(args) -> "]  # cut on a word end
    assert chunker.pending == "None"
    clock.now = 1.5
    assert chunker.feed(":") == []  # the wait restarts with the pending text


def test_final_flush_returns_what_is_left_once():
    chunker = SentenceChunker()
    chunker.feed("Short")
    assert chunker.flush() == "Short"
    assert chunker.flush() == ""


def test_a_big_piece_with_many_sentences_is_one_chunk():
    text = "One sentence here. Two sentences here. Three sentences here. Tail"
    assert chunk_all([text]) == ["One sentence here. Two sentences here. Three sentences here.", " Tail"]
