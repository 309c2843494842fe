import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_openai import Reply
from llm import DemoModel, OpenAIModel, make_client
from settings import Settings
from postgres import query
from store import INTERRUPTED_NOTE, DatabaseUnavailable, InvalidInput, Store, open_store
from worker import Busy, LiveReply, ReplyWorker, SlowDown

SENTENCES = [
    "The first sentence is right here.",
    " A second one follows it!",
    " Is this the third sentence?",
    " Yes, and it ends the reply.",
]
PIECES = [word for sentence in SENTENCES for word in sentence.split(" ") if word]
PIECES = [PIECES[0]] + [" " + p for p in PIECES[1:]]
TEXT = "".join(PIECES)


# The model stream's timing, faults and reasoning are tested on SQLite only;
# what the worker stores, on both engines (tests/test_store.py holds the store's contract).
pytestmark = pytest.mark.engines("sqlite")
BOTH_ENGINES = pytest.mark.engines("sqlite", "postgresql")

@pytest.fixture
def make_worker(store, server):
    workers = []

    def make(**options):
        timeouts = {"idle_timeout_s": 2.0, "first_token_timeout_s": 4.0}
        timeouts.update((name, options.pop(name)) for name in list(timeouts) if name in options)
        settings = Settings(openai_api_key="sk-test", openai_base_url=server.base_url, **timeouts)
        model = options.pop("model", None) or OpenAIModel(make_client(settings), "test-model", **timeouts)
        worker = ReplyWorker(options.pop("store", store), model, system_prompt="Be brief.", **timeouts, **options)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        assert worker.shutdown(timeout=10)


def ask(store, worker, text="@gpt hello", room="general", asker="Ada") -> LiveReply:
    question = store.add_message(room, asker, text)
    return worker.ask(room, asker, reply_to=question.id)


def wait_done(reply: LiveReply, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not reply.done and time.monotonic() < deadline:
        reply.wait(len(reply.text()), 0.1)
    assert reply.done, "reply did not finish"


def wait_for_text(reply: LiveReply, chars: int, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(reply.text()) < chars and time.monotonic() < deadline:
        reply.wait(len(reply.text()), 0.1)
    assert len(reply.text()) >= chars


@BOTH_ENGINES
def test_reply_completes_and_is_stored_exactly_as_streamed(store, server, make_worker):
    server.enqueue(Reply(pieces=PIECES))
    worker = make_worker()
    reply = ask(store, worker)
    wait_done(reply)
    stored = store.get(reply.message_id)
    assert reply.text() == stored.text == TEXT == server.sent[0].text
    assert (reply.status, stored.status, stored.role, stored.author) == ("complete", "complete", "assistant", "GPT")
    # The model saw the system prompt and the question with its author.
    messages = server.requests[0]["body"]["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[-1] == {"role": "user", "content": "Ada: @gpt hello"}


@BOTH_ENGINES
def test_reply_is_persisted_once_per_sentence_and_counted(store, server, make_worker):
    server.enqueue(Reply(pieces=PIECES))
    worker = make_worker()
    reply = ask(store, worker)
    wait_done(reply)
    chunks = [text for (text,) in query(store, "SELECT text FROM chunks WHERE message_id = ? ORDER BY seq", [reply.message_id])]
    assert chunks == SENTENCES
    stats = reply.stats
    assert stats.tokens == len(PIECES)
    assert stats.chunks == len(SENTENCES)
    assert stats.commits == len(SENTENCES) + 1  # start; the last sentence goes with the final status
    assert stats.bytes_written == len(TEXT.encode())
    assert stats.bytes_written < stats.seed_bytes < stats.per_token_bytes
    assert worker.totals.tokens == len(PIECES)


def test_the_asker_follows_token_by_token(store, server, make_worker):
    server.enqueue(Reply(pieces=PIECES, delay_s=0.03))
    worker = make_worker()
    reply = ask(store, worker)
    states = list(reply.follow(timeout=0.01))
    assert len(states) > len(SENTENCES) * 2  # many more steps than sentences
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(states, states[1:]))  # only grows
    assert states[-1] == TEXT == store.get(reply.message_id).text


@BOTH_ENGINES
def test_viewer_polling_the_store_sees_only_sentence_boundaries(store, server, make_worker):
    server.enqueue(Reply(pieces=PIECES, delay_s=0.03))
    worker = make_worker()
    reply = ask(store, worker)
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        message = store.get(reply.message_id)
        if not seen or seen[-1] != message.text:
            seen.append(message.text)
        if message.is_final:
            break
        time.sleep(0.005)
    boundaries = {"".join(SENTENCES[:i]) for i in range(len(SENTENCES) + 1)}
    assert set(seen) <= boundaries
    assert len(seen) >= 3  # it grew in steps, not all at once
    assert seen[-1] == TEXT


def test_follower_attaching_midway_sees_the_same_final_text(store, server, make_worker):
    server.enqueue(Reply(pieces=PIECES, delay_s=0.02))
    worker = make_worker()
    reply = ask(store, worker)
    wait_for_text(reply, 30)
    again = worker.get(reply.message_id)  # as after a rerun of the asker's script
    assert again is reply
    states = list(again.follow())
    assert len(states[0]) >= 30  # the text so far, at once
    assert states[-1] == TEXT
    assert worker.get(reply.message_id).text() == TEXT  # still there once finished


@BOTH_ENGINES
def test_stop_keeps_the_text_so_far_and_closes_the_model_stream(store, server, make_worker):
    server.enqueue(Reply(pieces=["word "] * 400, delay_s=0.01))
    worker = make_worker()
    reply = ask(store, worker)
    wait_for_text(reply, 50)
    reply.cancel()
    wait_done(reply)
    stored = store.get(reply.message_id)
    assert (reply.status, stored.status) == ("stopped", "stopped")
    assert stored.text == reply.text() and len(stored.text) >= 50
    assert server.sent[0].done.wait(5) and server.sent[0].aborted
    assert server.sent[0].pieces_sent < 400


def test_stop_is_immediate_even_while_the_model_is_silent(store, server, make_worker):
    server.enqueue(Reply(pieces=["Thinking hard..."], hang=True))
    worker = make_worker()
    reply = ask(store, worker)
    wait_for_text(reply, 5)
    started = time.monotonic()
    reply.cancel()
    wait_done(reply, timeout=1)
    assert time.monotonic() - started < 0.5
    assert store.get(reply.message_id).status == "stopped"
    assert store.get(reply.message_id).text == "Thinking hard..."


def test_stopping_twice_is_harmless(store, server, make_worker):
    server.enqueue(Reply(pieces=["word "] * 200, delay_s=0.01))
    worker = make_worker()
    reply = ask(store, worker)
    wait_for_text(reply, 10)
    reply.cancel()
    reply.cancel()
    wait_done(reply)
    assert store.get(reply.message_id).status == "stopped"


PROVIDER_FAULTS = {
    "dropped connection": ({"drop": True}, "connection"),
    "401": ({"status": 401}, "API key"),
    "429": ({"status": 429, "headers": {"retry-after-ms": "1"}}, "rate-limiting"),
    "500": ({"status": 500, "headers": {"retry-after-ms": "1"}}, "answered 500"),
    "503": ({"status": 503, "headers": {"retry-after-ms": "1"}}, "answered 503"),
    "error event in a 200 stream": ({"error_event": {"message": "overloaded"}}, "overloaded"),
    "malformed SSE line": ({"raw_lines": ["data: {oops"]}, "malformed"),
    "hang": ({"hang": True}, "sent nothing"),
    "no finish reason": ({"finish_reason": None, "usage": False}, "cut off"),
}


@pytest.mark.parametrize("fault", PROVIDER_FAULTS, ids=list(PROVIDER_FAULTS))
def test_provider_faults_end_the_reply_with_its_text_and_the_room_goes_on(store, server, make_worker, fault):
    misbehaviour, note = PROVIDER_FAULTS[fault]
    # Status errors are retried before the first token, so the server answers each try the same way.
    server.enqueue(*[Reply(pieces=PIECES[:8], **misbehaviour)] * 3)
    worker = make_worker()
    reply = ask(store, worker)
    wait_done(reply, timeout=10)
    stored = store.get(reply.message_id)
    sent = server.sent[-1].text
    assert (reply.status, stored.status) == ("error", "error")
    assert stored.text == reply.text() == sent  # partial text kept, nothing duplicated
    assert note in stored.error and stored.error == reply.error
    if "status" not in misbehaviour:
        assert len(server.requests) == 1  # never retried once text had arrived
    server.queue.clear()
    server.enqueue(Reply(pieces=PIECES))
    after = ask(store, worker, text="@gpt again")
    wait_done(after)
    assert store.get(after.message_id).text == TEXT


def test_provider_refusal_stores_an_empty_error_reply(store, server, make_worker):
    server.enqueue(Reply(status=401))
    worker = make_worker()
    reply = ask(store, worker)
    wait_done(reply)
    stored = store.get(reply.message_id)
    assert (stored.status, stored.text) == ("error", "")
    assert "API key" in stored.error and "sk-test" not in stored.error


@BOTH_ENGINES
def test_concurrency_limit_refuses_clearly_and_stores_nothing(store, server, make_worker):
    server.default = Reply(pieces=["word "] * 100, delay_s=0.02)
    worker = make_worker(max_concurrent=2)
    first = ask(store, worker, asker="Ada")
    second = ask(store, worker, asker="Bob")
    replies_before = query(store, "SELECT COUNT(*) FROM messages WHERE role = 'assistant'")
    with pytest.raises(Busy, match="already writing 2 replies"):
        worker.ask("general", "Cy")
    assert query(store, "SELECT COUNT(*) FROM messages WHERE role = 'assistant'") == replies_before
    first.cancel()
    wait_done(first)
    third = worker.ask("general", "Cy")  # a slot is free again
    second.cancel()
    third.cancel()
    wait_done(third)


@BOTH_ENGINES
def test_rate_limit_per_asker(store, make_worker):
    worker = make_worker(model=DemoModel(tokens_per_s=5000), replies_per_minute=2)
    for _ in range(2):
        wait_done(worker.ask("general", "session-ada"))
    with pytest.raises(SlowDown, match=r"2 times a minute; please wait (59|60) s\."):
        worker.ask("general", "session-ada")
    wait_done(worker.ask("general", "session-bob"))  # others are not affected
    query(store, "UPDATE messages SET created_at = created_at - 61 WHERE asker = 'session-ada'")  # a minute later
    wait_done(worker.ask("general", "session-ada"))


@BOTH_ENGINES
def test_five_concurrent_replies_lose_nothing(store, server, make_worker):
    server.default = Reply(echo=12, delay_s=0.002)
    worker = make_worker(max_concurrent=5)
    replies = [ask(store, worker, text=f"@gpt reply{i} number {i} please.", asker=f"p{i}") for i in range(5)]
    for reply in replies:
        wait_done(reply, timeout=20)
    sent = {s.text for s in server.sent}
    for i, reply in enumerate(replies):
        stored = store.get(reply.message_id)
        assert stored.status == "complete"
        assert stored.text == reply.text() and stored.text in sent
        assert stored.text.count(f"reply{i}") == 12  # its own words, none of another reply's
        assert stored.text.count("reply") == 12


@BOTH_ENGINES
def test_reply_completes_and_is_stored_when_nobody_follows_it(store, db_path, server, make_worker):
    server.enqueue(Reply(pieces=PIECES, delay_s=0.01))
    worker = make_worker()
    reply = ask(store, worker)
    message_id = reply.message_id
    del reply  # the asker's session is gone
    other_viewer = open_store(store.location)
    deadline = time.monotonic() + 10
    while other_viewer.get(message_id).status == "streaming" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert other_viewer.get(message_id).status == "complete"
    assert other_viewer.get(message_id).text == TEXT


@BOTH_ENGINES
def test_shutdown_ends_every_reply_in_a_final_state(store, server, make_worker):
    server.default = Reply(pieces=["word "] * 500, delay_s=0.01)
    worker = make_worker()
    replies = [ask(store, worker, asker=f"p{i}") for i in range(3)]
    for reply in replies:
        wait_for_text(reply, 5)
    assert worker.shutdown(timeout=5)
    assert {store.get(r.message_id).status for r in replies} == {"interrupted"}
    assert all(store.get(r.message_id).text == r.text() != "" for r in replies)
    with pytest.raises(Busy):
        worker.ask("general", "late")


def test_demo_model_reply_through_the_worker(store, make_worker):
    worker = make_worker(model=DemoModel(tokens_per_s=2000))
    reply = ask(store, worker, text="@gpt how does this work?")
    wait_done(reply)
    stored = store.get(reply.message_id)
    assert stored.status == "complete" and "how does this work?" in stored.text
    assert reply.stats.chunks >= 4


def test_post_stores_a_plain_message_without_a_reply(store, make_worker):
    worker = make_worker(model=DemoModel(tokens_per_s=5000))
    posted = worker.post("general", "Ada", "just chatting, no mention of the gpt")
    assert posted.reply is None
    assert [(m.author, m.text) for m in store.recent("general")] == [("Ada", "just chatting, no mention of the gpt")]


@BOTH_ENGINES
@pytest.mark.parametrize("text", ["@gpt hi", "Hey @GPT, what's up?", "@Gpt"])
def test_post_with_a_mention_stores_the_question_and_starts_the_reply(store, make_worker, text):
    worker = make_worker(model=DemoModel(tokens_per_s=5000))
    posted = worker.post("general", "Ada", text)
    wait_done(posted.reply)
    question, answer = store.recent("general")
    assert (question.text, answer.reply_to, answer.status) == (text, question.id, "complete")


@BOTH_ENGINES
def test_refused_posts_store_nothing(store, make_worker):
    worker = make_worker(model=DemoModel(tokens_per_s=5000), replies_per_minute=1)
    wait_done(worker.post("general", "Ada", "@gpt one").reply)
    count = len(store.recent("general"))
    with pytest.raises(SlowDown):
        worker.post("general", "Ada", "@gpt two")
    with pytest.raises(InvalidInput):
        worker.post("general", "Bob", "@gpt " + "x" * 4000)
    assert len(store.recent("general")) == count
    wait_done(worker.post("general", "Bob", "@gpt three").reply)  # Bob's refusal cost him nothing


def test_busy_post_stores_nothing(store, server, make_worker):
    server.default = Reply(pieces=["word "] * 100, delay_s=0.02)
    worker = make_worker(max_concurrent=1)
    first = worker.post("general", "Ada", "@gpt long one").reply
    count = len(store.recent("general"))
    with pytest.raises(Busy):
        worker.post("general", "Bob", "@gpt me too")
    assert len(store.recent("general")) == count
    first.cancel()
    wait_done(first)


def test_latest_reply_of_a_room(store, make_worker):
    worker = make_worker(model=DemoModel(tokens_per_s=5000))
    assert worker.latest("general") is None
    first = worker.post("general", "Ada", "@gpt one").reply
    wait_done(first)
    other = worker.post("random", "Ada", "@gpt two").reply
    wait_done(other)
    assert worker.latest("general") is first
    assert worker.latest("random") is other


def test_keep_alive_comments_do_not_keep_a_silent_reply_open(store, server, make_worker):
    server.enqueue(Reply(pieces=PIECES[:5], keepalive=True))
    worker = make_worker(idle_timeout_s=1.0)
    reply = ask(store, worker)
    started = time.monotonic()
    wait_done(reply, timeout=10)
    assert time.monotonic() - started < 5
    stored = store.get(reply.message_id)
    assert (stored.status, stored.text) == ("error", "".join(PIECES[:5]))
    assert "sent nothing" in stored.error
    assert server.sent[-1].done.wait(5)  # the stream was closed too


@BOTH_ENGINES
def test_retry_answers_its_question_without_the_failed_reply(store, server, make_worker):
    worker = make_worker()
    server.enqueue(Reply(pieces=["Half an"], error_event={"message": "boom"}))
    posted = worker.post("general", "Ada", "@gpt what is SQLite?")
    wait_done(posted.reply)
    store.add_message("general", "Bob", "anyone up for pizza tonight?")
    server.enqueue(Reply(pieces=["A database."]))
    retried = worker.ask("general", "Ada", reply_to=posted.message.id)
    wait_done(retried)
    messages = server.requests[-1]["body"]["messages"]
    assert messages[-1] == {"role": "user", "content": "Ada: @gpt what is SQLite?"}
    assert all("Half an" not in m["content"] and "pizza" not in m["content"] for m in messages)
    assert store.get(retried.message_id).reply_to == posted.message.id


class FlakyStore(Store):
    """A real store whose final writes fail as a database locked past its busy timeout does, a set number of times."""

    def __init__(self, path, failures: int):
        super().__init__(path)
        self.failures = failures

    def finish_reply(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise DatabaseUnavailable(f"The SQLite database {self.location} cannot be opened or used: database is locked")
        return super().finish_reply(*args, **kwargs)


def test_a_final_write_that_keeps_failing_is_retried_later(db_path, server):
    store = FlakyStore(db_path, failures=3)
    worker = ReplyWorker(store, OpenAIModel(make_client(Settings(openai_base_url=server.base_url)), "m"), "")
    worker.final_write_attempts = 2
    server.enqueue(Reply(pieces=PIECES))
    reply = worker.post("general", "Ada", "@gpt hi").reply
    wait_done(reply)
    assert reply.status == "error"  # as far as anyone following it can tell
    assert store.get(reply.message_id).status == "streaming"
    worker.tidy()  # still locked: tries again later
    assert store.get(reply.message_id).status == "streaming"
    worker.tidy()
    stored = store.get(reply.message_id)
    assert (stored.status, stored.text) == ("complete", TEXT)
    worker.shutdown()


def test_a_post_whose_reply_cannot_be_created_stores_no_question(db_path, make_worker):
    class NoReplies(Store):
        def _insert_reply(self, *args):
            raise sqlite3.OperationalError("disk I/O error")

    worker = ReplyWorker(NoReplies(db_path), DemoModel(tokens_per_s=5000), "")
    with pytest.raises(sqlite3.OperationalError):
        worker.post("general", "Ada", "@gpt hello")
    assert worker.store.recent("general") == []
    assert worker.post("general", "Ada", "no mention, still fine").reply is None  # slot given back
    worker.shutdown()


# Reasoning models: thinking is progress, budgets and empty replies are explained


def test_reasoning_longer_than_the_idle_timeout_then_text_completes_without_the_reasoning(store, server, make_worker):
    server.enqueue(Reply(reasoning=["private chain of thought "] * 30, delay_s=0.1, pieces=PIECES))  # 3 s; idle 2 s
    worker = make_worker()
    reply = ask(store, worker)
    wait_for_thinking = time.monotonic() + 5
    while not reply.thinking and time.monotonic() < wait_for_thinking:
        time.sleep(0.01)
    assert reply.thinking and reply.text() == ""
    wait_done(reply)
    stored = store.get(reply.message_id)
    assert (stored.status, stored.text) == ("complete", TEXT)
    assert "private" not in stored.text


def test_silent_thinking_longer_than_the_idle_timeout_is_allowed_before_the_first_word(store, server, make_worker):
    server.enqueue(Reply(think_s=3.0, pieces=PIECES))  # idle 2 s, first token 4 s
    worker = make_worker()
    reply = ask(store, worker)
    wait_done(reply, timeout=10)
    assert (store.get(reply.message_id).status, store.get(reply.message_id).text) == ("complete", TEXT)


def test_silence_past_the_first_token_timeout_ends_the_reply_and_says_how_long(store, server, make_worker):
    server.enqueue(Reply(think_s=30, pieces=PIECES))
    worker = make_worker(first_token_timeout_s=1.5)
    reply = ask(store, worker)
    wait_done(reply, timeout=10)
    stored = store.get(reply.message_id)
    assert (stored.status, stored.text) == ("error", "")
    assert "sent nothing for 1.5 seconds" in stored.error
    assert server.sent[-1].done.wait(5), server.sent  # the stream was closed


def test_a_reply_cut_at_the_token_budget_is_kept_and_marked(store, server, make_worker):
    server.enqueue(Reply(pieces=PIECES[:6], finish_reason="length"))
    worker = make_worker()
    reply = ask(store, worker)
    wait_done(reply)
    stored = store.get(reply.message_id)
    assert (stored.status, stored.text) == ("truncated", "".join(PIECES[:6]))


def test_a_budget_spent_on_reasoning_alone_ends_as_an_error_a_person_can_act_on(store, server, make_worker):
    server.enqueue(Reply(reasoning=["thinking "] * 10, pieces=[], finish_reason="length"))
    worker = make_worker()
    reply = ask(store, worker)
    wait_done(reply)
    stored = store.get(reply.message_id)
    assert (stored.status, stored.text) == ("error", "")
    assert "OPENAI_MAX_TOKENS" in stored.error


@BOTH_ENGINES
def test_the_providers_usage_figures_are_stored_with_the_reply(store, server, make_worker):
    figures = {"prompt_tokens": 12, "completion_tokens": 300, "total_tokens": 312,
               "completion_tokens_details": {"reasoning_tokens": 256}}
    server.enqueue(Reply(pieces=PIECES, usage_figures=figures))
    worker = make_worker()
    reply = ask(store, worker)
    wait_done(reply)
    stored = store.get(reply.message_id)
    assert (stored.prompt_tokens, stored.completion_tokens, stored.reasoning_tokens) == (12, 300, 256)
    assert (reply.usage.prompt_tokens, reply.usage.reasoning_tokens) == (12, 256)


def test_a_chinese_reply_is_stored_at_its_sentence_ends(store, server, make_worker):
    sentences = ["今天天气很好，我们一起去公园散步吧！", "你觉得这个主意怎么样？", "好的，那就这么定了，下午三点见。", "记得带水。"]
    text = "".join(sentences)
    pieces = [text[i : i + 2] for i in range(0, len(text), 2)]  # tokens of one or two characters
    server.enqueue(Reply(pieces=pieces, delay_s=0.02))
    worker = make_worker()
    reply = ask(store, worker, text="@gpt 明天做什么？")
    wait_done(reply)
    chunks = [text for (text,) in query(store, "SELECT text FROM chunks WHERE message_id = ? ORDER BY seq", [reply.message_id])]
    assert "".join(chunks) == text
    assert len(chunks) >= 3
    assert all(chunk[-1] in "。！？" for chunk in chunks), chunks  # never a forced cut mid-sentence


# Several replicas on one database


def beats_of(store, owner: str) -> list[float]:
    return [beat_at for (beat_at,) in query(store, "SELECT beat_at FROM replicas WHERE owner = ?", [owner])]


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


@BOTH_ENGINES
def test_a_replica_beats_while_it_lives_and_leaves_at_shutdown(store, make_worker):
    worker = make_worker(model=DemoModel(tokens_per_s=5000), owner="replica-a", beat_every_s=0.1)
    wait_until(lambda: beats_of(store, "replica-a"))
    [first] = beats_of(store, "replica-a")
    wait_until(lambda: beats_of(store, "replica-a")[0] > first)
    assert worker.shutdown(timeout=5)
    assert beats_of(store, "replica-a") == []


@BOTH_ENGINES
def test_a_silent_reply_of_a_replica_that_beats_outlives_another_replicas_housekeeping(
    store, other_store, server, make_worker
):
    server.enqueue(Reply(think_s=2.0, pieces=PIECES))  # silent for 2 s; the other replica allows 0.4 s
    writer = make_worker(owner="replica-a", beat_every_s=0.05)  # also while it waits to hear of stop requests
    tidier = make_worker(store=other_store, model=DemoModel(), owner="replica-b", stale_after_s=0.4)
    store.beat("replica-gone")
    gone = store.start_reply("general", owner="replica-gone")
    query(store, "UPDATE replicas SET beat_at = beat_at - 1 WHERE owner = 'replica-gone'")
    reply = ask(store, writer)
    while not reply.done:
        tidier.tidy()
        time.sleep(0.1)
    assert store.get(gone.id).status == "interrupted"  # the housekeeping did run
    stored = store.get(reply.message_id)
    assert (reply.status, stored.status, stored.text) == ("complete", "complete", TEXT)


KILLED_REPLICA = """
import sys, time
from llm import DemoModel
from store import open_store
from worker import ReplyWorker
worker = ReplyWorker(open_store(sys.argv[1]), DemoModel(tokens_per_s=20), "", beat_every_s=0.1)
print(worker.post("general", "Ada", "@gpt tell me everything").reply.message_id, flush=True)
time.sleep(60)
"""


@BOTH_ENGINES
@pytest.mark.parametrize("where", ["this host", "another host"])
def test_the_replies_of_a_killed_replica_end_interrupted_as_another_replica_sees_it(store, db_path, make_worker, where):
    replica = subprocess.Popen(
        [sys.executable, "-c", KILLED_REPLICA, store.location],
        cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, text=True,
    )
    try:
        message_id = int(replica.stdout.readline())
        wait_until(lambda: store.get(message_id).text)  # a sentence is stored
    finally:
        replica.kill()
        replica.wait()
    owner, text = store.get(message_id).owner, store.get(message_id).text
    assert store.get(message_id).status == "streaming"
    assert query(store, "SELECT pid FROM replicas WHERE owner = ?", [owner]) == [(replica.pid,)]
    if where == "this host":
        assert store.recover_interrupted() == 1  # at start-up: its pid is gone from this very pid space
    else:
        query(store, "UPDATE replicas SET pid_space = 'another host' WHERE owner = ?", [owner])
        assert store.recover_interrupted() == 0  # it beat within the last 30 s
        survivor = make_worker(model=DemoModel(), owner="replica-b", stale_after_s=0.5)
        started = time.monotonic()
        survivor.start_housekeeping(interval_s=0.1)
        wait_until(lambda: store.get(message_id).status != "streaming")
        assert time.monotonic() - started < 2
    stored = store.get(message_id)
    assert (stored.status, stored.text, stored.error) == ("interrupted", text, INTERRUPTED_NOTE)


@BOTH_ENGINES
def test_the_concurrency_limit_counts_the_replies_of_every_replica(store, other_store, server, make_worker):
    server.default = Reply(pieces=["word "] * 200, delay_s=0.02)
    replica_a = make_worker(owner="replica-a", max_concurrent=2)
    replica_b = make_worker(store=other_store, owner="replica-b", max_concurrent=2)
    first = replica_a.post("general", "Ada", "@gpt one", asker="tab-ada").reply
    second = replica_a.post("general", "Bob", "@gpt two", asker="tab-bob").reply
    count = len(store.recent("general"))
    with pytest.raises(Busy) as refused:
        replica_b.post("general", "Cy", "@gpt three", asker="tab-cy")
    assert str(refused.value) == "The assistant is already writing 2 replies; please ask again when one has finished."
    assert len(store.recent("general")) == count  # neither the question nor a reply
    assert replica_b.post("general", "Cy", "no mention, so no limit").reply is None
    first.cancel()
    wait_done(first)
    third = replica_b.post("general", "Cy", "@gpt three", asker="tab-cy").reply  # a slot is free again
    assert store.get(third.message_id).owner == "replica-b"
    for reply in (second, third):
        reply.cancel()
        wait_done(reply)


@BOTH_ENGINES
def test_the_rate_limit_holds_across_replicas(store, other_store, make_worker):
    replica_a = make_worker(model=DemoModel(tokens_per_s=5000), owner="replica-a", replies_per_minute=2)
    replica_b = make_worker(store=other_store, model=DemoModel(tokens_per_s=5000), owner="replica-b",
                            replies_per_minute=2)
    wait_done(replica_a.post("general", "Ada", "@gpt one", asker="tab-ada").reply)
    wait_done(replica_b.post("general", "Ada", "@gpt two", asker="tab-ada").reply)
    count = len(store.recent("general"))
    for replica in (replica_a, replica_b):
        with pytest.raises(SlowDown, match=r"^You can ask the assistant 2 times a minute; please wait (59|60) s\.$"):
            replica.post("general", "Ada", "@gpt three", asker="tab-ada")
    assert len(store.recent("general")) == count
    wait_done(replica_b.post("general", "Bob", "@gpt mine", asker="tab-bob").reply)  # another tab asks freely


@BOTH_ENGINES
@pytest.mark.parametrize("model_reply", [
    Reply(pieces=["word "] * 400, delay_s=0.01),
    Reply(pieces=["Thinking hard..."], hang=True),  # nothing to write meanwhile
], ids=["talking", "silent"])
def test_a_stop_requested_through_another_replica_ends_the_reply_within_a_second(
    store, other_store, server, make_worker, model_reply
):
    server.enqueue(model_reply)
    writer = make_worker(owner="replica-a")
    reply = ask(store, writer)
    wait_for_text(reply, 10)
    started = time.monotonic()
    assert other_store.request_stop(reply.message_id)
    wait_done(reply, timeout=2)
    assert time.monotonic() - started < 1
    stored = store.get(reply.message_id)
    assert (reply.status, stored.status) == ("stopped", "stopped")
    assert stored.text == reply.text() and len(stored.text) >= 10
    if not model_reply.hang:  # a hanging server notices the close only when it writes again
        assert server.sent[0].done.wait(5) and server.sent[0].aborted  # the model stream was closed


@BOTH_ENGINES
def test_stop_through_either_replica_keeps_the_text(store, other_store, server, make_worker):
    server.default = Reply(pieces=["word "] * 400, delay_s=0.01)
    replica_a = make_worker(owner="replica-a")
    replica_b = make_worker(store=other_store, owner="replica-b")
    here, there = ask(store, replica_a), ask(store, replica_a, asker="Bob")
    wait_for_text(here, 10)
    wait_for_text(there, 10)
    assert replica_a.stop(here.message_id)  # the replica writing it: at once
    assert replica_b.stop(there.message_id)  # another replica: through the store
    for reply in (here, there):
        wait_done(reply, timeout=2)
        assert (store.get(reply.message_id).status, store.get(reply.message_id).text) == ("stopped", reply.text())
    assert not replica_b.stop(there.message_id)  # over already
