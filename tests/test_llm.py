import re
import time
from dataclasses import dataclass

import pytest

from fake_openai import Reply
from llm import (
    AuthFailed,
    ConnectionLost,
    DemoModel,
    OpenAIModel,
    ProviderError,
    ProviderRateLimited,
    TimedOut,
    build_context,
    demo_reply,
    model_from_settings,
)
from settings import ConfigError, Settings

KEY = "sk-test-secret-0123456789"
ASK = [{"role": "user", "content": "Ada: @gpt hello?"}]
FAST_RETRY = {"retry-after-ms": "1"}


@pytest.fixture
def model(server):
    settings = Settings(openai_api_key=KEY, openai_base_url=server.base_url, openai_model="test-model",
                        idle_timeout_s=1.0, max_tokens=77)
    return model_from_settings(settings)


def collect(stream):
    """The pieces a stream yielded, and the error it ended with (if any)."""
    pieces = []
    try:
        for piece in stream:
            pieces.append(piece)
    except Exception as error:
        return pieces, error
    return pieces, None


def test_streams_the_text_and_sends_a_proper_request(server, model):
    server.enqueue(Reply(pieces=["Hel", "lo", ", ", "Ada", "!"]))
    pieces, error = collect(model.stream(ASK))
    assert error is None
    assert "".join(pieces) == "Hello, Ada!"
    [request] = server.requests
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "test-model" and body["stream"] is True
    assert body["max_tokens"] == 77
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == ASK


def test_empty_deltas_and_usage_only_chunk_are_skipped(server, model):
    server.enqueue(Reply(pieces=["", "A", "", "B"], empty_deltas=True, usage=True))
    pieces, error = collect(model.stream(ASK))
    assert (pieces, error) == (["A", "B"], None)


def test_stream_without_usage_chunk_also_works(server, model):
    server.enqueue(Reply(pieces=["A", "B"], empty_deltas=False, usage=False))
    assert collect(model.stream(ASK)) == (["A", "B"], None)


def test_401_is_an_auth_error_without_the_key(server, model):
    server.enqueue(Reply(status=401, error_body={"error": {"message": f"Incorrect API key provided: {KEY}"}}))
    pieces, error = collect(model.stream(ASK))
    assert isinstance(error, AuthFailed) and pieces == []
    assert KEY not in str(error) and "API key" in str(error)
    assert len(server.requests) == 1  # not retried


def test_429_is_retried_before_the_first_token(server, model):
    server.enqueue(Reply(status=429, headers=FAST_RETRY), Reply(pieces=["ok"]))
    assert collect(model.stream(ASK)) == (["ok"], None)
    assert len(server.requests) == 2


def test_429_that_persists_is_a_rate_limit_error_after_bounded_retries(server, model):
    server.enqueue(*[Reply(status=429, headers=FAST_RETRY)] * 5)
    pieces, error = collect(model.stream(ASK))
    assert isinstance(error, ProviderRateLimited) and "try again" in str(error)
    assert len(server.requests) == 3  # the first try and two retries


def test_500_is_a_provider_error_with_a_scrubbed_short_note(server, model):
    body = {"error": {"message": f"upstream exploded while using {KEY}" + " very" * 100}}
    server.enqueue(*[Reply(status=500, headers=FAST_RETRY, error_body=body)] * 3)
    pieces, error = collect(model.stream(ASK))
    assert isinstance(error, ProviderError)
    assert "500" in str(error) and "upstream exploded" in str(error)
    assert KEY not in str(error) and len(str(error)) < 300


def test_error_event_inside_a_200_stream_keeps_the_text_before_it(server, model):
    server.enqueue(Reply(pieces=["Partial", " text"], error_event={"message": "overloaded", "type": "server_error"}))
    pieces, error = collect(model.stream(ASK))
    assert pieces == ["Partial", " text"]
    assert isinstance(error, ProviderError) and "overloaded" in str(error)
    assert len(server.requests) == 1  # never retried after text


def test_connection_dropped_mid_stream_is_connection_lost_and_not_retried(server, model):
    server.enqueue(Reply(pieces=["Some", " words"], drop=True))
    pieces, error = collect(model.stream(ASK))
    assert pieces == ["Some", " words"]
    assert isinstance(error, ConnectionLost)
    assert len(server.requests) == 1


def test_stream_that_ends_without_finish_reason_is_an_error(server, model):
    server.enqueue(Reply(pieces=["Cut"], finish_reason=None, usage=False))
    pieces, error = collect(model.stream(ASK))
    assert pieces == ["Cut"] and isinstance(error, ConnectionLost)


def test_malformed_sse_line_is_a_provider_error(server, model):
    server.enqueue(Reply(pieces=["Ok"], raw_lines=["data: {not json"]))
    pieces, error = collect(model.stream(ASK))
    assert pieces == ["Ok"] and isinstance(error, ProviderError) and "malformed" in str(error)


def test_a_stream_that_hangs_ends_after_the_idle_timeout(server, model):
    server.enqueue(Reply(pieces=["Start"], hang=True))
    started = time.monotonic()
    pieces, error = collect(model.stream(ASK))
    took = time.monotonic() - started
    assert pieces == ["Start"] and isinstance(error, TimedOut)
    assert 0.9 <= took < 5  # idle_timeout_s=1.0


def test_keep_alive_chunks_without_text_do_not_reset_the_idle_timeout(server, model):
    server.enqueue(Reply(pieces=["Start"] + [""] * 40, delay_s=0.1))
    pieces, error = collect(model.stream(ASK))
    assert pieces == ["Start"] and isinstance(error, TimedOut)


def test_closing_the_stream_early_stops_the_server_sending(server, model):
    server.enqueue(Reply(pieces=["x"] * 500, delay_s=0.01))
    stream = model.stream(ASK)
    assert [next(stream) for _ in range(3)] == ["x"] * 3
    stream.close()
    sent = server.sent[0]
    assert sent.done.wait(5), "the server kept sending after the client closed"
    assert sent.aborted and sent.pieces_sent < 100


def test_unreachable_server_is_connection_lost():
    settings = Settings(openai_base_url="http://127.0.0.1:9/v1", idle_timeout_s=1.0)
    pieces, error = collect(model_from_settings(settings).stream(ASK))
    assert pieces == [] and isinstance(error, ConnectionLost)


# The offline demo model


def test_demo_model_is_used_without_key_or_base_url():
    model = model_from_settings(Settings())
    assert isinstance(model, DemoModel) and model.name == "offline demo model"
    assert isinstance(model_from_settings(Settings(openai_api_key=KEY)), OpenAIModel)
    assert isinstance(model_from_settings(Settings(openai_base_url="http://127.0.0.1:1/v1")), OpenAIModel)


def test_demo_reply_answers_the_question_deterministically_in_sentences():
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Ada: @gpt what is SQLite?"}]
    text = "".join(DemoModel(tokens_per_s=10_000).stream(messages))
    assert text == demo_reply(messages) == "".join(DemoModel(tokens_per_s=10_000).stream(messages))
    assert "Ada" in text and "what is SQLite?" in text and "@gpt" not in text
    assert "offline demo model" in text
    assert len(re.findall(r"[.!?](?:\s|$)", text)) >= 5


def test_demo_reply_quotes_the_question_without_the_mention():
    text = demo_reply([{"role": "user", "content": "Ada: Hello @gpt, what can you do?"}])
    assert "“Hello, what can you do?”" in text


def test_demo_model_streams_at_the_configured_rate():
    model = DemoModel(tokens_per_s=200)
    started = time.monotonic()
    pieces = list(model.stream(ASK))
    took = time.monotonic() - started
    assert len(pieces) > 40
    assert len(pieces) / 200 <= took < len(pieces) / 200 * 3


# Context


@dataclass
class Row:
    role: str
    author: str
    text: str


def test_context_has_system_prompt_then_last_messages_with_names():
    history = [Row("user", "Ada", f"m{i}") for i in range(12)] + [Row("assistant", "GPT", "answer")]
    context = build_context(history, "SYSTEM", limit=10)
    assert context[0] == {"role": "system", "content": "SYSTEM"}
    assert len(context) == 11
    assert context[1] == {"role": "user", "content": "Ada: m3"}
    assert context[-1] == {"role": "assistant", "content": "answer"}


def test_context_is_bounded_in_characters_and_skips_empty_replies():
    history = [Row("user", "Ada", "a" * 5000), Row("assistant", "GPT", ""), Row("user", "Bob", "b" * 5000)]
    context = build_context(history, "S", max_chars=8000)
    assert sum(len(m["content"]) for m in context[1:]) <= 8000
    assert context[-1]["content"] == "Bob: " + "b" * 5000
    assert all(m["content"] for m in context)


# Settings


def test_settings_from_environment():
    settings = Settings.from_env({"OPENAI_API_KEY": KEY, "CHAT_MAX_CONCURRENT": "2", "CHAT_IDLE_TIMEOUT_S": "2.5",
                                  "CHAT_DB_PATH": "/tmp/x.db", "OPENAI_MODEL": "llama3"})
    assert (settings.max_concurrent, settings.idle_timeout_s, str(settings.db_path), settings.openai_model) == (
        2, 2.5, "/tmp/x.db", "llama3")
    assert KEY not in repr(settings)
    assert Settings.from_env({}).uses_demo_model


@pytest.mark.parametrize("env, named", [({"CHAT_MAX_CONCURRENT": "many"}, "CHAT_MAX_CONCURRENT"),
                                         ({"CHAT_IDLE_TIMEOUT_S": "-1"}, "CHAT_IDLE_TIMEOUT_S")])
def test_bad_settings_name_the_variable(env, named):
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)
