"""What the server sends a session, read off the websocket (tests/wire_client.py).

The app against `streamlit run`, the real openai client and the local test
server; the session speaks Streamlit's protocol as the page does.
"""

import itertools
import time
import uuid
from collections import Counter

import pytest
from hypothesis import example, given, strategies as st

from fake_openai import Reply
from live import as_pieces, stored_reply, wait_until
from store import Store
from wire_client import TAGGED_WORD, TickClock, WireSession, tagged_words


@pytest.fixture
def connect(app):
    clock, sessions = TickClock(), []

    def connect(room: str, name: str, ready: bool = True) -> WireSession:
        session = WireSession(app.url, f"room={room}&name={name}&tab={uuid.uuid4().hex[:16]}", clock)
        sessions.append(session)
        if ready:
            session.wait_ready()
        return session

    yield connect
    for session in sessions:
        session.close()
    clock.stop()


@given(st.lists(st.tuples(st.sampled_from(["r1w1", "r1w22", "r12w3", "r2w4", "xr1w5", "5r1w6", "r1wx", "r1w", "w",
                                          "answer", "**r1w7**", "@gpt", "r1"]),
                          st.sampled_from([" ", "\n", ". ", "\n\n", "", "-"]))))
@example([("r1w1", " "), ("xr1w5", "")])  # not at a word's start
@example([("r1w1", " "), ("r1wx", "")])  # no number
@example([("r1w1", ""), ("r1w1", "")])  # two glued into one word
def test_the_sessions_word_count_is_the_patterns(parts):
    """What a session counts in a Markdown body (quickly, for a reply's block) is what TAGGED_WORD finds."""
    body = "".join(word + separator for word, separator in parts)
    assert tagged_words(body) == Counter(TAGGED_WORD.findall(body))


def fill(db, room: str, questions: int) -> None:
    store = Store(db)
    for i in range(questions):
        store.add_message(room, "Ada", f"Question {i}")
        reply = store.start_reply(room)
        store.finish_reply(reply.id, "complete", last_chunk=f"Answer {i}.")


def quiet(session: WireSession, for_s: float = 0.5) -> int:
    """The messages the session has received, once none has come for ``for_s`` seconds."""
    last = [session.messages, time.monotonic()]

    def still() -> bool:
        if session.messages != last[0]:
            last[:] = [session.messages, time.monotonic()]
        return time.monotonic() - last[1] >= for_s

    wait_until(still, timeout=10)
    return last[0]


def answered(app, room: str, tag: str, words: int = 48) -> bool:
    """Whether the newest reply in ``room`` is complete, with ``words`` words tagged ``tag``."""
    reply = stored_reply(app.db, room)
    return reply["status"] == "complete" and f"{tag}w{words - 1}" in reply["text"]


def test_asking_resends_only_the_live_area_not_the_room(app, model, connect):
    """The asker's first token must not wait for the browser to redraw the whole room."""
    fill(app.db, "full", 30)  # 60 messages, three elements each
    asker = connect("full", "Ada")
    model.enqueue(Reply(tagged=48, delay_s=0.02))
    asked = len(asker.elements)
    asker.chat("@gpt r1")
    wait_until(lambda: answered(app, "full", "r1"))
    first_token = min(asker.seen["r1"].values())
    before = [path for at, path, _ in asker.elements[asked:] if at <= first_token]
    # question, reply bubble, Stop, refresh trigger: a dozen elements, all in
    # the live area (root 0, the main part), but for the stats in the sidebar (root 1)
    # (the sidebar's may come first, from the tick's run the question cut short)
    assert 0 < len(before) < 20, before
    live_area = next(path[:2] for path in before if path[0] == 0)
    assert all(path[:2] == live_area for path in before if path[0] == 0), before
    assert len({path[:2] for path in before if path[0] == 1}) <= 1
    # and the reply is drawn token by token there, before the page folds it in
    assert len(asker.seen["r1"]) > 4


def test_a_viewer_is_sent_each_stored_step_in_place(app, model, connect):
    fill(app.db, "watched", 30)
    viewer, asker = connect("watched", "Bea"), connect("watched", "Ada")
    sentences = [" ".join(f"r2w{i}" for i in range(n, n + 12)) + " and so on." for n in range(0, 72, 12)]
    model.enqueue(Reply(pieces=as_pieces(sentences), delay_s=0.1))  # 6 sentences, 9 s
    asked = time.time()
    asker.chat("@gpt r2")
    wait_until(lambda: answered(app, "watched", "r2", words=72), timeout=30)
    wait_until(lambda: 72 in viewer.seen.get("r2", {}), timeout=10)
    # The viewer saw the reply grow in the steps it was stored in, never token by token.
    chunks = stored_reply(app.db, "watched")["chunks"]
    stored_steps = list(itertools.accumulate(len(TAGGED_WORD.findall(chunk)) for chunk in chunks))
    steps = sorted(viewer.seen["r2"])
    assert len(steps) >= 3 and set(steps) <= set(stored_steps), (steps, stored_steps)
    # Each step redrew only the message that changed, in the live area: a few
    # elements per step, not the 180 of the room, and no script run had to end.
    last = viewer.seen["r2"][steps[-2]]
    during = [path for at, path, _ in viewer.elements if asked <= at <= last]
    assert 0 < len(during) <= 10 * len(steps), len(during)
    assert all(path[:2] == during[0][:2] for path in during if path[0] == 0)
    assert len({path[:2] for path in during if path[0] == 1}) <= 1  # the sidebar's stats
    assert [at for at in viewer.runs if asked <= at <= last] == []


def test_a_viewer_draws_changes_that_come_close_together_at_once(app, model, connect):
    """Each stored sentence wakes every page in the room. A page waiting on the
    room draws at most once per ROOM_FRAME_S (0.25 s) whatever came meanwhile, so
    many replies written at once cost their viewers in proportion to time, not
    to sentences; the asker still sees its own reply token by token."""
    viewer, asker = connect("busy", "Bea"), connect("busy", "Ada")
    sentences = [" ".join(f"r5w{n + i}" for i in range(4)) + "." for n in range(0, 160, 4)]
    model.enqueue(Reply(pieces=as_pieces(sentences), delay_s=0.01))  # 40 sentences in 1.6 s
    asker.chat("@gpt r5")
    wait_until(lambda: answered(app, "busy", "r5", words=160) and 160 in viewer.seen.get("r5", {}), timeout=30)
    stored_steps = len(stored_reply(app.db, "busy")["chunks"])
    assert stored_steps >= 30, stored_steps
    drawn = sorted(viewer.seen["r5"].values())  # when each new state of the reply arrived
    span = drawn[-1] - drawn[0]
    assert 3 <= len(drawn) <= span / 0.25 + 2, (len(drawn), span)
    assert len(asker.seen["r5"]) > len(drawn)


def test_a_new_message_reaches_a_viewer_in_a_few_messages(app, connect):
    """When questions arrive, every page in the room draws them at once; each
    new bubble is drawn straight into its place (no empty placeholder first,
    no note until there is one): a handful of messages to each browser."""
    viewer = connect("arrivals", "Bea")
    wait_until(lambda: not viewer.ticking, timeout=30)  # in the live area's own run
    received = quiet(viewer)  # that run has drawn what it draws at its start
    store = Store(app.db)
    for n in range(60, 70):
        store.add_message("arrivals", "Ada", f"r{n}w0 r{n}w1")
    wait_until(lambda: all(2 in viewer.seen.get(f"r{n}", {}) for n in range(60, 70)), timeout=10)
    sent = quiet(viewer) - received
    # Each: the chat bubble, its author line, the container of its text, the text.
    assert sent <= 10 * 4 + 2, sent


def test_a_viewers_stats_panel_resends_only_its_figures(app, model, connect):
    """While a reply is written the sidebar's figures are redrawn once a second on
    every page in the room: only the part that changed is sent again."""
    viewer, asker = connect("figures", "Bea"), connect("figures", "Ada")
    wait_until(lambda: not viewer.ticking, timeout=30)
    quiet(viewer)
    start = len(viewer.elements)
    model.enqueue(Reply(tagged=150, delay_s=0.03))  # 4.5 s
    asker.chat("@gpt r7")
    wait_until(lambda: answered(app, "figures", "r7", words=150), timeout=30)
    quiet(viewer)
    redraws: list[list[float]] = []  # the sidebar's elements, grouped by the redraw that sent them
    for at, path, _ in viewer.elements[start:]:
        if path[0] == 1:
            if redraws and at - redraws[-1][-1] < 0.3:
                redraws[-1].append(at)
            else:
                redraws.append([at])
    # Between the reply's first figures and its last: the figures alone, one element.
    assert len(redraws) >= 4 and all(len(redraw) == 1 for redraw in redraws[1:-1]), [len(r) for r in redraws]


def test_a_long_reply_costs_its_readers_bytes_in_proportion_to_its_length(app, model, connect):
    """Finished Markdown blocks are sent once; only the block being written is sent again."""
    paragraphs = [" ".join(f"r3w{n * 50 + i}" for i in range(50)) + "." for n in range(40)]
    text = "\n\n".join(paragraphs)  # 40 paragraphs, 2,000 words, about 16 KB
    pieces = [text[i : i + 6] for i in range(0, len(text), 6)]
    model.enqueue(Reply(pieces=pieces, delay_s=0.0015))  # about 4 s
    viewer, asker = connect("long", "Bea"), connect("long", "Ada")
    asker.chat("@gpt r3")
    wait_until(lambda: stored_reply(app.db, "long")["status"] == "complete", timeout=30)
    assert stored_reply(app.db, "long")["text"] == text
    wait_until(lambda: len(asker.words.get("r3", {})) == len(viewer.words.get("r3", {})) == 2000)
    size = len(text.encode())
    assert len(set(asker.words["r3"].values())) > 40  # the asker saw it grow many times
    # Redrawing the whole reply at each of those steps would cost 30 times its size and more.
    assert asker.markdown_bytes < 4 * size, asker.markdown_bytes / size
    assert viewer.markdown_bytes < 4 * size, viewer.markdown_bytes / size


def test_a_message_sent_with_a_refresh_tick_is_answered_by_the_whole_page(app, model, connect):
    """The page sends a message and a refresh tick of the same moment as one run of the live
    area alone; what the message needs drawn outside it, such as a refusal, is drawn still.
    The trigger ticks only while a full run follows the room: in the live area's own run,
    which does not end, such a run would wait for ever."""
    person = connect("ticked", "Ada", ready=False)
    wait_until(lambda: person.ticking, timeout=30)  # the first full run has drawn the trigger
    person.chat("x" * 4_001, with_tick=True)
    wait_until(lambda: any("4,001 characters long" in alert for alert in person.alerts), timeout=10)
    assert Store(app.db).recent("ticked") == []  # and nothing was stored
    model.enqueue(Reply(tagged=24, delay_s=0.01))
    person.chat("@gpt r4", with_tick=True)  # within the 2 s the refusal's full run follows the room
    wait_until(lambda: 24 in person.seen.get("r4", {}) and answered(app, "ticked", "r4", words=24))
    # Once the live area's own run has taken over, the trigger is still.
    wait_until(lambda: not person.ticking, timeout=10)
    ticks = person.ticks
    time.sleep(2.5)  # the trigger's interval is 1 s
    assert person.ticks == ticks


def test_a_page_rides_out_the_database_cutting_its_connections(start_app, postgres):
    """The live area's run, which no tick restarts, tries the database again until it answers."""
    import psycopg

    from store import open_store

    url = postgres.new_database()
    app = start_app(DATABASE_URL=url)
    clock = TickClock()
    viewer = WireSession(app.url, f"room=cut&name=Bea&tab={uuid.uuid4().hex[:16]}", clock)
    try:
        viewer.wait_ready()
        wait_until(lambda: not viewer.ticking)  # in the live area's own run
        with psycopg.connect(url, autocommit=True) as conn:  # every connection of the app's, pooled and listening
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        store = open_store(url)
        store.add_message("cut", "Ada", "r5w0 r5w1 r5w2")
        wait_until(lambda: 3 in viewer.seen.get("r5", {}), timeout=30)
    finally:
        viewer.close()
        clock.stop()


def test_behind_a_transaction_pooler_a_page_sees_another_replicas_messages(start_app, postgres, pooler):
    """Through PgBouncer in transaction mode no change notification arrives: the app reads
    the rooms' versions instead, and a page still follows what another replica writes."""
    from store import open_store

    url = pooler.url(postgres.new_database())
    app = start_app(DATABASE_URL=url)
    clock = TickClock()
    viewer = WireSession(app.url, f"room=pooled&name=Bea&tab={uuid.uuid4().hex[:16]}", clock)
    elsewhere = open_store(url)
    try:
        viewer.wait_ready()
        wait_until(lambda: not viewer.ticking)  # in the live area's own run
        for k in range(3):
            elsewhere.add_message("pooled", "Ada", f"r{k}w0 r{k}w1")
            wait_until(lambda: 2 in viewer.seen.get(f"r{k}", {}), timeout=10)
    finally:
        elsewhere.close()
        viewer.close()
        clock.stop()
