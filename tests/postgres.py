"""A real PostgreSQL server for the tests: Debian's `postgresql` package, started in a temporary folder.

initdb and pg_ctl refuse to run as root, so as root (CI) they run as the
`postgres` user. The server listens on 127.0.0.1 on a free port, trusts local
connections, and is stopped when the tests end.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from live import free_port


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    def __init__(self) -> None:
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="chat-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        """The URL of a new, empty database on this server."""
        import psycopg

        name = f"chat_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} STRATEGY = FILE_COPY")  # quicker for a small database
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def query(store, sql: str, params=()) -> list[tuple]:
    """Rows of a query, as tuples, on a store of either engine (written with ? placeholders); [] for a write."""
    if hasattr(store, "db"):  # SQLite
        return [tuple(row) for row in store.db.execute(sql, list(params)).fetchall()]
    with store.pool.connection() as conn:
        cursor = conn.execute(sql.replace("?", "%s"), list(params))
        return [tuple(row.values()) for row in cursor.fetchall()] if cursor.description else []
