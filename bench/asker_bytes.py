"""What a streaming reply costs the asker's browser, per byte of reply, as replies grow.

Every redraw of a Streamlit element resends it whole, so a reply redrawn as
one element costs the square of its length. This app draws a reply as one
element per Markdown block and redraws only the block being written, at a
bounded rate. Here, replies of 400 and 4,000 tokens stream at 200 tokens/s,
written as real replies are (paragraphs, lists, fenced code), into this app
and into the common `st.write_stream` pattern (`bench/write_stream_app.py`);
and one reply that is a single 4,000-token code block, the worst case for
block-by-block drawing. Bytes are the websocket payloads Chromium receives
(before compression), from Enter until the last word is on screen.

    python bench/asker_bytes.py
"""

from __future__ import annotations

import tempfile
import time

from common import CHROMIUM, CHROMIUM_ARGS, ROOT, App

from fake_openai import FakeOpenAI, Reply  # noqa: E402

RATE = 200  # tokens per second
CASES = [("prose, lists, code", 400), ("prose, lists, code", 4_000), ("one code block", 4_000)]


def markdown_tokens(n: int) -> list[str]:
    """n tokens of a reply made of paragraphs, bulleted lists and fenced code, each word unique (w<i>)."""
    out, i, block = [], 0, 0
    while i < n:
        kind = ("paragraph", "paragraph", "list", "paragraph", "code")[block % 5]
        if kind == "paragraph":
            for sentence in range(4):
                for word in range(10):
                    out.append(("" if not out or out[-1].endswith("\n") else " ") + f"w{i}")
                    i += 1
                out[-1] += "."
            out.append("\n\n")
        elif kind == "list":
            for item in range(3):
                out.append("- ")
                for word in range(8):
                    out.append(("" if word == 0 else " ") + f"w{i}")
                    i += 1
                out.append("\n")
            out.append("\n")
        else:
            out.append("```python\n")
            for line in range(5):
                out.append(f"x = w{i}  # w{i + 1}\n")
                i += 2
            out.append("```\n\n")
        block += 1
    return out


def code_block_tokens(n: int) -> list[str]:
    """n tokens inside one fenced code block."""
    return ["```text\n"] + [f"w{i}" + ("\n" if i % 10 == 9 else " ") for i in range(n)] + ["\n```\n"]


def last_word(pieces: list[str]) -> str:
    return max((w for p in pieces for w in p.replace(".", " ").replace("#", " ").split() if w[:1] == "w"
                and w[1:].isdigit()), key=lambda w: int(w[1:]))


def one_reply(browser, app: App, server: FakeOpenAI, pieces: list[str], path: str) -> dict:
    page = browser.new_context(viewport={"width": 1100, "height": 800}).new_page()
    payload = {"bytes": 0}

    def on_socket(socket) -> None:
        socket.on("framereceived", lambda data: payload.__setitem__("bytes", payload["bytes"] + len(data)))

    page.on("websocket", on_socket)
    page.goto(app.url + path.format(room=f"b{time.monotonic_ns()}"))
    page.wait_for_selector("[data-testid=stChatInput] textarea", timeout=30_000)
    time.sleep(3.0)  # the first full run has ended
    server.enqueue(Reply(pieces=pieces, delay_s=1 / RATE))
    page.fill("[data-testid=stChatInput] textarea", "@gpt go")
    before = payload["bytes"]
    started = time.monotonic()
    page.keyboard.press("Enter")
    final = last_word(pieces)
    page.wait_for_function(f"() => document.body.innerText.includes('{final}')", timeout=len(pieces) / RATE * 1000 * 3 + 30_000)
    took = time.monotonic() - started
    time.sleep(0.5)
    result = {"payload": payload["bytes"] - before, "seconds": took,
              "reply": len("".join(pieces).encode())}
    page.context.close()
    return result


def measure() -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows = []
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "x", "CHAT_DB_PATH": f"{tmp}/chat.db",
               "CHAT_REPLIES_PER_MINUTE": "1000"}
        apps = {"this app": (ROOT / "app.py", "/?room={room}&name=Ada"),
                "st.write_stream": (ROOT / "bench" / "write_stream_app.py", "/")}
        for label, (script, path) in apps.items():
            with App(script, env) as app:
                for kind, n in CASES:
                    pieces = markdown_tokens(n) if kind.startswith("prose") else code_block_tokens(n)
                    rows.append({"approach": label, "kind": kind, "tokens": n,
                                 **one_reply(browser, app, server, pieces, path)})
        browser.close()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"one reply at {RATE} tokens/s; bytes the asker's browser received from Enter to the last word on screen")
    print(f"{'approach':<16} {'reply':<19} {'tokens':>6} {'reply KB':>8} {'payload KB':>10} {'per reply byte':>14} "
          f"{'payload KB/s':>12}")
    for r in rows:
        print(f"{r['approach']:<16} {r['kind']:<19} {r['tokens']:>6,} {r['reply'] / 1000:>8.1f} "
              f"{r['payload'] / 1000:>10.1f} {r['payload'] / r['reply']:>14.1f} "
              f"{r['payload'] / 1000 / r['seconds']:>12.1f}")
    for approach in dict.fromkeys(r["approach"] for r in rows):
        small, big = [r for r in rows if r["approach"] == approach and r["kind"].startswith("prose")]
        ratio = (big["payload"] / big["reply"]) / (small["payload"] / small["reply"])
        print(f"{approach}: a 4,000-token reply costs {ratio:.1f} times as much per byte as a 400-token one")


def main() -> None:
    print_table(measure())


if __name__ == "__main__":
    main()
