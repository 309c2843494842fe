"""SQLite storage for chat rooms, through sqlite-utils.

A message's text lives in the ``chunks`` table, one row per persisted piece, and
reading a message joins them in order. An assistant reply therefore grows by
appending rows: text already stored is never rewritten, so the bytes handed to
SQLite grow linearly with the reply.

Every thread (each Streamlit script run, each reply worker) gets its own
connection, so WAL readers never wait for a writer. Every write is one
``BEGIN IMMEDIATE`` transaction, which waits on ``busy_timeout`` instead of
failing with "database is locked" halfway through.

Several processes (replicas) may share the database. Each one that writes
replies beats: it records the time in ``replicas`` every few seconds, and a
streaming reply whose owner has not beaten for ``STALE_AFTER_S`` is taken to
be orphaned (see recover_interrupted). Times are epoch seconds from the
database's own clock, so that replicas agree on them: SQLite is only shared on
one host, whose clock is ``time.time()``; PostgreSQL's store asks the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
import logging
import threading
import time
import unicodedata
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 4_000
MAX_NAME_CHARS = 40
ASSISTANT_NAME = "GPT"
BUSY_TIMEOUT_MS = 5_000
WATCH_S = 0.2  # how often a Store asks SQLite whether another connection committed

ROOM_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
# Names a person may not take, compared after folding case, width and
# punctuation away, so "G.P.T", "ｇｐｔ" or "G\u200bPT" are refused too.
RESERVED_NAMES = frozenset({"gpt", "chatgpt", "assistant", "system", "ai", "bot"})
# Control characters other than tab, newline and carriage return.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# "truncated": the model stopped at its token budget, after some text.
STATUSES = ("complete", "streaming", "stopped", "error", "interrupted", "truncated")
FINAL_STATUSES = frozenset(STATUSES) - {"streaming"}
INTERRUPTED_NOTE = "The server restarted while this reply was being written."
CACHED_READS = 64  # (room, after_id) reads kept for the pages that follow rooms
BEAT_EVERY_S = 10.0  # how often a replica writing replies records that it lives
STALE_AFTER_S = 30.0  # a replica silent this long is gone, and so are its replies
RATE_WINDOW_S = 60.0  # the per-asker limit counts the replies started within this window
# This process, as recorded on the replies it writes: host, pid, and a token
# that tells it apart from an earlier process that had the same pid.
PROCESS = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_space() -> str | None:
    """Where a pid names one process: this kernel's boot and this pid namespace; None off Linux.

    A hostname does not say it: containers that share one (host networking)
    each see their own pids.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot} {namespace}"


PID_SPACE = _pid_space()


class StoreError(Exception):
    """Something the store refused to do."""


class InvalidInput(StoreError, ValueError):
    """Input a person can fix: the message says how."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached or opened now; the message says which, without secrets."""


class NotStreaming(StoreError):
    """A chunk or final status for a reply that is not streaming any more."""


class TooManyReplies(StoreError):
    """Every replica together is writing as many replies as ``limit`` allows."""

    def __init__(self, limit: int):
        super().__init__(f"{limit} replies are being written already")
        self.limit = limit


class AskingTooFast(StoreError):
    """The asker started ``limit`` replies within RATE_WINDOW_S; the next may start in ``wait_s``."""

    def __init__(self, limit: int, wait_s: float):
        super().__init__(f"{limit} replies asked for within {RATE_WINDOW_S:g} s; the next in {wait_s:.1f} s")
        self.limit, self.wait_s = limit, wait_s


@dataclass(frozen=True)
class ReplyLimits:
    """What a new reply may not exceed, counted over every replica on the database."""

    max_concurrent: int  # replies being written at once (streaming, by an owner that beats)
    replies_per_minute: int  # replies one asker may start within RATE_WINDOW_S
    stale_after_s: float = STALE_AFTER_S  # replies of owners silent this long no longer count


def check_limits(limits: ReplyLimits, writing: int, asked: int, oldest: float | None, now: float) -> None:
    """Raise if a new reply would exceed ``limits``, given what the database counted.

    ``writing`` replies are being written; the asker started ``asked`` within
    RATE_WINDOW_S, the ``oldest`` of them then (all by the database's clock).
    """
    if asked >= limits.replies_per_minute:
        raise AskingTooFast(limits.replies_per_minute, oldest + RATE_WINDOW_S - now)
    if writing >= limits.max_concurrent:
        raise TooManyReplies(limits.max_concurrent)


@dataclass(frozen=True)
class Message:
    id: int
    room: str
    author: str
    role: str  # "user" or "assistant"
    text: str
    status: str
    error: str | None
    reply_to: int | None
    created_at: float
    updated_at: float
    owner: str | None = None  # the process writing a streaming reply
    prompt_tokens: int | None = None  # as the provider reported them, for a finished reply
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    asker: str | None = None  # whom a reply counts against (the asking tab's token)
    stop_requested_at: float | None = None  # someone asked to stop this reply (see Store.request_stop)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


# Migrations, in order; each runs once per database (see simonw/llm).
MIGRATIONS: list[Callable[[Database], None]] = []
migration = MIGRATIONS.append


@migration
def m001_initial(db: Database) -> None:
    db["rooms"].create({"name": str, "version": int}, pk="name")
    db["messages"].create(
        {
            "id": int,
            "room": str,
            "author": str,
            "role": str,
            "status": str,
            "error": str,
            "reply_to": int,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
        not_null={"room", "author", "role", "status", "created_at", "updated_at"},
    )
    db["messages"].create_index(["room", "id"])
    db["messages"].create_index(["status"])
    db["chunks"].create(
        {"message_id": int, "seq": int, "text": str},
        pk=("message_id", "seq"),
        foreign_keys=[("message_id", "messages", "id")],
        not_null={"text"},
    )


@migration
def m002_reply_owner(db: Database) -> None:
    # Which process writes a streaming reply, so recovery leaves live ones alone.
    db["messages"].add_column("owner", str)


@migration
def m003_usage(db: Database) -> None:
    # What a reply cost, as the provider reported it.
    for column in ("prompt_tokens", "completion_tokens", "reasoning_tokens"):
        db["messages"].add_column(column, int)


@migration
def m004_replicas(db: Database) -> None:
    # The last heartbeat of each process that writes replies, by owner tag, and
    # its pid where that can tell a process's death at once (see _is_orphan).
    db["replicas"].create(
        {"owner": str, "beat_at": float, "pid_space": str, "pid": int}, pk="owner", not_null={"beat_at"}
    )


@migration
def m005_reply_asker(db: Database) -> None:
    # Who asked for a reply, so that every replica counts the same replies per asker.
    db["messages"].add_column("asker", str)
    db["messages"].create_index(["asker", "created_at"])


@migration
def m006_stop_requests(db: Database) -> None:
    # A stop asked for through any replica, for the one writing the reply to act on.
    db["messages"].add_column("stop_requested_at", float)


# The last sign of life of a streaming reply's owner, in SQL both engines speak:
# its latest heartbeat; for an owner that never beat (rows from before
# heartbeats, a NULL owner), the reply's own last change.
LAST_SIGN_SQL = "COALESCE((SELECT beat_at FROM replicas WHERE replicas.owner = messages.owner), messages.updated_at)"


def migrate(db: Database) -> None:
    """Apply the migrations this database has not seen yet; safe to repeat."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    done = {row["name"] for row in db.query("SELECT name FROM _migrations")}
    for step in MIGRATIONS:
        if step.__name__ in done:
            continue
        with _immediate(db):
            step(db)
            db.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                [step.__name__, time.time()],
            )


def connect(path: str | Path) -> Database:
    """One connection in WAL mode that waits for locks instead of failing.

    Each is used by one thread only; ``check_same_thread`` is off so that it can
    be closed from whichever thread cleans up after that one.
    """
    conn = sqlite3.connect(
        str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return Database(conn)


@contextlib.contextmanager
def _immediate(db: Database) -> Iterator[Database]:
    """A write transaction that takes the write lock up front (BEGIN IMMEDIATE)."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


def _fold(name: str) -> str:
    folded = unicodedata.normalize("NFKC", name).casefold()
    return "".join(ch for ch in folded if ch.isalnum())


def _encodable(text: str) -> bool:
    """False for text with lone surrogates, which cannot be stored as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_visible(text: str) -> bool:
    """True if some character is neither whitespace nor invisible (zero-width, controls)."""
    return any(unicodedata.category(ch)[0] not in "CZ" for ch in text)


def check_room(room: str) -> str:
    if not isinstance(room, str) or not ROOM_PATTERN.fullmatch(room):
        raise InvalidInput(
            "Room names use 1 to 40 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit."
        )
    return room


def check_name(name: str) -> str:
    """A person's display name, trimmed; raises InvalidInput when unusable."""
    name = name.strip() if isinstance(name, str) else ""
    if not _has_visible(name):
        raise InvalidInput("Please choose a name.")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"Names can be at most {MAX_NAME_CHARS} characters.")
    if CONTROL_CHARS.search(name) or "\n" in name or "\r" in name or "\t" in name:
        raise InvalidInput("Names must be a single line of text.")
    if not _encodable(name):
        raise InvalidInput("Your name contains characters that cannot be stored.")
    if _fold(name) in RESERVED_NAMES:
        raise InvalidInput(f"“{name}” is reserved for the assistant; please choose another name.")
    return name


def check_text(text: str) -> str:
    """A person's message, stored exactly as written; raises InvalidInput when unusable."""
    if not isinstance(text, str) or not _has_visible(text):
        raise InvalidInput("Your message is empty.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise InvalidInput(
            f"Your message is {len(text):,} characters long; the limit is {MAX_MESSAGE_CHARS:,}."
        )
    if CONTROL_CHARS.search(text):
        raise InvalidInput("Your message contains control characters; please remove them.")
    if not _encodable(text):
        raise InvalidInput("Your message contains characters that cannot be stored.")
    return text


class _ThreadConnection:
    """Closes its connection when its thread ends and thread-local data is dropped.

    Streamlit runs every script run in a new thread. A connection left to the
    garbage collector stays open for a long time (sqlite-utils' Database holds
    a reference cycle, and the app turns off Streamlit's collection after each
    run), so open files would pile up.
    """

    def __init__(self, db: Database):
        self.db = db

    def __del__(self) -> None:
        self.db.conn.close()


def _watch_commits(store_ref: weakref.ref) -> None:
    """Note a change whenever another connection has committed, until the Store is gone."""
    store = store_ref()
    conn = sqlite3.connect(str(store.path), check_same_thread=False)
    try:
        last = conn.execute("PRAGMA data_version").fetchone()[0]
        del store
        while (store := store_ref()) is not None:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != last:
                last = version
                store._note_change()
            del store
            time.sleep(WATCH_S)
    except sqlite3.Error:
        log.exception("stopped watching %s for changes", store_ref() and store_ref().path)
    finally:
        conn.close()


def _is_orphan(row: dict, now: float, stale_after_s: float) -> bool:
    """Whether the process writing a streaming reply is gone, ``now`` by the database's clock.

    ``row`` has the reply's ``owner`` and ``updated_at``, and its owner's
    heartbeat (``beat_at``, ``pid_space``, ``pid``; None if it never beat). An
    owner that beats is alive while its last beat is recent, however long its
    reply has been silent (a reasoning model may think for minutes), and gone
    once it is not, or at once when its pid has exited in this very pid space.
    An owner that never beat (replies from before heartbeats, a NULL owner) is
    judged by the reply's last change, or at once when its tag names a process
    on this host that has exited.
    """
    if row["beat_at"] is None:
        return _tag_exited(row["owner"]) or now - row["updated_at"] > stale_after_s
    return _exited(row["pid_space"], row["pid"]) or now - row["beat_at"] > stale_after_s


def _last_sign(row: dict) -> float:
    """LAST_SIGN_SQL of a row that has ``beat_at`` and ``updated_at``."""
    return row["updated_at"] if row["beat_at"] is None else row["beat_at"]


def _exited(pid_space: str | None, pid: int | None) -> bool:
    """True for a pid of this very pid space that no process has any more; False when unsure."""
    return pid_space is not None and pid_space == PID_SPACE and pid is not None and _gone(pid)


def _tag_exited(owner: str | None) -> bool:
    """True for a PROCESS tag (host:pid:token) of a process on this host that no longer runs."""
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and _gone(int(pid))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # is a process with that pid running?
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it runs, as another user
    return False  # it runs, or another process took its pid: the clock will tell


def open_store(location: str | Path):
    """The store at ``location``: a ``postgresql://`` URL (store_pg.PgStore) or an SQLite file (Store)."""
    if str(location).startswith(("postgresql://", "postgres://")):
        from store_pg import PgStore

        return PgStore(str(location))
    return Store(location)


class ChangeWaiting:
    """What both stores share: a counter of the database changes this process has seen, to wait on.

    A write through the store counts at once (``_note_change``); another
    process's commit counts once the store's watcher, started by the first
    wait (``_start_watching``), notices it. The database itself is not read
    while nothing changes.
    """

    def __init__(self) -> None:
        self._changes = 0
        self._changed = threading.Condition()
        self._watching = False
        # Reads shared by every page of this process that follows a room: at
        # each change they all wake at once, and one query serves them all.
        self._reads = threading.Lock()  # guards the dicts; each room's reads queue on the room's own lock
        self._room_reads: dict[str, threading.Lock] = {}
        self._versions: dict[str, tuple[int, int]] = {}  # room -> (change counter before reading, version)
        self._recents: OrderedDict[tuple, tuple[int, list[Message]]] = OrderedDict()  # -> (version, messages)
        # Rooms' versions as the database's change notifications tell them
        # (PostgreSQL's carry each room's new version); None while none come.
        self._told: dict[str, int] | None = None

    def changes(self) -> int:
        """The counter now; see wait_for_change."""
        with self._changed:
            return self._changes

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """The change counter, as soon as it differs from ``seen``, or after ``timeout`` seconds."""
        with self._changed:
            start, self._watching = not self._watching, True
        if start:
            self._start_watching()
        with self._changed:
            self._changed.wait_for(lambda: self._changes != seen, timeout)
            return self._changes

    def cached_version(self, room: str) -> int:
        """``version(room)``, read once per change this process has seen, however many pages ask;
        not read at all while the change notifications tell it."""
        with self._changed:
            told = self._told
            if told is not None and room in told:
                return told[room]
            seen = self._changes  # before reading: what is read is at least as new
        with self._reading_room(room):
            held = self._versions.get(room)
            if held is None or held[0] != seen:
                held = self._versions[room] = (seen, self.version(room))
        with self._changed:
            if told is not None and told is self._told:  # heard since before the read: later changes will be told
                told[room] = max(held[1], told.get(room, 0))
        return held[1]

    def cached_recent(self, room: str, limit: int, after_id: int, version: int) -> list[Message]:
        """``recent(room, limit, after_id)`` as of room ``version`` or later, read once for all who ask.

        ``version`` must have been read before: what is read after it is at
        least as new, and is kept for every later caller with that version.
        """
        key = (room, limit, after_id)
        with self._reading_room(room):
            held = self._recents.get(key)
            if held is None or held[0] < version:
                held = (version, self.recent(room, limit, after_id))
            with self._reads:
                self._recents[key] = held
                self._recents.move_to_end(key)
                while len(self._recents) > CACHED_READS:
                    self._recents.popitem(last=False)
            return held[1]

    def _reading_room(self, room: str) -> threading.Lock:
        """The lock the pages reading ``room`` queue on, so that the first reads for all of them."""
        with self._reads:
            return self._room_reads.setdefault(room, threading.Lock())

    def _note_change(self, versions: dict[str, int | None] | None = None) -> None:
        """Count a change and wake whoever waits; ``versions``: rooms' new versions, None where unknown."""
        with self._changed:
            self._changes += 1
            if self._told is not None:
                for room, version in (versions or {}).items():
                    if version is None:
                        self._told.pop(room, None)
                    else:
                        self._told[room] = max(version, self._told.get(room, 0))
            self._changed.notify_all()

    def _hearing(self, heard: bool) -> None:
        """Whether every commit's notification reaches this store from now on, with its version."""
        with self._changed:
            self._told = {} if heard else None

    def _start_watching(self) -> None:
        raise NotImplementedError


class Store(ChangeWaiting):
    """The chat database at ``path``; safe to share between threads.

    Another process's commit wakes waiting pages within WATCH_S.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self._local = threading.local()
        migrate(self.db)

    @property
    def db(self) -> Database:
        """This thread's connection (created on first use, closed when the thread ends)."""
        holder = getattr(self._local, "connection", None)
        if holder is None:
            holder = self._local.connection = _ThreadConnection(connect(self.path))
        return holder.db

    # Writing ---------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Database]:
        """One write transaction; whoever waits for a change is woken once it commits."""
        with _immediate(self.db) as db:
            yield db
        self._note_change()

    def add_message(self, room: str, author: str, text: str) -> Message:
        """Store a person's message whole, or raise InvalidInput and store nothing."""
        room, author, text = check_room(room), check_name(author), check_text(text)
        now = time.time()
        with self._writing() as db:
            message_id = self._insert_message(db, room, author, "user", "complete", None, now)
            self._insert_chunk(db, message_id, 0, text)
            self._bump(db, room)
        return self.get(message_id)

    def start_reply(
        self,
        room: str,
        reply_to: int | None = None,
        owner: str = PROCESS,
        asker: str | None = None,
        limits: ReplyLimits | None = None,
    ) -> Message:
        """An empty assistant message in status ``streaming``, to append chunks to.

        With ``limits``, it is stored only if they allow it (counted in the same
        write), else TooManyReplies or AskingTooFast is raised.
        """
        room = check_room(room)
        with self._writing() as db:
            self._within(db, limits, owner, asker)
            message_id = self._insert_reply(db, room, reply_to, owner, asker)
            self._bump(db, room)
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
        """A person's message and the empty reply to it, stored together or not at all (see start_reply)."""
        room, author, text = check_room(room), check_name(author), check_text(text)
        with self._writing() as db:
            self._within(db, limits, owner, asker)
            question_id = self._insert_message(db, room, author, "user", "complete", None, time.time())
            self._insert_chunk(db, question_id, 0, text)
            reply_id = self._insert_reply(db, room, question_id, owner, asker)
            self._bump(db, room)
        return self.get(question_id), self.get(reply_id)

    def append_chunk(self, message_id: int, text: str) -> None:
        """Append one piece to a streaming reply, in one transaction."""
        if not text:
            return
        with self._writing() as db:
            room = self._touch_streaming(db, message_id)
            seq = db.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM chunks WHERE message_id = ?", [message_id]
            ).fetchone()[0]
            self._insert_chunk(db, message_id, seq, text)
            self._bump(db, room)

    def finish_reply(
        self, message_id: int, status: str, error: str | None = None, last_chunk: str = "", usage=None
    ) -> None:
        """Give a streaming reply its final status, with the last piece of text and its token usage if any.

        ``usage`` has ``prompt_tokens``, ``completion_tokens`` and ``reasoning_tokens`` (llm.Usage).
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status!r}")
        with self._writing() as db:
            room = self._touch_streaming(db, message_id)
            if last_chunk:
                seq = db.execute(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM chunks WHERE message_id = ?",
                    [message_id],
                ).fetchone()[0]
                self._insert_chunk(db, message_id, seq, last_chunk)
            db.execute(
                "UPDATE messages SET status = ?, error = ?, prompt_tokens = ?, completion_tokens = ?, "
                "reasoning_tokens = ? WHERE id = ?",
                [status, error, *(
                    (usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens) if usage else (None,) * 3
                ), message_id],
            )
            self._bump(db, room)

    def recover_interrupted(self, stale_after_s: float = STALE_AFTER_S, owner: str = PROCESS) -> int:
        """Mark replies left ``streaming`` by a dead process as ``interrupted``.

        Their text so far is kept. A reply is orphaned when its owner has not
        beaten for ``stale_after_s``, or its process has exited on this host
        (see _is_orphan); the replies of ``owner`` (this process) and of every
        replica that beats are left alone, so this is safe to call at start-up
        and now and then. Returns how many it marked.
        """
        now = time.time()
        orphans = [
            row
            for row in self.db.query(
                "SELECT m.id, m.room, m.owner, m.updated_at, r.beat_at, r.pid_space, r.pid FROM messages AS m "
                "LEFT JOIN replicas AS r ON r.owner = m.owner WHERE m.status = 'streaming' AND m.owner IS NOT ?",
                [owner],
            )
            if _is_orphan(row, now, stale_after_s)
        ]
        if not orphans:
            return 0
        count = 0
        with self._writing() as db:
            for row in orphans:
                # Only if its owner has shown no sign of life since it was read.
                marked = db.execute(
                    "UPDATE messages SET status = 'interrupted', error = ?, updated_at = ? "
                    f"WHERE id = ? AND status = 'streaming' AND {LAST_SIGN_SQL} = ?",
                    [INTERRUPTED_NOTE, now, row["id"], _last_sign(row)],
                ).rowcount
                if marked:
                    count += marked
                    self._bump(db, row["room"])
        return count

    def request_stop(self, message_id: int) -> bool:
        """Ask whichever replica writes a streaming reply to stop it, as its Stop button does.

        Pages notice (the room's version changes); the writing ReplyWorker ends
        the reply, its text kept, as ``stopped``. False, and nothing changes,
        for a reply that is not streaming any more.
        """
        with self._writing() as db:
            rows = db.execute(
                "UPDATE messages SET stop_requested_at = COALESCE(stop_requested_at, ?) "
                "WHERE id = ? AND status = 'streaming' RETURNING room",
                [time.time(), message_id],
            ).fetchall()
            if rows:
                self._bump(db, rows[0][0])
        return bool(rows)

    def stop_requested(self, message_ids: Collection[int]) -> set[int]:
        """Those of ``message_ids`` that are streaming and someone asked to stop."""
        if not message_ids:
            return set()
        placeholders = ",".join("?" * len(message_ids))
        return {
            message_id
            for (message_id,) in self.db.execute(
                f"SELECT id FROM messages WHERE id IN ({placeholders}) "
                "AND status = 'streaming' AND stop_requested_at IS NOT NULL",
                list(message_ids),
            )
        }

    # Replicas ----------------------------------------------------------------

    def beat(self, owner: str = PROCESS) -> None:
        """Record that ``owner`` lives, now, in this process: its streaming replies are not orphans while it beats."""
        # Nobody here waits for a heartbeat: no change to note. (Other processes'
        # watchers see its commit as any other: their pages wake, find the
        # room's version unchanged, and wait again.)
        with _immediate(self.db) as db:
            db.execute(
                "INSERT INTO replicas (owner, beat_at, pid_space, pid) VALUES (?, ?, ?, ?) ON CONFLICT (owner) "
                "DO UPDATE SET beat_at = excluded.beat_at, pid_space = excluded.pid_space, pid = excluded.pid",
                [owner, time.time(), PID_SPACE, os.getpid()],
            )

    def retire(self, owner: str = PROCESS) -> None:
        """Forget ``owner``'s heartbeat, as it shuts down cleanly."""
        with _immediate(self.db) as db:
            db.execute("DELETE FROM replicas WHERE owner = ?", [owner])

    # Reading ---------------------------------------------------------------

    def get(self, message_id: int) -> Message:
        rows = list(self.db.query("SELECT * FROM messages WHERE id = ?", [message_id]))
        if not rows:
            raise StoreError(f"no message {message_id}")
        return self._with_text(rows)[0]

    def recent(self, room: str, limit: int = 100, after_id: int = 0) -> list[Message]:
        """The room's last ``limit`` messages (newer than ``after_id``), oldest first."""
        rows = list(
            self.db.query(
                "SELECT * FROM (SELECT * FROM messages WHERE room = ? AND id > ? ORDER BY id DESC LIMIT ?) "
                "ORDER BY id",
                [check_room(room), after_id, limit],
            )
        )
        return self._with_text(rows)

    def version(self, room: str) -> int:
        """A counter that changes whenever anything in the room changes."""
        row = self.db.execute("SELECT version FROM rooms WHERE name = ?", [room]).fetchone()
        return row[0] if row else 0

    # Waiting for changes (ChangeWaiting) -------------------------------------

    def _start_watching(self) -> None:
        """One thread asks SQLite every WATCH_S whether another connection committed."""
        threading.Thread(target=_watch_commits, args=(weakref.ref(self),), name="store-watch", daemon=True).start()

    # Internals -------------------------------------------------------------

    def _with_text(self, rows: list[dict]) -> list[Message]:
        if not rows:
            return []
        texts: dict[int, list[str]] = {row["id"]: [] for row in rows}
        placeholders = ",".join("?" * len(texts))
        for message_id, text in self.db.execute(
            f"SELECT message_id, text FROM chunks WHERE message_id IN ({placeholders}) "
            "ORDER BY message_id, seq",
            list(texts),
        ):
            texts[message_id].append(text)
        return [Message(text="".join(texts[row["id"]]), **row) for row in rows]

    @staticmethod
    def _insert_message(db, room, author, role, status, reply_to, now) -> int:
        return db.execute(
            "INSERT INTO messages (room, author, role, status, reply_to, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [room, author, role, status, reply_to, now, now],
        ).lastrowid

    @staticmethod
    def _insert_reply(db, room: str, reply_to: int | None, owner: str, asker: str | None) -> int:
        message_id = Store._insert_message(
            db, room, ASSISTANT_NAME, "assistant", "streaming", reply_to, time.time()
        )
        db.execute("UPDATE messages SET owner = ?, asker = ? WHERE id = ?", [owner, asker, message_id])
        return message_id

    @staticmethod
    def _within(db, limits: ReplyLimits | None, owner: str, asker: str | None) -> None:
        """Raise unless ``limits`` allow one more reply; inside the write, so no other can slip in meanwhile."""
        if limits is None:
            return
        now = time.time()
        writing = db.execute(
            f"SELECT COUNT(*) FROM messages WHERE status = 'streaming' AND (owner = ? OR {LAST_SIGN_SQL} > ?)",
            [owner, now - limits.stale_after_s],
        ).fetchone()[0]
        asked, oldest = db.execute(
            "SELECT COUNT(*), MIN(created_at) FROM messages WHERE asker = ? AND created_at > ?",
            [asker, now - RATE_WINDOW_S],
        ).fetchone()
        check_limits(limits, writing, asked, oldest, now)

    @staticmethod
    def _insert_chunk(db, message_id: int, seq: int, text: str) -> None:
        db.execute(
            "INSERT INTO chunks (message_id, seq, text) VALUES (?, ?, ?)", [message_id, seq, text]
        )

    @staticmethod
    def _touch_streaming(db, message_id: int) -> str:
        """Mark the reply updated and return its room; refuse if it is not streaming."""
        row = db.execute(
            "UPDATE messages SET updated_at = ? WHERE id = ? AND status = 'streaming' "
            "RETURNING room",
            [time.time(), message_id],
        ).fetchall()
        if not row:
            raise NotStreaming(f"message {message_id} is not a streaming reply")
        return row[0][0]

    @staticmethod
    def _bump(db, room: str) -> None:
        db.execute(
            "INSERT INTO rooms (name, version) VALUES (?, 1) "
            "ON CONFLICT (name) DO UPDATE SET version = version + 1",
            [room],
        )
