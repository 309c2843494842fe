"""Fixtures for every kind of test, and what a failing live test prints.

Unit tests get a real SQLite file (``store``) and the local OpenAI-compatible
test server (``server``). Live tests (browser, fault, load and wire tests) run
`streamlit run` against the test server: ``app`` is one app shared by a
module's tests, answered by ``model``; ``start_app`` starts apps for one test,
answered by ``fake``; ``pages`` opens Chromium pages on either.
When a live test fails, its report shows what each page showed, what the
database held, and the end of the app's log.
"""

import os

import pytest

from fake_openai import FakeOpenAI
from store import Store

LIVE = pytest.StashKey[list]()  # the apps and pages a live test used


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "chat.db"


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the whole run (skipped only where it is not installed and CI is unset)."""
    from postgres import PostgresServer, binaries

    if binaries() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pooler(postgres):
    """PgBouncer in transaction mode in front of the tests' server (tests/postgres.py)."""
    from postgres import TransactionPooler

    if not os.path.exists(TransactionPooler.BINARY) and not os.environ.get("CI"):
        pytest.skip("PgBouncer is not installed (Debian: apt-get install pgbouncer)")
    pooler = TransactionPooler(postgres)
    yield pooler
    pooler.stop()


ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    """A test that uses ``store`` runs on each engine, or on those its ``engines`` mark names."""
    if "store" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("engines")
        metafunc.parametrize("engine", marker.args if marker else ENGINES)


@pytest.fixture
def store(request, engine, db_path):
    """The store on one engine: the same tests hold for both."""
    store = Store(db_path if engine == "sqlite" else request.getfixturevalue("postgres").new_database())
    yield store
    store.close()


@pytest.fixture
def other_store(store):
    """A second store on the same database, as another replica (process or host) opens it."""
    other = Store(store.location)
    yield other
    other.close()


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def dead_owner() -> str:
    """The owner tag of a process on this host that has exited."""
    import socket
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}:gone"


# Live tests ------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole run (Debian's, driven by Playwright)."""
    from playwright.sync_api import sync_playwright

    from live import CHROMIUM, CHROMIUM_ARGS, require_chromium

    require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def fake():
    """The model server for one test."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def model():
    """The model server for a module's shared app."""
    with FakeOpenAI() as server:
        yield server


def _app_settings(fake: FakeOpenAI, **env: str) -> dict[str, str]:
    from live import KEY

    return {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": KEY, "OPENAI_MODEL": "test-model",
            "CHAT_IDLE_TIMEOUT_S": "5", **env}


@pytest.fixture(scope="module")
def app(model, tmp_path_factory):
    """One app for a whole module, on its own database, answered by ``model``; checked at the end."""
    from live import StreamlitApp, check_log

    app = StreamlitApp(tmp_path_factory.mktemp("app"), _app_settings(model)).start()
    yield app
    app.stop()
    check_log(app)


@pytest.fixture
def start_app(request, fake, tmp_path):
    """Start apps for this test: ``start_app(wrapper=None, **env)``; each is stopped and checked after it."""
    from live import StreamlitApp, check_log

    apps = []

    def start(wrapper: list[str] | None = None, **env: str) -> StreamlitApp:
        app = StreamlitApp(tmp_path, _app_settings(fake, **env), wrapper=wrapper)
        apps.append(app)
        request.node.stash.setdefault(LIVE, []).append(app)
        return app.start()

    yield start
    for app in apps:
        app.stop()
    for app in apps:
        check_log(app)


@pytest.fixture
def pages(request, browser):
    """Open pages: ``pages(app, room, *names)``, one browser context (one person) each, loaded in parallel.

    Returns the page, or a list of pages for several names. ``ready`` is the
    selector that says a page has loaded (the chat input by default); with
    ``tabs``, the pages are tabs of one browser context (see live.open_rooms).
    """
    from live import CHAT_INPUT, open_rooms

    opened = []

    def open_pages(app, room: str, *names: str, ready: str = CHAT_INPUT, tabs: bool = False):
        new = open_rooms(browser, app, room, list(names), ready=ready, tabs=tabs)
        opened.extend(new)
        live = request.node.stash.setdefault(LIVE, [])
        live.extend(item for item in (app, *new) if item not in live)
        return new if len(new) > 1 else new[0]

    yield open_pages
    for context in dict.fromkeys(page.context for page in opened):
        context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.when == "call" and item.stash.get(LIVE, None):
        from live import evidence

        for title, text in evidence(item.stash[LIVE]):
            report.sections.append((title, text))
    return report

