import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from live import wait_until
from postgres import query

from store import (
    INTERRUPTED_NOTE,
    MAX_MESSAGE_CHARS,
    AskingTooFast,
    InvalidInput,
    PID_SPACE,
    NotStreaming,
    ReplyLimits,
    Store,
    TooManyReplies,
    open_store,
)




def test_migrations_run_once_and_can_repeat(store, db_path):
    open_store(store.location).close()  # a second process starts on the same database
    open_store(store.location).close()
    names = [name for (name,) in query(store, "SELECT name FROM _migrations ORDER BY name")]
    assert names == [
        "m001_initial", "m002_reply_owner", "m003_usage", "m004_replicas", "m005_reply_asker", "m006_stop_requests",
        "m007_chunks_without_rowid",
    ]
    assert query(store, "SELECT owner, beat_at, pid_space, pid FROM replicas") == []
    message = store.add_message("general", "Ada", "hi")
    assert [tuple(query(store, f"SELECT {column} FROM messages"))[0] for column in (
        "room", "author", "role", "status", "error", "owner", "prompt_tokens", "completion_tokens", "reasoning_tokens",
        "asker", "stop_requested_at",
    )] == [("general",), ("Ada",), ("user",), ("complete",)] + [(None,)] * 7
    assert query(store, "SELECT message_id, seq, text FROM chunks") == [(message.id, 0, "hi")]


def test_a_database_made_by_the_release_that_built_tables_with_sqlite_utils_still_works(db_path):
    """Before the migrations were SQL, SQLite's tables were made by sqlite-utils: such a file,
    made as that release made it, keeps its messages and takes new ones."""
    from sqlite_utils import Database

    old = Database(db_path)
    old["rooms"].create({"name": str, "version": int}, pk="name")
    old["messages"].create(
        {"id": int, "room": str, "author": str, "role": str, "status": str, "error": str, "reply_to": int,
         "created_at": float, "updated_at": float, "owner": str, "prompt_tokens": int, "completion_tokens": int,
         "reasoning_tokens": int, "asker": str, "stop_requested_at": float},
        pk="id", not_null={"room", "author", "role", "status", "created_at", "updated_at"},
    )
    old["messages"].create_index(["room", "id"])
    old["chunks"].create({"message_id": int, "seq": int, "text": str}, pk=("message_id", "seq"),
                         foreign_keys=[("message_id", "messages", "id")], not_null={"text"})
    old["replicas"].create({"owner": str, "beat_at": float, "pid_space": str, "pid": int}, pk="owner")
    old["_migrations"].insert_all({"name": name, "applied_at": 0.0} for name in (
        "m001_initial", "m002_reply_owner", "m003_usage", "m004_replicas", "m005_reply_asker", "m006_stop_requests"))
    old["messages"].insert({"id": 1, "room": "general", "author": "Ada", "role": "user", "status": "complete",
                            "created_at": 1.0, "updated_at": 1.0})
    old["chunks"].insert({"message_id": 1, "seq": 0, "text": "from the old release"})
    old["rooms"].insert({"name": "general", "version": 1})
    old.conn.close()

    store = Store(db_path)
    question, reply = store.add_question("general", "Bob", "@gpt still there?")
    store.finish_reply(reply.id, "complete", last_chunk="Yes.")
    assert [(m.id, m.text) for m in store.recent("general")] == [
        (1, "from the old release"), (2, "@gpt still there?"), (3, "Yes.")]
    assert store.version("general") == 3
    with pytest.raises(sqlite3.OperationalError, match="rowid"):  # chunks now live in their key's b-tree alone
        store.engine.db.execute("SELECT rowid FROM chunks")


def test_database_uses_wal_and_a_busy_timeout(db_path):
    store = Store(db_path)
    assert store.engine.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.engine.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_add_message_and_read_it_back(store):
    sent = store.add_message("general", "Ada", "Hello *world*  ")
    [got] = store.recent("general")
    assert got == sent
    assert (got.author, got.role, got.text, got.status) == ("Ada", "user", "Hello *world*  ", "complete")


def test_reply_is_appended_in_chunks_and_read_whole(store):
    question = store.add_message("general", "Ada", "@gpt hi")
    reply = store.start_reply("general", reply_to=question.id)
    assert store.get(reply.id).text == "" and store.get(reply.id).status == "streaming"
    store.append_chunk(reply.id, "First sentence. ")
    assert store.get(reply.id).text == "First sentence. "
    store.append_chunk(reply.id, "Second one.")
    store.finish_reply(reply.id, "complete", last_chunk=" End.")
    final = store.get(reply.id)
    assert (final.text, final.status, final.reply_to) == ("First sentence. Second one. End.", "complete", question.id)
    stored = [text for (text,) in query(store, "SELECT text FROM chunks WHERE message_id = ? ORDER BY seq", [reply.id])]
    assert stored == ["First sentence. ", "Second one.", " End."]  # appended, never rewritten


def test_finished_reply_refuses_more_text(store):
    reply = store.start_reply("general")
    store.finish_reply(reply.id, "stopped", last_chunk="Half")
    with pytest.raises(NotStreaming):
        store.append_chunk(reply.id, "more")
    with pytest.raises(NotStreaming):
        store.finish_reply(reply.id, "complete")
    assert store.get(reply.id).text == "Half"
    assert store.get(reply.id).status == "stopped"


def test_recent_is_ordered_limited_and_per_room(store):
    for i in range(5):
        store.add_message("general", "Ada", f"g{i}")
        store.add_message("random", "Bob", f"r{i}")
    assert [m.text for m in store.recent("general")] == ["g0", "g1", "g2", "g3", "g4"]
    assert [m.text for m in store.recent("general", limit=2)] == ["g3", "g4"]
    assert {m.room for m in store.recent("random")} == {"random"}
    assert store.recent("empty") == []


def test_room_version_changes_with_every_write_in_that_room_only(store):
    assert store.version("general") == 0
    store.add_message("general", "Ada", "hi")
    v1 = store.version("general")
    reply = store.start_reply("general")
    v2 = store.version("general")
    store.append_chunk(reply.id, "Some text. ")
    v3 = store.version("general")
    store.add_message("random", "Bob", "elsewhere")
    assert store.version("general") == v3
    store.finish_reply(reply.id, "complete")
    assert v1 < v2 < v3 < store.version("general")


def test_recovery_marks_a_dead_process_replies_interrupted_and_keeps_text(store, db_path, dead_owner):
    done = store.start_reply("general")
    store.finish_reply(done.id, "complete", last_chunk="Done.")
    left = store.start_reply("general", owner=dead_owner)
    store.append_chunk(left.id, "Half a reply")
    mine = store.start_reply("general")  # this process is alive and still writing it
    before = store.version("general")

    restarted = open_store(store.location)
    assert restarted.recover_interrupted() == 1
    assert restarted.get(left.id).status == "interrupted"
    assert restarted.get(left.id).text == "Half a reply"
    assert restarted.get(left.id).error
    assert restarted.get(done.id).status == "complete"
    assert restarted.get(mine.id).status == "streaming"
    assert restarted.version("general") > before
    assert restarted.recover_interrupted() == 0


def test_recovery_leaves_other_live_processes_replies_alone_until_stale(store):
    elsewhere = store.start_reply("general", owner="other-host:123:abc")
    alive_here = store.start_reply("general", owner=f"{socket.gethostname()}:{os.getpid()}:another")
    assert store.recover_interrupted(stale_after_s=60) == 0
    time.sleep(0.2)
    assert store.recover_interrupted(stale_after_s=0.1) == 2  # silent too long: gone
    assert {store.get(m.id).status for m in (elsewhere, alive_here)} == {"interrupted"}


def test_a_reply_whose_owner_beats_is_left_alone_however_old_and_one_whose_owner_stopped_is_not(store, other_store):
    store.beat("replica-a")
    thinking = store.start_reply("general", owner="replica-a")
    store.append_chunk(thinking.id, "Let me think. ")
    store.beat("replica-c")
    orphan = store.start_reply("general", owner="replica-c")
    store.append_chunk(orphan.id, "Half a reply")
    query(store, "UPDATE messages SET created_at = created_at - 10800, updated_at = updated_at - 10800 WHERE id = ?",
          [thinking.id])  # silent for three hours, but its replica beats
    query(store, "UPDATE replicas SET beat_at = beat_at - 60 WHERE owner = 'replica-c'")  # its replica is gone
    before = store.version("general")

    assert other_store.recover_interrupted(stale_after_s=30, owner="replica-b") == 1
    assert store.get(thinking.id).status == "streaming"
    interrupted = store.get(orphan.id)
    assert (interrupted.status, interrupted.text, interrupted.error) == ("interrupted", "Half a reply", INTERRUPTED_NOTE)
    assert store.version("general") > before

    query(store, "UPDATE replicas SET beat_at = beat_at - 31 WHERE owner = 'replica-a'")  # now replica-a stops too
    assert other_store.recover_interrupted(stale_after_s=30, owner="replica-b") == 1
    assert (store.get(thinking.id).status, store.get(thinking.id).text) == ("interrupted", "Let me think. ")


@pytest.mark.skipif(PID_SPACE is None, reason="pids are told apart through /proc (Linux)")
def test_a_beating_owner_is_gone_before_its_heartbeat_is_stale_only_if_its_pid_exited_in_this_pid_space(
    store, other_store, dead_owner
):
    for owner in ("here", "other-container", "no-proc"):
        store.beat(owner)
        store.start_reply("general", owner=owner)
    query(store, "UPDATE replicas SET pid = ?", [int(dead_owner.split(":")[1])])  # a pid that has exited here
    query(store, "UPDATE replicas SET pid_space = 'another boot or pid namespace' WHERE owner = 'other-container'")
    query(store, "UPDATE replicas SET pid_space = NULL WHERE owner = 'no-proc'")
    assert other_store.recover_interrupted(stale_after_s=30, owner="replica-b") == 1
    assert {m.owner: m.status for m in store.recent("general")} == {
        "here": "interrupted", "other-container": "streaming", "no-proc": "streaming",
    }


def test_a_replica_never_interrupts_its_own_replies(store):
    store.beat("replica-a")
    mine = store.start_reply("general", owner="replica-a")
    query(store, "UPDATE replicas SET beat_at = beat_at - 60")
    assert store.recover_interrupted(stale_after_s=30, owner="replica-a") == 0
    assert store.recover_interrupted(stale_after_s=30, owner="replica-b") == 1
    assert store.get(mine.id).status == "interrupted"


def test_a_reply_whose_owner_never_beat_is_judged_by_when_it_started(store):
    from_before_heartbeats = store.start_reply("general", owner="old-host:1:abc")
    nobody = store.start_reply("general")
    query(store, "UPDATE messages SET owner = NULL WHERE id = ?", [nobody.id])
    assert store.recover_interrupted(stale_after_s=30) == 0
    query(store, "UPDATE messages SET updated_at = updated_at - 31")
    assert store.recover_interrupted(stale_after_s=30) == 2
    assert {store.get(m.id).status for m in (from_before_heartbeats, nobody)} == {"interrupted"}


def test_a_heartbeat_is_kept_per_owner_and_removed_on_retiring(store):
    store.beat("replica-a")
    store.beat("replica-b")
    [(first,)] = query(store, "SELECT beat_at FROM replicas WHERE owner = 'replica-a'")
    assert abs(first - time.time()) < 5  # epoch seconds
    time.sleep(0.05)
    store.beat("replica-a")
    [(second,)] = query(store, "SELECT beat_at FROM replicas WHERE owner = 'replica-a'")
    assert second > first
    store.retire("replica-a")
    assert query(store, "SELECT owner FROM replicas") == [("replica-b",)]


def test_question_and_reply_are_stored_together(store):
    question, reply = store.add_question("general", "Ada", "@gpt hi")
    assert (reply.reply_to, reply.status, reply.role) == (question.id, "streaming", "assistant")
    with pytest.raises(InvalidInput):
        store.add_question("general", "Ada", " ")
    assert len(store.recent("general")) == 2


def test_a_stop_request_flags_a_streaming_reply_for_its_writer_and_leaves_a_final_one_alone(store, other_store):
    writing = store.start_reply("general")
    store.append_chunk(writing.id, "So far. ")
    done = store.start_reply("general")
    store.finish_reply(done.id, "complete", last_chunk="Done.")
    assert store.stop_requested([writing.id, done.id]) == set() == store.stop_requested([])
    before = store.version("general")

    assert other_store.request_stop(writing.id) is True
    assert store.version("general") > before  # pages notice
    assert store.stop_requested([writing.id, done.id]) == {writing.id}
    assert (store.get(writing.id).status, store.get(writing.id).text) == ("streaming", "So far. ")  # its writer ends it
    after = store.version("general")
    assert other_store.request_stop(done.id) is False
    assert store.version("general") == after
    assert store.get(done.id).stop_requested_at is None

    store.finish_reply(writing.id, "stopped")
    assert store.stop_requested([writing.id]) == set()
    assert other_store.request_stop(writing.id) is False


def count_messages(store) -> int:
    [(count,)] = query(store, "SELECT COUNT(*) FROM messages")
    return count


def test_a_reply_is_stored_only_while_fewer_than_the_limit_are_written_by_all_replicas(store, other_store):
    limits = ReplyLimits(max_concurrent=2, replies_per_minute=10)
    store.beat("replica-a")
    other_store.beat("replica-b")
    _, first = store.add_question("general", "Ada", "@gpt one", owner="replica-a", asker="tab-ada", limits=limits)
    other_store.start_reply("general", owner="replica-b", asker="tab-bob", limits=limits)
    before = count_messages(store)
    with pytest.raises(TooManyReplies) as refused:
        store.add_question("general", "Cy", "@gpt three", owner="replica-a", asker="tab-cy", limits=limits)
    assert refused.value.limit == 2
    with pytest.raises(TooManyReplies):
        other_store.start_reply("general", owner="replica-b", asker="tab-cy", limits=limits)
    assert count_messages(store) == before  # neither the question nor a reply

    store.finish_reply(first.id, "complete")  # one fewer being written
    _, third = other_store.add_question("general", "Cy", "@gpt three", owner="replica-b", asker="tab-cy", limits=limits)
    assert (third.status, third.owner, third.asker) == ("streaming", "replica-b", "tab-cy")
    with pytest.raises(TooManyReplies):
        store.start_reply("general", owner="replica-a", asker="tab-dan", limits=limits)

    query(store, "UPDATE replicas SET beat_at = beat_at - 31 WHERE owner = 'replica-b'")  # replica-b is gone
    assert store.start_reply("general", owner="replica-a", asker="tab-dan", limits=limits).status == "streaming"


def test_an_asker_may_start_so_many_replies_a_minute_through_any_replica(store, other_store):
    limits = ReplyLimits(max_concurrent=10, replies_per_minute=2)
    first = store.start_reply("general", owner="replica-a", asker="tab-ada", limits=limits)
    store.finish_reply(first.id, "complete")  # finished replies count too: they were started
    other_store.start_reply("general", owner="replica-b", asker="tab-ada", limits=limits)
    before = count_messages(store)
    with pytest.raises(AskingTooFast) as refused:
        store.add_question("general", "Ada", "@gpt again", owner="replica-a", asker="tab-ada", limits=limits)
    assert refused.value.limit == 2 and 55 < refused.value.wait_s <= 60
    assert count_messages(store) == before
    store.start_reply("general", owner="replica-a", asker="tab-bob", limits=limits)  # others are not held up

    query(store, "UPDATE messages SET created_at = created_at - 45 WHERE asker = 'tab-ada'")
    with pytest.raises(AskingTooFast) as refused:
        other_store.start_reply("general", owner="replica-b", asker="tab-ada", limits=limits)
    assert 10 < refused.value.wait_s <= 15
    query(store, "UPDATE messages SET created_at = created_at - 16 WHERE asker = 'tab-ada'")
    assert other_store.start_reply("general", owner="replica-b", asker="tab-ada", limits=limits).asker == "tab-ada"


def test_replies_asked_for_at_once_through_two_replicas_never_exceed_the_limit(store, other_store):
    limits = ReplyLimits(max_concurrent=3, replies_per_minute=100)
    outcomes = []
    start = threading.Barrier(8)

    def ask(replica, i):
        start.wait()
        try:
            replica.add_question("general", "Ada", f"@gpt {i}", owner=f"replica-{i % 2}", asker=f"tab-{i}", limits=limits)
            outcomes.append("stored")
        except TooManyReplies:
            outcomes.append("refused")

    threads = [threading.Thread(target=ask, args=(other_store if i % 2 else store, i)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 5 + ["stored"] * 3
    assert query(store, "SELECT COUNT(*) FROM messages WHERE status = 'streaming'") == [(3,)]
    assert count_messages(store) == 6


@pytest.mark.parametrize(
    "room, author, text, complaint",
    [
        ("general", "Ada", "", "empty"),
        ("general", "Ada", "  \n\t ", "empty"),
        ("general", "Ada", "\u200b\u200b", "empty"),
        ("general", "Ada", "x" * (MAX_MESSAGE_CHARS + 1), "limit"),
        ("general", "Ada", "bell\x07", "control"),
        ("General", "Ada", "hi", "Room"),
        ("../etc", "Ada", "hi", "Room"),
        ("", "Ada", "hi", "Room"),
        ("r" * 41, "Ada", "hi", "Room"),
        ("general", "", "hi", "name"),
        ("general", "   ", "hi", "name"),
        ("general", "n" * 41, "hi", "at most"),
        ("general", "GPT", "hi", "reserved"),
        ("general", "gpt ", "hi", "reserved"),
        ("general", "G.P.T", "hi", "reserved"),
        ("general", "ＧＰＴ", "hi", "reserved"),
        ("general", "G\u200bPT", "hi", "reserved"),
        ("general", "Assistant", "hi", "reserved"),
        ("general", "Ada\nGPT", "hi", "single line"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_stored(store, room, author, text, complaint):
    with pytest.raises(InvalidInput, match=complaint):
        store.add_message(room, author, text)
    assert query(store, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert query(store, "SELECT COUNT(*) FROM chunks") == [(0,)]


def test_limits_are_inclusive(store):
    store.add_message("r" * 40, "n" * 40, "x" * MAX_MESSAGE_CHARS)
    [message] = store.recent("r" * 40)
    assert len(message.text) == MAX_MESSAGE_CHARS
    assert message.author == "n" * 40


def test_names_are_trimmed(store):
    assert store.add_message("general", "  Ada  ", "hi").author == "Ada"


def test_eight_threads_append_concurrently_without_loss_or_interleaving(store):
    replies = [store.start_reply("general").id for _ in range(8)]
    errors = []

    def write(message_id):
        try:
            for i in range(60):
                store.append_chunk(message_id, f"[{message_id}:{i}]")
            store.finish_reply(message_id, "complete")
        except Exception as error:  # collected, asserted below
            errors.append(error)

    readers_stop = threading.Event()

    def read():
        while not readers_stop.is_set():
            store.recent("general")

    threads = [threading.Thread(target=write, args=(m,)) for m in replies]
    threads += [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[:8]:
        t.join()
    readers_stop.set()
    for t in threads[8:]:
        t.join()

    assert errors == []
    for message_id in replies:
        message = store.get(message_id)
        assert message.status == "complete"
        assert message.text == "".join(f"[{message_id}:{i}]" for i in range(60))


def test_store_waits_for_another_writer_instead_of_failing(db_path):
    store = Store(db_path)
    reply = store.start_reply("general")
    locked = threading.Event()

    def hold_write_lock():
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(1.0)
        other.execute("COMMIT")

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    locked.wait()
    started = time.monotonic()
    store.append_chunk(reply.id, "waited. ")  # blocks until the other writer commits
    waited = time.monotonic() - started
    holder.join()
    assert store.get(reply.id).text == "waited. "
    assert waited >= 0.5  # it really waited on the lock rather than failing


def test_each_thread_connection_is_closed_when_the_thread_ends(db_path):
    import gc

    store = Store(db_path)
    store.add_message("general", "Ada", "hi")

    def open_files():
        return sum(1 for fd in os.listdir("/proc/self/fd") if str(db_path) in os.path.realpath(f"/proc/self/fd/{fd}"))

    gc.disable()  # as with Streamlit's runner.postScriptGC = false
    try:
        before = open_files()
        for _ in range(50):  # fifty script runs, each in a thread of its own
            thread = threading.Thread(target=lambda: store.recent("general"))
            thread.start()
            thread.join()
        assert open_files() <= before + 2
    finally:
        gc.enable()


def test_a_write_wakes_whoever_waits_for_a_change_at_once(store):
    seen = store.changes()
    woke = []

    def wait():
        started = time.monotonic()
        woke.append((store.wait_for_change(seen, timeout=5), time.monotonic() - started))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    store.add_message("general", "Ada", "hello")
    waiter.join()
    [(changes, waited)] = woke
    assert changes != seen and waited < 1


def test_a_commit_by_another_process_wakes_the_wait_too(store, db_path):
    seen = store.changes()
    assert store.wait_for_change(seen, timeout=0.3) == seen  # nothing happened: the wait times out
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from store import open_store; open_store(sys.argv[1]).add_message('general', 'Bob', 'hi')",
         store.location],
        cwd=Path(__file__).parent.parent, check=True,
    )
    assert other.returncode == 0
    started = time.monotonic()
    assert store.wait_for_change(seen, timeout=5) != seen
    assert time.monotonic() - started < 1
    assert [m.text for m in store.recent("general")] == ["hi"]


def test_pages_following_a_room_share_one_read_per_change(store):
    store.add_message("general", "Ada", "first")
    reads = []
    version_of = store.version
    store.version = lambda room: reads.append(room) or version_of(room)  # counts the reads
    version = store.cached_version("general")
    shared = store.cached_recent("general", 100, 0, version)
    assert [m.text for m in shared] == ["first"]
    assert store.cached_version("general") == version
    assert reads == ["general"]  # nothing changed: read once, for every page that asks
    assert store.cached_recent("general", 100, 0, version) is shared  # the same read, for every page
    store.add_message("general", "Bob", "second")  # counted at once by this store
    newer = store.cached_version("general")
    assert newer > version
    assert [m.text for m in store.cached_recent("general", 100, 0, newer)] == ["first", "second"]
    assert [m.text for m in store.cached_recent("general", 100, 1, newer)] == ["second"]  # after_id: its own read
    assert store.cached_recent("general", 100, 0, version) is not shared  # an older version gets the newer read


def test_shared_reads_see_another_process_commit_once_it_is_noticed(store, other_store):
    store.add_message("general", "Ada", "first")
    version = store.cached_version("general")
    seen = store.changes()
    assert store.wait_for_change(seen, timeout=0.3) == seen  # watching for other processes from now on
    other_store.add_message("general", "Bob", "from elsewhere")
    assert store.wait_for_change(seen, timeout=5) != seen
    newer = store.cached_version("general")
    assert newer > version
    assert [m.text for m in store.cached_recent("general", 100, 0, newer)] == ["first", "from elsewhere"]


def hearing(store, other_store) -> None:
    """Wait until ``store`` hears other_store's commits (its LISTEN is in place), and has heard them all."""
    def heard() -> bool:
        seen = store.changes()
        other_store.add_message("warm-up", "Bob", "can you hear me?")
        return store.wait_for_change(seen, timeout=0.5) != seen
    wait_until(heard, timeout=10)
    while (seen := store.changes()) != store.wait_for_change(seen, timeout=0.5):
        pass  # one heard late, after its try had given up


@pytest.mark.engines("postgresql")
def test_postgresql_tells_each_room_version_with_its_change_so_pages_do_not_read_it(store, other_store):
    store.add_message("general", "Ada", "first")
    hearing(store, other_store)
    reads = []
    version_of = store.version
    store.version = lambda room: reads.append(room) or version_of(room)  # counts the reads

    seen = store.changes()
    other_store.add_message("general", "Bob", "from another replica")
    store.wait_for_change(seen, timeout=5)  # as a page does: woken, then it asks
    assert store.cached_version("general") == other_store.version("general")
    store.add_message("general", "Ada", "from this replica")
    assert store.cached_version("general") == other_store.version("general")
    assert reads == []  # every version came with its notification

    assert store.cached_version("quiet") == 0  # a room not heard of since listening began: read once
    other_store.add_message("quiet", "Bob", "now it speaks")
    wait_until(lambda: store.cached_version("quiet") == 1, timeout=5)
    assert reads == ["quiet"]

    # A replica of an older release tells the room's name only: the version is read again.
    query(other_store, "UPDATE rooms SET version = version + 5 WHERE name = 'general'")
    query(other_store, "SELECT pg_notify('chat_changes', 'general')")
    expected = other_store.version("general")
    wait_until(lambda: store.cached_version("general") == expected, timeout=5)
    assert reads == ["quiet", "general"]


@pytest.mark.engines("postgresql")
def test_versions_told_before_the_notifications_were_lost_are_not_trusted_after(store, other_store):
    store.add_message("general", "Ada", "first")
    hearing(store, other_store)
    version = store.cached_version("general")
    # The listening connection drops; a commit meanwhile is never told.
    query(other_store, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE query LIKE 'LISTEN%' AND datname = current_database()")
    other_store.add_message("general", "Bob", "while nobody listened")
    wait_until(lambda: store.cached_version("general") == version + 1, timeout=5)
    assert [m.text for m in store.cached_recent("general", 100, 0, version + 1)] == ["first", "while nobody listened"]


def test_a_lost_postgresql_database_is_reported_without_its_password(postgres):
    import psycopg

    from store import DatabaseUnavailable

    url = postgres.new_database().replace("postgres@", "postgres:secret-pw-42@")  # the server trusts 127.0.0.1
    store = open_store(url, connect_timeout_s=1)
    store.add_message("general", "Ada", "before")
    with psycopg.connect(postgres.url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")
    with pytest.raises(DatabaseUnavailable) as lost:
        store.add_message("general", "Ada", "after")
    assert "secret-pw-42" not in str(lost.value) and "127.0.0.1" in str(lost.value)
    store.close()


@pytest.mark.engines("postgresql")
def test_connections_the_server_closed_while_idle_are_not_lent_again(store):
    """Hosted servers close idle connections (a restart, a pooler's idle timeout, a serverless
    database going to sleep): the next write still lands, on a fresh connection."""
    import psycopg

    store.add_message("general", "Ada", "before")
    with psycopg.connect(store.location, autocommit=True) as admin:
        pids = [pid for (pid,) in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [pids])
        wait_until(lambda: not admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]).fetchall(), timeout=5)
    assert pids
    store.add_message("general", "Ada", "after")
    assert [m.text for m in store.recent("general", 10)] == ["before", "after"]


def test_through_a_transaction_pooler_another_replicas_commits_are_still_noticed(postgres, pooler):
    """Supavisor's port 6543, Neon's -pooler hosts and PgBouncer in transaction mode accept
    LISTEN but deliver nothing, and keep no prepared statement from one transaction to the
    next: the store notices the other replica's commits by reading the rooms' versions."""
    url = pooler.url(postgres.new_database())
    store, other = Store(url), Store(url)
    try:
        for n in range(6):  # the same statements from both, more often than psycopg prepares them after
            store.add_message("general", "Ada", f"message {n}")
            other.add_message("general", "Bob", f"reply {n}")
        for text in ("from another replica", "and again"):  # the second: after the polling has begun
            version, seen = store.cached_version("general"), store.changes()
            other.add_message("general", "Bob", text)
            wait_until(lambda: store.wait_for_change(seen, timeout=0.5) != seen, timeout=10)
            assert store.cached_version("general") == version + 1
            assert store.cached_recent("general", 100, 0, version + 1)[-1].text == text
    finally:
        store.close()
        other.close()
