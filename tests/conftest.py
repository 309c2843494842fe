import pytest

from fake_openai import FakeOpenAI
from store import Store


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "chat.db"


@pytest.fixture
def store(db_path):
    return Store(db_path)


@pytest.fixture
def server():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole run (Debian's, driven by Playwright)."""
    from playwright.sync_api import sync_playwright

    from live import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
