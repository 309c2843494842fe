"""Models that stream text: the OpenAI-compatible one and the offline demo model.

Every model has one method, ``stream(messages)``, a generator of text pieces.
Failures surface as a handful of ``ModelError`` subclasses whose messages are
short, meant for people, and never contain the API key.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import openai

from settings import Settings

CONTEXT_MESSAGES = 10  # how many recent room messages the model sees
CONTEXT_CHARS = 12_000  # and at most this many characters of them
MAX_RETRIES = 2  # retried by the client before the first token only


class ModelError(Exception):
    """A reply that could not be produced; str(error) is for people."""


class AuthFailed(ModelError):
    pass


class ProviderRateLimited(ModelError):
    pass


class ProviderError(ModelError):
    pass


class ConnectionLost(ModelError):
    pass


class TimedOut(ModelError):
    pass


class Model(Protocol):
    name: str  # shown in the UI

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Text pieces of the reply to ``messages``; closing it stops the generation."""
        ...


class HistoryMessage(Protocol):
    role: str
    author: str
    text: str


def build_context(
    history: Sequence[HistoryMessage],
    system_prompt: str,
    limit: int = CONTEXT_MESSAGES,
    max_chars: int = CONTEXT_CHARS,
) -> list[dict[str, str]]:
    """The system prompt plus the newest messages that fit, oldest first."""
    picked: list[dict[str, str]] = []
    budget = max_chars
    for message in reversed(history):
        if len(picked) == limit or budget <= 0:
            break
        if not message.text.strip():  # e.g. a reply that failed before its first word
            continue
        if message.role == "assistant":
            entry = {"role": "assistant", "content": message.text}
        else:
            entry = {"role": "user", "content": f"{message.author}: {message.text}"}
        entry["content"] = entry["content"][-budget:]  # keep the end of an overlong one
        budget -= len(entry["content"])
        picked.append(entry)
    return [{"role": "system", "content": system_prompt}, *reversed(picked)]


# The OpenAI-compatible model ------------------------------------------------


def make_client(settings: Settings) -> openai.OpenAI:
    """The one place the openai client is built."""
    return openai.OpenAI(
        # A local server (Ollama, llama.cpp) needs no key, but the client wants one.
        api_key=settings.openai_api_key or "not-needed",
        base_url=settings.openai_base_url or None,
        # `read` bounds the wait for each next piece of the stream: the idle timeout.
        timeout=openai.Timeout(settings.idle_timeout_s, connect=10.0),
        max_retries=MAX_RETRIES,
    )


class OpenAIModel:
    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        max_tokens: int = 1024,
        idle_timeout_s: float = 30.0,
        secret: str | None = None,
    ):
        self.client = client
        self.model = model
        self.name = model
        self.max_tokens = max_tokens
        self.idle_timeout_s = idle_timeout_s
        self._secret = secret  # only to scrub it out of provider messages

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIModel:
        return cls(
            make_client(settings),
            settings.openai_model,
            max_tokens=settings.max_tokens,
            idle_timeout_s=settings.idle_timeout_s,
            secret=settings.openai_api_key,
        )

    def stream(self, messages: list[dict[str, str]]) -> OpenAIStream:
        return OpenAIStream(self, messages)

    def _pieces(self, messages: list[dict[str, str]], handle: OpenAIStream) -> Iterator[str]:
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                max_tokens=self.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.APIError as error:
            raise self._translate(error) from None
        handle._opened(response)
        with response:  # closing the generator closes the HTTP stream too
            finished = False
            last_text_at = time.monotonic()
            try:
                for chunk in response:
                    for choice in chunk.choices or []:  # none in the usage-only last chunk
                        if choice.delta is not None and choice.delta.content:
                            last_text_at = time.monotonic()
                            yield choice.delta.content
                        if choice.finish_reason is not None:
                            finished = True
                            self._check_finish(choice.finish_reason)
                    # Keep-alive chunks with no text do not count as progress.
                    if time.monotonic() - last_text_at > self.idle_timeout_s:
                        raise TimedOut(self._idle_message())
            except openai.APIError as error:
                if handle.closed:
                    return  # closed on purpose, from another thread
                raise self._translate(error) from None
            except ValueError:  # a line that is not JSON
                raise ProviderError("The model provider sent a malformed response.") from None
            if not finished and not handle.closed:
                raise ConnectionLost("The reply was cut off before the model finished.")

    def _check_finish(self, reason: str) -> None:
        if reason == "content_filter":
            raise ProviderError("The model provider's content filter stopped this reply.")

    def _idle_message(self) -> str:
        return f"The model sent nothing for {self.idle_timeout_s:g} seconds, so the reply was ended."

    def _translate(self, error: openai.APIError) -> ModelError:
        if isinstance(error, openai.APITimeoutError):
            return TimedOut(self._idle_message())
        if isinstance(error, openai.APIConnectionError):
            return ConnectionLost("The connection to the model provider was lost.")
        if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return AuthFailed("The model provider refused the API key. Check OPENAI_API_KEY.")
        if isinstance(error, openai.RateLimitError):
            return ProviderRateLimited(
                "The model provider is rate-limiting this app. Please try again in a minute."
            )
        detail = self._scrub(getattr(error, "message", "") or "")
        if isinstance(error, openai.APIStatusError):
            return ProviderError(f"The model provider answered {error.status_code}: {detail}")
        return ProviderError(f"The model provider reported an error: {detail}")

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        text = " ".join(text.split())
        return text if len(text) <= 200 else text[:199] + "…"


class OpenAIStream:
    """The text pieces of one reply from an OpenAI-compatible server.

    Iterate it in one thread; ``close()`` may be called from any other: it
    closes the HTTP response, which ends the iteration at the next bytes that
    arrive (keep-alive comments included) and tells the provider to stop.
    """

    def __init__(self, model: OpenAIModel, messages: list[dict[str, str]]):
        self._lock = threading.Lock()
        self._response = None
        self.closed = False
        self._pieces = model._pieces(messages, self)

    def __iter__(self) -> OpenAIStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            response = self._response
        if response is not None:
            response.close()

    def _opened(self, response) -> None:
        with self._lock:
            self._response = response
            closed = self.closed
        if closed:
            response.close()


# The offline demo model -----------------------------------------------------

MENTION = re.compile(r"@gpt\b", re.IGNORECASE)
PIECES = re.compile(r"\s*\S+")


def demo_reply(messages: list[dict[str, str]]) -> str:
    """What the demo model says: an honest answer about itself, using the question."""
    asked = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    name, _, question = asked.partition(": ") if ": " in asked else ("", "", asked)
    question = " ".join(MENTION.sub("", question).split())
    question = re.sub(r" ([,.!?;:])", r"\1", question) or "nothing in particular"  # "Hello @gpt, hi"
    if len(question) > 80:
        question = question[:79].rstrip() + "…"
    greeting = f"Hi {name}! " if name else "Hi! "
    kind = "question" if question.rstrip("…").endswith("?") else "message"
    return (
        f"{greeting}You asked me: “{question}” I am the offline demo model, so I can't really "
        f"answer your {kind}: no API key is set, and all I know is how this app works. "
        "Right now you see my reply arrive token by token, straight from the server's memory. "
        "Everyone else in the room sees it grow one sentence at a time, because each finished "
        "sentence is written to SQLite once. "
        "To talk to a real model, set OPENAI_API_KEY, or OPENAI_BASE_URL for a local server."
    )


class DemoModel:
    """A deterministic model that needs no network, for trying the app without a key."""

    name = "offline demo model"

    def __init__(self, tokens_per_s: float = 40.0):
        self.delay_s = 1 / tokens_per_s

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        for piece in PIECES.findall(demo_reply(messages)):
            time.sleep(self.delay_s)
            yield piece


def model_from_settings(settings: Settings) -> Model:
    if settings.uses_demo_model:
        return DemoModel(settings.demo_tokens_per_s)
    return OpenAIModel.from_settings(settings)
