"""PostgreSQL, through psycopg 3: for hosted deploys and for several app processes on one database.

Chosen with ``DATABASE_URL=postgresql://...``. Connections come from a small
pool, each checked (one empty query) before it is lent: hosted servers close
idle connections (restarts, a pooler's idle timeout, a serverless database
going to sleep), and a closed one would otherwise fail the next write. The
clock is the server's ``now()``, never the writing host's, so replicas on hosts
whose clocks differ still agree on whose heartbeat is stale. ``exclusive`` is
a transaction-scoped advisory lock.

A note sent with ``notify`` is a ``pg_notify`` delivered when the transaction
commits: one listening connection per engine hears every process's commits at
once, without polling. Through a transaction pooler (PgBouncer's transaction
mode, Supavisor's port 6543, Neon's ``-pooler`` hosts) notifications do not
arrive and prepared statements do not last: the engine prepares none, checks
that a notification of its own arrives, and where it does not, polls the
listener's fingerprint every POLL_S instead.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from engines import Connection, DatabaseUnavailable, Engine, Listener, first_line, reraised

log = logging.getLogger(__name__)

CHANNEL = "chat_changes"
LISTEN_RETRY_S = 1.0  # after the listening connection fails, before trying again
HEAR_CHECK_S = 2.0  # how long a new listening connection waits for a notification of its own
POLL_S = 0.25  # where notifications do not arrive: how often the fingerprint is read
CONNECT_TIMEOUT_S = 5  # a page waits at most this long for an unreachable database
LOST = (psycopg.OperationalError, PoolTimeout, PoolClosed)  # the database cannot be reached now


def describe(url: str) -> str:
    """The URL as a person may see it: user, host, port and database, never the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL database in DATABASE_URL (which could not be parsed)"
    where = f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
    return f"PostgreSQL database {where}" + (f" as {parts['user']}" if parts.get("user") else "")


def without_secrets(error: BaseException, url: str) -> str:
    """An error's first line, with the URL's password taken out should it appear."""
    text = first_line(error)
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    return text.replace(password, "***") if password else text


class PostgresEngine(Engine):
    name = "postgresql"
    param = "%s"
    now = "EXTRACT(EPOCH FROM now())::DOUBLE PRECISION"  # the server's clock, at the transaction's start
    lock = " FOR UPDATE"

    def __init__(self, url: str, pool_size: int = 10, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        super().__init__()
        self.url = self.location = url
        self._closed = threading.Event()
        try:
            conninfo_to_dict(url)
        except psycopg.Error as error:
            raise DatabaseUnavailable(
                f"DATABASE_URL is not a usable PostgreSQL URL ({without_secrets(error, url)})."
            ) from None
        timeout = max(1, round(connect_timeout_s))
        try:  # once, straight, for the server's own reason should it refuse
            psycopg.connect(url, connect_timeout=timeout).close()
        except psycopg.Error as error:
            raise DatabaseUnavailable(
                f"The {describe(url)} cannot be reached or opened: {without_secrets(error, url)}"
            ) from None
        # No connection is kept while none is used (min_size=0), so a pool whose
        # database went away does not keep trying to reconnect in the background.
        self.pool = ConnectionPool(
            url, min_size=0, max_size=pool_size, open=True, name="chat", timeout=connect_timeout_s * 2,
            check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": timeout,
                    "prepare_threshold": None},  # a transaction pooler keeps no prepared statements
        )

    def describe(self) -> str:
        return describe(self.url)

    def _lost(self, error: BaseException) -> str:
        return f"The {self.describe()} is unavailable: {without_secrets(error, self.url)}"

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        with reraised(LOST, self._lost), self.pool.connection() as raw:
            yield Connection(self, raw)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.connection() as conn, conn.raw.transaction():
            yield conn

    def exclusive(self, conn: Connection, key: int) -> None:
        conn.run("SELECT pg_advisory_xact_lock(?)", [key])

    def notify(self, conn: Connection, note: str) -> None:
        conn.run("SELECT pg_notify(?, ?)", [CHANNEL, note])

    def close(self) -> None:
        self._closed.set()
        self.pool.close()

    # Hearing other processes' commits ------------------------------------------

    def watch(self, listener: Listener) -> None:
        """One listening connection: any process's commit is heard as soon as PostgreSQL delivers it."""
        threading.Thread(target=self._listen, args=(weakref.ref(listener),), name="store-listen", daemon=True).start()

    def _listen(self, listener_ref: weakref.ref) -> None:
        """Tell every commit's note until the listener is gone; reconnect on failure, poll where nothing arrives."""
        reconnecting = False
        while not self._closed.is_set() and listener_ref() is not None:
            try:
                with psycopg.connect(self.url, autocommit=True, prepare_threshold=None) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if not self._hears_itself(conn, listener_ref):
                        log.warning("the database's change notifications do not arrive (is DATABASE_URL a "
                                    "transaction pooler?); polling every %s s instead", POLL_S)
                        self._poll(listener_ref)
                        return
                    self._tell(listener_ref, lambda listener: listener.hearing(True))
                    if reconnecting:
                        self._tell(listener_ref, lambda listener: listener.heard(None))  # what nobody heard
                    while not self._closed.is_set() and listener_ref() is not None:
                        for notice in conn.notifies(timeout=1.0, stop_after=1):
                            self._tell(listener_ref, lambda listener, note=notice.payload: listener.heard(note))
            except (psycopg.Error, DatabaseUnavailable):
                self._tell(listener_ref, lambda listener: listener.hearing(False))
                if self._closed.is_set():
                    return
                log.warning("lost the database's change notifications; listening again in %s s", LISTEN_RETRY_S)
                reconnecting = True
                self._closed.wait(LISTEN_RETRY_S)

    def _hears_itself(self, conn: psycopg.Connection, listener_ref: weakref.ref) -> bool:
        """Whether a notification sent through the pool reaches the listening ``conn``; the
        notifications heard meanwhile are told as usual."""
        channel = f"chat_check_{uuid.uuid4().hex}"
        conn.execute(f"LISTEN {channel}")
        with self.connection() as sender:
            sender.run("SELECT pg_notify(?, '')", [channel])
        heard, deadline = False, time.monotonic() + HEAR_CHECK_S
        while not heard and (left := deadline - time.monotonic()) > 0:
            for notice in conn.notifies(timeout=left, stop_after=1):  # holds conn until it ends
                if notice.channel == channel:
                    heard = True
                else:
                    self._tell(listener_ref, lambda listener, note=notice.payload: listener.heard(note))
        if heard:
            conn.execute(f"UNLISTEN {channel}")
        return heard

    def _poll(self, listener_ref: weakref.ref) -> None:
        """Tell of a change whenever the fingerprint moves, every POLL_S, until the listener is gone."""
        last = None  # None: unknown, as at the start and after the database was lost
        while not self._closed.wait(POLL_S) and (listener := listener_ref()) is not None:
            try:
                with self.connection() as conn:
                    fingerprint = listener.fingerprint(conn)
            except DatabaseUnavailable:
                fingerprint = None
            if fingerprint is not None and fingerprint != last:
                listener.heard(None)
            last = fingerprint
            del listener

    @staticmethod
    def _tell(listener_ref: weakref.ref, call) -> None:
        if (listener := listener_ref()) is not None:
            call(listener)
