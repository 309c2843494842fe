"""SQLite, through sqlite-utils: the default engine, a file beside the app.

Every thread (each Streamlit script run, each reply worker) gets its own
connection, so WAL readers never wait for a writer. Every write is one
``BEGIN IMMEDIATE`` transaction: it takes the database's write lock up front,
waiting on ``busy_timeout`` instead of failing with "database is locked"
halfway through, and holds it until it commits, so nothing needs another lock
to be exclusive. SQLite is shared only by processes on one host, whose clock
is ``time.time()``: it is the SQL function ``epoch_now()`` on every connection.
Another connection's commit is noticed by asking ``PRAGMA data_version`` every
WATCH_S.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

from sqlite_utils import Database

from engines import Connection, DatabaseUnavailable, Engine, Listener, first_line

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5_000
WATCH_S = 0.2  # how often the watcher asks SQLite whether another connection committed
# The primary result codes that mean the file cannot be used now (busy or locked past the
# busy timeout, unreadable, unwritable, full, not a database), rather than a mistake in SQL.
UNAVAILABLE = {5, 6, 8, 10, 11, 13, 14, 15, 26}


def connect(path: str | Path) -> Database:
    """One connection in WAL mode that waits for locks instead of failing.

    Each is used by one thread only; ``check_same_thread`` is off so that it can
    be closed from whichever thread cleans up after that one.
    """
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.create_function("epoch_now", 0, time.time)
    return Database(conn)


class _ThreadConnection:
    """Closes its connection when its thread ends and thread-local data is dropped.

    Streamlit runs every script run in a new thread. A connection left to the
    garbage collector stays open for a long time (sqlite-utils' Database holds
    a reference cycle, and the app turns off Streamlit's collection after each
    run), so open files would pile up.
    """

    def __init__(self, conn: Connection):
        self.conn = conn

    def __del__(self) -> None:
        self.conn.raw.conn.close()


class SqliteEngine(Engine):
    name = "sqlite"
    param = "?"
    now = "epoch_now()"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.location = str(path)
        self._local = threading.local()
        self._closed = threading.Event()

    def describe(self) -> str:
        return f"SQLite database {self.path}"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as error:  # OperationalError, and "not a database" or corrupt
            if getattr(error, "sqlite_errorcode", 0) & 0xFF not in UNAVAILABLE:
                raise  # a mistake in the SQL, not the database's state
            raise DatabaseUnavailable(f"The {self.describe()} cannot be opened or used: {first_line(error)}") from None

    @property
    def db(self) -> Database:
        """This thread's sqlite-utils Database (opened on first use, closed when the thread ends)."""
        return self._thread_connection().raw

    def _thread_connection(self) -> Connection:
        holder = getattr(self._local, "holder", None)
        if holder is None:
            with self._errors():
                holder = self._local.holder = _ThreadConnection(Connection(self, connect(self.path)))
        return holder.conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        with self._errors():
            yield self._thread_connection()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.connection() as conn:
            conn.raw.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.raw.conn.in_transaction:  # SQLite rolls some failures back itself
                    conn.raw.execute("ROLLBACK")
                raise
            conn.raw.execute("COMMIT")

    def exclusive(self, conn: Connection, key: int) -> None:
        pass  # BEGIN IMMEDIATE holds the write lock until the transaction commits

    def watch(self, listener: Listener) -> None:
        """One thread asks SQLite every WATCH_S whether another connection committed."""
        threading.Thread(target=self._watch, args=(weakref.ref(listener),), name="store-watch", daemon=True).start()

    def _watch(self, listener_ref: weakref.ref) -> None:
        conn = sqlite3.connect(str(self.path), check_same_thread=False)
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            while not self._closed.wait(WATCH_S) and (listener := listener_ref()) is not None:
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    last = version
                    listener.heard(None)
                del listener
        except sqlite3.Error:
            log.exception("stopped watching %s for changes", self.path)
        finally:
            conn.close()

    def close(self) -> None:
        self._closed.set()
