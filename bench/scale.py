"""How far this 2-core machine goes: viewers times concurrent replies.

For 5, 10 and 20 viewer sessions with 1, 3 and 5 replies streaming at once
(50 tokens/s each, 400 tokens, in a room of 100 messages), then more viewers
until it breaks. Every session is a ``WireSession`` (tests/wire_client.py):
the page's side of Streamlit's websocket, without a browser rendering it on
the server's own two cores. One Chromium page more
watches as a viewer, to show what a person sees on screen.

Measured: the askers' p95 latency (token sent to token arriving in the
asker's session), the viewers' staleness (a sentence stored to it arriving;
stored is taken as its last token being sent, which precedes the commit by a
millisecond or two), the same on the Chromium viewer's screen, the server's
CPU as a share of one core, how busy the whole machine was, the load
generator's own CPU (sessions, model server, browser driver), and the time
the replies took against the model's time.

    python bench/scale.py [--viewers 5 10 20] [--replies 1 3 5] [--beyond 40 80]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asker_latency
from common import CHROMIUM, CHROMIUM_ARGS, ROOT, App, cpu_seconds, machine_busy
from viewers import ROOM, percentile, seed
from wire_client import TickClock, WireSession

from fake_openai import FakeOpenAI, Reply  # noqa: E402

RATE, TOKENS = 50, 400
SENTENCE = 12  # words per sentence in the test server's tagged replies
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


def lags(seen: dict, stamps: list[tuple[float, int]], step: int = 1) -> list[tuple[float, float]]:
    """(sent, lag) in ms for every ``step``-th token and the last: from the token being sent to the
    session first having at least that many words (``seen``: word count -> epoch ms)."""
    shown = [(int(count), at) for count, at in seen.items()]
    result = []
    for count in sorted({*range(step, len(stamps) + 1, step), len(stamps)}):
        arrivals = [at for n, at in shown if n >= count]
        if arrivals:
            sent = stamps[count - 1][0] * 1000
            result.append((sent, min(arrivals) - sent))
    return result


def following(pairs: list[tuple[float, float]], seen: dict) -> list[float]:
    """The lags of sentences stored after the viewer first saw the reply.

    Noticing the reply is itself a step a viewer waits for (the first
    sentence); after it, what the staleness target is about.
    """
    noticed = min(seen.values(), default=float("inf"))
    return [lag for sent, lag in pairs if sent >= noticed]


def in_ms(seen: dict[int, float]) -> dict[int, float]:
    return {count: at * 1000 for count, at in seen.items()}


def session(app: App, clock: TickClock, name: str) -> WireSession:
    return WireSession(app.url, f"room={ROOM}&name={name}&tab={uuid.uuid4().hex[:16]}", clock)


def run(browser, server: FakeOpenAI, viewers: int, replies: int, db: Path, fast_asker: bool = False) -> dict:
    """One combination; with ``fast_asker`` the last reply is asked from Chromium in a room
    of its own and streamed at 2,000 tokens/s, measured as in bench/asker_latency.py."""
    server.default = Reply(tagged=TOKENS, delay_s=1 / RATE)
    sent_before = len(server.sent)
    env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "x", "CHAT_DB_PATH": str(db),
           "CHAT_MAX_CONCURRENT": str(replies), "CHAT_REPLIES_PER_MINUTE": "1000"}
    with App(ROOT / "app.py", env) as app:
        clock = TickClock()
        watchers = [session(app, clock, f"V{i}") for i in range(viewers)]
        askers = [session(app, clock, f"A{k}") for k in range(replies - fast_asker)]
        for s in watchers + askers:
            s.wait_ready()
        page = browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
        page.goto(f"{app.url}/?room={ROOM}&name=Chromium", wait_until="commit")
        page.wait_for_selector("[data-testid=stChatInput] textarea", timeout=120_000)
        page.evaluate(OBSERVE)
        time.sleep(2)
        me = os.getpid()
        cpu0, own0, started, machine0 = app.cpu(), cpu_seconds(me), time.monotonic(), machine_busy()
        for k, asker in enumerate(askers):
            asker.chat(f"@gpt r{k}")
        fast = None
        if fast_asker:
            time.sleep(0.5)  # while the others stream
            fast = asker_latency.one_reply(browser, app, server, 2_000, 2_000, "/?room={room}&name=Fast", 100)
        deadline = time.monotonic() + TOKENS / RATE * 4 + 30
        while time.monotonic() < deadline:
            done = [s for s in server.sent[sent_before:] if s.done.is_set()]
            if len(done) == replies:
                break
            time.sleep(0.2)
        took = time.monotonic() - started
        cpu = (app.cpu() - cpu0) / took * 100
        own = (cpu_seconds(me) - own0) / took * 100
        machine1 = machine_busy()
        machine = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1]) * 100
        time.sleep(3)  # the last refresh reaches every viewer
        stamps = {s.text.split("w")[0]: s.stamps for s in server.sent[sent_before:]}
        asker_lags, viewer_lags, steady_lags, screen_lags = [], [], [], []
        for k, asker in enumerate(askers):
            asker_lags += [lag for _, lag in lags(in_ms(asker.seen.get(f"r{k}", {})), stamps[f"r{k}"])]
        for watcher in watchers:
            for tag, seen in watcher.seen.items():
                if tag in stamps:
                    pairs = lags(in_ms(seen), stamps[tag], step=SENTENCE)
                    viewer_lags += [lag for _, lag in pairs]
                    steady_lags += following(pairs, in_ms(seen))
        for tag, seen in page.evaluate("() => window.__seen").items():
            if tag in stamps:
                screen_lags += following(lags(seen, stamps[tag], step=SENTENCE), seen)
        page.context.close()
        for s in watchers + askers:
            s.close()
        clock.stop()
    return {"viewers": viewers, "replies": replies, "asker_p95": percentile(asker_lags, 0.95),
            "viewer_p50": statistics.median(viewer_lags) if viewer_lags else float("nan"),
            "viewer_p95": percentile(viewer_lags, 0.95), "steady_p95": percentile(steady_lags, 0.95),
            "screen_p95": percentile(screen_lags, 0.95),
            "cpu": cpu, "machine": machine, "load": own, "took": took, "model_s": TOKENS / RATE, "fast": fast}


def measure(viewer_counts=(5, 10, 20), reply_counts=(1, 3, 5), beyond=(40, 80)) -> tuple[list[dict], dict]:
    """The grid, then more viewers with the most replies until it breaks, then the
    2,000 tokens/s asker in Chromium while 20 viewers and 4 other replies run."""
    from playwright.sync_api import sync_playwright

    rows = []
    combos = [(v, r) for v in viewer_counts for r in reply_counts] + [(v, max(reply_counts)) for v in beyond]
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for viewers, replies in combos:
            db = Path(tmp) / f"{viewers}x{replies}.db"
            seed(db)
            rows.append(run(browser, server, viewers, replies, db))
            print_row(rows[-1])
        db = Path(tmp) / "fast.db"
        seed(db)
        loaded = run(browser, server, 20, 5, db, fast_asker=True)
        browser.close()
    print_fast(loaded)
    return rows, loaded


def print_fast(row: dict) -> None:
    m = row["fast"]
    print(f"\nThe asker at 2,000 tokens/s (Chromium, its own room of 100 messages) while {row['viewers']} viewers "
          f"and {row['replies'] - 1} other replies run:")
    print(f"first token {m['first_ms']:.0f} ms after Enter, p50 {m['p50']:.0f}, p95 {m['p95']:.0f}, "
          f"last {m['last']:.0f} ms after sent, longest frame {m['longest_frame_ms']:.0f} ms; "
          f"viewers meanwhile: following p95 {row['steady_p95']:.0f} ms")


def print_header() -> None:
    print(f"{RATE} tokens/s, {TOKENS} tokens per reply, 100 messages in the room; ms unless said.")
    print("asker / viewer: arrival in the session; following: once the viewer has seen the reply;")
    print("on screen: the Chromium viewer; load: the sessions, model server and browser driver")
    print(f"{'viewers':>7} {'replies':>7} {'asker p95':>9} {'viewer p50':>10} {'viewer p95':>10} {'following p95':>13} "
          f"{'on screen p95':>13} "
          f"{'server CPU %':>12} {'machine busy %':>14} {'load CPU %':>10} {'replies took s':>14}")


def print_row(r: dict) -> None:
    print(f"{r['viewers']:>7} {r['replies']:>7} {r['asker_p95']:>9.0f} {r['viewer_p50']:>10.0f} "
          f"{r['viewer_p95']:>10.0f} {r['steady_p95']:>13.0f} {r['screen_p95']:>13.0f} {r['cpu']:>12.0f} {r['machine']:>14.0f} "
          f"{r['load']:>10.0f} {r['took']:>8.1f} / {r['model_s']:.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--replies", type=int, nargs="*", default=[1, 3, 5])
    parser.add_argument("--beyond", type=int, nargs="*", default=[40, 80], help="viewers, with the most replies")
    args = parser.parse_args()
    print_header()
    measure(args.viewers, args.replies, args.beyond)


if __name__ == "__main__":
    main()
