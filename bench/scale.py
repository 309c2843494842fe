"""How far this 2-core machine goes: viewers times concurrent replies.

For 5, 10 and 20 viewer sessions with 1, 3 and 5 replies streaming at once
(50 tokens/s each, 400 tokens, in a room of 100 messages): the askers' p95
latency (token sent to token on screen), the viewers' p95 staleness (a sentence
stored to it being on screen; stored is taken as its last token being sent,
which precedes the commit by a millisecond or two), the server's CPU as a
share of one core, how busy the whole machine was (the browsers run on it
too), and the time the replies took against the model's time.

    python bench/scale.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import CHROMIUM, CHROMIUM_ARGS, ROOT, App, machine_busy
from viewers import ROOM, percentile, seed

from fake_openai import FakeOpenAI, Reply  # noqa: E402

RATE, TOKENS = 50, 400
# For each reply tag (r0, r1, ...) on the page: when each word count first showed.
OBSERVE = """() => {
    window.__seen = {};
    const look = () => {
        const now = performance.timeOrigin + performance.now();
        const counts = {};
        for (const m of (document.body.innerText.match(/r\\d+w\\d+/g) || [])) {
            const tag = m.split('w')[0];
            counts[tag] = (counts[tag] || 0) + 1;
        }
        for (const [tag, count] of Object.entries(counts)) {
            const seen = window.__seen[tag] = window.__seen[tag] || {};
            if (!(count in seen)) seen[count] = now;
        }
    };
    new MutationObserver(() => requestAnimationFrame(look))
        .observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def lags(seen: dict, stamps: list[tuple[float, int]], every_token: bool) -> list[float]:
    """For each count seen on a page: when it showed minus when its last token was sent."""
    sent = {count: at * 1000 for at, count in stamps}
    shown = sorted((int(count), at) for count, at in seen.items())
    if every_token:  # the asker: every token, at the first count that includes it
        result, i = [], 0
        for count in range(1, len(stamps) + 1):
            while i < len(shown) and shown[i][0] < count:
                i += 1
            if i < len(shown):
                result.append(shown[i][1] - sent[count])
        return result
    return [at - sent[count] for count, at in shown if count in sent and 0 < count]


def run(browser, server: FakeOpenAI, viewers: int, replies: int, db: Path) -> dict:
    server.default = Reply(tagged=TOKENS, delay_s=1 / RATE)
    sent_before = len(server.sent)
    env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "x", "CHAT_DB_PATH": str(db),
           "CHAT_MAX_CONCURRENT": str(replies), "CHAT_REPLIES_PER_MINUTE": "1000"}
    with App(ROOT / "app.py", env) as app:
        pages = []
        for i in range(viewers + replies):
            page = browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
            page.goto(f"{app.url}/?room={ROOM}&name=P{i}", wait_until="commit")
            pages.append(page)
        for page in pages:
            page.wait_for_selector("[data-testid=stChatInput] textarea", timeout=120_000)
            page.evaluate(OBSERVE)
        watchers, askers = pages[:viewers], pages[viewers:]
        time.sleep(2)
        cpu0, started, machine0 = app.cpu(), time.monotonic(), machine_busy()
        for k, page in enumerate(askers):
            page.fill("[data-testid=stChatInput] textarea", f"@gpt r{k}")
            page.keyboard.press("Enter")
        deadline = time.monotonic() + TOKENS / RATE * 4 + 30
        while time.monotonic() < deadline:
            done = [s for s in server.sent[sent_before:] if s.done.is_set()]
            if len(done) == replies:
                break
            time.sleep(0.2)
        took = time.monotonic() - started
        cpu = (app.cpu() - cpu0) / took * 100
        machine1 = machine_busy()
        machine = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1]) * 100
        time.sleep(3)  # the last refresh reaches every viewer
        stamps = {s.text.split("w")[0]: s.stamps for s in server.sent[sent_before:]}
        asker_lags, viewer_lags = [], []
        for k, page in enumerate(askers):
            seen = page.evaluate("() => window.__seen").get(f"r{k}", {})
            asker_lags += lags(seen, stamps[f"r{k}"], every_token=True)
        for page in watchers:
            for tag, seen in page.evaluate("() => window.__seen").items():
                if tag in stamps:
                    viewer_lags += lags(seen, stamps[tag], every_token=False)
        for page in pages:
            page.context.close()
    return {"viewers": viewers, "replies": replies, "asker_p95": percentile(asker_lags, 0.95),
            "viewer_p50": statistics.median(viewer_lags) if viewer_lags else float("nan"),
            "viewer_p95": percentile(viewer_lags, 0.95), "cpu": cpu, "machine": machine, "took": took, "model_s": TOKENS / RATE}


def measure(viewer_counts=(5, 10, 20), reply_counts=(1, 3, 5)) -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows = []
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for viewers in viewer_counts:
            for replies in reply_counts:
                db = Path(tmp) / f"{viewers}x{replies}.db"
                seed(db)
                rows.append(run(browser, server, viewers, replies, db))
                print_row(rows[-1])
        browser.close()
    return rows


def print_header() -> None:
    print(f"{RATE} tokens/s, {TOKENS} tokens per reply, 100 messages in the room; ms unless said")
    print(f"{'viewers':>7} {'replies':>7} {'asker p95':>9} {'viewer p50':>10} {'viewer p95':>10} "
          f"{'server CPU %':>12} {'machine busy %':>14} {'replies took s':>14}")


def print_row(r: dict) -> None:
    print(f"{r['viewers']:>7} {r['replies']:>7} {r['asker_p95']:>9.0f} {r['viewer_p50']:>10.0f} "
          f"{r['viewer_p95']:>10.0f} {r['cpu']:>12.0f} {r['machine']:>14.0f} {r['took']:>8.1f} / {r['model_s']:.0f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--replies", type=int, nargs="*", default=[1, 3, 5])
    args = parser.parse_args()
    print_header()
    measure(args.viewers, args.replies)


if __name__ == "__main__":
    main()
