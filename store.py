"""The chat's storage: rooms, messages and replies, each rule and verb written once over an engine.

A message's text lives in the ``chunks`` table, one row per persisted piece, and
reading a message joins them in order. An assistant reply therefore grows by
appending rows: text already stored is never rewritten, so the bytes handed to
the database grow linearly with the reply. Every room has a version, bumped
by every write in it, which pages compare to know whether to read again.

The database is SQLite (a file; ``engines/sqlite.py``, the default) or
PostgreSQL (a ``postgresql://`` URL; ``engines/postgresql.py``). This module
holds everything they share: validation, statuses, reply limits, migrations,
the verbs, and the counter of changes that pages wait on. An engine supplies
connections, transactions and its dialect, and tells the store of other
processes' commits (see engines/__init__.py).

Several processes (replicas) may share the database. Each one that writes
replies beats: it records the time in ``replicas`` every few seconds, and a
streaming reply whose owner has not beaten for ``STALE_AFTER_S`` is taken to
be orphaned (see recover_interrupted). Times are epoch seconds from the
database's own clock, so that replicas agree on them.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from engines import Connection, DatabaseUnavailable, Engine, StoreError  # noqa: F401  (errors: the store's face)

MAX_MESSAGE_CHARS = 4_000
MAX_NAME_CHARS = 40
ASSISTANT_NAME = "GPT"

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
MIGRATION_LOCK = 7_314_002  # Engine.exclusive keys: one process migrates at a time,
LIMITS_LOCK = 7_314_003  # ... and one counts the reply limits and inserts a reply at a time
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


class InvalidInput(StoreError, ValueError):
    """Input a person can fix: the message says how."""


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


# Input a person typed ------------------------------------------------------------


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


# Migrations ----------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One step of the schema, run once per database: statements that both engines run,
    or ``{engine name: statement}`` where they differ."""

    name: str
    statements: tuple[str | dict[str, str], ...]

    def __init__(self, name: str, *statements: str | dict[str, str]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "statements", statements)

    def sql(self, engine: str) -> list[str]:
        """Its statements for ``engine``: every plain one, and its own of each per-engine pair (if any)."""
        picked = [s if isinstance(s, str) else s.get(engine) for s in self.statements]
        return [s for s in picked if s]


MESSAGE_COLUMNS = (
    "room TEXT NOT NULL, author TEXT NOT NULL, role TEXT NOT NULL, status TEXT NOT NULL, error TEXT, "
    "reply_to BIGINT, created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)"
)

CHUNK_COLUMNS = (
    "message_id BIGINT NOT NULL REFERENCES messages (id), seq INTEGER NOT NULL, text TEXT NOT NULL, "
    "PRIMARY KEY (message_id, seq)"
)

MIGRATIONS = [
    Migration(
        "m001_initial",
        "CREATE TABLE rooms (name TEXT PRIMARY KEY, version BIGINT NOT NULL)",
        {  # an id the database assigns: SQLite's rowid, a sequence on PostgreSQL
            "sqlite": f"CREATE TABLE messages (id INTEGER PRIMARY KEY, {MESSAGE_COLUMNS}",
            "postgresql": f"CREATE TABLE messages (id BIGSERIAL PRIMARY KEY, {MESSAGE_COLUMNS}",
        },
        "CREATE INDEX messages_room_id ON messages (room, id)",
        "CREATE INDEX messages_status ON messages (status)",
        f"CREATE TABLE chunks ({CHUNK_COLUMNS})",
    ),
    # Which process writes a streaming reply, so recovery leaves live ones alone.
    Migration("m002_reply_owner", "ALTER TABLE messages ADD COLUMN owner TEXT"),
    # What a reply cost, as the provider reported it.
    Migration(
        "m003_usage",
        *(f"ALTER TABLE messages ADD COLUMN {column} INTEGER"
          for column in ("prompt_tokens", "completion_tokens", "reasoning_tokens")),
    ),
    # The last heartbeat of each process that writes replies, by owner tag, and
    # its pid where that can tell a process's death at once (see _is_orphan).
    Migration(
        "m004_replicas",
        "CREATE TABLE replicas (owner TEXT PRIMARY KEY, beat_at DOUBLE PRECISION NOT NULL, pid_space TEXT, pid INTEGER)",
    ),
    # Who asked for a reply, so that every replica counts the same replies per asker.
    Migration(
        "m005_reply_asker",
        "ALTER TABLE messages ADD COLUMN asker TEXT",
        "CREATE INDEX messages_asker_created_at ON messages (asker, created_at)",
    ),
    # A stop asked for through any replica, for the one writing the reply to act on.
    Migration("m006_stop_requests", "ALTER TABLE messages ADD COLUMN stop_requested_at DOUBLE PRECISION"),
    # SQLite: chunks kept in their primary key's own b-tree (no rowid), so that
    # a sentence writes one b-tree, not a table and its key's index as well.
    # PostgreSQL's tables are heaps with indexes either way.
    Migration(
        "m007_chunks_without_rowid",
        {"sqlite": f"CREATE TABLE chunks_by_key ({CHUNK_COLUMNS}) WITHOUT ROWID"},
        {"sqlite": "INSERT INTO chunks_by_key (message_id, seq, text) SELECT message_id, seq, text FROM chunks"},
        {"sqlite": "DROP TABLE chunks"},
        {"sqlite": "ALTER TABLE chunks_by_key RENAME TO chunks"},
    ),
]


def migrate(engine: Engine) -> None:
    """Apply the migrations this database has not seen yet, once, whichever process starts first."""
    with engine.transaction() as conn:
        engine.exclusive(conn, MIGRATION_LOCK)
        conn.run("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION)")
        done = {row["name"] for row in conn.rows("SELECT name FROM _migrations")}
        for migration in MIGRATIONS:
            if migration.name not in done:
                for statement in migration.sql(engine.name):
                    conn.run(statement)
                conn.run("INSERT INTO _migrations (name, applied_at) VALUES (?, {now})", [migration.name])


# Replies whose writer is gone ---------------------------------------------------

# The last sign of life of a streaming reply's owner: its latest heartbeat; for
# an owner that never beat (rows from before heartbeats, a NULL owner), when
# the reply started (a chunk does not touch its row; the heartbeats tell).
LAST_SIGN_SQL = "COALESCE((SELECT beat_at FROM replicas WHERE replicas.owner = messages.owner), messages.updated_at)"


def _is_orphan(row: dict, now: float, stale_after_s: float) -> bool:
    """Whether the process writing a streaming reply is gone, ``now`` by the database's clock.

    ``row`` has the reply's ``owner`` and ``updated_at``, and its owner's
    heartbeat (``beat_at``, ``pid_space``, ``pid``; None if it never beat). An
    owner that beats is alive while its last beat is recent, however long its
    reply has been silent (a reasoning model may think for minutes), and gone
    once it is not, or at once when its pid has exited in this very pid space.
    An owner that never beat (replies from before heartbeats, a NULL owner) is
    judged by when the reply started, or at once when its tag names a process
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


# The store -------------------------------------------------------------------------


def engine_for(location: str | Path, **options) -> Engine:
    """The engine for ``location``: a ``postgresql://`` URL, or an SQLite file.

    ``options`` go to PostgreSQL's engine (``pool_size``, ``connect_timeout_s``).
    """
    if str(location).startswith(("postgresql://", "postgres://")):
        from engines.postgresql import PostgresEngine

        return PostgresEngine(str(location), **options)
    from engines.sqlite import SqliteEngine

    return SqliteEngine(location)


def open_store(location: str | Path, **options) -> Store:
    """The store at ``location`` (see engine_for)."""
    return Store(engine_for(location, **options))


def _versions_in(note: str | None) -> dict[str, int | None]:
    """The room and new version a commit's note tells ("<version> <room>"), {} for none; a
    bare room name (from a replica of an older release) says the room changed, not to what."""
    if not note:
        return {}
    version, _, room = note.partition(" ")
    return {room: int(version)} if version.isdigit() and room else {note: None}


class _Write:
    """A write transaction under way: its connection, and the rooms it changed with their new versions."""

    def __init__(self, engine: Engine, conn: Connection):
        self.engine, self.conn = engine, conn
        self.versions: dict[str, int] = {}

    def bump(self, room: str) -> None:
        """A new version for the room, sent with the commit to every listening store."""
        version = self.conn.one(
            "INSERT INTO rooms (name, version) VALUES (?, 1) "
            "ON CONFLICT (name) DO UPDATE SET version = rooms.version + 1 RETURNING version",
            [room],
        )["version"]
        self.engine.notify(self.conn, f"{version} {room}")
        self.versions[room] = version


class Store:
    """The chat database: an SQLite file, a ``postgresql://`` URL, or an Engine; safe to share between threads.

    Besides its verbs, a store counts the changes it has seen, to wait on: a
    write through it counts at once; another process's commit counts once the
    engine hears it, which it starts doing at the first wait. The database
    itself is not read while nothing changes.
    """

    def __init__(self, where: str | Path | Engine):
        self.engine = where if isinstance(where, Engine) else engine_for(where)
        self.location = self.engine.location
        migrate(self.engine)
        self._changes = 0
        self._changed = threading.Condition()
        self._watching = False
        # Reads shared by every page of this process that follows a room: at
        # each change they all wake at once, and one query serves them all.
        self._reads = threading.Lock()  # guards the dicts; each room's reads queue on the room's own lock
        self._room_reads: dict[str, threading.Lock] = {}
        self._versions: dict[str, tuple[int, int]] = {}  # room -> (change counter before reading, version)
        self._recents: OrderedDict[tuple, tuple[int, list[Message]]] = OrderedDict()  # -> (version, messages)
        # Rooms' versions as the commits' notes tell them (where the engine
        # carries every note, as PostgreSQL does); None while they do not.
        self._told: dict[str, int] | None = None

    def close(self) -> None:
        self.engine.close()

    # Writing ---------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_Write]:
        """One write transaction; whoever waits for a change is woken once it commits."""
        with self.engine.transaction() as conn:
            write = _Write(self.engine, conn)
            yield write
        self._note_change(write.versions)

    def add_message(self, room: str, author: str, text: str) -> Message:
        """Store a person's message whole, or raise InvalidInput and store nothing."""
        room, author, text = check_room(room), check_name(author), check_text(text)
        with self._writing() as write:
            message_id = self._insert_message(write.conn, room, author, text)
            write.bump(room)
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
        with self._writing() as write:
            self._within(write.conn, limits, owner, asker)
            message_id = self._insert_reply(write.conn, room, reply_to, owner, asker)
            write.bump(room)
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
        with self._writing() as write:
            self._within(write.conn, limits, owner, asker)
            question_id = self._insert_message(write.conn, room, author, text)
            reply_id = self._insert_reply(write.conn, room, question_id, owner, asker)
            write.bump(room)
        return self.get(question_id), self.get(reply_id)

    def append_chunk(self, message_id: int, text: str) -> None:
        """Append one piece to a streaming reply, in one transaction."""
        if not text:
            return
        with self._writing() as write:
            room = self._streaming_room(write.conn, message_id)
            self._append(write.conn, message_id, text)
            write.bump(room)

    def finish_reply(
        self, message_id: int, status: str, error: str | None = None, last_chunk: str = "", usage=None
    ) -> None:
        """Give a streaming reply its final status, with the last piece of text and its token usage if any.

        ``usage`` has ``prompt_tokens``, ``completion_tokens`` and ``reasoning_tokens`` (llm.Usage).
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status!r}")
        figures = (usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens) if usage else (None,) * 3
        with self._writing() as write:
            room = self._streaming_room(write.conn, message_id)
            if last_chunk:
                self._append(write.conn, message_id, last_chunk)
            write.conn.run(
                "UPDATE messages SET status = ?, error = ?, prompt_tokens = ?, completion_tokens = ?, "
                "reasoning_tokens = ?, updated_at = {now} WHERE id = ?",
                [status, error, *figures, message_id],
            )
            write.bump(room)

    def recover_interrupted(self, stale_after_s: float = STALE_AFTER_S, owner: str = PROCESS) -> int:
        """Mark replies left ``streaming`` by a dead process as ``interrupted``.

        Their text so far is kept. A reply is orphaned when its owner has not
        beaten for ``stale_after_s``, or its process has exited on this host
        (see _is_orphan); the replies of ``owner`` (this process) and of every
        replica that beats are left alone, so this is safe to call at start-up
        and now and then. Returns how many it marked.
        """
        with self.engine.connection() as conn:
            rows = conn.rows(
                "SELECT m.id, m.room, m.owner, m.updated_at, r.beat_at, r.pid_space, r.pid, {now} AS now "
                "FROM messages AS m LEFT JOIN replicas AS r ON r.owner = m.owner "
                "WHERE m.status = 'streaming' AND (m.owner IS NULL OR m.owner <> ?)",
                [owner],
            )
        orphans = [row for row in rows if _is_orphan(row, row["now"], stale_after_s)]
        if not orphans:
            return 0
        count = 0
        with self._writing() as write:
            for row in orphans:
                # Only if its owner has shown no sign of life since it was read.
                marked = write.conn.run(
                    "UPDATE messages SET status = 'interrupted', error = ?, updated_at = {now} "
                    f"WHERE id = ? AND status = 'streaming' AND {LAST_SIGN_SQL} = ?",
                    [INTERRUPTED_NOTE, row["id"], _last_sign(row)],
                )
                if marked:
                    count += marked
                    write.bump(row["room"])
        return count

    def request_stop(self, message_id: int) -> bool:
        """Ask whichever replica writes a streaming reply to stop it, as its Stop button does.

        Pages notice (the room's version changes); the writing ReplyWorker ends
        the reply, its text kept, as ``stopped``. False, and nothing changes,
        for a reply that is not streaming any more.
        """
        with self._writing() as write:
            row = write.conn.one(
                "UPDATE messages SET stop_requested_at = COALESCE(stop_requested_at, {now}) "
                "WHERE id = ? AND status = 'streaming' RETURNING room",
                [message_id],
            )
            if row is not None:
                write.bump(row["room"])
        return row is not None

    def stop_requested(self, message_ids: Collection[int]) -> set[int]:
        """Those of ``message_ids`` that are streaming and someone asked to stop."""
        if not message_ids:
            return set()
        with self.engine.connection() as conn:
            rows = conn.rows(
                f"SELECT id FROM messages WHERE id IN ({_placeholders(message_ids)}) "
                "AND status = 'streaming' AND stop_requested_at IS NOT NULL",
                list(message_ids),
            )
        return {row["id"] for row in rows}

    # Replicas ----------------------------------------------------------------

    def beat(self, owner: str = PROCESS) -> None:
        """Record that ``owner`` lives, now, in this process: its streaming replies are not orphans while it beats."""
        # Nobody waits for a heartbeat: no change to count, no room to bump.
        # (Other processes may hear its commit as any other: their pages wake,
        # find the room's version unchanged, and wait again.)
        with self.engine.transaction() as conn:
            conn.run(
                "INSERT INTO replicas (owner, beat_at, pid_space, pid) VALUES (?, {now}, ?, ?) ON CONFLICT (owner) "
                "DO UPDATE SET beat_at = excluded.beat_at, pid_space = excluded.pid_space, pid = excluded.pid",
                [owner, PID_SPACE, os.getpid()],
            )

    def retire(self, owner: str = PROCESS) -> None:
        """Forget ``owner``'s heartbeat, as it shuts down cleanly."""
        with self.engine.transaction() as conn:
            conn.run("DELETE FROM replicas WHERE owner = ?", [owner])

    # Reading ---------------------------------------------------------------

    def get(self, message_id: int) -> Message:
        with self.engine.connection() as conn:
            rows = conn.rows("SELECT * FROM messages WHERE id = ?", [message_id])
            if not rows:
                raise StoreError(f"no message {message_id}")
            return self._with_text(conn, rows)[0]

    def recent(self, room: str, limit: int = 100, after_id: int = 0) -> list[Message]:
        """The room's last ``limit`` messages (newer than ``after_id``), oldest first."""
        with self.engine.connection() as conn:
            rows = conn.rows(
                "SELECT * FROM (SELECT * FROM messages WHERE room = ? AND id > ? ORDER BY id DESC LIMIT ?) "
                "AS newest ORDER BY id",
                [check_room(room), after_id, limit],
            )
            return self._with_text(conn, rows)

    def version(self, room: str) -> int:
        """A counter that changes whenever anything in the room changes."""
        with self.engine.connection() as conn:
            row = conn.one("SELECT version FROM rooms WHERE name = ?", [room])
        return row["version"] if row else 0

    # Waiting for changes ---------------------------------------------------

    def changes(self) -> int:
        """The counter of changes this store has seen; see wait_for_change."""
        with self._changed:
            return self._changes

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """The change counter, as soon as it differs from ``seen``, or after ``timeout`` seconds."""
        with self._changed:
            start, self._watching = not self._watching, True
        if start:
            self.engine.watch(self)
        with self._changed:
            self._changed.wait_for(lambda: self._changes != seen, timeout)
            return self._changes

    def cached_version(self, room: str) -> int:
        """``version(room)``, read once per change this process has seen, however many pages ask;
        not read at all while the commits' notes tell it."""
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

    # What the engine tells (engines.Listener) -------------------------------

    def heard(self, note: str | None) -> None:
        """Another connection committed; ``note`` is the one its store sent (see _Write.bump), if any."""
        self._note_change(_versions_in(note) if note is not None else {})

    def hearing(self, every_note: bool) -> None:
        """Whether every commit's note reaches this store from now on, with its version."""
        with self._changed:
            self._told = {} if every_note else None

    @staticmethod
    def fingerprint(conn: Connection) -> int:
        """The sum of every room's version: it moves with every change."""
        return conn.one("SELECT COALESCE(SUM(version), 0) AS total FROM rooms")["total"]

    # Internals -------------------------------------------------------------

    def _reading_room(self, room: str) -> threading.Lock:
        """The lock the pages reading ``room`` queue on, so that the first reads for all of them."""
        with self._reads:
            return self._room_reads.setdefault(room, threading.Lock())

    def _note_change(self, versions: dict[str, int | None]) -> None:
        """Count a change and wake whoever waits; ``versions``: rooms' new versions, None where unknown."""
        with self._changed:
            self._changes += 1
            if self._told is not None:
                for room, version in versions.items():
                    if version is None:
                        self._told.pop(room, None)
                    else:
                        self._told[room] = max(version, self._told.get(room, 0))
            self._changed.notify_all()

    @staticmethod
    def _with_text(conn: Connection, rows: list[dict]) -> list[Message]:
        if not rows:
            return []
        texts: dict[int, list[str]] = {row["id"]: [] for row in rows}
        for chunk in conn.rows(
            f"SELECT message_id, text FROM chunks WHERE message_id IN ({_placeholders(texts)}) "
            "ORDER BY message_id, seq",
            list(texts),
        ):
            texts[chunk["message_id"]].append(chunk["text"])
        return [Message(text="".join(texts[row["id"]]), **row) for row in rows]

    @staticmethod
    def _insert_message(conn: Connection, room: str, author: str, text: str) -> int:
        """A person's message, complete, with its text as its one chunk."""
        message_id = conn.one(
            "INSERT INTO messages (room, author, role, status, created_at, updated_at) "
            "VALUES (?, ?, 'user', 'complete', {now}, {now}) RETURNING id",
            [room, author],
        )["id"]
        conn.run("INSERT INTO chunks (message_id, seq, text) VALUES (?, 0, ?)", [message_id, text])
        return message_id

    @staticmethod
    def _insert_reply(conn: Connection, room: str, reply_to: int | None, owner: str, asker: str | None) -> int:
        return conn.one(
            "INSERT INTO messages (room, author, role, status, reply_to, created_at, updated_at, owner, asker) "
            "VALUES (?, ?, 'assistant', 'streaming', ?, {now}, {now}, ?, ?) RETURNING id",
            [room, ASSISTANT_NAME, reply_to, owner, asker],
        )["id"]

    def _within(self, conn: Connection, limits: ReplyLimits | None, owner: str, asker: str | None) -> None:
        """Raise unless ``limits`` allow one more reply; exclusive until the write commits, so none slips in."""
        if limits is None:
            return
        self.engine.exclusive(conn, LIMITS_LOCK)
        writing = conn.one(
            f"SELECT COUNT(*) AS n FROM messages WHERE status = 'streaming' AND (owner = ? OR {LAST_SIGN_SQL} > {{now}} - ?)",
            [owner, limits.stale_after_s],
        )["n"]
        asked = conn.one(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest, {now} AS now FROM messages "
            "WHERE asker = ? AND created_at > {now} - ?",
            [asker, RATE_WINDOW_S],
        )
        check_limits(limits, writing, asked["n"], asked["oldest"], asked["now"])

    @staticmethod
    def _append(conn: Connection, message_id: int, text: str) -> None:
        conn.run(
            "INSERT INTO chunks (message_id, seq, text) "
            "SELECT ?, COALESCE(MAX(seq) + 1, 0), ? FROM chunks WHERE message_id = ?",
            [message_id, text, message_id],
        )

    @staticmethod
    def _streaming_room(conn: Connection, message_id: int) -> str:
        """The reply's room; refuse if it is not streaming.

        It writes nothing (a sentence costs its chunk and the room's version,
        no more): the owner's heartbeats tell that the reply is alive. The row
        lock it takes where the engine has them (its ``lock``) puts concurrent
        appends to one reply in line.
        """
        row = conn.one("SELECT room FROM messages WHERE id = ? AND status = 'streaming'{lock}", [message_id])
        if row is None:
            raise NotStreaming(f"message {message_id} is not a streaming reply")
        return row["room"]


def _placeholders(values: Collection) -> str:
    return ", ".join("?" * len(values))
