"""Running the real app for tests: `streamlit run` in a subprocess, driven by Chromium.

Shared by the browser, fault and soak tests. Replies come from FakeOpenAI (the
local OpenAI-compatible test server) through the real openai client.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "sk-live-test-secret-7f3a9c"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Several pages are watched at once; keep background ones running as a visible one would.
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
CHAT_INPUT = "[data-testid=stChatInput] textarea"
WARNING = "[data-testid=stAlertContentWarning]"
# Every chat message on a page: who it is from, its caption lines and its body.
READ_MESSAGES = """() => Array.from(document.querySelectorAll('[data-testid=stChatMessage]')).map(m => ({
    from: m.querySelector('[data-testid=stChatMessageContent]').getAttribute('aria-label'),
    caption: Array.from(m.querySelectorAll('[data-testid=stCaptionContainer]')).map(c => c.innerText).join('\\n'),
    body: Array.from(m.querySelectorAll('[data-testid=stMarkdownContainer]'))
        .filter(e => !e.closest('[data-testid=stCaptionContainer]') && !e.closest('button'))
        .map(e => e.innerText).join('\\n'),
}))"""


def require_chromium() -> None:
    """Skip the calling module without Chromium, except in CI, where it must be there."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            raise RuntimeError(f"CI needs Chromium at {CHROMIUM} for the browser tests")
        pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamlitApp:
    """`streamlit run app.py` on 127.0.0.1, with its own log file."""

    def __init__(self, folder: Path, env: dict[str, str], wrapper: list[str] | None = None):
        self.folder = folder
        self.db = Path(env.get("CHAT_DB_PATH", folder / "chat.db"))
        self.env = {**os.environ, "CHAT_DB_PATH": str(self.db), **env}
        self.wrapper = wrapper or []
        self.log = folder / "streamlit.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> StreamlitApp:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
                 "--server.address", "127.0.0.1", "--server.port", str(port)],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=1)
                return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.process.kill()
                    raise RuntimeError(self.log.read_text(errors="replace"))
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> float:
        """Send ``sig`` and wait for the exit; returns how long it took."""
        started = time.monotonic()
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return time.monotonic() - started

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def open_rooms(browser, app: StreamlitApp, room: str, names: list[str], ready: str = CHAT_INPUT,
               tabs: bool = False) -> list:
    """A page per name, loaded in parallel: each in a fresh browser context (a separate person), or,
    with ``tabs``, all as tabs of one (each still a person of its own to the app, by its name and its
    own session; only loading them is quicker, from the browser's cache)."""
    pages = []
    shared = browser.new_context(viewport={"width": 1100, "height": 760}) if tabs else None
    for name in names:
        page = (shared or browser.new_context(viewport={"width": 1100, "height": 760})).new_page()
        page.person = name
        page.goto(f"{app.url}/?room={room}&name={name}", wait_until="commit")
        pages.append(page)
    for page in pages:
        page.wait_for_selector(ready, timeout=60_000)
    return pages


def send(page, text: str) -> None:
    page.fill(CHAT_INPUT, text)
    page.keyboard.press("Enter")


def warnings(page) -> list[str]:
    return page.locator(WARNING).all_inner_texts()


def messages(page) -> list[dict]:
    return page.evaluate(READ_MESSAGES)


def assistant_body(page) -> str | None:
    """The newest assistant message's text as shown, without the cursor."""
    replies = [m for m in messages(page) if m["from"].endswith("assistant")]
    return replies[-1]["body"].rstrip("▌") if replies else None


def wait_until(condition, timeout: float = 20.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting")


def stored_replies(db: Path, room: str) -> list[dict]:
    """The room's assistant messages as stored, oldest first, each with its chunks."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT * FROM messages WHERE room = ? AND role = 'assistant' ORDER BY id", [room]).fetchall()
    replies = []
    for row in rows:
        chunks = [r[0] for r in conn.execute("SELECT text FROM chunks WHERE message_id = ? ORDER BY seq", [row["id"]])]
        replies.append({**dict(row), "chunks": chunks, "text": "".join(chunks)})
    conn.close()
    return replies


def stored_messages(db: Path, room: str) -> list[dict]:
    """The room's people's messages as stored, oldest first."""
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT m.id, m.author, group_concat(c.text, '') FROM messages m JOIN chunks c ON c.message_id = m.id "
        "WHERE m.room = ? AND m.role = 'user' GROUP BY m.id ORDER BY m.id",
        [room],
    ).fetchall()
    conn.close()
    return [{"id": r[0], "author": r[1], "text": r[2]} for r in rows]


def stored_reply(db: Path, room: str) -> dict:
    """The room's newest assistant message as stored (status None if there is none yet)."""
    replies = stored_replies(db, room)
    return replies[-1] if replies else {"status": None, "text": None, "chunks": []}


def as_pieces(sentences: list[str]) -> list[str]:
    words = " ".join(sentences).split(" ")
    return [words[0]] + [" " + word for word in words[1:]]


def check_log(app: StreamlitApp) -> None:
    """The app's log has no traceback, no lock error and no trace of the API key."""
    log = app.log_text()
    for bad in ("Traceback", "database is locked", KEY):
        assert bad not in log, f"{bad!r} in the log of {app.url}:\n{log[-3000:]}"


def evidence(items: list) -> list[tuple[str, str]]:
    """Report sections for a failed live test: each page as shown, each database, each log's end."""
    sections = []
    for item in items:
        if isinstance(item, StreamlitApp):
            sections.append((f"database of {item.url}", _database_rows(item.db)))
            sections.append((f"log of {item.url}", item.log_text()[-3000:]))
        else:
            sections.append((f"page of {getattr(item, 'person', '?')} ({item.url})", _page_as_shown(item)))
    return sections


def _page_as_shown(page) -> str:
    try:
        lines = [f"{m['from']} | {m['caption']!r} | {m['body'][-200:]!r}" for m in messages(page)]
        for kind in ("Warning", "Error"):
            lines += [f"{kind}: {text}" for text in page.locator(f"[data-testid=stAlertContent{kind}]").all_inner_texts()]
        lines += [f"Exception: {text}" for text in page.locator("[data-testid=stException]").all_inner_texts()]
        lines += [f"Status: {text}" for text in page.locator("[data-testid=stStatusWidget]").all_inner_texts() if text]
        box = page.locator(CHAT_INPUT)
        if box.count():
            state = "disabled" if box.is_disabled() else "enabled"
            lines.append(f"Chat input ({state}): {box.input_value()!r}")
        return "\n".join(lines) or "(no messages)"
    except Exception as error:  # closed or crashed
        return f"(could not read the page: {error})"


def _database_rows(db: Path) -> str:
    if not db.exists():
        return "(no database)"
    try:
        conn = sqlite3.connect(db)
        rows = conn.execute(
            "SELECT m.id, m.room, m.author, m.status, m.error, count(c.seq), coalesce(group_concat(c.text, ''), '') "
            "FROM messages m LEFT JOIN chunks c ON c.message_id = m.id GROUP BY m.id ORDER BY m.id DESC LIMIT 60"
        ).fetchall()
        conn.close()
    except sqlite3.Error as error:
        return f"(could not read the database: {error})"
    return "\n".join(
        f"#{id} {room} {author} {status}{f' ({error})' if error else ''}: {chunks} chunks, {text[-120:]!r}"
        for id, room, author, status, error, chunks, text in reversed(rows)
    ) or "(no messages)"
