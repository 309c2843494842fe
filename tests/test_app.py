"""The Streamlit script, run by AppTest against a real SQLite file."""

import os

import pytest
import streamlit as st
from fake_openai import Reply
from live import wait_until
from streamlit.testing.v1 import AppTest

from llm import demo_reply
from markup import escape_markdown
from store import Store

APP = os.path.join(os.path.dirname(__file__), "..", "app.py")
KEY = "sk-app-test-secret-42"


@pytest.fixture
def env(monkeypatch, db_path):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHAT_DB_PATH", str(db_path))
    monkeypatch.setenv("CHAT_DEMO_TOKENS_PER_S", "5000")
    return monkeypatch


@pytest.fixture(autouse=True)
def released():
    """Each test's worker and store are released after it (AppTest shares Streamlit's caches in this process)."""
    yield
    st.cache_resource.clear()


def open_app(room=None, name="Ada") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=20)
    if room:
        at.query_params["room"] = room
    if name:
        at.query_params["name"] = name
    return at.run()


def messages(at):
    """(caption, body) of each chat message on the page."""
    return [
        (m.caption[0].value if m.caption else "", m.markdown[0].value if m.markdown else "")
        for m in at.chat_message
    ]


def everything_shown(at) -> str:
    parts = []
    for kind in ("markdown", "caption", "warning", "error", "code", "text_input", "subheader"):
        for element in getattr(at, kind):
            parts.append(str(getattr(element, "value", "")))
    return "\n".join(parts)


def test_first_visit_picks_a_name_and_writes_it_into_the_url(env):
    at = open_app(name=None)
    assert not at.exception
    name = at.query_params["name"][0] if isinstance(at.query_params["name"], list) else at.query_params["name"]
    assert name and " " in name
    assert at.sidebar.text_input[0].value == name
    assert "No messages yet" in everything_shown(at)
    assert at.subheader[0].value == "#general"


def test_sending_a_message_stores_and_shows_it(env, db_path):
    at = open_app()
    at.chat_input[0].set_value("Hello **everyone**").run()
    assert not at.exception
    assert messages(at) == [("**Ada** · you", "Hello **everyone**")]
    [stored] = Store(db_path).recent("general")
    assert (stored.author, stored.text, stored.role) == ("Ada", "Hello **everyone**", "user")


def test_a_gpt_mention_gets_a_completed_reply(env, db_path):
    at = open_app()
    at.chat_input[0].set_value("@gpt what is this room?").run()
    assert not at.exception
    question, answer = Store(db_path).recent("general")
    assert answer.status == "complete" and answer.reply_to == question.id
    assert answer.text.startswith("Hi Ada! You asked me: “what is this room?”")
    at.run()  # the finished reply is drawn from the store
    assert messages(at)[-1] == ("**GPT**", answer.text)
    assert "offline demo model" in everything_shown(at)
    assert f"{answer.text.count(' ') + 1} tokens streamed" in everything_shown(at)


@pytest.mark.parametrize(
    "text, complaint",
    [("   ", "empty"), ("x" * 4001, "limit is 4,000"), ("@gpt " + "y" * 4000, "limit is 4,000")],
)
def test_refused_input_shows_a_message_and_stores_nothing(env, db_path, text, complaint):
    at = open_app()
    at.chat_input[0].set_value(text).run()
    assert not at.exception
    assert any(complaint in w.value for w in at.warning)
    assert Store(db_path).recent("general") == []


def test_rate_limit_refusal_stores_nothing(env, db_path):
    env.setenv("CHAT_REPLIES_PER_MINUTE", "1")
    at = open_app()
    at.chat_input[0].set_value("@gpt first").run()
    at.chat_input[0].set_value("@gpt second").run()
    assert not at.exception
    assert any("1 times a minute" in w.value for w in at.warning)
    assert [m.text for m in Store(db_path).recent("general") if m.role == "user"] == ["@gpt first"]


def test_room_and_name_come_from_the_query_string(env, db_path):
    Store(db_path).add_message("games", "Bob", "anyone for chess?")
    at = open_app(room="games", name="Cy")
    assert not at.exception
    assert at.subheader[0].value == "#games"
    assert messages(at) == [("**Bob**", "anyone for chess?")]
    at.chat_input[0].set_value("me!").run()
    assert [(m.author, m.room) for m in Store(db_path).recent("games")][-1] == ("Cy", "games")


def test_bad_room_or_reserved_name_in_the_url_is_explained(env):
    at = open_app(room="../etc", name="GPT")
    assert not at.exception
    shown = everything_shown(at)
    assert "Room names use" in shown and "reserved" in shown
    assert at.subheader[0].value == "#general"
    assert at.sidebar.text_input[0].value != "GPT"


def test_changing_name_in_the_sidebar_validates_it(env):
    at = open_app()
    at.sidebar.text_input[0].set_value("GPT").run()
    assert any("reserved" in w.value for w in at.sidebar.warning)
    at.sidebar.text_input[0].set_value("Grace").run()
    at.chat_input[0].set_value("hi").run()
    assert messages(at)[-1] == ("**Grace** · you", "hi")


def test_others_messages_are_not_marked_as_yours(env, db_path):
    Store(db_path).add_message("general", "Bob", "hello Ada")
    at = open_app()
    at.chat_input[0].set_value("hello Bob").run()
    assert messages(at) == [("**Bob**", "hello Ada"), ("**Ada** · you", "hello Bob")]
    assert [m.name for m in at.chat_message] == ["Bob", "user"]


def test_a_reply_left_streaming_by_a_dead_process_shows_as_interrupted(env, db_path, dead_owner):
    store = Store(db_path)
    question = store.add_message("general", "Ada", "@gpt tell me")
    reply = store.start_reply("general", reply_to=question.id, owner=dead_owner)
    store.append_chunk(reply.id, "Half of an answer.")
    at = open_app()
    assert not at.exception
    assert Store(db_path).get(reply.id).status == "interrupted"
    assert messages(at)[-1] == ("**GPT**", "Half of an answer.")
    assert "Interrupted" in everything_shown(at)
    assert at.button(key=f"retry-{reply.id}")  # the asker may retry


def test_provider_error_shows_a_note_and_retry_works(env, db_path, server):
    env.setenv("OPENAI_BASE_URL", server.base_url)
    env.setenv("OPENAI_API_KEY", KEY)
    server.enqueue(Reply(pieces=["Partial", " answer"], error_event={"message": "model overloaded"}))
    at = open_app()
    at.chat_input[0].set_value("@gpt are you there?").run()
    at.run()
    assert not at.exception
    failed = Store(db_path).recent("general")[-1]
    assert (failed.status, failed.text) == ("error", "Partial answer")
    assert "model overloaded" in everything_shown(at)
    assert "Traceback" not in everything_shown(at)
    server.enqueue(Reply(pieces=["All", " good", " now."]))
    at.button(key=f"retry-{failed.id}").click().run()
    at.run()
    retried = Store(db_path).recent("general")[-1]
    assert (retried.status, retried.text, retried.reply_to) == ("complete", "All good now.", failed.reply_to)
    assert KEY not in everything_shown(at)


def test_the_sidebar_shows_what_the_latest_reply_cost_in_tokens_and_a_cut_reply_says_so(env, db_path, server):
    env.setenv("OPENAI_BASE_URL", server.base_url)
    env.setenv("OPENAI_API_KEY", KEY)
    figures = {"prompt_tokens": 12, "completion_tokens": 300, "total_tokens": 312,
               "completion_tokens_details": {"reasoning_tokens": 256}}
    server.enqueue(Reply(pieces=["A", " long", " answer"], finish_reason="length", usage_figures=figures))
    at = open_app()
    at.chat_input[0].set_value("@gpt explain everything").run()
    at.run()
    assert not at.exception
    assert Store(db_path).recent("general")[-1].status == "truncated"
    assert messages(at)[-1] == ("**GPT**", "A long answer")
    shown = everything_shown(at)
    assert "Cut short" in shown
    assert "12 prompt tokens and 300 completion tokens, 256 of them reasoning" in shown


def test_model_name_is_shown_and_the_key_is_not(env, server):
    env.setenv("OPENAI_BASE_URL", server.base_url)
    env.setenv("OPENAI_API_KEY", KEY)
    env.setenv("OPENAI_MODEL", "llama3.2")
    at = open_app()
    shown = everything_shown(at)
    assert escape_markdown("llama3.2") in shown and "offline demo model" not in shown
    assert KEY not in shown


def test_bad_configuration_is_explained_without_a_traceback(env):
    env.setenv("CHAT_MAX_CONCURRENT", "lots")
    at = open_app()
    assert not at.exception
    assert "CHAT_MAX_CONCURRENT" in at.error[0].value


def test_unusable_database_path_is_explained(env, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    env.setenv("CHAT_DB_PATH", str(not_a_folder / "chat.db"))
    at = open_app()
    assert not at.exception
    assert "cannot be opened" in at.error[0].value and "CHAT_DB_PATH" in at.error[0].value


def test_a_file_that_is_not_a_database_is_explained_and_left_as_it_was(env, db_path):
    notes = b"Not a database: someone's notes, saved where the chat's file should be.\n" * 100
    db_path.write_bytes(notes)
    at = open_app()
    assert not at.exception
    assert "cannot be opened or used: file is not a database" in at.error[0].value
    assert "CHAT_DB_PATH" in at.error[0].value
    assert db_path.read_bytes() == notes


def test_demo_reply_matches_what_the_page_shows(env, db_path):
    at = open_app(name="Zed")
    at.chat_input[0].set_value("@gpt ping").run()
    at.run()
    expected = demo_reply([{"role": "user", "content": "Zed: @gpt ping"}])
    assert messages(at)[-1][1] == expected


def test_history_shows_the_last_30_messages_newest_at_the_bottom_and_more_on_request(env, db_path):
    store = Store(db_path)
    for i in range(70):
        store.add_message("general", "Bob", f"message {i}")
    at = open_app()
    assert [body for _, body in messages(at)] == [f"message {i}" for i in range(40, 70)]
    at.button(key="earlier").click().run()
    assert [body for _, body in messages(at)] == [f"message {i}" for i in range(10, 70)]
    at.button(key="earlier").click().run()
    assert [body for _, body in messages(at)] == [f"message {i}" for i in range(70)]
    assert "earlier" not in [b.key for b in at.button]


def test_a_room_that_fits_on_the_page_has_no_earlier_messages_button(env, db_path):
    store = Store(db_path)
    for i in range(30):
        store.add_message("general", "Bob", f"message {i}")
    at = open_app()
    assert len(messages(at)) == 30
    assert "earlier" not in [b.key for b in at.button]


def test_recovery_runs_once_per_process_not_on_every_rerun(env, db_path, dead_owner):
    at = open_app()
    live = Store(db_path).start_reply("general", owner=dead_owner)  # appears after start-up
    at.run()
    at.chat_input[0].set_value("hello").run()
    assert Store(db_path).get(live.id).status == "streaming"
    assert "writing…" in messages(at)[0][0]


def test_images_in_messages_cannot_load(env, db_path):
    at = open_app()
    at.chat_input[0].set_value("look ![pixel](https://tracker.example/p.png) and <b>bold</b>").run()
    body = messages(at)[0][1]
    assert "![" not in body  # the image syntax is broken by an invisible word joiner
    assert body.replace("\u2060", "") == "look ![pixel](https://tracker.example/p.png) and <b>bold</b>"
    assert [m.text for m in Store(db_path).recent("general")] == [body.replace("\u2060", "")]  # stored as typed


def test_a_refusal_stays_with_the_refused_text_until_the_next_message(env, db_path):
    at = open_app()
    long_text = "z" * 4500
    at.chat_input[0].set_value(long_text).run()
    at.run()  # a refresh does not make the explanation vanish
    assert any("limit is 4,000" in w.value for w in at.warning)
    assert at.main.code[-1].value == long_text  # there to copy, since the chat box was cleared
    at.chat_input[0].set_value("short one").run()
    assert not at.warning
    assert Store(db_path).recent("general")[-1].text == "short one"


def test_app_has_no_bare_expression_that_magic_would_write():
    """Streamlit "magic" turns a bare expression statement (anything but a call or
    a docstring) into st.write(...), on every run, anywhere in app.py."""
    import ast

    with open(APP) as f:
        tree = ast.parse(f.read())
    docstrings = {
        id(node.body[0])
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    written = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and id(node) not in docstrings
        and not isinstance(node.value, (ast.Call, ast.Yield, ast.YieldFrom, ast.Await))
    ]
    assert written == []


def test_the_chat_works_on_postgresql_when_database_url_is_set(env, db_path, postgres):
    from store import open_store

    url = postgres.new_database()
    env.setenv("DATABASE_URL", url)
    at = open_app("pg", "Ada")
    at.chat_input[0].set_value("@gpt where do you keep this?").run()
    assert not at.exception
    question, answer = open_store(url).recent("pg")
    assert (question.text, answer.status, answer.reply_to) == ("@gpt where do you keep this?", "complete", question.id)
    at.run()
    assert messages(at)[-1] == ("**GPT**", answer.text)
    assert not db_path.exists()  # nothing went to the SQLite file


def test_clearing_streamlits_cache_ends_the_worker_and_closes_its_connections(env, postgres):
    import psycopg

    url = postgres.new_database()
    env.setenv("DATABASE_URL", url)
    at = open_app("pg", "Ada")
    at.chat_input[0].set_value("@gpt are you there?").run()
    assert not at.exception

    def database(sql: str) -> int:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            return conn.execute(sql, [url.rsplit("/", 1)[1]]).fetchone()[0]

    def connections() -> int:
        return database("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()")

    assert connections() > 0  # the pool, and the connection listening for other replicas' commits
    st.cache_resource.clear()
    wait_until(lambda: connections() == 0, timeout=10)
    with psycopg.connect(url) as conn:  # the worker retired: no heartbeat of this process is left
        assert conn.execute("SELECT count(*) FROM replicas").fetchone()[0] == 0


def test_an_unreachable_database_is_explained_without_its_password_and_tried_again(env, postgres):
    import psycopg

    name = "chat_not_yet"
    url = postgres.url.replace("postgres@", "postgres:hunter2-secret@").rsplit("/", 1)[0] + f"/{name}"
    env.setenv("DATABASE_URL", url)
    at = open_app()
    assert not at.exception
    shown = everything_shown(at) + "\n".join(e.value for e in at.error)
    assert "cannot be reached" in shown and f"/{name}" in shown
    assert "hunter2" not in shown
    with psycopg.connect(postgres.url, autocommit=True) as conn:  # the database comes back
        conn.execute(f"CREATE DATABASE {name}")
    at.run()
    assert not at.error and not at.exception
    assert at.chat_input


def test_a_database_url_that_is_not_postgresql_is_refused(env):
    env.setenv("DATABASE_URL", "mysql://root:pw@localhost/chat")
    at = open_app()
    assert "DATABASE_URL must be a postgresql:// URL" in at.error[0].value
    assert "pw@" not in at.error[0].value
