"""Whether the asker's screen moves smoothly while a long reply streams, and how soon its end shows.

Replies of 2,000 tokens (each a distinct word, w<i>) stream at 200 and 2,000
tokens/s in three shapes: many Markdown blocks (paragraphs, lists, code), one
paragraph, and one fenced code block. Chromium shows the asker's page; a
MutationObserver notes, at the next animation frame, how many of the reply's
words are on screen. Figures, per reply:

  p95 / max gap   time between two changes of the screen, from the first word
                  shown to the last (what a person sees as jumps)
  changes         how many times the screen changed
  end             the model's last token sent to the last word on screen
  KB              bytes on the wire to the browser

Then three askers at once (three pages, one reply each, many blocks at
2,000 tokens/s): each one's end.

    python bench/asker_smooth.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

from asker_bytes import code_block_tokens, markdown_tokens
from asker_latency import OBSERVE, percentile
from common import CHROMIUM, CHROMIUM_ARGS, ROOT, App

from fake_openai import FakeOpenAI, Reply  # noqa: E402

TOKENS = 2_000
RATES = (200, 2_000)
THREE_AT_ONCE_RATE = 2_000


def paragraph_tokens(n: int) -> list[str]:
    """n tokens of one paragraph: sentences of ten words, never a blank line."""
    return [("" if i == 0 else " ") + f"w{i}" + ("." if i % 10 == 9 else "") for i in range(n)]


SHAPES = {"many blocks": markdown_tokens, "one paragraph": paragraph_tokens, "one code block": code_block_tokens}


def words_in(pieces: list[str]) -> int:
    return sum(p.count("w") for p in pieces)


def open_asker(browser, app: App, room: str, name: str):
    page = browser.new_context(viewport={"width": 1100, "height": 800}).new_page()
    page.goto(f"{app.url}/?room={room}&name={name}")
    page.wait_for_selector("[data-testid=stChatInput] textarea", timeout=30_000)
    return page


def ask(page, text: str = "@gpt go") -> None:
    page.evaluate(OBSERVE)
    page.fill("[data-testid=stChatInput] textarea", text)
    page.keyboard.press("Enter")


def read(page, sent, words: int, timeout: float) -> dict:
    """The figures of one reply, once all ``words`` are on ``page`` (or ``timeout`` has passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = page.evaluate("() => window.__seen")
        if seen and seen[-1][1] >= words:
            break
        time.sleep(0.05)
    seen = page.evaluate("() => window.__seen")
    streaming = [t for t, count in seen if 1 <= count]
    gaps = [b - a for a, b in zip(streaming, streaming[1:])]
    last_shown = next((t for t, count in seen if count >= words), float("nan"))
    return {"p95_gap_ms": percentile(gaps, 0.95) if gaps else float("nan"), "max_gap_ms": max(gaps, default=float("nan")),
            "changes": len(streaming), "end_ms": last_shown - sent.stamps[-1][0] * 1000}


def one_reply(browser, app: App, server: FakeOpenAI, shape: str, rate: int) -> dict:
    pieces = SHAPES[shape](TOKENS)
    page = open_asker(browser, app, f"s{time.monotonic_ns()}", "Ada")
    time.sleep(3.0)  # past the page's first full run, as a person typing would be
    server.enqueue(Reply(pieces=pieces, delay_s=1 / rate))
    before, replies = app.proxy.down, len(server.sent)
    ask(page)
    [sent] = wait_for_reply(server, len(pieces), replies)
    result = read(page, sent, words_in(pieces), timeout=10)
    time.sleep(0.5)
    result["kb"] = (app.proxy.down - before) / 1000
    page.context.close()
    return result


def wait_for_reply(server: FakeOpenAI, pieces: int, before: int, count: int = 1) -> list:
    """The model's next ``count`` replies after the first ``before``, once each has sent all ``pieces``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sent = server.sent[before:before + count]
        if len(sent) == count and all(s.pieces_sent == pieces and s.done.is_set() for s in sent):
            return sent
        time.sleep(0.02)
    raise RuntimeError("the model's replies did not end")


def three_at_once(browser, app: App, server: FakeOpenAI) -> list[float]:
    """The end of each of three askers' replies, asked at the same moment, each in a room of its own
    (so that the last reply on each page is its own)."""
    pieces = markdown_tokens(TOKENS)
    names = ("Ada", "Bob", "Cy")
    pages = [open_asker(browser, app, f"t{time.monotonic_ns()}", name) for name in names]
    time.sleep(3.0)
    for _ in pages:
        server.enqueue(Reply(pieces=pieces, delay_s=1 / THREE_AT_ONCE_RATE))
    before = len(server.sent)
    for page, name in zip(pages, names):  # Playwright's pages are driven from this thread: one after another
        ask(page, f"@gpt go {name}")
    wait_for_reply(server, len(pieces), before, count=3)
    asked = [r["body"]["messages"][-1]["content"] for r in server.requests[before:]]  # "Ada: @gpt go Ada"
    whose = {name: server.sent[before + i] for i, text in enumerate(asked) for name in names if text.endswith(name)}
    ends = [read(page, whose[name], words_in(pieces), timeout=10)["end_ms"] for page, name in zip(pages, names)]
    for page in pages:
        page.context.close()
    return ends


def measure() -> tuple[list[dict], list[float]]:
    from playwright.sync_api import sync_playwright

    rows = []
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "x", "CHAT_DB_PATH": f"{tmp}/chat.db",
               "CHAT_REPLIES_PER_MINUTE": "1000"}
        with App(ROOT / "app.py", env) as app:
            for shape in SHAPES:
                for rate in RATES:
                    rows.append({"shape": shape, "rate": rate, **one_reply(browser, app, server, shape, rate)})
            ends = three_at_once(browser, app, server)
        browser.close()
    return rows, ends


def print_table(rows: list[dict], ends: list[float]) -> None:
    print(f"{TOKENS:,} tokens per reply; the asker's screen while it streams, and its end")
    print(f"{'shape':<15} {'tokens/s':>8} {'p95 gap ms':>10} {'max gap ms':>10} {'changes':>7} {'end ms':>7} {'KB':>8}")
    for r in rows:
        print(f"{r['shape']:<15} {r['rate']:>8,} {r['p95_gap_ms']:>10.0f} {r['max_gap_ms']:>10.0f} {r['changes']:>7} "
              f"{r['end_ms']:>7.0f} {r['kb']:>8.0f}")
    print(f"end, median of the six: {statistics.median(r['end_ms'] for r in rows):.0f} ms")
    print(f"three askers at once, {THREE_AT_ONCE_RATE:,} tokens/s: ends " + ", ".join(f"{e:.0f}" for e in ends) + " ms")


def main() -> None:
    print_table(*measure())


if __name__ == "__main__":
    main()
