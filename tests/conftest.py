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
