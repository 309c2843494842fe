"""A real PostgreSQL server for the tests (deploy/local_postgres.py), in a temporary folder.

It listens on 127.0.0.1 on a free port, trusts local connections, skips
fsync, and is stopped and removed when the tests end.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from deploy.local_postgres import LocalPostgres, binaries  # noqa: F401  (binaries: for conftest)
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
    if hasattr(store, "db"):  # SQLite
        return [tuple(row) for row in store.db.execute(sql, list(params)).fetchall()]
    with store.pool.connection() as conn:
        cursor = conn.execute(sql.replace("?", "%s"), list(params))
        return [tuple(row.values()) for row in cursor.fetchall()] if cursor.description else []
