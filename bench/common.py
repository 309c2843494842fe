"""Shared plumbing for the benchmarks: apps under test, a byte-counting proxy, CPU time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# The same browser, flags and port picking as the tests (tests/live.py).
from live import CHROMIUM, CHROMIUM_ARGS, free_port  # noqa: E402,F401

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks; for deltas."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts the bytes the server sends (on the wire)."""

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
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the app has stopped; a browser is still reconnecting
                client.close()
                continue
            for end in (client, server):  # relay each message at once, as the server itself does
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


class App:
    """A Streamlit script served on 127.0.0.1 (run from the project folder, so it
    uses the project's .streamlit/config.toml), reached through a CountingProxy."""

    def __init__(self, script: Path, env: dict[str, str], flags: list[str] | None = None):
        self.script, self.env, self.flags = script, env, flags or []

    def __enter__(self) -> App:
        port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(self.script), "--server.address", "127.0.0.1",
             "--server.port", str(port), *self.flags],
            cwd=ROOT, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(150):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            self.process.kill()
            raise RuntimeError(f"{self.script.name} did not start")
        self.proxy = CountingProxy(port)
        self.url = f"http://127.0.0.1:{self.proxy.port}"  # bytes counted
        self.direct_url = f"http://127.0.0.1:{port}"  # for many sessions: the proxy relays in Python
        return self

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def __exit__(self, *exc) -> None:
        self.proxy.close()
        self.process.terminate()
        self.process.wait(15)
