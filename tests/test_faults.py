"""Faults in a running app: killed and stopped processes, closed tabs, double stops, locks.

Each test starts its own `streamlit run` (they kill or stop it) and checks that
every reply ends in a final state with its text intact and the room still works.
After each test, the app's log must hold no traceback and no trace of the API key.
"""

import os
import signal
import subprocess
import sys
import time

from fake_openai import Reply
from live import (
    as_pieces,
    assistant_body,
    messages,
    require_chromium,
    send,
    stored_replies,
    stored_reply,
    wait_until,
)

require_chromium()

SENTENCES = [f"Sentence {n} of a long reply, written slowly on purpose." for n in range(1, 41)]


def test_sigkill_mid_reply_then_restart_shows_interrupted_and_works(start_app, pages, fake):
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES), delay_s=0.03))
    app = start_app()
    asker = pages(app, "crash", "Ada")
    send(asker, "@gpt tell me a long story")
    wait_until(lambda: len(stored_reply(app.db, "crash")["chunks"]) >= 3)
    app.stop(signal.SIGKILL)
    before = stored_reply(app.db, "crash")
    assert before["status"] == "streaming"

    fake.enqueue(Reply(pieces=["Back", " again."]))
    app.start()  # a new process on the same database
    viewer = pages(app, "crash", "Bob")
    after = stored_reply(app.db, "crash")
    assert (after["status"], after["text"]) == ("interrupted", before["text"])
    shown = messages(viewer)
    assert [m["body"] for m in shown] == ["@gpt tell me a long story", before["text"]]
    assert "Interrupted" in shown[-1]["caption"]
    send(viewer, "@gpt are you back?")
    wait_until(lambda: stored_reply(app.db, "crash")["status"] == "complete")
    wait_until(lambda: assistant_body(viewer) == "Back again.")
    assert [r["status"] for r in stored_replies(app.db, "crash")] == ["interrupted", "complete"]


def test_sigterm_mid_reply_ends_it_before_exit(start_app, pages, fake):
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES), delay_s=0.03))
    app = start_app()
    asker = pages(app, "shutdown", "Ada")
    send(asker, "@gpt tell me a long story")
    wait_until(lambda: len(stored_reply(app.db, "shutdown")["chunks"]) >= 2)
    took = app.stop(signal.SIGTERM)
    assert took < 10
    reply = stored_reply(app.db, "shutdown")
    assert reply["status"] == "interrupted"
    assert fake.sent[-1].text.startswith(reply["text"]) and len(reply["text"]) > 50


def test_sigterm_while_the_model_hangs_still_exits_promptly(start_app, pages, fake):
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES[:3]), hang=True))
    app = start_app(CHAT_IDLE_TIMEOUT_S="120")
    asker = pages(app, "hung", "Ada")
    send(asker, "@gpt say something")
    wait_until(lambda: stored_reply(app.db, "hung")["text"] or None)
    wait_until(lambda: len(assistant_body(asker) or "") >= len(" ".join(SENTENCES[:3])) - 1)
    took = app.stop(signal.SIGTERM)
    assert took < 10
    reply = stored_reply(app.db, "hung")
    assert (reply["status"], reply["text"]) == ("interrupted", " ".join(SENTENCES[:3]))


def test_closing_the_tab_mid_reply_still_completes_it_for_everyone(start_app, pages, fake):
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES[:12]), delay_s=0.03))
    app = start_app()
    asker, viewer = pages(app, "leaving", "Ada", "Bob")
    send(asker, "@gpt a dozen sentences please")
    wait_until(lambda: len(assistant_body(asker) or "") > 30)
    asker.context.close()
    wait_until(lambda: stored_reply(app.db, "leaving")["status"] == "complete")
    assert stored_reply(app.db, "leaving")["text"] == fake.sent[-1].text
    wait_until(lambda: assistant_body(viewer) == fake.sent[-1].text, timeout=15)


def test_stop_clicked_twice_and_a_second_question_while_streaming(start_app, pages, fake):
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES), delay_s=0.03))
    app = start_app()
    asker = pages(app, "busy", "Ada")
    send(asker, "@gpt first question")
    wait_until(lambda: len(assistant_body(asker) or "") > 40)
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES[:4]), delay_s=0.03))
    send(asker, "@gpt second question, while the first is streaming")
    wait_until(lambda: len(stored_replies(app.db, "busy")) == 2)
    wait_until(lambda: stored_replies(app.db, "busy")[1]["status"] == "complete")
    first, second = stored_replies(app.db, "busy")
    assert second["text"] == " ".join(SENTENCES[:4])
    assert first["status"] == "streaming"  # still going in the background

    stop = asker.get_by_role("button", name="Stop")
    wait_until(lambda: stop.is_visible())
    stop.dblclick()
    wait_until(lambda: stored_replies(app.db, "busy")[0]["status"] == "stopped")
    first = stored_replies(app.db, "busy")[0]
    assert fake.sent[0].text.startswith(first["text"]) and first["text"]
    send(asker, "still usable after all that")
    wait_until(lambda: any(m["body"] == "still usable after all that" for m in messages(asker)))
    assert not asker.locator("[data-testid=stException]").count()


def test_read_only_database_folder_gets_a_clear_message(start_app, pages, tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores file modes: mount the folder read-only in a private namespace
        mount = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && exec \"$@\""
        wrapper = ["unshare", "--mount", "sh", "-c", mount, "sh"]
    else:
        folder.chmod(0o555)
        wrapper = None
    app = start_app(wrapper=wrapper, CHAT_DB_PATH=str(folder / "chat.db"))
    page = pages(app, "general", "Ada", ready="[data-testid=stAlertContentError]")
    error = page.locator("[data-testid=stAlertContentError]")
    assert "cannot be opened" in error.inner_text() and "CHAT_DB_PATH" in error.inner_text()
    assert "Traceback" not in page.content()
    assert not (folder / "chat.db").exists()


def test_another_process_holding_the_write_lock_for_3_s_loses_nothing(start_app, pages, fake):
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES[:20]), delay_s=0.02))
    app = start_app()
    asker = pages(app, "locked", "Ada")
    send(asker, "@gpt twenty sentences")
    wait_until(lambda: len(stored_reply(app.db, "locked")["chunks"]) >= 1)
    hold = (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(3); c.execute('COMMIT')"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(app.db)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    started = time.monotonic()
    holder.wait(10)
    assert time.monotonic() - started > 2.5
    wait_until(lambda: stored_reply(app.db, "locked")["status"] == "complete")
    assert stored_reply(app.db, "locked")["text"] == fake.sent[-1].text == " ".join(SENTENCES[:20])
    wait_until(lambda: assistant_body(asker) == fake.sent[-1].text)
    assert "database is locked" not in app.log_text()
