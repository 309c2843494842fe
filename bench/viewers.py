"""How soon viewers see the room move, and what a viewer costs, under two Streamlit settings.

Starts `streamlit run app.py` once per setting, on a room with 100 messages,
and opens VIEWERS Chromium pages on it through a byte-counting proxy, so the
figures are bytes on the wire (after any websocket compression). Phases:

  baseline  the server with no page open, for its own housekeeping
  idle      the pages are open and nothing happens in the room
  at rest   every 2 s another connection stores a message in the quiet room
  writing   a reply in the room grows by one sentence a second

Per viewer: kilobytes per second to the browser and the server's CPU time as a
percentage of one core over the baseline; and how stale each new message (at
rest) and each stored sentence (writing) is: from its commit to its being on a
viewer's screen (p50, p95).

    python bench/viewers.py [--viewers 5] [--phase-s 30]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from common import CHROMIUM, CHROMIUM_ARGS, ROOT, App

from store import Store, open_store  # noqa: E402

SETTINGS = {
    "Streamlit defaults": ["--runner.postScriptGC", "true", "--server.enableWebsocketCompression", "false"],
    "this app": [],  # .streamlit/config.toml: postScriptGC off, websocket compression on
}
ROOM = "bench"
# Notes when each "Arrival N" message and each "Sentence N" of the reply shows up on this page.
OBSERVE = """() => {
    window.__seen = {};
    const look = () => {
        for (const m of (document.body.innerText.match(/(Arrival|Sentence) \\d+(?= of)/g) || [])) {
            if (!(m in window.__seen)) window.__seen[m] = performance.timeOrigin + performance.now();
        }
    };
    new MutationObserver(() => requestAnimationFrame(look))
        .observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def seed(database: Path | str, room: str = ROOM, messages: int = 100) -> None:
    """``messages`` settled messages in ``room`` (an SQLite file or a PostgreSQL URL): questions and replies."""
    store = open_store(database)
    for i in range(messages // 2):
        store.add_message(room, "Ada", f"Message {i}: a few words about nothing in particular, to fill the room.")
        reply = store.start_reply(room)
        store.finish_reply(reply.id, "complete", last_chunk=f"Reply {i}. " + "Some sentence of an answer. " * 6)
    if hasattr(store, "close"):
        store.close()


def write_sentences(db_path: Path, stop: threading.Event, stored: dict) -> None:
    """A reply that grows by one sentence a second; notes when each was committed."""
    store = Store(db_path)
    reply = store.start_reply(ROOM)
    n = 0
    while not stop.wait(1.0):
        n += 1
        store.append_chunk(reply.id, f"Sentence {n} of a reply being written. ")
        stored[f"Sentence {n}"] = time.time() * 1000
    store.finish_reply(reply.id, "complete")


def write_messages(db_path: Path, count: int, stored: dict) -> None:
    """A message every 2 s from another connection, as another process would; notes each commit."""
    store = Store(db_path)
    for n in range(1, count + 1):
        time.sleep(2.0)
        store.add_message(ROOM, "Bea", f"Arrival {n} of a message in a quiet room.")
        stored[f"Arrival {n}"] = time.time() * 1000


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def measure(viewers: int = 5, phase_s: float = 30.0) -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for label, flags in SETTINGS.items():
            db_path = Path(tmp) / f"{len(rows)}.db"
            seed(db_path)
            with App(ROOT / "app.py", {"CHAT_DB_PATH": str(db_path), "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""},
                     flags) as app:
                time.sleep(2)
                baseline = sample(app, 10, 1)
                pages = []
                for i in range(viewers):
                    page = browser.new_context().new_page()
                    page.goto(f"{app.url}/?room={ROOM}&name=Viewer{i}", wait_until="commit")
                    pages.append(page)
                for page in pages:
                    page.wait_for_selector("[data-testid=stChatMessage]", timeout=60_000)
                    page.evaluate(OBSERVE)
                time.sleep(5)
                idle = sample(app, phase_s, viewers)
                arrivals: dict = {}
                write_messages(db_path, 10, arrivals)
                time.sleep(2)
                stop, sentences = threading.Event(), {}
                writer = threading.Thread(target=write_sentences, args=(db_path, stop, sentences))
                writer.start()
                time.sleep(3)
                writing = sample(app, phase_s, viewers)
                stop.set()
                writer.join()
                time.sleep(2)
                at_rest, stale = [], []
                for page in pages:
                    seen = page.evaluate("() => window.__seen")
                    at_rest += [seen[k] - t for k, t in arrivals.items() if k in seen]
                    stale += [seen[k] - t for k, t in sentences.items() if k in seen]
                    page.context.close()
            missed = viewers * (len(arrivals) + len(sentences)) - len(at_rest) - len(stale)
            rows.append({"setting": label, "baseline_cpu": baseline[1],
                         "idle_kbps": idle[0], "idle_cpu": idle[1] - baseline[1] / viewers,
                         "writing_kbps": writing[0], "writing_cpu": writing[1] - baseline[1] / viewers,
                         "rest_p50": percentile(at_rest, 0.5), "rest_p95": percentile(at_rest, 0.95),
                         "stale_p50": percentile(stale, 0.5), "stale_p95": percentile(stale, 0.95),
                         "missed": missed})
        browser.close()
    return rows


def sample(app: App, seconds: float, viewers: int) -> tuple[float, float]:
    cpu0, bytes0, t0 = app.cpu(), app.proxy.down, time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return ((app.proxy.down - bytes0) / elapsed / viewers / 1000, (app.cpu() - cpu0) / elapsed / viewers * 100)


def print_table(rows: list[dict], viewers: int, phase_s: float) -> None:
    print(f"{viewers} Chromium viewers, {phase_s:g} s idle and {phase_s:g} s writing, 100 messages in the room; "
          "per viewer, CPU over the server's own (baseline, no page open):")
    print(f"{'setting':<20} {'baseline CPU %':>14} {'idle KB/s':>9} {'idle CPU %':>10} {'writing KB/s':>12} "
          f"{'writing CPU %':>13} {'at rest p50 ms':>14} {'at rest p95 ms':>14} {'writing p50 ms':>14} "
          f"{'writing p95 ms':>14} {'missed':>6}")
    for r in rows:
        print(f"{r['setting']:<20} {r['baseline_cpu']:>14.2f} {r['idle_kbps']:>9.2f} {r['idle_cpu']:>10.2f} "
              f"{r['writing_kbps']:>12.2f} {r['writing_cpu']:>13.2f} {r['rest_p50']:>14.0f} {r['rest_p95']:>14.0f} "
              f"{r['stale_p50']:>14.0f} {r['stale_p95']:>14.0f} {r['missed']:>6}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, default=5)
    parser.add_argument("--phase-s", type=float, default=30.0)
    args = parser.parse_args()
    print_table(measure(args.viewers, args.phase_s), args.viewers, args.phase_s)


if __name__ == "__main__":
    main()
