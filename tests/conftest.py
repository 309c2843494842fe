import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_openai import FakeOpenAI  # noqa: E402
from store import Store  # noqa: E402


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
