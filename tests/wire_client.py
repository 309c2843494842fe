"""A Streamlit session without a browser: the page's side of the websocket, for load.

A Chromium page costs tens of milliseconds of CPU for every update it renders;
twenty of them on the server's own two cores measure the browsers, not the
server. A ``WireSession`` speaks the same protocol as the page (protobuf
BackMsg / ForwardMsg over ``/_stcore/stream``) and does what the page does for
this app: it opens the script with a query string, answers the
``st_autorefresh`` component as its iframe would (a tick ``interval`` ms
after the component was last drawn, rerunning the component's fragment), and
can submit the chat input. It records every element it is sent, and when
each tagged word count first arrived in a Markdown element: what a browser
would start drawing then. Used by the scale benchmark and by tests of what the
server sends.

The scale benchmark runs a hundred of these on the server's own two cores, so
what a session does per message is kept small: each message is read in the
connection's own thread (no hand-over to a second one), and a Markdown body
is counted without scanning it word by word.
"""

from __future__ import annotations

import functools
import heapq
import json
import re
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

# Words of the test server's tagged replies: the reply's tag (r0, r1, ...), w, the word's number.
TAGGED_WORD = re.compile(r"\b(r\d+)w\d+")


class WireSession:
    """One browser tab's worth of protocol, driven from a background thread."""

    def __init__(self, url: str, query: str, clock: TickClock):
        parts = urlsplit(url)
        self.query = query
        self.seen: dict[str, dict[int, float]] = {}  # tag -> word count in one element -> first arrival (epoch s)
        self.markdown: list[tuple[float, str]] = []  # (arrival, body) of every Markdown element
        self.elements: list[tuple[float, tuple[int, ...], str]] = []  # (arrival, delta path, element type)
        self.alerts: list[str] = []  # the text of every alert (warning, error, ...) sent
        self.bytes_received = 0
        self.markdown_bytes = 0  # bytes of Markdown text in the elements received
        self.messages = 0
        self.runs: list[float] = []  # when each script run (full or fragment) finished
        self._clock = clock
        self._lock = threading.Lock()
        # The refresh trigger: component widget id, interval ms, fragment id, limit (0 for none).
        self._refresh: tuple[str, int, str, int] | None = None
        self._ticks = 0  # the trigger's count, as the iframe keeps it
        self.ticks = 0  # the ticks sent
        self._chat_input_id: str | None = None
        self._ready = threading.Event()
        self._started = 0  # runs started
        self._ws = connect(f"ws://{parts.netloc}/_stcore/stream", subprotocols=["streamlit"],
                           max_size=None, open_timeout=30, legacy=True,
                           create_connection=functools.partial(_Connection, on_message=self._handle))
        self._rerun()

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the first run is over and the chat input is known.

        Over: finished, or followed by another run. A tick that reaches
        Streamlit just as a run ends gets a new script runner, and the
        ending runner's "finished" is then never sent.
        """
        if not self._ready.wait(timeout):
            raise TimeoutError("the first script run did not finish")

    def chat(self, text: str, with_tick: bool = False) -> None:
        """Submit ``text`` in the chat input, as pressing Enter does.

        ``with_tick``: as the page sends it when the refresh trigger ticks in
        the same moment, in one rerun of the trigger's fragment (the page
        batches the widget changes of a moment, and the first fragment named
        in a batch scopes all of it). Only while the trigger ticks.
        """
        state = WidgetState(id=self._chat_input_id)
        state.chat_input_value.data = text
        if not with_tick:
            self._rerun([state])
            return
        tick = self._next_tick()
        if tick is None:
            raise RuntimeError("the refresh trigger has stopped: the page sends no tick")
        self._rerun([state, tick[0]], tick[1])

    @property
    def ticking(self) -> bool:
        """Whether the refresh trigger is drawn and its interval runs (its limit not reached)."""
        with self._lock:
            return self._refresh is not None and not self._past_limit(self._ticks + 1)

    def _past_limit(self, count: int) -> bool:
        """Whether the iframe stops at ``count`` instead of sending it (its limit, if any, reached)."""
        limit = self._refresh[3]
        return bool(limit) and count >= limit

    def close(self) -> None:
        self._clock.forget(self)
        self._ws.close()

    # The page's side -----------------------------------------------------------

    def _rerun(self, widgets: list[WidgetState] = (), fragment_id: str = "") -> None:
        message = BackMsg()
        message.rerun_script.query_string = self.query
        message.rerun_script.widget_states.widgets.extend(widgets)
        message.rerun_script.fragment_id = fragment_id
        self._ws.send(message.SerializeToString())

    def tick(self, due: float) -> None:
        """What the autorefresh iframe does when its interval (a setInterval) runs out."""
        tick = self._next_tick()
        if tick is None:
            return  # stopped (its limit passed), until it is drawn without one
        self._clock.schedule(self, due + self._refresh[1] / 1000)
        try:
            self._rerun([tick[0]], tick[1])
        except Exception:  # closed meanwhile
            pass

    def _next_tick(self) -> tuple[WidgetState, str] | None:
        """The refresh trigger's next value and its fragment, as the iframe counts
        (a count that reaches the limit stops it instead), or None."""
        with self._lock:
            if self._refresh is None:
                return None
            widget_id, _, fragment_id, _ = self._refresh
            self._ticks += 1
            if self._past_limit(self._ticks):
                return None
            self.ticks += 1
            return WidgetState(id=widget_id, json_value=json.dumps(self._ticks)), fragment_id

    def _handle(self, frame: bytes, now: float) -> None:
        self.bytes_received += len(frame)
        self.messages += 1
        message = ForwardMsg()
        message.ParseFromString(frame)
        kind = message.WhichOneof("type")
        if kind == "script_finished":
            self.runs.append(now)
            if self._chat_input_id:
                self._ready.set()
            return
        if kind == "new_session":  # a run starts
            self._started += 1
            if self._started > 1 and self._chat_input_id:
                self._ready.set()
            return
        if kind != "delta" or message.delta.WhichOneof("type") != "new_element":
            return
        element = message.delta.new_element
        which = element.WhichOneof("type")
        self.elements.append((now, tuple(message.metadata.delta_path), which))
        if which == "markdown":
            body = element.markdown.body
            self.markdown.append((now, body))
            self.markdown_bytes += len(body.encode())
            for tag, count in tagged_words(body).items():
                self.seen.setdefault(tag, {}).setdefault(count, now)
        elif which == "alert":
            self.alerts.append(element.alert.body)
        elif which == "chat_input":
            self._chat_input_id = element.chat_input.id
        elif which == "component_instance" and "autorefresh" in element.component_instance.component_name:
            args = json.loads(element.component_instance.json_args)
            refresh = (element.component_instance.id, int(args["interval"]), message.delta.fragment_id,
                       int(args.get("limit") or 0))
            with self._lock:
                changed, self._refresh = refresh != self._refresh, refresh
            # The iframe restarts its interval when the interval or limit
            # changes, and with debounce (the default) at every render.
            if changed or args.get("debounce", True):
                self._clock.schedule(self, now + refresh[1] / 1000)

    @property
    def words(self) -> dict[str, dict[str, float]]:
        """Tag -> tagged word -> its first arrival, in any Markdown element."""
        words: dict[str, dict[str, float]] = {}
        for at, body in self.markdown:
            for match in TAGGED_WORD.finditer(body):
                words.setdefault(match[1], {}).setdefault(match[0], at)
        return words


def tagged_words(body: str) -> dict[str, int]:
    """Tag -> how many of its tagged words ``body`` holds, as TAGGED_WORD counts them.

    A block of a tagged reply, where every "w" follows one tag at the start of
    a word, is counted without scanning word by word (some five times faster);
    anything else by TAGGED_WORD itself.
    """
    first = TAGGED_WORD.search(body)
    if first is None:
        return {}
    tag = first[1]
    marker = f"{tag}w"
    starts = body.startswith(marker) + body.count(f" {marker}") + body.count(f"\n{marker}")
    if body.count("w") == body.count(marker) == starts:
        return {tag: len(_numbered(marker).findall(body))}
    return dict(Counter(TAGGED_WORD.findall(body)))


@functools.cache
def _numbered(marker: str) -> re.Pattern:
    return re.compile(re.escape(marker) + r"\d")  # a literal prefix: the regex engine skips ahead to each


class _Connection(ClientConnection):
    """A client connection that hands each message, as it is read, to ``on_message(data, arrival)``
    in the connection's own reading thread. (Streamlit's server sends every message in one frame.)"""

    def __init__(self, *args, on_message, **kwargs):
        self.on_message = on_message
        super().__init__(*args, **kwargs)

    def process_event(self, event) -> None:
        if isinstance(event, Frame) and event.opcode is Opcode.BINARY and event.fin:
            self.on_message(event.data, time.time())
        else:
            super().process_event(event)


class TickClock:
    """One thread that fires every session's autorefresh ticks on time."""

    def __init__(self) -> None:
        self._due: dict[WireSession, float] = {}
        self._heap: list[tuple[float, int, WireSession]] = []
        self._changed = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._run, daemon=True).start()

    def schedule(self, session: WireSession, at: float) -> None:
        with self._changed:
            self._due[session] = at
            heapq.heappush(self._heap, (at, id(session), session))
            self._changed.notify()

    def forget(self, session: WireSession) -> None:
        with self._changed:
            self._due.pop(session, None)

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.time()):
                    self._changed.wait(self._heap[0][0] - time.time() if self._heap else None)
                if self._stopped:
                    return
                at, _, session = heapq.heappop(self._heap)
                if self._due.get(session) != at:
                    continue  # rescheduled since (drawn again) or closed
                del self._due[session]
            session.tick(at)
