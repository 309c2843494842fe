"""The reply worker: generates assistant replies outside any Streamlit script run.

A script run is stopped by every refresh tick, click or closed tab, so a reply
cannot be generated inside one. ``ReplyWorker`` (one per process, held in
``st.cache_resource``) runs each reply in a thread of its own that never calls
``st.*``:

    model.stream() --pump thread--> queue --reply thread--> LiveReply  (asker, per token)
                                                      \\--> SentenceChunker --> Store  (everyone, per sentence)

The pump thread only reads the model, so that a stop takes effect at once even
while the model is silent. The reply thread owns all writes for its reply and
always ends it in a final status.

Several processes (replicas) may share one database. Each worker's pulse
thread beats (Store.beat) from construction to shutdown, so that the others'
housekeeping never takes its replies for orphans, however long a model thinks;
and while the worker writes replies, it watches the store for stops requested
through any replica (Store.request_stop) and ends those replies as a local
Stop does.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import NamedTuple

from chunker import SentenceChunker
from llm import CONTEXT_MESSAGES, MENTION, THINKING, Finished, Model, ModelError, TimedOut, Usage, build_context
from store import (
    BEAT_EVERY_S,
    INTERRUPTED_NOTE,
    PROCESS,
    STALE_AFTER_S,
    AskingTooFast,
    DatabaseUnavailable,
    Message,
    NotStreaming,
    ReplyLimits,
    Store,
    TooManyReplies,
    check_name,
    check_room,
    check_text,
)

log = logging.getLogger(__name__)

KEEP_FINISHED = 200  # finished replies kept in memory for late followers and stats
TIDY_EVERY_S = 10.0  # housekeeping: a dead replica's replies end interrupted within STALE_AFTER_S + this
STOP_WAIT_S = 0.5  # while replies are written: the longest between two checks for stop requests ...
STOP_GAP_S = 0.1  # ... and the shortest, however often the database changes
WRITE_ATTEMPTS = 3  # each attempt already waits up to the store's busy timeout
FINAL_WRITE_ATTEMPTS = 12  # the final status matters most: about a minute of locks
_CANCEL_NOTES = {"interrupted": INTERRUPTED_NOTE}
SAVE_FAILED_NOTE = "This reply could not be saved completely."
UNEXPECTED_NOTE = "Something went wrong while writing this reply."

_END = object()  # the model finished
_CANCEL = object()  # someone pressed stop, or the server is shutting down


class Posted(NamedTuple):
    message: Message
    reply: LiveReply | None  # set when the message asked @gpt


class ReplyRefused(Exception):
    """The worker will not start a reply now; str(error) is for people."""


class Busy(ReplyRefused):
    pass


class SlowDown(ReplyRefused):
    pass


@dataclass
class ReplyStats:
    """Figures for one reply, and what two other ways of persisting it would cost."""

    tokens: int = 0  # pieces received from the model
    chunks: int = 0  # text chunks persisted
    commits: int = 0  # write transactions, including start and finish
    bytes_written: int = 0  # text bytes handed to SQLite by this store
    seed_bytes: int = 0  # ... by rewriting the whole text at every sentence
    per_token_bytes: int = 0  # ... by rewriting the whole text at every token
    text_bytes: int = 0  # size of the reply so far

    def __add__(self, other: ReplyStats) -> ReplyStats:
        return ReplyStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class LiveReply:
    """A reply being generated: the text so far, for followers, and its outcome."""

    def __init__(self, message_id: int, room: str, asker: str):
        self.message_id = message_id
        self.room = room
        self.asker = asker
        self.stats = ReplyStats()
        self.usage: Usage | None = None  # as the provider reported it, at the end
        self.thinking = False  # the model has shown signs of reasoning
        self.started_at = time.time()
        self.status = "streaming"
        self.error: str | None = None
        self._pieces: list[str] = []
        self._length = 0
        self._changed = threading.Condition()
        self._cancelled = threading.Event()
        self._cancel_status = "stopped"
        self._wake: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def done(self) -> bool:
        return self.status != "streaming"

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def text(self) -> str:
        with self._changed:
            return "".join(self._pieces)

    def wait(self, seen: int, timeout: float) -> tuple[str, bool]:
        """Block until there is more than ``seen`` characters, the end, or ``timeout``.

        Returns the whole text so far and whether the reply is done.
        """
        with self._changed:
            self._changed.wait_for(lambda: self._length > seen or self.done, timeout)
            return "".join(self._pieces), self.done

    def follow(self, timeout: float = 0.05) -> Iterator[str]:
        """The whole text so far, again each time it grows, until the reply ends."""
        seen = -1
        while True:
            text, done = self.wait(seen, timeout)
            if len(text) != seen:
                seen = len(text)
                yield text
            if done:
                return

    def cancel(self, status: str = "stopped") -> None:
        """Stop generating; the text so far is kept and the reply ends with ``status``."""
        if not self._cancelled.is_set():
            self._cancel_status = status
            self._cancelled.set()
        self._wake.put(_CANCEL)

    def _add(self, piece: str) -> None:
        with self._changed:
            self._pieces.append(piece)
            self._length += len(piece)
            self._changed.notify_all()

    def _end(self, status: str, error: str | None) -> None:
        with self._changed:
            self.status, self.error = status, error
            self._changed.notify_all()


class ReplyWorker:
    """Starts, tracks and limits assistant replies for the whole process.

    ``owner`` tags the replies it writes and its heartbeat, one per replica;
    a replica that has not beaten for ``stale_after_s`` counts as gone. The
    limits (``max_concurrent`` replies being written, ``replies_per_minute``
    per asker) hold across every replica on the database: the store counts
    them as it stores each new reply.
    """

    final_write_attempts = FINAL_WRITE_ATTEMPTS

    def __init__(
        self,
        store: Store,
        model: Model,
        system_prompt: str,
        max_concurrent: int = 4,
        replies_per_minute: int = 5,
        idle_timeout_s: float = 30.0,
        first_token_timeout_s: float = 120.0,
        chunker: Callable[[], SentenceChunker] = SentenceChunker,
        owner: str = PROCESS,
        stale_after_s: float = STALE_AFTER_S,
        beat_every_s: float = BEAT_EVERY_S,
    ):
        self.store = store
        self.model = model
        self.system_prompt = system_prompt
        self.limits = ReplyLimits(max_concurrent, replies_per_minute, stale_after_s)
        self.idle_timeout_s = idle_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self._chunker = chunker
        self._lock = threading.Lock()
        self._starting = 0  # slots held by post() and ask() before the thread exists
        self._active: dict[int, tuple[LiveReply, threading.Thread]] = {}
        self._finished: OrderedDict[int, LiveReply] = OrderedDict()
        self._closed = False
        self._unsaved_ends: list[Callable[[], None]] = []  # final writes to try again
        self.totals = ReplyStats()
        self.owner = owner
        self.beat_every_s = beat_every_s
        self._stirred = threading.Condition(self._lock)  # a reply started or ended, or shutdown: wakes the threads below
        self._beat()  # before any reply of this owner exists, so that none is judged as an owner's that never beat
        self._pulse_thread = threading.Thread(target=self._pulse, name="reply-worker-pulse", daemon=True)
        self._pulse_thread.start()

    # Public ------------------------------------------------------------------

    def post(self, room: str, author: str, text: str, asker: str | None = None) -> Posted:
        """Store a person's message and, if it mentions @gpt, start the reply to it.

        Raises InvalidInput or ReplyRefused with nothing stored. ``asker`` is
        who the rate limit counts against (default: the author).
        """
        room, author, text = check_room(room), check_name(author), check_text(text)
        if not MENTION.search(text):
            return Posted(self.store.add_message(room, author, text), None)
        asker = asker or author
        with self._slot(), _refusals():
            question, message = self.store.add_question(
                room, author, text, owner=self.owner, asker=asker, limits=self.limits
            )
        return Posted(question, self._launch(message, asker))

    def ask(self, room: str, asker: str, reply_to: int | None = None) -> LiveReply:
        """Start a reply to message ``reply_to`` (a retry), or raise ReplyRefused."""
        with self._slot(), _refusals():
            message = self.store.start_reply(
                check_room(room), reply_to, owner=self.owner, asker=asker, limits=self.limits
            )
        return self._launch(message, asker)

    def stop(self, message_id: int) -> bool:
        """Stop a reply being written, keeping its text: at once if this replica writes it,
        else through the store, for the replica that does (within a second).

        False if the reply is not being written any more.
        """
        return self._stop_here(message_id) or self.store.request_stop(message_id)

    def get(self, message_id: int) -> LiveReply | None:
        """The live (or recently finished) reply for a message, if this process has it."""
        with self._lock:
            if message_id in self._active:
                return self._active[message_id][0]
            return self._finished.get(message_id)

    def active(self) -> list[LiveReply]:
        with self._lock:
            return [reply for reply, _ in self._active.values()]

    def latest(self, room: str) -> LiveReply | None:
        """The newest reply in the room that this process has seen, live or finished."""
        with self._lock:
            replies = [reply for reply, _ in self._active.values()] + list(self._finished.values())
        in_room = [reply for reply in replies if reply.room == room]
        return max(in_room, key=lambda reply: reply.message_id, default=None)

    def shutdown(self, timeout: float = 10.0) -> bool:
        """End every reply as interrupted and wait for each to be stored; True if all ended in time.

        Then the heartbeat stops and this replica's row is removed.
        """
        with self._lock:
            self._closed = True
            running = list(self._active.values())
            self._stirred.notify_all()
        for reply, _ in running:
            reply.cancel("interrupted")
        deadline = time.monotonic() + timeout
        for _, thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._pulse_thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for _, thread in running)

    def shutdown_with_process(self, timeout: float = 5.0) -> None:
        """Call shutdown() when the main thread ends (Streamlit's on SIGTERM or Ctrl-C).

        Python waits for non-daemon threads, such as the reply threads, before it
        exits; without this a long reply would hold the process up, and with
        daemon threads it would be cut off unrecorded.
        """

        def watch() -> None:
            threading.main_thread().join()
            self.shutdown(timeout)

        threading.Thread(target=watch, name="reply-worker-exit", daemon=True).start()

    def start_housekeeping(self, interval_s: float = TIDY_EVERY_S) -> None:
        """Every ``interval_s``: retry final writes that failed, and mark replies
        of replicas that died (see Store.recover_interrupted) as interrupted."""

        def tidy() -> None:
            while True:
                with self._lock:
                    if self._stirred.wait_for(lambda: self._closed, interval_s):
                        return
                self.tidy()

        threading.Thread(target=tidy, name="reply-worker-housekeeping", daemon=True).start()

    def tidy(self) -> None:
        with self._lock:
            pending, self._unsaved_ends = self._unsaved_ends, []
        for finish in pending:
            try:
                finish()
            except NotStreaming:
                pass  # already final
            except Exception:
                with self._lock:
                    self._unsaved_ends.append(finish)
        try:
            self.store.recover_interrupted(self.limits.stale_after_s, owner=self.owner)
        except Exception:
            log.exception("could not check for interrupted replies")

    # The pulse thread ----------------------------------------------------------

    def _pulse(self) -> None:
        """Beat every beat_every_s; while replies are written, end those asked to stop.

        With no reply being written it only beats, waiting in between for a
        reply to start. It retires once shutdown has ended every reply.
        """
        next_beat = time.monotonic() + self.beat_every_s
        while True:
            if time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + self.beat_every_s
            with self._lock:
                if self._closed and not self._active:
                    break
                self._stirred.wait_for(lambda: self._active or self._closed, max(0.0, next_beat - time.monotonic()))
                writing = list(self._active)
            if writing:
                self._end_stopped(writing, until=next_beat)
        try:
            self.store.retire(self.owner)
        except Exception:
            log.warning("could not remove replica %s from the database", self.owner, exc_info=True)

    def _end_stopped(self, message_ids: list[int], until: float) -> None:
        """Stop those of ``message_ids`` someone asked to stop, then wait for the database to change.

        A request made through any replica changes the database, which wakes
        the wait: at once on PostgreSQL (LISTEN/NOTIFY), within engines.sqlite.WATCH_S on
        SQLite; STOP_WAIT_S bounds it should a notification be lost, and so
        does ``until`` (time.monotonic()), the next heartbeat.
        """
        seen = self.store.changes()
        checked_at = time.monotonic()
        try:
            stopped = self.store.stop_requested(message_ids)
        except Exception:
            log.warning("could not check for requests to stop replies", exc_info=True)
            stopped = set()
        for message_id in stopped:
            self._stop_here(message_id)
        self.store.wait_for_change(seen, max(0.0, min(STOP_WAIT_S, until - time.monotonic())))
        time.sleep(max(0.0, min(STOP_GAP_S - (time.monotonic() - checked_at), until - time.monotonic())))

    def _stop_here(self, message_id: int) -> bool:
        """Stop the reply as its Stop button does, if this replica writes it; False if not."""
        with self._lock:
            held = self._active.get(message_id)
        if held is None:
            return False
        held[0].cancel("stopped")
        return True

    def _beat(self) -> None:
        try:
            self.store.beat(self.owner)
        except Exception:
            log.warning("replica %s could not beat; trying again in %g s", self.owner, self.beat_every_s, exc_info=True)

    # Limits ------------------------------------------------------------------

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """Hold a reply slot while the reply is stored, or raise Busy.

        This process's own count is a first check; the store's, over every
        replica, decides (see _refusals). _launch takes the slot over; a
        failure gives it back.
        """
        with self._lock:
            if self._closed:
                raise Busy("The server is restarting; please ask again in a moment.")
            if len(self._active) + self._starting >= self.limits.max_concurrent:
                raise Busy(_busy_note(self.limits.max_concurrent))
            self._starting += 1
        try:
            yield
        except BaseException:
            with self._lock:
                self._starting -= 1
            raise

    def _launch(self, message: Message, asker: str) -> LiveReply:
        """Start the thread for a stored, empty reply, in the slot _slot took.

        From here on the reply always ends in a final status: if the thread
        cannot start, it is ended here.
        """
        reply = LiveReply(message.id, message.room, asker)
        reply.stats.commits = 1
        thread = threading.Thread(
            target=self._run,
            args=(reply, message.reply_to),
            name=f"reply-{message.id}",
            # Not a daemon (Streamlit's script threads are, and would pass it on):
            # Python waits for it at exit, so the reply is always stored.
            daemon=False,
        )
        with self._lock:
            self._starting -= 1
            self._active[message.id] = (reply, thread)
            self._stirred.notify_all()
        try:
            thread.start()
        except BaseException:
            log.exception("reply %s could not start", message.id)
            self._end(reply, "error", UNEXPECTED_NOTE, "")
        return reply

    def _context(self, reply: LiveReply, reply_to: int | None) -> list[dict[str, str]]:
        """What the model sees: the room up to the question, without failed replies."""
        history = [
            m
            for m in self.store.recent(reply.room, limit=CONTEXT_MESSAGES * 3)
            if m.id != reply.message_id
            and (reply_to is None or m.id <= reply_to)
            and (m.role == "user" or m.status in ("complete", "truncated"))
        ]
        return build_context(history[-CONTEXT_MESSAGES:], self.system_prompt)

    # The reply thread ----------------------------------------------------------

    def _run(self, reply: LiveReply, reply_to: int | None) -> None:
        chunker = self._chunker()
        unsaved = ""  # text a failed write could not store; retried with the last chunk
        status, note = "error", UNEXPECTED_NOTE  # until we know better
        stream = None
        try:
            stream = self.model.stream(self._context(reply, reply_to))
            pump = threading.Thread(
                target=_pump,
                args=(stream, reply._wake, reply._cancelled),
                name=f"reply-{reply.message_id}-model",
                daemon=True,  # it only reads; the reply thread does every write
            )
            pump.start()
            cut_short = False  # the provider stopped at the token budget
            while True:
                # A wall clock of its own, for the silence allowed before the
                # first word and then between words: keep-alive comments (and
                # chunks with nothing in them) keep the HTTP stream open but
                # never reach this queue, so they do not count as life.
                silence = self.idle_timeout_s if reply._length else self.first_token_timeout_s
                try:
                    item = reply._wake.get(timeout=silence)
                except queue.Empty:
                    reply._cancelled.set()  # the pump closes the stream when it wakes
                    raise TimedOut(f"The model sent nothing for {silence:g} seconds, so the reply was ended.") from None
                if item is _CANCEL or reply.cancelled:
                    status, note = reply._cancel_status, _CANCEL_NOTES.get(reply._cancel_status)
                    break
                if item is _END:
                    status, note = ("truncated", None) if cut_short else ("complete", None)
                    break
                if isinstance(item, BaseException):
                    raise item
                if item is THINKING:
                    reply.thinking = True
                    continue
                if isinstance(item, Usage):
                    reply.usage = item
                    continue
                if isinstance(item, Finished):
                    cut_short = item.reason == "length"
                    continue
                reply._add(item)
                _count_token(reply.stats, item)
                for chunk in chunker.feed(item):
                    unsaved += chunk
                    self._write(reply, lambda: self.store.append_chunk(reply.message_id, unsaved))
                    _count_chunk(reply.stats, unsaved)
                    unsaved = ""
        except ModelError as error:
            status, note = "error", str(error)
        except BaseException:
            log.exception("reply %s failed", reply.message_id)
            raise
        finally:
            reply._cancelled.set()  # whatever ended the reply, the pump stops reading
            _interrupt(stream)
            self._end(reply, status, note, unsaved + chunker.flush())

    def _end(self, reply: LiveReply, status: str, note: str | None, rest: str) -> None:
        """Store the final status with the text not yet stored, then free the slot."""
        try:
            self._write(
                reply,
                lambda: self.store.finish_reply(reply.message_id, status, note, last_chunk=rest, usage=reply.usage),
                attempts=self.final_write_attempts,
            )
            if rest:
                _count_chunk(reply.stats, rest)
        except Exception:
            # The row stays `streaming` for now; housekeeping tries again later.
            log.exception("reply %s could not be saved", reply.message_id)
            with self._lock:
                self._unsaved_ends.append(
                    functools.partial(
                        self.store.finish_reply, reply.message_id, status, note, last_chunk=rest, usage=reply.usage
                    )
                )
            status, note = "error", SAVE_FAILED_NOTE
        with self._lock:
            self._active.pop(reply.message_id, None)
            self._stirred.notify_all()
            self._finished[reply.message_id] = reply
            while len(self._finished) > KEEP_FINISHED:
                self._finished.popitem(last=False)
            self.totals = self.totals + reply.stats
        reply._end(status, note)  # last: a follower that sees it done finds the slot free

    @staticmethod
    def _write(reply: LiveReply, write: Callable[[], None], attempts: int = WRITE_ATTEMPTS) -> None:
        """One store write, retried while the database stays locked past its busy timeout."""
        for attempt in range(attempts):
            try:
                write()
                reply.stats.commits += 1
                return
            except DatabaseUnavailable:  # SQLite locked past its busy timeout, PostgreSQL unreachable
                if attempt == attempts - 1:
                    raise
                log.warning("reply %s: database busy or unreachable, retrying", reply.message_id)
                time.sleep(min(0.2 * (attempt + 1), 2.0))


def _busy_note(limit: int) -> str:
    return f"The assistant is already writing {limit} replies; please ask again when one has finished."


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """The store's refusals of a new reply, as messages for people."""
    try:
        yield
    except TooManyReplies as error:
        raise Busy(_busy_note(error.limit)) from None
    except AskingTooFast as error:
        raise SlowDown(
            f"You can ask the assistant {error.limit} times a minute; please wait {max(1, round(error.wait_s))} s."
        ) from None


def _interrupt(stream) -> None:
    """Close a model stream from outside the thread reading it, where it allows that.

    An OpenAIStream does; a plain generator cannot be closed while another thread
    runs it, and closes itself when the pump notices the cancellation.
    """
    if stream is not None and not inspect.isgenerator(stream):
        stream.close()


def _pump(stream: Iterator[str], out: queue.SimpleQueue, cancelled: threading.Event) -> None:
    """Read the model's stream into ``out``; close it (and its HTTP stream) on stop."""
    try:
        for piece in stream:
            if cancelled.is_set():
                return
            if piece:
                out.put(piece)
        out.put(_END)
    except BaseException as error:  # handed to the reply thread, which decides
        out.put(error)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _count_token(stats: ReplyStats, piece: str) -> None:
    stats.tokens += 1
    stats.text_bytes += len(piece.encode())
    stats.per_token_bytes += stats.text_bytes


def _count_chunk(stats: ReplyStats, chunk: str) -> None:
    stats.chunks += 1
    stats.bytes_written += len(chunk.encode())
    stats.seed_bytes += stats.bytes_written
