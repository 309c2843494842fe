"""Load on the real app: bursts of questions, and a soak of replies and viewers.

The soak runs SOAK_SECONDS (default 15 s in the normal suite); run the full
one with `SOAK_SECONDS=60 python -m pytest tests/test_load.py -k soak -s`.
Viewers are real Chromium pages, each a person of its own to the app (its
name, its session); loaded as tabs of one browser, which is quicker.
"""

import os
import threading
import time

from fake_openai import Reply
from live import (
    as_pieces,
    assistant_body,
    messages,
    require_chromium,
    send,
    stored_messages,
    stored_replies,
    wait_until,
    warnings,
)

require_chromium()

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "15"))


def test_a_burst_of_ten_questions_never_exceeds_the_concurrency_limit(start_app, pages, fake):
    # Every reply is held after its first words until all ten people have had
    # their answer, however far apart one driver's ten key presses land.
    held = threading.Event()
    fake.default = Reply(pieces=as_pieces(["One short answer, written in a moment."] * 4), delay_s=0.02, hold=held)
    app = start_app(CHAT_MAX_CONCURRENT="4", CHAT_IDLE_TIMEOUT_S="60")
    people = pages(app, "burst", *[f"Person{i}" for i in range(10)], tabs=True)
    for i, page in enumerate(people):
        page.fill("[data-testid=stChatInput] textarea", f"@gpt question {i}")
    for page in people:
        page.keyboard.press("Enter")
    # Everyone has been answered or told why, and every reply's request has reached the model.
    wait_until(lambda: sum(bool(warnings(p)) for p in people) + len(stored_replies(app.db, "burst")) >= 10
               and fake.in_flight == len(stored_replies(app.db, "burst")))
    held.set()
    wait_until(lambda: all(r["status"] == "complete" for r in stored_replies(app.db, "burst")), timeout=30)

    replies = stored_replies(app.db, "burst")
    refused = [p for p in people if any("already writing 4 replies" in w for w in warnings(p))]
    assert fake.max_in_flight == 4
    assert len(replies) == 4 and len(refused) == 6
    assert sorted(r["text"] for r in replies) == sorted(s.text for s in fake.sent)
    assert len(stored_messages(app.db, "burst")) == 4  # refused questions were not stored


def test_the_per_asker_rate_limit_holds(start_app, pages, fake):
    fake.default = Reply(pieces=["Quick", " answer."])
    app = start_app(CHAT_REPLIES_PER_MINUTE="5")
    asker = pages(app, "ratelimit", "Ada")
    for i in range(5):
        send(asker, f"@gpt question {i}")
        wait_until(lambda: len(stored_replies(app.db, "ratelimit")) == i + 1
                   and stored_replies(app.db, "ratelimit")[-1]["status"] == "complete")
    send(asker, "@gpt one too many")
    wait_until(lambda: any("5 times a minute" in w for w in warnings(asker)))
    assert len(stored_replies(app.db, "ratelimit")) == 5
    other = pages(app, "ratelimit", "Bob")  # someone else may still ask
    send(other, "@gpt my turn")
    wait_until(lambda: len(stored_replies(app.db, "ratelimit")) == 6)


def test_soak_five_replies_and_twenty_viewers(start_app, pages, fake):
    sentences = [f"Sentence {n} of a steady reply, one of many in this soak." for n in range(1, 400)]
    pieces = as_pieces(sentences)
    per_piece = 0.02
    count = int(SOAK_SECONDS / per_piece)
    fake.default = Reply(pieces=pieces[:count], delay_s=per_piece)
    app = start_app(CHAT_MAX_CONCURRENT="5")
    viewers = pages(app, "soak", *[f"Viewer{i}" for i in range(20)], tabs=True)
    askers = pages(app, "soak", *[f"Asker{i}" for i in range(5)], tabs=True)
    started = time.monotonic()
    for i, page in enumerate(askers):
        send(page, f"@gpt soak question {i}")
    wait_until(lambda: len(stored_replies(app.db, "soak")) == 5)
    wait_until(lambda: all(r["status"] != "streaming" for r in stored_replies(app.db, "soak")),
               timeout=SOAK_SECONDS * 3 + 30)
    took = time.monotonic() - started

    replies = stored_replies(app.db, "soak")
    sent = sorted(s.text for s in fake.sent)
    assert [r["status"] for r in replies] == ["complete"] * 5, [(r["status"], r["error"]) for r in replies]
    assert sorted(r["text"] for r in replies) == sent  # nothing lost, nothing interleaved
    finals = {r["text"] for r in replies}

    def shows_all_final(page):
        shown = {m["body"] for m in messages(page) if m["from"].endswith("assistant")}
        return shown == finals and "writing" not in " ".join(m["caption"] for m in messages(page))

    for page in viewers + askers:
        try:
            wait_until(lambda: shows_all_final(page), timeout=30)
        except AssertionError:  # say which page, and what it shows instead
            shown = [(m["caption"], m["body"][-60:]) for m in messages(page) if m["from"].endswith("assistant")]
            raise AssertionError(f"after 30 s, {page.url} shows {shown}") from None
    assert assistant_body(viewers[0]) in finals
    print(
        f"\nsoak: {len(replies)} replies, {sum(len(r['chunks']) for r in replies)} chunks, "
        f"{sum(len(r['text']) for r in replies)} characters, {len(viewers)} viewers + {len(askers)} askers, "
        f"{took:.1f} s for the replies (model time {count * per_piece:.1f} s), 0 errors"
    )
