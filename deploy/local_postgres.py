"""A PostgreSQL server of this machine's own (Debian's `postgresql` package), run in a folder.

Used by `deploy/scale_out.py` (a lasting folder, so the chat outlives the
command) and by the tests (a temporary one). initdb and pg_ctl refuse to run
as root, so as root they run as the `postgres` user, which the package creates.
The server listens on 127.0.0.1 only and trusts local connections: it is for
this machine, never for a network.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def as_postgres(command: list[str]) -> list[str]:
    """``command``, run as the `postgres` user when this is root (initdb, pg_ctl and PgBouncer refuse root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def hand_to_postgres(folder: Path) -> None:
    """When this is root, make ``folder`` and all in it the `postgres` user's, who runs the servers."""
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (folder, *folder.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)


class LocalPostgres:
    """A server with its data in ``folder``, on 127.0.0.1:``port``; ``durable=False`` skips fsync (tests)."""

    def __init__(self, folder: Path, port: int, durable: bool = True):
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        self.folder, self.port, self.durable = Path(folder), port, durable
        self.data = self.folder / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(as_postgres([str(self.bin / args[0]), *args[1:]]), check=True, capture_output=True, text=True)

    def start(self) -> LocalPostgres:
        """Create the database cluster if the folder has none yet, and start the server."""
        self.folder.mkdir(parents=True, exist_ok=True)
        hand_to_postgres(self.folder)
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      *(() if self.durable else ("--no-sync",)))
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
        if not self.durable:
            options += " -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")
        return self

    def stop(self, fast: bool = False) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate" if fast else "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """The URL of database ``name``, created if it does not exist yet."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(f'CREATE DATABASE "{name}" STRATEGY = FILE_COPY')  # quick for a small database
        return self.url.rsplit("/", 1)[0] + f"/{name}"
