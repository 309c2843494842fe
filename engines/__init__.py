"""What a database engine supplies to the store, and the plumbing every engine shares.

``store.py`` holds the chat's rules (what is stored, limits, validation,
statuses, migrations, the change counter) and writes each verb once, in SQL
that every engine runs. An engine supplies only what differs between
databases:

- connecting and transactions: ``connection()`` for reads (each statement
  commits on its own) and ``transaction()`` for one write that commits whole;
- the dialect: its placeholder (``param``), its clock as SQL (``now``), how a
  SELECT locks the rows it reads until the commit (``lock``), the
  name that picks a migration's statement (``name``), ``exclusive(conn, key)``
  (no other transaction passes the same key until this one commits) and
  ``notify(conn, note)`` (a note delivered to the listeners with the commit);
- hearing other processes' commits: ``watch(listener)`` (see Listener);
- its driver's errors that mean "the database cannot be reached or used now",
  raised as DatabaseUnavailable with a message safe to show (no password).

The store's SQL is written once, with ``?`` for each parameter, ``{now}``
for the database's clock and ``{lock}`` after a SELECT whose rows it locks;
``Connection`` turns it into the engine's dialect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol


class StoreError(Exception):
    """Something the store refused, or could not do."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached or opened now; the message says which, without secrets."""


class Listener(Protocol):
    """Whom an engine tells of the commits of other connections and processes (the store)."""

    def heard(self, note: str | None) -> None:
        """Something was committed: ``note`` is what its writer sent with notify(), None where unknown."""

    def hearing(self, every_note: bool) -> None:
        """From now on, every commit's note arrives (True), or not any more (False)."""

    def fingerprint(self, conn: Connection) -> object:
        """A value that changes whenever the data does, for engines that must poll."""


class Connection:
    """One connection of an engine, with the three ways the store runs SQL."""

    def __init__(self, engine: Engine, raw):
        self.engine = engine
        self.raw = raw  # the driver's own connection

    def rows(self, sql: str, params: Sequence = ()) -> list[dict]:
        cursor = self.raw.execute(self.engine.dialect(sql), list(params))
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def one(self, sql: str, params: Sequence = ()) -> dict | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: Sequence = ()) -> int:
        """Run a statement; the number of rows it changed."""
        return self.raw.execute(self.engine.dialect(sql), list(params)).rowcount


class Engine:
    """The primitives the store is written over; each engine overrides the hooks, never the store's flow."""

    name: str  # which of a migration's statements this engine runs
    location: str  # the file or URL it was opened with
    param: str  # the driver's placeholder for a parameter
    now: str  # the database's clock, in epoch seconds, as an SQL expression
    lock: str = ""  # what follows a SELECT to lock its rows until the commit ("" where a write locks it all)

    def __init__(self) -> None:
        self._dialects: dict[str, str] = {}

    def describe(self) -> str:
        """Which database this is, as a person may see it (never a password)."""
        raise NotImplementedError

    def dialect(self, sql: str) -> str:
        """The store's SQL (``?`` parameters, ``{now}``, ``{lock}``) in this engine's dialect."""
        translated = self._dialects.get(sql)
        if translated is None:
            translated = sql.format(now=self.now, lock=self.lock)
            if self.param != "?":
                translated = translated.replace("%", "%%").replace("?", self.param)
            self._dialects[sql] = translated
        return translated

    def connection(self) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def exclusive(self, conn: Connection, key: int) -> None:
        """Until ``conn``'s transaction commits, no other transaction passes exclusive() with ``key``."""
        raise NotImplementedError

    def notify(self, conn: Connection, note: str) -> None:
        """Send ``note`` to every listener when ``conn``'s transaction commits (if the engine carries notes)."""

    def watch(self, listener: Listener) -> None:
        """Start telling ``listener`` of other processes' commits, until it is gone or the engine closed."""
        raise NotImplementedError

    def close(self) -> None:
        """Close connections and stop watching."""


@contextlib.contextmanager
def reraised(errors: tuple[type[BaseException], ...], message) -> Iterator[None]:
    """Raise ``errors`` as DatabaseUnavailable(message(error)), the driver's traceback left out."""
    try:
        yield
    except errors as error:
        raise DatabaseUnavailable(message(error)) from None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
