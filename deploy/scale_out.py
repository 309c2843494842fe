"""Several replicas of the chat behind HAProxy, on one PostgreSQL database, on this machine.

    python deploy/scale_out.py                  # 2 replicas, http://127.0.0.1:8501
    python deploy/scale_out.py --replicas 3 --port 8080

With DATABASE_URL set, the replicas use that database. Otherwise this starts a
PostgreSQL server of its own (Debian's `postgresql` package) with its data in
`.scale-out/postgres`, so the chat outlives the command. Replicas listen on
127.0.0.1:8601, 8602, ...; HAProxy (Debian's `haproxy` package) listens on
--port and sends each browser to one replica, by a cookie, for as long as that
replica is healthy. Ctrl-C stops everything this started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.local_postgres import LocalPostgres  # noqa: E402

FIRST_REPLICA_PORT = 8601
POSTGRES_PORT = 8632
COOKIE = "chat_replica"
CONFIG = """\
# HAProxy in front of {count} replicas of the chat (deploy/scale_out.py writes
# this file; deploy/haproxy.cfg is its output for two replicas).
global
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    # A page keeps one websocket open for as long as it is open, quiet at times.
    timeout tunnel 1h
    # A replica that fails a request before answering: try another one.
    retries 2
    option redispatch

frontend chat
    bind {address}:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    # Affinity: a Streamlit session lives in one process, with its websocket,
    # widget state and media; the cookie keeps each browser on one replica.
    # When that replica goes down, the browser reconnects to another one and
    # starts a new session there (the URL keeps its room, name and tab).
    cookie {cookie} insert indirect nocache httponly
    option httpchk GET /_stcore/health
    http-check expect status 200
    default-server check inter 2s fall 2 rise 1
{servers}
"""


def haproxy_config(replica_ports: list[int], port: int, address: str = "127.0.0.1") -> str:
    servers = "\n".join(
        f"    server r{i} 127.0.0.1:{p} cookie r{i}" for i, p in enumerate(replica_ports, start=1)
    )
    return CONFIG.format(count=len(replica_ports), address=address, port=port, cookie=COOKIE, servers=servers)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not start") from None
            time.sleep(0.2)


def start_replica(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
             "--server.address", "127.0.0.1", "--server.port", str(port)],
            cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )


def start_haproxy(config: Path) -> subprocess.Popen:
    """HAProxy in the foreground (-db) with ``config``, after checking it (-c)."""
    subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], check=True)
    return subprocess.Popen(["haproxy", "-db", "-f", str(config)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8501, help="where HAProxy listens")
    parser.add_argument("--folder", type=Path, default=ROOT / ".scale-out", help="logs, config, PostgreSQL data")
    args = parser.parse_args()
    args.folder.mkdir(exist_ok=True)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C, at any point
    postgres = None
    processes: list[subprocess.Popen] = []
    try:
        url = os.environ.get("DATABASE_URL")
        if not url:
            postgres = LocalPostgres(args.folder / "postgres", POSTGRES_PORT)
            url = postgres.start().create_database("chat")
            print(f"PostgreSQL: {url} (data in {postgres.data})")
        ports = [FIRST_REPLICA_PORT + i for i in range(args.replicas)]
        for port in ports:
            processes.append(start_replica(port, {"DATABASE_URL": url}, args.folder / f"replica-{port}.log"))
        for port, process in zip(ports, processes):
            wait_healthy(f"http://127.0.0.1:{port}", process)
            print(f"replica on http://127.0.0.1:{port} (log: {args.folder / f'replica-{port}.log'})")
        config = args.folder / "haproxy.cfg"
        config.write_text(haproxy_config(ports, args.port))
        processes.append(start_haproxy(config))
        print(f"\nThe chat: http://127.0.0.1:{args.port}  (Ctrl-C stops it)")
        while all(process.poll() is None for process in processes):
            time.sleep(1)
        print("A replica or HAProxy stopped; stopping the rest.", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if postgres is not None and (postgres.data / "postmaster.pid").exists():
            try:
                postgres.stop()
            except subprocess.CalledProcessError:
                pass  # already stopping: Ctrl-C in a terminal reaches it too


if __name__ == "__main__":
    main()
