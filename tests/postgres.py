"""A real PostgreSQL server for the tests (deploy/local_postgres.py), in a temporary folder.

It listens on 127.0.0.1 on a free port, trusts local connections, skips
fsync, and is stopped and removed when the tests end. ``TransactionPooler``
puts PgBouncer in transaction mode in front of it, as hosted poolers are.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from deploy.local_postgres import LocalPostgres, as_postgres, binaries, hand_to_postgres  # noqa: F401  (binaries: for conftest)
from live import free_port


class PostgresServer(LocalPostgres):
    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="chat-pg-")), free_port(), durable=False)

    def stop(self) -> None:
        try:
            super().stop(fast=True)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def new_database(self) -> str:
        """The URL of a new, empty database on this server."""
        return self.create_database(f"chat_{uuid.uuid4().hex[:12]}")


def query(store, sql: str, params=()) -> list[tuple]:
    """Rows of a query, as tuples, on a store of either engine (written with ? placeholders); [] for a write."""
    with store.engine.connection() as conn:
        if not sql.lstrip().upper().startswith("SELECT"):
            conn.run(sql, params)
            return []
        return [tuple(row.values()) for row in conn.rows(sql, params)]


class TransactionPooler:
    """PgBouncer (Debian's ``pgbouncer``) in transaction mode in front of ``server``, as
    Supavisor's port 6543 or Neon's ``-pooler`` hosts are: each transaction may run on
    another server connection, so LISTEN hears nothing and prepared statements vanish."""

    BINARY = "/usr/sbin/pgbouncer"

    def __init__(self, server: LocalPostgres):
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="chat-pgbouncer-"))
        (self.folder / "users.txt").write_text('"postgres" ""\n')
        (self.folder / "pgbouncer.ini").write_text(
            f"[databases]\n* = host=127.0.0.1 port={server.port}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.folder}/users.txt\npool_mode = transaction\n"
            "default_pool_size = 3\nmax_client_conn = 200\n"
        )
        hand_to_postgres(self.folder)
        self.process = subprocess.Popen(as_postgres([self.BINARY, "--quiet", str(self.folder / "pgbouncer.ini")]),
                                        stderr=subprocess.PIPE, text=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        from live import wait_until

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"PgBouncer exited: {self.process.stderr.read()}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=1).close()
                return True
            except psycopg.OperationalError:
                return False
        wait_until(answers, timeout=10)

    def url(self, database_url_or_name: str) -> str:
        """The URL of a database of the server (its URL or its name), through the pooler."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database_url_or_name.rsplit('/', 1)[-1]}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)
