"""How quickly the asker sees a streaming reply, against st.write_stream inside the script run.

A local OpenAI-compatible server streams replies at 50, 500 and 2,000 tokens/s
(each token a distinct word, stamped with the time it was sent), into an empty
room and into a room of 100 messages (the baseline's session starts with the
same 100). Chromium shows the page; a MutationObserver notes, at the next
animation frame, how many words are on screen. For every token: time on screen minus time sent. Also, per
reply: the longest gap between two animation frames (the main thread's
longest stretch of work), bytes on
the wire to the browser, and the Streamlit server's CPU time. The bare openai
client, reading the same stream in this process, is the floor.

    python bench/asker_latency.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import CHROMIUM, CHROMIUM_ARGS, ROOT, App
from viewers import seed

from fake_openai import FakeOpenAI, Reply  # noqa: E402

import openai  # noqa: E402

RATES = [(50, 250), (500, 1_000), (2_000, 2_000)]  # tokens per second, tokens per reply
ROOM_SIZES = (0, 100)  # messages already in the room
OBSERVE = """() => {
    window.__seen = [];
    const words = () => {
        const replies = [...document.querySelectorAll('[data-testid=stChatMessage]')].filter(m =>
            m.querySelector('[data-testid=stChatMessageContent]').getAttribute('aria-label').endsWith('assistant'));
        if (!replies.length) return 0;
        const bodies = [...replies[replies.length - 1].querySelectorAll('[data-testid=stMarkdownContainer]')]
            .filter(e => !e.closest('[data-testid=stCaptionContainer]'));
        return (bodies.map(b => b.innerText).join(' ').match(/w\\d+/g) || []).length;
    };
    let last = -1;
    new MutationObserver(() => requestAnimationFrame(() => {
        const count = words();
        if (count !== last) { last = count; window.__seen.push([performance.timeOrigin + performance.now(), count]); }
    })).observe(document.body, {subtree: true, childList: true, characterData: true});
    // The longest gap between two animation frames: how long the main thread was busy at a stretch.
    window.__gap = 0;
    let lastFrame = performance.now();
    const frame = now => { window.__gap = Math.max(window.__gap, now - lastFrame); lastFrame = now;
                           requestAnimationFrame(frame); };
    requestAnimationFrame(frame);
}"""


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def tokens(n: int) -> list[str]:
    return [f"w{i} " for i in range(n)]


def bare_client(server: FakeOpenAI, rate: float, n: int) -> dict:
    """The floor: the openai client itself, reading the same kind of stream."""
    server.enqueue(Reply(pieces=tokens(n), delay_s=1 / rate))
    client = openai.OpenAI(api_key="x", base_url=server.base_url)
    received = []
    started = time.time()
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            received.append(time.time())
    sent = [t for t, _ in server.sent[-1].stamps]
    lags = [(r - s) * 1000 for r, s in zip(received, sent)]
    return {"first_ms": (received[0] - started) * 1000, "request_ms": (server.requests[-1]["at"] - started) * 1000,
            "p50": statistics.median(lags),
            "p95": percentile(lags, 0.95), "last": lags[-1]}


def one_reply(browser, app: App, server: FakeOpenAI, rate: float, n: int, path: str, size: int) -> dict:
    room = f"r{rate}x{time.monotonic_ns()}"  # a new room each time
    if app.script.name == "app.py" and size:
        seed(app.env.get("DATABASE_URL") or Path(app.env["CHAT_DB_PATH"]), room, size)
    page = browser.new_context(viewport={"width": 1100, "height": 800}).new_page()
    page.goto(app.url + path.format(room=room))
    page.wait_for_selector("[data-testid=stChatInput] textarea", timeout=30_000)
    # As a person types: past the 2 s a page's first full run follows the room
    # (asking sooner reruns the whole page; see app.send).
    time.sleep(3.0)
    page.evaluate(OBSERVE)
    server.enqueue(Reply(pieces=tokens(n), delay_s=1 / rate))
    cpu0, bytes0 = app.cpu(), app.proxy.down
    page.fill("[data-testid=stChatInput] textarea", "@gpt go")
    page.evaluate("() => { window.__gap = 0; }")
    pressed = time.time()
    page.keyboard.press("Enter")
    deadline = time.monotonic() + n / rate * 3 + 20
    while time.monotonic() < deadline:
        seen = page.evaluate("() => window.__seen")
        if seen and seen[-1][1] >= n:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    seen = page.evaluate("() => window.__seen")
    longest = page.evaluate("() => window.__gap")
    cpu, sent_bytes = app.cpu() - cpu0, app.proxy.down - bytes0
    page.context.close()
    stamps = server.sent[-1].stamps
    lags, i = [], 0
    for sent_at, count in stamps:
        while i < len(seen) and seen[i][1] < count:
            i += 1
        if i == len(seen):
            break
        lags.append(seen[i][0] - sent_at * 1000)
    shown_first = next(t for t, c in seen if c >= 1)
    return {
        "first_ms": shown_first - pressed * 1000,
        "request_ms": (server.requests[-1]["at"] - pressed) * 1000,
        "p50": statistics.median(lags), "p95": percentile(lags, 0.95),
        "last": lags[-1] if len(lags) == len(stamps) else float("nan"),
        "longest_frame_ms": longest, "kb": sent_bytes / 1000, "cpu_s": cpu,
        "redraws": len(seen),
    }


def measure(runs: int = 3) -> dict:
    """Medians per room size, token rate and approach."""
    from playwright.sync_api import sync_playwright

    results: dict = {size: {rate: {} for rate, _ in RATES} for size in ROOM_SIZES}
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "x", "CHAT_DB_PATH": f"{tmp}/chat.db",
               "CHAT_REPLIES_PER_MINUTE": "1000"}
        for rate, n in RATES:
            bare = [bare_client(server, rate, n) for _ in range(runs)]
            for size in ROOM_SIZES:
                results[size][rate]["bare openai client"] = bare
        for size in ROOM_SIZES:
            apps = {
                "this app": (ROOT / "app.py", "/?room={room}&name=Ada"),
                "st.write_stream": (ROOT / "bench" / "write_stream_app.py", "/"),
            }
            for label, (script, path) in apps.items():
                with App(script, {**env, "BENCH_HISTORY": str(size)}) as app:
                    for rate, n in RATES:
                        results[size][rate][label] = [
                            one_reply(browser, app, server, rate, n, path, size) for _ in range(runs)
                        ]
        browser.close()
    return {
        size: {
            rate: {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in by.items()}
            for rate, by in by_rate.items()
        }
        for size, by_rate in results.items()
    }


def print_table(medians: dict, runs: int) -> None:
    print(f"median of {runs} replies each, in ms. request: from Enter (or the call) to the server receiving it;")
    print("first token: from Enter (or the call) to the first word on screen (or received);")
    print("p50 / p95 / last: from the server sending a token to that token being on screen")
    print(f"{'messages':>8} {'tokens/s':>8} {'approach':<18} {'request':>7} {'first token':>11} {'p50':>7} {'p95':>7} "
          f"{'last':>7} {'longest frame':>13} {'KB to browser':>13} {'server CPU s':>12} {'redraws':>7}")
    for size, by_rate in medians.items():
        for rate, by in by_rate.items():
            for label, m in by.items():
                print(f"{size:>8} {rate:>8,} {label:<18} {m['request_ms']:>7.0f} {m['first_ms']:>11.0f} "
                      f"{m['p50']:>7.0f} {m['p95']:>7.0f} {m['last']:>7.0f} {m.get('longest_frame_ms', 0):>13.0f} "
                      f"{m.get('kb', 0):>13.1f} {m.get('cpu_s', 0):>12.2f} {m.get('redraws', 0):>7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print_table(measure(args.runs), args.runs)


if __name__ == "__main__":
    main()
