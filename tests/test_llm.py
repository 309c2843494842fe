import re
import time
from dataclasses import dataclass

import pytest

from fake_openai import FakeOpenAI, Reply
from llm import (
    THINKING,
    AuthFailed,
    ConnectionLost,
    DemoModel,
    EmptyReply,
    Finished,
    OpenAIModel,
    ProviderError,
    ProviderRateLimited,
    TimedOut,
    Usage,
    build_context,
    demo_reply,
    model_from_settings,
    token_param,
)
from settings import ConfigError, Settings

KEY = "sk-test-secret-0123456789"
ASK = [{"role": "user", "content": "Ada: @gpt hello?"}]
FAST_RETRY = {"retry-after-ms": "1"}


@pytest.fixture
def model(server):
    settings = Settings(openai_api_key=KEY, openai_base_url=server.base_url, openai_model="test-model",
                        idle_timeout_s=1.0, first_token_timeout_s=2.0, max_tokens=77)
    return model_from_settings(settings)


def collect(stream, events: list | None = None):
    """The text pieces a stream yielded, and the error it ended with (if any); other events go to ``events``."""
    pieces = []
    try:
        for piece in stream:
            if isinstance(piece, str):
                pieces.append(piece)
            elif events is not None:
                events.append(piece)
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


def test_a_stream_that_hangs_ends_after_the_longest_silence_allowed(server, model):
    # The HTTP read timeout is the longest silence allowed at all (here the
    # first-token timeout, 2 s); the reply thread bounds the gaps once text flows.
    server.enqueue(Reply(pieces=["Start"], hang=True))
    started = time.monotonic()
    pieces, error = collect(model.stream(ASK))
    took = time.monotonic() - started
    assert pieces == ["Start"] and isinstance(error, TimedOut)
    assert 1.9 <= took < 6


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


# Today's models and servers: adapting parameters, reasoning, budgets, usage


def model_for(server, **options) -> OpenAIModel:
    settings = Settings(openai_api_key=KEY, openai_base_url=server.base_url, openai_model="o4-mini",
                        idle_timeout_s=1.0, first_token_timeout_s=2.0, max_tokens=77, **options)
    return model_from_settings(settings)


def test_a_server_that_refuses_max_tokens_like_openai_reasoning_models_gets_max_completion_tokens():
    with FakeOpenAI(refuse=("max_tokens",)) as server:
        model = model_for(server)
        server.enqueue(Reply(pieces=["Thought", " it", " through."]), Reply(pieces=["Again."]))
        assert collect(model.stream(ASK)) == (["Thought", " it", " through."], None)
        assert collect(model.stream(ASK)) == (["Again."], None)  # remembered: no second refusal
    assert server.refused == ["max_tokens"]
    first, retried, second = (request["body"] for request in server.requests)
    assert first["max_tokens"] == 77
    assert retried["max_completion_tokens"] == 77 and "max_tokens" not in retried
    assert second["max_completion_tokens"] == 77 and "max_tokens" not in second


def test_a_server_that_refuses_stream_options_is_asked_again_without_them():
    with FakeOpenAI(refuse=("stream_options",)) as server:
        model = model_for(server)
        server.enqueue(Reply(pieces=["Fine."]), Reply(pieces=["Still fine."]))
        assert collect(model.stream(ASK)) == (["Fine."], None)
        assert collect(model.stream(ASK)) == (["Still fine."], None)
    assert server.refused == ["stream_options"]
    assert [("stream_options" in r["body"]) for r in server.requests] == [True, False, False]


def test_a_server_that_refuses_both_token_fields_is_sent_neither():
    with FakeOpenAI(refuse=("max_tokens", "max_completion_tokens")) as server:
        model = model_for(server)
        server.enqueue(Reply(pieces=["Unbounded."]))
        assert collect(model.stream(ASK)) == (["Unbounded."], None)
    assert server.refused == ["max_tokens", "max_completion_tokens"]
    last = server.requests[-1]["body"]
    assert "max_tokens" not in last and "max_completion_tokens" not in last


def test_a_400_that_names_nothing_we_sent_is_not_retried(server, model):
    body = {"error": {"message": "This model's maximum context length is 8192 tokens.", "param": "messages"}}
    server.enqueue(Reply(status=400, error_body=body))
    pieces, error = collect(model.stream(ASK))
    assert pieces == [] and isinstance(error, ProviderError) and "maximum context length" in str(error)
    assert len(server.requests) == 1


@pytest.mark.parametrize("setting, base_url, sent", [
    ("auto", None, "max_completion_tokens"),
    ("auto", "https://api.openai.com/v1", "max_completion_tokens"),
    ("auto", "https://my-team.openai.azure.com/openai/v1", "max_completion_tokens"),
    ("auto", "http://localhost:11434/v1", "max_tokens"),
    ("auto", "https://api.groq.com/openai/v1", "max_tokens"),
    ("max_tokens", None, "max_tokens"),
    ("none", "http://localhost:11434/v1", "none"),
])
def test_the_token_budget_field_suits_the_provider(setting, base_url, sent):
    assert token_param(setting, base_url) == sent


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_longer_than_the_idle_timeout_keeps_the_reply_alive_and_is_never_text(server, field):
    model = model_for(server)
    thoughts = [f"secret thought {i} " for i in range(25)]  # 2.5 s of reasoning; idle timeout 1 s
    server.enqueue(Reply(reasoning=thoughts, reasoning_field=field, delay_s=0.1, pieces=["The", " answer."]))
    events = []
    pieces, error = collect(model.stream(ASK), events)
    assert (pieces, error) == (["The", " answer."], None)
    assert events.count(THINKING) == 25
    assert not any("secret" in str(event) for event in events)


def test_silent_thinking_longer_than_the_idle_timeout_is_allowed_before_the_first_token(server):
    model = model_for(server)  # idle 1 s, first token 2 s
    server.enqueue(Reply(think_s=1.5, pieces=["Done", " thinking."]))
    assert collect(model.stream(ASK)) == (["Done", " thinking."], None)


def test_silence_longer_than_the_first_token_timeout_ends_the_reply(server):
    model = model_for(server)
    server.enqueue(Reply(think_s=4, pieces=["Too late."]))
    started = time.monotonic()
    pieces, error = collect(model.stream(ASK))
    assert pieces == [] and isinstance(error, TimedOut) and "2 seconds" in str(error)
    assert time.monotonic() - started < 3.5


def test_a_budget_spent_before_any_text_is_an_error_that_says_what_to_do(server):
    model = model_for(server)
    server.enqueue(Reply(reasoning=["hmm "] * 5, pieces=[], finish_reason="length"))
    pieces, error = collect(model.stream(ASK))
    assert pieces == [] and isinstance(error, EmptyReply)
    assert "77 tokens" in str(error) and "OPENAI_MAX_TOKENS" in str(error)


def test_a_reply_cut_at_the_budget_after_some_text_says_so(server):
    model = model_for(server)
    server.enqueue(Reply(pieces=["Half", " a"], finish_reason="length"))
    events = []
    assert collect(model.stream(ASK), events) == (["Half", " a"], None)
    assert Finished("length") in events


def test_a_reply_with_no_visible_text_is_an_error(server):
    model = model_for(server)
    server.enqueue(Reply(pieces=["", "  ", "\n"]))
    pieces, error = collect(model.stream(ASK))
    assert isinstance(error, EmptyReply) and "without writing anything" in str(error)


def test_usage_with_reasoning_tokens_is_reported(server):
    model = model_for(server)
    figures = {"prompt_tokens": 31, "completion_tokens": 420, "total_tokens": 451,
               "completion_tokens_details": {"reasoning_tokens": 384}}
    server.enqueue(Reply(pieces=["Ok."], usage_figures=figures))
    events = []
    assert collect(model.stream(ASK), events) == (["Ok."], None)
    assert events == [Usage(prompt_tokens=31, completion_tokens=420, reasoning_tokens=384), Finished("stop")]


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
    assert (Settings.from_env({}).first_token_timeout_s, Settings.from_env({}).max_tokens_param) == (120.0, "auto")
    reasoning = Settings.from_env({"CHAT_FIRST_TOKEN_TIMEOUT_S": "300", "OPENAI_MAX_TOKENS_PARAM": "Max_Tokens"})
    assert (reasoning.first_token_timeout_s, reasoning.max_tokens_param) == (300.0, "max_tokens")


@pytest.mark.parametrize("env, named", [({"CHAT_MAX_CONCURRENT": "many"}, "CHAT_MAX_CONCURRENT"),
                                         ({"CHAT_IDLE_TIMEOUT_S": "-1"}, "CHAT_IDLE_TIMEOUT_S"),
                                         ({"CHAT_FIRST_TOKEN_TIMEOUT_S": "soon"}, "CHAT_FIRST_TOKEN_TIMEOUT_S"),
                                         ({"OPENAI_MAX_TOKENS_PARAM": "max_length"}, "OPENAI_MAX_TOKENS_PARAM")])
def test_bad_settings_name_the_variable(env, named):
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)
