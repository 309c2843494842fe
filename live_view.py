"""The live area: what keeps a page current inside Streamlit's run model.

app.py draws the settled history in a full run of the script; ``live_area``, a
fragment, draws everything newer (the replies being written, and the asker's
own reply token by token from the worker's memory) and keeps it current in a
loop: it waits for the room to change and redraws only the messages that
changed.

Each rule below comes from a behaviour of Streamlit (1.67) or of the refresh
trigger; the test after it fails if a release changes that behaviour.

1. A refresh tick, a click or a closed tab stops a script run at its next
   ``st.*`` call. So no reply is written inside a run: the worker writes them
   in threads, and this module only draws what the worker and the store hold.
   (tests/test_faults.py::test_closing_the_tab_mid_reply_still_completes_it_for_everyone)
2. A new run drops whatever the previous, finished run had not yet handed to
   the browser, which under load can be most of a page. So a fragment run of
   ``live_area`` does not end while the page is open, and a full run follows
   the room for FULL_RUN_FOLLOWS_S before it ends, long enough for the browser
   to have its messages.
   (tests/test_browser.py::test_asking_right_after_sending_a_message_keeps_the_whole_history_on_the_page)
3. ``st_autorefresh`` inside a fragment reruns only the fragment, and ticks
   that arrive while a run goes on wait behind it. The full run's steady ticks
   hand the page over to a fragment run; after that the trigger stays quiet
   (a limit its count has passed). The trigger keeps one place in the page,
   or its iframe is loaded anew (82 KB of script).
   (tests/test_browser.py::test_the_refresh_trigger_is_loaded_once_while_replies_come_and_settle,
   tests/test_wire.py::test_a_message_sent_with_a_refresh_tick_is_answered_by_the_whole_page)
4. Streamlit clears what a run did not draw only when the run finishes. A run
   that does not finish draws over every place an earlier run of this
   session filled (``Places.cover``).
   (tests/test_browser.py::test_stop_keeps_the_partial_text_for_everyone)
5. A widget's event waits behind a running fragment run, so the live area
   holds no widget. Stop is drawn by the full run, outside it, and shown by
   the page's CSS only while the live area holds a container keyed
   ``my-reply-<id>`` (Streamlit gives a keyed container the class
   ``st-key-<key>``); a failed reply is folded into the settled history, with
   its Retry button, as soon as nothing before it is still being written.
   (tests/test_browser.py::test_the_asker_re_attaches_after_a_rerun_and_after_a_reload,
   tests/test_browser.py::test_provider_error_shows_a_short_note_and_no_traceback)
6. A person's action stops a running run at its next ``st.*`` call, a read of
   ``st.session_state`` included: the loop makes one on every turn, so a click
   or a message is handled within WAIT_S.
   (tests/test_faults.py::test_stop_clicked_twice_and_a_second_question_while_streaming)
7. Streamlit sends an element whole, and its send queue replaces an unsent
   delta for an element by a newer one. So a reply is drawn as one element per
   Markdown block, each block drawn whole, and only the last one redrawn as it
   grows (``BlockView``): bytes to the browser stay linear in the reply.
   (tests/test_wire.py::test_a_long_reply_costs_its_readers_bytes_in_proportion_to_its_length,
   tests/test_browser.py::test_a_reply_drawn_block_by_block_ends_exactly_as_the_whole_text_renders)
8. ``st.rerun(<fragment key>)`` from a callback runs only that fragment: a
   message that asks @gpt reruns only the live area, so the first token is not
   queued behind a redraw of the room (bench/asker_latency.py measures it).
   (tests/test_wire.py::test_asking_resends_only_the_live_area_not_the_room)
9. Under AppTest there is no browser (``st.context.headers`` is empty) and a
   run is awaited to its end: the live area returns once the asker's own reply
   has ended, and otherwise at once.
   (tests/test_app.py::test_a_gpt_mention_gets_a_completed_reply)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable

import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit_autorefresh import st_autorefresh

from look import CURSOR, author_line, bubble_for, note_for, retryable, stats_parts, thinking
from markup import defines_references, safe_markdown, split_blocks
from store import Message, Store, StoreError
from worker import LiveReply, ReplyWorker

LIVE_MESSAGES = 100  # the most the live area draws
FULL_RUN_FOLLOWS_S = 2.0  # how long a full run follows the room before it ends
HANDOVER_TICK_MS = 1_000  # a full run's refresh tick, which starts live_area's fragment run
FRAME_S = 0.05  # at most one redraw of the asker's streaming reply per 50 ms
ROOM_FRAME_S = 0.25  # at most one redraw of the room per 250 ms, for a page waiting on it
WAIT_S = 0.5  # the longest live_area waits before it lets Streamlit stop it
RETRY_S = 3.0  # how long live_area waits before it tries an unreachable database again
FOLD_AT = 10  # settled messages the live area holds before the page takes them over, once the room is quiet
FOLD_QUIET_S = 3.0  # how long nothing must change first: a fold redraws the page, which delays the next message
FOLD_ANYWAY_AT = 40  # ... unless the live area holds this many
STATS_EVERY_S = 1.0  # the sidebar's figures for a reply being written: redrawn at most this often
LIVE_BLOCK_BYTES_PER_S = 20_000  # the most a block still being written is sent, per second
LIVE_KEY = "live"  # the fragment's key: st.rerun(LIVE_KEY) reruns only the live area
STOP_KEY = "stop"  # the Stop button's key, which the page's style shows and hides
PAGE_STYLE = f"""<style>
/* The refresh trigger is an invisible iframe, and the flag for this tab's own
   live reply holds nothing to see; keep them from adding a gap to the page. */
.st-key-refresh-trigger, [class*="st-key-my-reply-"] {{ position: absolute; width: 0; height: 0; overflow: hidden; }}
/* Stop is drawn by every full run, outside live_area, and shown only while
   live_area holds this tab's own reply, which may start in a fragment run. */
.stApp:not(:has([class*="st-key-my-reply-"])) .st-key-{STOP_KEY} {{ display: none; }}
/* It floats above the chat input, where it stays put while the reply grows. */
.st-key-{STOP_KEY} {{ position: fixed; bottom: 6.5rem; left: 50%; transform: translateX(-50%); z-index: 100; width: auto; }}
</style>"""


def my_live_reply(worker: ReplyWorker, room: str, tab: str) -> LiveReply | None:
    """The newest reply this tab asked for that this process is writing, if any."""
    mine = [r for r in worker.active() if r.room == room and r.asker == tab]
    return max(mine, key=lambda r: r.message_id, default=None)


def writing_for(messages: Iterable[Message], tab: str) -> int | None:
    """The newest of ``messages`` being written for this tab, by any replica."""
    return max((m.id for m in messages if m.status == "streaming" and m.asker == tab), default=None)


def stoppable(worker: ReplyWorker, room: str, tab: str) -> int | None:
    """The reply Stop stops: this tab's newest being written here, else by another replica
    (which stops it when it sees the request in the database)."""
    mine = my_live_reply(worker, room, tab)
    return mine.message_id if mine else writing_for(worker.store.recent(room, LIVE_MESSAGES), tab)


def draw_live_area(
    store: Store, worker: ReplyWorker, room: str, name: str, tab: str,
    after_id: int, questions: dict[int, Message], stats_place: DeltaGenerator,
) -> None:
    """The live area, in the page's full run: it follows the room for FULL_RUN_FOLLOWS_S, then a
    fragment run of its own takes over (rules 2 and 3)."""
    until = time.time() + FULL_RUN_FOLLOWS_S
    st.session_state.full_run_until = until
    live_area(store, worker, room, name, tab, after_id, questions, stats_place, until)


def rerun_after_asking() -> None:
    """From a callback that started a reply: rerun only the live area, so the first token is not
    queued behind a redraw of the room (rule 8); but not while the page's full run may still be
    handing its messages to the browser, which a new run would drop (rule 2)."""
    if time.time() > st.session_state.get("full_run_until", float("inf")):
        st.rerun(LIVE_KEY)


@st.fragment(key=LIVE_KEY)
def live_area(
    store: Store, worker: ReplyWorker, room: str, name: str, tab: str,
    after_id: int, questions: dict[int, Message], stats_place: DeltaGenerator, until: float,
) -> None:
    """Everything newer than message ``after_id``, kept up to date.

    Inside the full run that drew the page it returns at ``until``; as a
    fragment run (later, so ``until`` has passed) it ends only by folding what
    has settled into the page with a full run, or when Streamlit stops it
    because the person did something. While the database cannot be reached,
    it says so and starts again every few seconds: no tick would start it.
    """
    trouble = st.empty()  # a fixed place, which the next run empties
    try:
        follow_room(store, worker, room, name, tab, after_id, questions, stats_place, until)
    except StoreError:
        trouble.warning("The chat database cannot be reached just now; trying again…")
        time.sleep(RETRY_S)
        st.rerun(scope="fragment")


def follow_room(
    store: Store, worker: ReplyWorker, room: str, name: str, tab: str,
    after_id: int, questions: dict[int, Message], stats_place: DeltaGenerator, until: float,
) -> None:
    """live_area's run: draw what is newer than ``after_id`` and keep it up to date."""
    full_run = time.time() < until
    with st.container(key="refresh-trigger"):
        # Steady ticks (no debounce) while a full run follows the room: they
        # queue behind it and carry on in a run of this fragment. Then none:
        # the page sends whatever the person does in the same moment as a
        # tick together with it, as a run of this fragment, which would wait
        # behind this run, which does not end.
        st_autorefresh(interval=HANDOVER_TICK_MS, limit=None if full_run else 1, debounce=False, key="refresh")
    tail = Tail(Places(st.container(), "live_places"), name, questions)
    in_browser = bool(st.context.headers)
    changes = store.changes()
    # Every page of the room wakes at each change: the reads are shared (cached_*).
    version, seen, following, followed = store.cached_version(room), None, None, False
    changed_at = time.monotonic()
    stats = StatsPanel(stats_place)
    while True:
        mine = my_live_reply(worker, room, tab)
        if version != seen or (mine and mine.message_id) != following:
            seen, following = version, mine and mine.message_id
            tail.update(store.cached_recent(room, LIVE_MESSAGES, after_id, version), mine)
            tail.places.cover()
            changed_at = time.monotonic()
        else:
            tail.tick(mine)
        tail.mark_mine(mine.message_id if mine else writing_for(tail.messages.values(), tab))
        if tail.worth_folding(quiet_s=time.monotonic() - changed_at):
            st.rerun()  # a full run draws them as settled history, with any Retry buttons
        stats.show(worker.latest(room))
        if mine is not None:
            tail.follow(mine)
            followed = True
        elif not in_browser:
            if followed:
                st.rerun()  # AppTest shows the page a full run draws
            return
        elif full_run and time.time() >= until:
            return  # the full run ends; the tick queued meanwhile carries on in a fragment run
        else:
            # Changes that come close together are drawn together: while
            # replies are written, every page in the room would otherwise
            # wake at each of their sentences, all at once.
            timeout = min(WAIT_S, until - time.time()) if full_run else WAIT_S
            rest = max(0.0, min(timeout, changed_at + ROOM_FRAME_S - time.monotonic()))
            time.sleep(rest)
            store.wait_for_change(changes, timeout - rest)
        if store.changes() != changes:
            changes = store.changes()
            version = store.cached_version(room)
        st.session_state.get("notice")  # a point where Streamlit can stop this run (rule 6)


class Places:
    """Places for messages in a container, taken in order: each an ``st.empty()``
    to draw over (``take``), or what is drawn there at once (``put``).

    Once a run has drawn what it has, ``cover()`` empties the places this
    session's earlier runs filled beyond (rule 4). It comes last, so that a
    run cut short leaves the earlier run's messages in place rather than
    empty places.
    """

    def __init__(self, container: DeltaGenerator, key: str):
        self.container = container
        self.key = key
        self.places: list[DeltaGenerator] = []
        self.taken = 0

    def take(self) -> DeltaGenerator:
        return self.put(lambda place: place.empty())

    def put(self, draw: Callable[[DeltaGenerator], DeltaGenerator]) -> DeltaGenerator:
        """What ``draw(place)`` draws on the next place: exactly one element or block,
        which it returns. A new place is not first drawn empty: one message to the
        browser instead of two."""
        if self.taken < len(self.places):  # a place cover() drew empty
            drawn = draw(self.places[self.taken])
        else:
            drawn = draw(self.container)  # the container's next element
            self.places.append(drawn)
            if len(self.places) > st.session_state.get(self.key, 0):
                st.session_state[self.key] = len(self.places)
        self.taken += 1
        return drawn

    def cover(self) -> None:
        with self.container:
            while len(self.places) < st.session_state.get(self.key, 0):
                self.places.append(st.empty())


class StatsPanel:
    """The sidebar's figures for the room's latest reply, kept current from the live area.

    While a reply is written they are redrawn at most once a second, as the
    panel is several times the size of a sentence; when it ends, at once.
    Only the parts that changed are sent again (look.stats_parts).
    """

    def __init__(self, place: DeltaGenerator):
        self.place = place
        self.shown: tuple | None = ()  # never (): the first show() draws
        self.drawn_at = 0.0
        self.places: list[DeltaGenerator] = []
        self.parts: list[tuple[str, str] | None] = []

    def show(self, reply: LiveReply | None) -> None:
        figures = reply and (reply.message_id, reply.done, reply.stats.chunks)
        if figures == self.shown:
            return
        if figures and self.shown and figures[:2] == self.shown[:2] and time.monotonic() - self.drawn_at < STATS_EVERY_S:
            return  # the same reply, still being written, drawn less than a second ago
        parts = stats_parts(reply)
        if not self.places:
            with self.place.container():
                self.places = [self._draw(st, part) for part in parts]
        else:
            for index, part in enumerate(parts):
                if part != self.parts[index]:
                    self._draw(self.places[index], part)
        self.parts = parts
        self.shown, self.drawn_at = figures, time.monotonic()

    @staticmethod
    def _draw(place, part: tuple[str, str] | None) -> DeltaGenerator:
        if part is None:
            return place.empty()
        kind, text = part
        return place.markdown(text) if kind == "markdown" else place.caption(text)


class Tail:
    """The live area's messages, each a Bubble in a place of its own, updated in place."""

    def __init__(self, places: Places, name: str, questions: dict[int, Message]):
        # A fixed place first: while this tab's own reply is live it holds an
        # empty container keyed my-reply-<id>, which the page's CSS shows Stop for.
        self.flag = places.take()
        self.places = places
        self.name = name
        self.questions = dict(questions)
        self.messages: dict[int, Message] = {}  # the newest stored version of each, in the room's order
        self.shown: dict[int, Message] = {}  # the stored version each bubble shows, if it shows one
        self.bubbles: dict[int, Bubble] = {}
        self.mine_id: int | None = None

    def update(self, messages: list[Message], mine: LiveReply | None) -> None:
        for message in messages:
            self.messages[message.id] = message
            if message.role == "user":
                self.questions[message.id] = message
            if message.id not in self.bubbles:
                self.bubbles[message.id] = Bubble(self.places, message, self.name)
            if mine is not None and message.id == mine.message_id:
                continue  # drawn from memory by follow(); as stored once it has ended, even if unchanged by then
            if self.shown.get(message.id) != message:
                self.bubbles[message.id].show(message)
                self.shown[message.id] = message

    def tick(self, mine: LiveReply | None) -> None:
        """Move the thinking clocks on: replies with no words yet show how long they have been thinking."""
        for message in self.messages.values():
            if message.status == "streaming" and not message.text and message.id != (mine and mine.message_id):
                self.bubbles[message.id].show(message)

    def mark_mine(self, message_id: int | None) -> None:
        """Say which reply being written is this tab's own (the page's CSS shows Stop for it), or none."""
        if message_id == self.mine_id:
            return
        self.mine_id = message_id
        if message_id is None:
            self.flag.empty()
        else:
            with self.flag.container(key=f"my-reply-{message_id}"):
                st.html("<span></span>")  # an empty container would not be on the page

    def worth_folding(self, quiet_s: float) -> bool:
        """Whether the settled messages at the start of the tail should join the page's history.

        They should when one of them needs a Retry button (rule 5), and when
        there are many, once the room has been quiet for a moment: a fold is
        a full run of the page, for every page in the room at once, and would
        delay the next message.
        """
        settled = list(itertools.takewhile(lambda m: m.is_final, self.messages.values()))
        if any(retryable(m, self.name, self.questions) for m in settled):
            return True
        return len(settled) >= FOLD_ANYWAY_AT or (len(settled) >= FOLD_AT and quiet_s >= FOLD_QUIET_S)

    def follow(self, reply: LiveReply) -> None:
        """Draw the asker's own reply as it grows: wait for more text, draw it, rest one frame."""
        bubble = self.bubbles.get(reply.message_id)
        if bubble is None:  # not in this page's tail (never expected)
            reply.wait(len(reply.text()), timeout=WAIT_S)
            return
        text, done = reply.wait(len(bubble.text), timeout=WAIT_S)
        if done:
            return  # once it has ended, the store has it, final, for update() to draw
        if bubble.show_live(text, reply.started_at):
            time.sleep(FRAME_S)  # tokens arriving meanwhile are drawn together


class Bubble:
    """One message in the live area: drawn once, then updated in place as it grows.

    Its places never change: author line, text (one element per Markdown
    block, see BlockView), note (from the first one on). So it only ever
    grows on the page, which matters in a run that does not end (rule 4).
    Each element is drawn straight into its place, not as an empty
    placeholder first: when questions arrive, every page in the room draws
    them at once, and each message to the browsers delays the asker's first
    words on the server.
    """

    def __init__(self, places: Places, message: Message, name: str):
        self.name = name
        who, avatar = bubble_for(message, name)
        # The note, when there is one, comes after the text's container.
        self.bubble = places.put(lambda place: place.chat_message(who, avatar=avatar))
        with self.bubble:
            self.label = author_line(message, name)
            self.label_place, self.blocks = st.caption(self.label), BlockView(st.container())
        self.note_place, self.note = None, None

    @property
    def text(self) -> str:
        return self.blocks.text

    def show(self, message: Message) -> None:
        """Draw the message as stored, where it changed."""
        writing = message.status == "streaming"
        self._label(author_line(message, self.name))
        self.blocks.show(message.text, live=writing)
        self._note(thinking(message.created_at) if writing and not message.text else note_for(message))

    def show_live(self, text: str, started_at: float) -> bool:
        """Draw the asker's own reply from memory; True if its text was drawn again."""
        self._label("**GPT** · writing…" + (f" ({len(text.encode()) // 1000:,} KB)" if self.blocks.held else ""))
        self._note(None if text else thinking(started_at))
        return self.blocks.show(text, live=True)

    def _label(self, label: str) -> None:
        if label != self.label:
            self.label_place.caption(label)
            self.label = label

    def _note(self, note: str | None) -> None:
        if note == self.note:
            return
        if self.note_place is None:
            with self.bubble:
                self.note_place = st.caption(note)
        elif note:
            self.note_place.caption(note)
        else:
            self.note_place.empty()
        self.note = note


class BlockView:
    """Text drawn as one Markdown element per top-level block (markup.split_blocks).

    A finished block is drawn once; only the last block, still being written,
    is drawn again as it grows, so a long reply costs the browser bytes in
    proportion to its length, not to its square (rule 7). The last block is
    drawn at most once per FRAME_S, and less often when it is big: at most
    LIVE_BLOCK_BYTES_PER_S, so that one huge code block cannot bring the
    square back.
    """

    def __init__(self, container: DeltaGenerator):
        self.container = container
        self.places: list[DeltaGenerator] = []
        self.drawn: list[str] = []  # the Markdown each place shows ("" for none)
        self.finished: list[str] = []  # blocks that more text cannot change
        self.whole = False  # the text defines link references: drawn in one piece
        self.text = ""  # the text as last given
        self.held = False  # the last block waits, being big
        self._last_drawn_at = 0.0

    def show(self, text: str, live: bool) -> bool:
        """Draw what changed; True if anything was drawn."""
        self.text = text
        parts = self._parts(text)
        drew = False
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            body = safe_markdown(part) + (CURSOR if live and last else "")
            if index < len(self.drawn) and self.drawn[index] == body:
                continue
            self.held = live and last and not self._due(body)
            if self.held:
                continue
            self._draw(index, body)
            drew = True
        for index in range(len(parts), len(self.places)):
            self._draw(index, "")  # a block that re-splitting merged away
        return drew

    def _parts(self, text: str) -> list[str]:
        done = sum(map(len, self.finished))
        if not text.startswith("".join(self.finished)):  # not the same text grown (never expected)
            self.finished, done = [], 0
        self.whole = self.whole or defines_references(text[done:])
        if self.whole:  # blocks before a reference definition may use it: one piece from now on
            self.finished = []
            return [text]
        rest = split_blocks(text[done:])  # only the part not yet finished is parsed again
        self.finished += rest[:-1]
        return [*self.finished, rest[-1]]

    def _due(self, body: str) -> bool:
        wait = max(FRAME_S, len(body.encode()) / LIVE_BLOCK_BYTES_PER_S)
        return time.monotonic() - self._last_drawn_at >= wait

    def _draw(self, index: int, body: str) -> None:
        new = index == len(self.places)  # a new block (they come in order): its first element is its place
        if not new and body == self.drawn[index]:
            return
        place = self.container if new else self.places[index]
        drawn = place.markdown(body) if body.strip() else place.empty()
        if new:
            self.places.append(drawn)
            self.drawn.append(body)
        else:
            self.drawn[index] = body
        self._last_drawn_at = time.monotonic()
