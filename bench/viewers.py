"""What viewers cost the server, and how stale their view is, under a few Streamlit settings.

Starts `streamlit run app.py` once per setting, on a room with 100 messages,
and opens VIEWERS Chromium pages on it through a byte-counting proxy, so the
figures are bytes on the wire (after any websocket compression). Two phases:

  idle     nothing happens in the room (the page ticks every 5 s)
  writing  a reply in the room grows by one sentence a second (ticks every 1 s,
           and each stored sentence makes every viewer rerun the page)

Per viewer: kilobytes per second to the browser and the server's CPU time as a
percentage of one core; and, while writing, the staleness of each stored
sentence: from its commit to its being on a viewer's screen (p50, p95).

    python bench/viewers.py [--viewers 3] [--phase-s 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import CHROMIUM, CHROMIUM_ARGS, ROOT, App

from store import Store  # noqa: E402

SETTINGS = {
    "defaults": ["--runner.postScriptGC", "true", "--server.enableWebsocketCompression", "false"],
    "postScriptGC=false": ["--runner.postScriptGC", "false", "--server.enableWebsocketCompression", "false"],
    "ws compression": ["--runner.postScriptGC", "true", "--server.enableWebsocketCompression", "true"],
    "both (this app)": ["--runner.postScriptGC", "false", "--server.enableWebsocketCompression", "true"],
}
ROOM = "bench"
# Notes when each "Sentence N" of the streaming reply shows up on this page.
OBSERVE = """() => {
    window.__seen = {};
    const look = () => {
        for (const m of (document.body.innerText.match(/Sentence \\d+ of a reply being written/g) || [])) {
            const n = +m.split(' ')[1];
            if (!(n in window.__seen)) window.__seen[n] = performance.timeOrigin + performance.now();
        }
    };
    new MutationObserver(() => requestAnimationFrame(look))
        .observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def seed(db_path: Path, room: str = ROOM, messages: int = 100) -> None:
    """``messages`` settled messages in ``room``: questions and replies, taking turns."""
    store = Store(db_path)
    for i in range(messages // 2):
        store.add_message(room, "Ada", f"Message {i}: a few words about nothing in particular, to fill the room.")
        reply = store.start_reply(room)
        store.finish_reply(reply.id, "complete", last_chunk=f"Reply {i}. " + "Some sentence of an answer. " * 6)


def write_sentences(db_path: Path, stop: threading.Event, stored: dict) -> None:
    """A reply that grows by one sentence a second; notes when each was committed."""
    store = Store(db_path)
    reply = store.start_reply(ROOM)
    n = 0
    while not stop.wait(1.0):
        n += 1
        store.append_chunk(reply.id, f"Sentence {n} of a reply being written. ")
        stored[n] = time.time() * 1000
    store.finish_reply(reply.id, "complete")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def measure(viewers: int = 3, phase_s: float = 20.0) -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for label, flags in SETTINGS.items():
            db_path = Path(tmp) / f"{len(rows)}.db"
            seed(db_path)
            with App(ROOT / "app.py", {"CHAT_DB_PATH": str(db_path), "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""},
                     flags) as app:
                pages = []
                for i in range(viewers):
                    page = browser.new_context().new_page()
                    page.goto(f"{app.url}/?room={ROOM}&name=Viewer{i}", wait_until="commit")
                    pages.append(page)
                for page in pages:
                    page.wait_for_selector("[data-testid=stChatMessage]", timeout=60_000)
                    page.evaluate(OBSERVE)
                time.sleep(3)
                idle = sample(app, phase_s, viewers)
                stop, stored = threading.Event(), {}
                writer = threading.Thread(target=write_sentences, args=(db_path, stop, stored))
                writer.start()
                time.sleep(6)  # every viewer has noticed the reply and ticks every second
                writing = sample(app, phase_s, viewers)
                stop.set()
                writer.join()
                time.sleep(2)
                stale = []
                for page in pages:
                    seen = page.evaluate("() => window.__seen")
                    stale += [seen[str(n)] - t for n, t in stored.items() if str(n) in seen and n > 6]
                    page.context.close()
            rows.append({"setting": label, "idle_kbps": idle[0], "idle_cpu": idle[1], "writing_kbps": writing[0],
                         "writing_cpu": writing[1], "stale_p50": statistics.median(stale) if stale else float("nan"),
                         "stale_p95": percentile(stale, 0.95)})
        browser.close()
    return rows


def sample(app: App, seconds: float, viewers: int) -> tuple[float, float]:
    cpu0, bytes0, t0 = app.cpu(), app.proxy.down, time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return ((app.proxy.down - bytes0) / elapsed / viewers / 1000, (app.cpu() - cpu0) / elapsed / viewers * 100)


def print_table(rows: list[dict], viewers: int, phase_s: float) -> None:
    print(f"{viewers} viewers, {phase_s:g} s per phase, 100 messages in the room; per viewer:")
    print(f"{'setting':<20} {'idle KB/s':>9} {'idle CPU %':>10} {'writing KB/s':>12} {'writing CPU %':>13} "
          f"{'stale p50 ms':>12} {'stale p95 ms':>12}")
    for r in rows:
        print(f"{r['setting']:<20} {r['idle_kbps']:>9.2f} {r['idle_cpu']:>10.2f} {r['writing_kbps']:>12.2f} "
              f"{r['writing_cpu']:>13.2f} {r['stale_p50']:>12.0f} {r['stale_p95']:>12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, default=3)
    parser.add_argument("--phase-s", type=float, default=20.0)
    args = parser.parse_args()
    print_table(measure(args.viewers, args.phase_s), args.viewers, args.phase_s)


if __name__ == "__main__":
    main()
