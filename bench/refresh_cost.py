"""What viewers cost the server, under a few Streamlit settings, side by side.

Starts `streamlit run app.py` once per setting, on a room with 100 messages,
and opens VIEWERS browser pages (Chromium) on it through a byte-counting TCP
proxy, so the figures are bytes on the wire (after any websocket compression).
Two phases of PHASE_S seconds each:

  idle     nothing happens in the room (the page ticks every 5 s)
  writing  a reply in the room grows by one sentence a second (ticks every 1 s,
           and each stored sentence makes every viewer rerun the page)

For each, per viewer: kilobytes per second to the browser, and the server
process's CPU time as a percentage of one core.

    python bench/refresh_cost.py [--viewers 3] [--phase-s 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from store import Store  # noqa: E402

SETTINGS = {
    "defaults": [],
    "postScriptGC=false": ["--runner.postScriptGC", "false"],
    "ws compression": ["--server.enableWebsocketCompression", "true"],
    "both": ["--runner.postScriptGC", "false", "--server.enableWebsocketCompression", "true"],
}
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
ROOM = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts the bytes the server sends."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(65536):
                if count:
                    with self._lock:
                        self.down += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def seed(db_path: Path) -> None:
    store = Store(db_path)
    for i in range(50):
        store.add_message(ROOM, "Ada", f"Message {i}: a few words about nothing in particular, to fill the room.")
        reply = store.start_reply(ROOM)
        store.finish_reply(reply.id, "complete", last_chunk=f"Reply {i}. " + "Some sentence of an answer. " * 6)


def start_app(db_path: Path, flags: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "CHAT_DB_PATH": str(db_path)}
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.address", "127.0.0.1",
         "--server.port", str(port), *flags],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(150):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
            return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("streamlit did not start")


def measure(process: subprocess.Popen, proxy: CountingProxy, seconds: float, viewers: int) -> tuple[float, float]:
    cpu0, bytes0, t0 = cpu_seconds(process.pid), proxy.down, time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    cpu = (cpu_seconds(process.pid) - cpu0) / elapsed / viewers * 100
    kbps = (proxy.down - bytes0) / elapsed / viewers / 1000
    return kbps, cpu


def write_sentences(db_path: Path, seconds: float, stop: threading.Event) -> None:
    store = Store(db_path)
    reply = store.start_reply(ROOM)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and not stop.wait(1.0):
        n += 1
        store.append_chunk(reply.id, f"Sentence {n} of a reply being written. ")
    store.finish_reply(reply.id, "complete")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, default=3)
    parser.add_argument("--phase-s", type=float, default=20.0)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    print(f"{args.viewers} viewers, {args.phase_s:g} s per phase, 100 messages in the room")
    print(f"{'setting':<20} {'phase':<8} {'KB/s per viewer':>16} {'CPU % per viewer':>17}")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for label, flags in SETTINGS.items():
            db_path = Path(tmp) / f"{label.replace(' ', '_').replace('=', '_')}.db"
            seed(db_path)
            process, port = start_app(db_path, flags)
            proxy = CountingProxy(port)
            contexts = []
            try:
                for i in range(args.viewers):
                    context = browser.new_context()
                    contexts.append(context)
                    page = context.new_page()
                    page.goto(f"http://127.0.0.1:{proxy.port}/?room={ROOM}&name=Viewer{i}")
                    page.wait_for_selector("[data-testid=stChatMessage]", timeout=30_000)
                time.sleep(3)
                kbps, cpu = measure(process, proxy, args.phase_s, args.viewers)
                print(f"{label:<20} {'idle':<8} {kbps:>16.2f} {cpu:>17.2f}", flush=True)
                stop = threading.Event()
                writer = threading.Thread(target=write_sentences, args=(db_path, args.phase_s + 8, stop))
                writer.start()
                time.sleep(6)  # every viewer has noticed the reply and ticks every second
                kbps, cpu = measure(process, proxy, args.phase_s, args.viewers)
                print(f"{label:<20} {'writing':<8} {kbps:>16.2f} {cpu:>17.2f}", flush=True)
                stop.set()
                writer.join()
            finally:
                for context in contexts:
                    context.close()
                proxy.close()
                process.terminate()
                process.wait(15)
        browser.close()


if __name__ == "__main__":
    main()
