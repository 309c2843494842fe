"""Two replicas of the app behind HAProxy, on one PostgreSQL database (or one SQLite file), in Chromium.

The balancer is configured as deploy/scale_out.py configures it. Each person's
browser carries the balancer's affinity cookie for a chosen replica, as it
would after the balancer first sent it there, so a test says who is on which.
"""

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from deploy.scale_out import COOKIE, haproxy_config
from fake_openai import Reply
from live import (
    CHAT_INPUT,
    StreamlitApp,
    as_pieces,
    assistant_body,
    check_log,
    free_port,
    messages,
    require_chromium,
    send,
    wait_until,
    warnings,
)
from store import open_store

require_chromium()
if shutil.which("haproxy") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs HAProxy (apt-get install haproxy) for the replica tests")
    pytest.skip("HAProxy is not installed (apt-get install haproxy)", allow_module_level=True)

SENTENCES = [f"Sentence number {i} comes from one replica and is read on another." for i in range(16)]


class Cluster:
    """Replicas r1, r2, ... of the app on one database, and HAProxy in front of them."""

    def __init__(self, folder, database: str | Path, env: dict[str, str], count: int = 2):
        self.database = database
        where = {"DATABASE_URL": database} if isinstance(database, str) else {"CHAT_DB_PATH": str(database)}
        self.replicas = [StreamlitApp(folder / f"r{i}", {**env, **where}) for i in range(1, count + 1)]
        for replica in self.replicas:
            replica.folder.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = folder / "haproxy.cfg"
        self.balancer: subprocess.Popen | None = None
        self.store = None

    def start(self) -> "Cluster":
        failures = []

        def start(replica: StreamlitApp) -> None:
            try:
                replica.start()
            except Exception as error:  # raised below, in the test's thread
                failures.append(error)

        threads = [threading.Thread(target=start, args=(replica,)) for replica in self.replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        ports = [urllib.parse.urlsplit(replica.url).port for replica in self.replicas]
        self.config.write_text(haproxy_config(ports, self.port))
        self.balancer = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _answers(f"{self.url}/_stcore/health"), timeout=20)
        self.store = open_store(self.database)
        return self

    def browser_on(self, browser, replica: int):
        """A browser context that the balancer sends to replica ``replica`` (1, 2, ...)."""
        context = browser.new_context(viewport={"width": 1100, "height": 760})
        context.add_cookies([{"name": COOKIE, "value": f"r{replica}", "url": self.url}])
        return context

    def page(self, browser, replica: int, room: str, name: str, tab: str | None = None, wait: bool = True,
             context=None):
        """A person's page on replica ``replica``, through the balancer; loaded unless not ``wait``.

        In a browser context of its own, or as a tab of ``context`` (from browser_on).
        """
        page = (context or self.browser_on(browser, replica)).new_page()
        page.person = f"{name} on r{replica}"
        page.goto(f"{self.url}/?room={room}&name={name}" + (f"&tab={tab}" if tab else ""), wait_until="commit")
        if wait:
            page.wait_for_selector(CHAT_INPUT, timeout=60_000)
        return page

    def replies(self, room: str):
        return [m for m in self.store.recent(room, 100) if m.role == "assistant"]

    def writer(self, room: str) -> int:
        """The pid of the process that wrote (or writes) the room's newest reply."""
        return int(self.replies(room)[-1].owner.split(":")[1])

    def stop(self) -> None:
        """Stop everything started, each whatever happens to the others."""
        if hasattr(self.store, "close"):
            self.store.close()
        if self.balancer is not None:
            self.balancer.terminate()
            try:
                self.balancer.wait(10)
            except subprocess.TimeoutExpired:
                self.balancer.kill()
        for replica in self.replicas:
            try:
                replica.stop()
            except subprocess.TimeoutExpired:
                pass  # killed by stop(); its log is still checked


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except OSError:
        return False


@pytest.fixture
def cluster(request, fake, tmp_path):
    """Two replicas on a new PostgreSQL database, or (``engine`` "sqlite") on one SQLite file."""
    from conftest import LIVE, _app_settings

    if getattr(request, "param", "postgresql") == "sqlite":
        database = tmp_path / "shared.db"
    else:
        database = request.getfixturevalue("postgres").new_database()
    # Replies may be held back by a test for a while: no idle timeout meanwhile.
    cluster = Cluster(tmp_path, database, _app_settings(fake, CHAT_MAX_CONCURRENT="4", CHAT_IDLE_TIMEOUT_S="60"))
    request.node.stash.setdefault(LIVE, []).extend(cluster.replicas)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
    for replica in cluster.replicas:
        check_log(replica)


@pytest.fixture
def open_page(request, browser, cluster):
    from conftest import LIVE

    opened = []

    def open_on(replica: int, room: str, name: str, tab: str | None = None, wait: bool = True, context=None):
        page = cluster.page(browser, replica, room, name, tab, wait, context)
        opened.append(page)
        request.node.stash.setdefault(LIVE, []).append(page)
        return page

    open_on.browser_on = lambda replica: cluster.browser_on(browser, replica)
    yield open_on
    for context in dict.fromkeys(page.context for page in opened):
        context.close()


def tab_of(page) -> str:
    return wait_until(lambda: urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query).get("tab", [None])[0])


@pytest.mark.parametrize("cluster", ["postgresql", "sqlite"], indirect=True)
def test_a_viewer_on_another_replica_sees_the_reply_grow_in_sentences(cluster, open_page, fake):
    room = "across"
    asker, viewer = open_page(1, room, "Ada"), open_page(2, room, "Bob")
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES), delay_s=0.02))
    send(asker, "@gpt tell me about replicas")
    shown = []  # what the viewer's page showed of the reply, each time it changed

    def complete_on_screen() -> bool:
        body = assistant_body(viewer)
        if body and shown[-1:] != [body]:
            shown.append(body)
        replies = cluster.replies(room)
        return bool(replies) and replies[-1].status == "complete" and body == replies[-1].text

    wait_until(complete_on_screen, timeout=30, step=0.02)
    sent = fake.sent[-1].text
    assert cluster.writer(room) == cluster.replicas[0].process.pid  # written by r1, the asker's
    assert shown[-1] == sent == cluster.replies(room)[-1].text
    steps = [s for s in dict.fromkeys(shown) if s != sent]
    assert len(steps) >= 2, shown  # it grew on the viewer's screen before it was complete
    for step in steps:  # each a whole number of sentences, as stored
        assert sent.startswith(step) and step.endswith("."), step


def test_stop_pressed_on_another_replica_ends_the_reply_within_a_second(cluster, open_page, fake):
    room = "stop-across"
    asker = open_page(1, room, "Ada")
    fake.enqueue(Reply(pieces=as_pieces(["Word after word, the reply goes on."] * 100), delay_s=0.03))
    send(asker, "@gpt talk for a long time")
    wait_until(lambda: len(assistant_body(asker) or "") > 40)
    # The same tab, reloaded onto the other replica (its own went away, say).
    again = open_page(2, room, "Ada", tab=tab_of(asker))
    seen = wait_until(lambda: assistant_body(again))
    wait_until(lambda: len(assistant_body(again) or "") > len(seen))  # it follows the reply as it grows
    stop = again.get_by_role("button", name="Stop")
    stop.wait_for(state="visible", timeout=10_000)
    clicked = time.monotonic()
    stop.click()
    wait_until(lambda: cluster.replies(room)[-1].status == "stopped", timeout=5)
    took = time.monotonic() - clicked
    assert took < 1.0, f"stopped {took:.2f} s after the click"
    assert cluster.writer(room) == cluster.replicas[0].process.pid
    stored = cluster.replies(room)[-1].text
    assert 40 < len(stored) < len(" ".join(["Word after word, the reply goes on."] * 100))  # cut short, kept
    assert fake.sent[-1].done.wait(5) and fake.sent[-1].aborted  # r1 closed the model's stream
    for page in (asker, again):
        wait_until(lambda page=page: [m["body"] for m in messages(page)][-1:] == [stored], timeout=10)
        wait_until(lambda page=page: "Stopped before the end" in messages(page)[-1]["caption"], timeout=10)
        wait_until(lambda page=page: not page.get_by_role("button", name="Stop").is_visible(), timeout=10)
    again.get_by_role("button", name="Retry").wait_for(state="visible", timeout=10_000)  # and may ask again


def test_a_replica_killed_mid_reply_leaves_it_interrupted_for_the_other(cluster, open_page, fake):
    room = "killed"
    asker, viewer = open_page(1, room, "Ada"), open_page(2, room, "Bob")
    fake.enqueue(Reply(pieces=as_pieces(SENTENCES * 20), delay_s=0.03))
    send(asker, "@gpt a long answer please")
    wait_until(lambda: (assistant_body(viewer) or "").count(".") >= 2)
    r1 = cluster.replicas[0]
    assert cluster.writer(room) == r1.process.pid
    r1.process.send_signal(signal.SIGKILL)
    r1.process.wait(10)
    reply = wait_until(lambda: (r := cluster.replies(room)[-1]).status == "interrupted" and r, timeout=60)
    assert reply.text and SENTENCES[0] in reply.text  # its text is kept
    wait_until(lambda: "Interrupted" in messages(viewer)[-1]["caption"], timeout=10)
    assert messages(viewer)[-1]["body"] == reply.text


def test_a_burst_over_both_replicas_holds_the_deployment_limit(cluster, open_page, fake):
    room = "burst"
    # Five on each replica, each a person of its own (name, session), as tabs of
    # one browser per replica, which loads them quicker.
    browsers = {replica: open_page.browser_on(replica) for replica in (1, 2)}
    people = [open_page(1 + i % 2, room, f"P{i}", wait=False, context=browsers[1 + i % 2]) for i in range(10)]
    for page in people:  # loading side by side
        page.wait_for_selector(CHAT_INPUT, timeout=60_000)
    # Every reply is held after its first words until all ten people have had
    # their answer, however far apart one driver's ten key presses land.
    held = threading.Event()
    fake.default = Reply(pieces=as_pieces(["One short answer, written in a moment."] * 4), delay_s=0.02, hold=held)
    for i, page in enumerate(people):
        page.fill(CHAT_INPUT, f"@gpt question {i}")
    for page in people:
        page.keyboard.press("Enter")
    # Everyone has been answered or told why, and every reply's request has reached the model.
    wait_until(lambda: sum(bool(warnings(p)) for p in people) + len(cluster.replies(room)) >= 10
               and fake.in_flight == len(cluster.replies(room)))
    held.set()
    wait_until(lambda: all(r.status == "complete" for r in cluster.replies(room)), timeout=30)

    refused = [p for p in people if any("already writing 4 replies" in w for w in warnings(p))]
    assert fake.max_in_flight == 4
    assert len(cluster.replies(room)) == 4 and len(refused) == 6
    assert sorted(r.text for r in cluster.replies(room)) == sorted(s.text for s in fake.sent)
    assert len([m for m in cluster.store.recent(room, 100) if m.role == "user"]) == 4  # refused: not stored


def test_the_shipped_haproxy_configuration_is_the_launchers_for_two_replicas_and_valid():
    from deploy.scale_out import ROOT

    shipped = ROOT / "deploy" / "haproxy.cfg"
    assert shipped.read_text() == haproxy_config([8601, 8602], 8501)
    checked = subprocess.run(["haproxy", "-c", "-f", str(shipped)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
