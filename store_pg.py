"""PostgreSQL storage for chat rooms, through psycopg 3: the same store as store.Store.

Chosen with ``DATABASE_URL=postgresql://...``: for hosted deploys, whose disk
does not outlive the container, and for several app processes sharing one
database. Same tables, statuses, append-only chunks, version counter,
validation and errors as the SQLite store; see store.py for the why.

Connections come from a small pool. Every write is one transaction that ends
with ``pg_notify('chat_changes', '<version> <room>')``, delivered when it
commits: one listening connection per Store wakes whoever waits for a change,
whichever process wrote it, without polling, and tells each room's new
version, so that pages following a room learn it without asking. Through a
transaction pooler (PgBouncer's transaction mode, Supavisor's port 6543,
Neon's ``-pooler`` hosts) notifications do not arrive and prepared statements
do not last: the store prepares none, checks that its notifications arrive,
and where they do not, reads the rooms' versions every POLL_S instead.

Every time stored (``created_at``, ``updated_at``, heartbeats) is the server's
``now()`` in epoch seconds, never the writing host's clock: replicas on hosts
whose clocks differ still agree on whose heartbeat is stale.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from store import (
    ASSISTANT_NAME,
    FINAL_STATUSES,
    ChangeWaiting,
    DatabaseUnavailable,
    INTERRUPTED_NOTE,
    LAST_SIGN_SQL,
    PID_SPACE,
    PROCESS,
    STALE_AFTER_S,
    Message,
    NotStreaming,
    RATE_WINDOW_S,
    ReplyLimits,
    StoreError,
    check_limits,
    _is_orphan,
    _last_sign,
    check_name,
    check_room,
    check_text,
)

log = logging.getLogger(__name__)

CHANNEL = "chat_changes"
LISTEN_RETRY_S = 1.0  # after the listening connection fails, before trying again
HEAR_CHECK_S = 2.0  # how long a new listening connection waits for a notification of its own
POLL_S = 0.25  # where notifications do not arrive: how often the rooms' versions are read
MIGRATION_LOCK = 7_314_002  # pg_advisory_xact_lock key: one process migrates at a time
LIMITS_LOCK = 7_314_003  # ... and one counts the reply limits and inserts a reply at a time
CONNECT_TIMEOUT_S = 5  # a page waits at most this long for an unreachable database
NOW = "EXTRACT(EPOCH FROM now())::DOUBLE PRECISION"  # the server's clock (at the transaction's start)


def describe(url: str) -> str:
    """The URL as a person may see it: user, host, port and database, never the password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL database in DATABASE_URL (which could not be parsed)"
    where = f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
    return f"PostgreSQL database {where}" + (f" as {parts['user']}" if parts.get("user") else "")


def _without_secrets(error: Exception, url: str) -> str:
    """An error's first line, with the URL's password taken out should it appear."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    return text.replace(password, "***") if password else text

MIGRATIONS: list[Callable[[psycopg.Connection], None]] = []
migration = MIGRATIONS.append


@migration
def m001_initial(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE rooms (name TEXT PRIMARY KEY, version BIGINT NOT NULL)")
    conn.execute(
        "CREATE TABLE messages (id BIGSERIAL PRIMARY KEY, room TEXT NOT NULL, author TEXT NOT NULL, "
        "role TEXT NOT NULL, status TEXT NOT NULL, error TEXT, reply_to BIGINT, "
        "created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)"
    )
    conn.execute("CREATE INDEX messages_room_id ON messages (room, id)")
    conn.execute("CREATE INDEX messages_status ON messages (status)")
    conn.execute(
        "CREATE TABLE chunks (message_id BIGINT NOT NULL REFERENCES messages (id), seq INTEGER NOT NULL, "
        "text TEXT NOT NULL, PRIMARY KEY (message_id, seq))"
    )


@migration
def m002_reply_owner(conn: psycopg.Connection) -> None:
    conn.execute("ALTER TABLE messages ADD COLUMN owner TEXT")


@migration
def m003_usage(conn: psycopg.Connection) -> None:
    for column in ("prompt_tokens", "completion_tokens", "reasoning_tokens"):
        conn.execute(f"ALTER TABLE messages ADD COLUMN {column} INTEGER")


@migration
def m004_replicas(conn: psycopg.Connection) -> None:
    conn.execute(
        "CREATE TABLE replicas (owner TEXT PRIMARY KEY, beat_at DOUBLE PRECISION NOT NULL, pid_space TEXT, pid INTEGER)"
    )


@migration
def m005_reply_asker(conn: psycopg.Connection) -> None:
    conn.execute("ALTER TABLE messages ADD COLUMN asker TEXT")
    conn.execute("CREATE INDEX messages_asker_created_at ON messages (asker, created_at)")


@migration
def m006_stop_requests(conn: psycopg.Connection) -> None:
    conn.execute("ALTER TABLE messages ADD COLUMN stop_requested_at DOUBLE PRECISION")


def migrate(conn: psycopg.Connection) -> None:
    """Apply the migrations this database has not seen yet, once, whichever process starts first."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
        conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION)")
        done = {row["name"] for row in conn.execute("SELECT name FROM _migrations")}
        for step in MIGRATIONS:
            if step.__name__ not in done:
                step(conn)
                conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (%s, %s)", [step.__name__, time.time()])


def _listen(store_ref: weakref.ref, url: str) -> None:
    """Note a change at every commit anyone makes, until the Store is gone; reconnect on failure.

    Each listening connection first sends itself a notification through the
    pool. Should it not arrive (a transaction pooler accepts LISTEN, then hands
    the server connection to someone else), the store polls instead.
    """
    reconnecting = False
    while store_ref() is not None:
        try:
            with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                if not _hears_itself(store_ref, conn):
                    log.warning("the database's change notifications do not arrive (is DATABASE_URL a "
                                "transaction pooler?); reading the rooms' versions every %s s instead", POLL_S)
                    break
                if (store := store_ref()) is not None:
                    store._hearing(True)
                    if reconnecting:
                        store._note_change()  # whatever happened while nobody listened
                    del store
                while store_ref() is not None:
                    for notice in conn.notifies(timeout=1.0, stop_after=1):
                        _heard(store_ref, notice)
        except (psycopg.Error, DatabaseUnavailable):
            if (store := store_ref()) is not None:
                store._hearing(False)
                del store
            log.warning("lost the database's change notifications; listening again in %s s", LISTEN_RETRY_S)
            reconnecting = True
            time.sleep(LISTEN_RETRY_S)
    _poll(store_ref)


def _hears_itself(store_ref: weakref.ref, conn: psycopg.Connection) -> bool:
    """Whether a notification sent through the store's pool reaches the listening ``conn``;
    the notifications heard meanwhile count as usual."""
    channel = f"chat_check_{uuid.uuid4().hex}"
    conn.execute(f"LISTEN {channel}")
    if (store := store_ref()) is None:
        return True  # gone: nothing to listen for
    with store._reading() as sender:
        sender.execute("SELECT pg_notify(%s, '')", [channel])
    del store
    heard, deadline = False, time.monotonic() + HEAR_CHECK_S
    while not heard and (left := deadline - time.monotonic()) > 0:
        for notice in conn.notifies(timeout=left, stop_after=1):  # holds conn until it ends
            if notice.channel == channel:
                heard = True
            else:
                _heard(store_ref, notice)
    if heard:
        conn.execute(f"UNLISTEN {channel}")
    return heard


def _heard(store_ref: weakref.ref, notice: psycopg.Notify) -> None:
    if (store := store_ref()) is not None:
        store._note_change(_told(notice.payload))


def _poll(store_ref: weakref.ref) -> None:
    """Note a change whenever the rooms' versions have moved, every POLL_S, until the Store is gone."""
    last = None  # None: unknown, as at the start and after the database was lost
    while (store := store_ref()) is not None:
        try:
            with store._reading() as conn:
                total = conn.execute("SELECT COALESCE(SUM(version), 0) AS total FROM rooms").fetchone()["total"]
        except DatabaseUnavailable:
            total = None
        if total is not None and total != last:
            store._note_change()
        last = total
        del store
        time.sleep(POLL_S)


def _told(payload: str) -> dict[str, int | None]:
    """The room and new version a notification tells ("<version> <room>"); a bare room
    name (from a replica of an older release) says the room changed, not to what."""
    version, _, room = payload.partition(" ")
    return {room: int(version)} if version.isdigit() and room else {payload: None}


class PgStore(ChangeWaiting):
    """The chat database at a ``postgresql://`` URL; safe to share between threads."""

    def __init__(self, url: str, pool_size: int = 10, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        super().__init__()
        self._bumped = threading.local()  # the rooms this thread's write transaction bumped, with their versions
        self.url = url
        try:
            conninfo_to_dict(url)
        except psycopg.Error as error:
            raise DatabaseUnavailable(f"DATABASE_URL is not a usable PostgreSQL URL ({_without_secrets(error, url)}).") from None
        # Each connection is checked (one empty query) before it is lent: hosted servers close idle
        # connections (restarts, a pooler's idle timeout, a serverless database going to sleep),
        # and a closed one would otherwise fail the next person's message.
        self.pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, open=False, name="chat", timeout=connect_timeout_s * 2,
            check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": max(1, round(connect_timeout_s)),
                    "prepare_threshold": None},  # a transaction pooler keeps no prepared statements
        )
        try:
            self.pool.open(wait=True, timeout=connect_timeout_s)
            with self.pool.connection() as conn:
                migrate(conn)
        except (psycopg.Error, PoolTimeout) as error:
            reason = _without_secrets(error, url)
            self.pool.close()
            raise DatabaseUnavailable(f"The {describe(url)} cannot be reached or opened: {reason}") from None

    def close(self) -> None:
        self.pool.close()

    # Writing ---------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[psycopg.Connection]:
        """A connection from the pool; a lost database raises DatabaseUnavailable, without secrets."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as error:
            raise DatabaseUnavailable(f"The {describe(self.url)} is unavailable: {_without_secrets(error, self.url)}") from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[psycopg.Connection]:
        """One write transaction; everyone waiting for a change is told once it commits."""
        bumped = self._bumped.rooms = {}  # filled by _bump
        with self._reading() as conn, conn.transaction():
            yield conn
        self._note_change(bumped)

    def add_message(self, room: str, author: str, text: str) -> Message:
        room, author, text = check_room(room), check_name(author), check_text(text)
        with self._writing() as conn:
            message_id = self._insert_message(conn, room, author, "user", "complete", None)
            self._insert_chunk(conn, message_id, 0, text)
            self._bump(conn, room)
        return self.get(message_id)

    def start_reply(
        self,
        room: str,
        reply_to: int | None = None,
        owner: str = PROCESS,
        asker: str | None = None,
        limits: ReplyLimits | None = None,
    ) -> Message:
        room = check_room(room)
        with self._writing() as conn:
            self._within(conn, limits, owner, asker)
            message_id = self._insert_reply(conn, room, reply_to, owner, asker)
            self._bump(conn, room)
        return self.get(message_id)

    def add_question(
        self,
        room: str,
        author: str,
        text: str,
        owner: str = PROCESS,
        asker: str | None = None,
        limits: ReplyLimits | None = None,
    ) -> tuple[Message, Message]:
        room, author, text = check_room(room), check_name(author), check_text(text)
        with self._writing() as conn:
            self._within(conn, limits, owner, asker)
            question_id = self._insert_message(conn, room, author, "user", "complete", None)
            self._insert_chunk(conn, question_id, 0, text)
            reply_id = self._insert_reply(conn, room, question_id, owner, asker)
            self._bump(conn, room)
        return self.get(question_id), self.get(reply_id)

    def append_chunk(self, message_id: int, text: str) -> None:
        if not text:
            return
        with self._writing() as conn:
            room = self._touch_streaming(conn, message_id)
            self._insert_chunk(conn, message_id, self._next_seq(conn, message_id), text)
            self._bump(conn, room)

    def finish_reply(
        self, message_id: int, status: str, error: str | None = None, last_chunk: str = "", usage=None
    ) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status!r}")
        figures = (usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens) if usage else (None,) * 3
        with self._writing() as conn:
            room = self._touch_streaming(conn, message_id)
            if last_chunk:
                self._insert_chunk(conn, message_id, self._next_seq(conn, message_id), last_chunk)
            conn.execute(
                "UPDATE messages SET status = %s, error = %s, prompt_tokens = %s, completion_tokens = %s, "
                "reasoning_tokens = %s WHERE id = %s",
                [status, error, *figures, message_id],
            )
            self._bump(conn, room)

    def recover_interrupted(self, stale_after_s: float = STALE_AFTER_S, owner: str = PROCESS) -> int:
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT m.id, m.room, m.owner, m.updated_at, r.beat_at, r.pid_space, r.pid, {NOW} AS now "
                "FROM messages AS m LEFT JOIN replicas AS r ON r.owner = m.owner "
                "WHERE m.status = 'streaming' AND m.owner IS DISTINCT FROM %s",
                [owner],
            ).fetchall()
        orphans = [row for row in rows if _is_orphan(row, row["now"], stale_after_s)]
        if not orphans:
            return 0
        count = 0
        with self._writing() as conn:
            for row in orphans:
                marked = conn.execute(
                    f"UPDATE messages SET status = 'interrupted', error = %s, updated_at = {NOW} "
                    f"WHERE id = %s AND status = 'streaming' AND {LAST_SIGN_SQL} = %s",
                    [INTERRUPTED_NOTE, row["id"], _last_sign(row)],
                ).rowcount
                if marked:
                    count += marked
                    self._bump(conn, row["room"])
        return count

    def request_stop(self, message_id: int) -> bool:
        with self._writing() as conn:
            row = conn.execute(
                f"UPDATE messages SET stop_requested_at = COALESCE(stop_requested_at, {NOW}) "
                "WHERE id = %s AND status = 'streaming' RETURNING room",
                [message_id],
            ).fetchone()
            if row is not None:
                self._bump(conn, row["room"])
        return row is not None

    def stop_requested(self, message_ids: Collection[int]) -> set[int]:
        if not message_ids:
            return set()
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT id FROM messages WHERE id = ANY(%s) AND status = 'streaming' AND stop_requested_at IS NOT NULL",
                [list(message_ids)],
            ).fetchall()
        return {row["id"] for row in rows}

    # Replicas ----------------------------------------------------------------

    def beat(self, owner: str = PROCESS) -> None:
        with self._reading() as conn:  # one statement, no notification: nobody waits for a heartbeat
            conn.execute(
                f"INSERT INTO replicas (owner, beat_at, pid_space, pid) VALUES (%s, {NOW}, %s, %s) ON CONFLICT (owner) "
                "DO UPDATE SET beat_at = EXCLUDED.beat_at, pid_space = EXCLUDED.pid_space, pid = EXCLUDED.pid",
                [owner, PID_SPACE, os.getpid()],
            )

    def retire(self, owner: str = PROCESS) -> None:
        with self._reading() as conn:
            conn.execute("DELETE FROM replicas WHERE owner = %s", [owner])

    # Reading ---------------------------------------------------------------

    def get(self, message_id: int) -> Message:
        with self._reading() as conn:
            rows = conn.execute("SELECT * FROM messages WHERE id = %s", [message_id]).fetchall()
            if not rows:
                raise StoreError(f"no message {message_id}")
            return self._with_text(conn, rows)[0]

    def recent(self, room: str, limit: int = 100, after_id: int = 0) -> list[Message]:
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT * FROM (SELECT * FROM messages WHERE room = %s AND id > %s ORDER BY id DESC LIMIT %s) "
                "AS newest ORDER BY id",
                [check_room(room), after_id, limit],
            ).fetchall()
            return self._with_text(conn, rows)

    def version(self, room: str) -> int:
        with self._reading() as conn:
            row = conn.execute("SELECT version FROM rooms WHERE name = %s", [room]).fetchone()
        return row["version"] if row else 0

    # Waiting for changes (store.ChangeWaiting) -------------------------------

    def _start_watching(self) -> None:
        """One listening connection: any process's commit counts as soon as PostgreSQL delivers it."""
        threading.Thread(target=_listen, args=(weakref.ref(self), self.url), name="store-listen", daemon=True).start()

    # Internals -------------------------------------------------------------

    @staticmethod
    def _with_text(conn: psycopg.Connection, rows: list[dict]) -> list[Message]:
        if not rows:
            return []
        texts: dict[int, list[str]] = {row["id"]: [] for row in rows}
        for chunk in conn.execute(
            "SELECT message_id, text FROM chunks WHERE message_id = ANY(%s) ORDER BY message_id, seq",
            [list(texts)],
        ):
            texts[chunk["message_id"]].append(chunk["text"])
        return [Message(text="".join(texts[row["id"]]), **row) for row in rows]

    @staticmethod
    def _insert_message(conn, room, author, role, status, reply_to, owner=None, asker=None) -> int:
        return conn.execute(
            "INSERT INTO messages (room, author, role, status, reply_to, created_at, updated_at, owner, asker) "
            f"VALUES (%s, %s, %s, %s, %s, {NOW}, {NOW}, %s, %s) RETURNING id",
            [room, author, role, status, reply_to, owner, asker],
        ).fetchone()["id"]

    @staticmethod
    def _insert_reply(conn, room: str, reply_to: int | None, owner: str, asker: str | None) -> int:
        return PgStore._insert_message(conn, room, ASSISTANT_NAME, "assistant", "streaming", reply_to, owner, asker)

    @staticmethod
    def _within(conn, limits: ReplyLimits | None, owner: str, asker: str | None) -> None:
        """Raise unless ``limits`` allow one more reply; under a lock held until the write commits."""
        if limits is None:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [LIMITS_LOCK])
        writing = conn.execute(
            "SELECT COUNT(*) AS n FROM messages "
            f"WHERE status = 'streaming' AND (owner = %s OR {LAST_SIGN_SQL} > {NOW} - %s)",
            [owner, limits.stale_after_s],
        ).fetchone()["n"]
        asked = conn.execute(
            f"SELECT COUNT(*) AS n, MIN(created_at) AS oldest, {NOW} AS now FROM messages "
            f"WHERE asker = %s AND created_at > {NOW} - %s",
            [asker, RATE_WINDOW_S],
        ).fetchone()
        check_limits(limits, writing, asked["n"], asked["oldest"], asked["now"])

    @staticmethod
    def _insert_chunk(conn, message_id: int, seq: int, text: str) -> None:
        conn.execute("INSERT INTO chunks (message_id, seq, text) VALUES (%s, %s, %s)", [message_id, seq, text])

    @staticmethod
    def _next_seq(conn, message_id: int) -> int:
        return conn.execute(
            "SELECT COALESCE(MAX(seq) + 1, 0) AS seq FROM chunks WHERE message_id = %s", [message_id]
        ).fetchone()["seq"]

    @staticmethod
    def _touch_streaming(conn, message_id: int) -> str:
        """Mark the reply updated and return its room; refuse if it is not streaming.

        The row lock it takes also puts concurrent appends to one reply in line.
        """
        row = conn.execute(
            f"UPDATE messages SET updated_at = {NOW} WHERE id = %s AND status = 'streaming' RETURNING room",
            [message_id],
        ).fetchone()
        if row is None:
            raise NotStreaming(f"message {message_id} is not a streaming reply")
        return row["room"]

    def _bump(self, conn, room: str) -> None:
        """A new version for the room, told to every listening store when the write commits."""
        version = conn.execute(
            "INSERT INTO rooms (name, version) VALUES (%s, 1) "
            "ON CONFLICT (name) DO UPDATE SET version = rooms.version + 1 RETURNING version",
            [room],
        ).fetchone()["version"]
        conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, f"{version} {room}"])
        self._bumped.rooms[room] = version
