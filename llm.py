"""Models that stream text: the OpenAI-compatible one and the offline demo model.

Every model has one method, ``stream(messages)``, a generator of text pieces
(``str``). A model may also yield a few events between them: ``THINKING``
when it shows signs of reasoning (its reasoning itself is never passed on),
``Usage`` with the token counts the provider reports, and ``Finished`` with
the provider's finish reason. Failures surface as a handful of ``ModelError``
subclasses whose messages are short, meant for people, and never contain the
API key.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import openai

from settings import Settings

log = logging.getLogger(__name__)

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


class EmptyReply(ModelError):
    """The model finished without writing anything visible."""


class Thinking:
    """The model is reasoning: alive, with nothing to show yet."""

    def __repr__(self) -> str:
        return "THINKING"


THINKING = Thinking()


@dataclass(frozen=True)
class Usage:
    """Tokens the provider counted for one reply."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int | None = None  # part of completion_tokens, where reported


@dataclass(frozen=True)
class Finished:
    """The provider's finish reason: "stop", "length" (the token budget ran out), ..."""

    reason: str


Event = Thinking | Usage | Finished


class Model(Protocol):
    name: str  # shown in the UI

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str | Event]:
        """Text pieces of the reply to ``messages``, and events; closing it stops the generation."""
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
        # `read` bounds the wait for each next piece of the stream; the reply
        # thread keeps the finer clock (first token, then idle gaps).
        timeout=openai.Timeout(max(settings.idle_timeout_s, settings.first_token_timeout_s), connect=10.0),
        max_retries=MAX_RETRIES,
    )


def token_param(setting: str, base_url: str | None) -> str:
    """Which request field carries the token budget, for OPENAI_MAX_TOKENS_PARAM = ``setting``.

    OpenAI and Azure OpenAI take ``max_completion_tokens`` for every model and
    refuse ``max_tokens`` for reasoning models; most other OpenAI-compatible
    servers know only ``max_tokens``.
    """
    if setting != "auto":
        return setting
    host = (urlsplit(base_url).hostname or "") if base_url else "api.openai.com"
    openai_hosts = ("api.openai.com", ".openai.azure.com", ".cognitiveservices.azure.com")
    return "max_completion_tokens" if host.endswith(openai_hosts) else "max_tokens"


# Fields in which OpenAI-compatible servers stream a model's reasoning:
# reasoning_content (DeepSeek, vLLM, llama.cpp), reasoning (OpenRouter, Ollama,
# newer vLLM), reasoning_details (OpenRouter).
REASONING_FIELDS = ("reasoning_content", "reasoning", "reasoning_details")


class OpenAIModel:
    """A model behind an OpenAI-compatible chat-completions endpoint.

    The optional request fields (the token budget's field, ``stream_options``)
    adapt: when the server refuses one by name with HTTP 400, before any text,
    the request is sent once more without it (or with the other token field),
    and that choice is kept for this model for the life of the process.
    """

    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        max_tokens: int = 1024,
        idle_timeout_s: float = 30.0,
        first_token_timeout_s: float = 120.0,
        secret: str | None = None,
        max_tokens_param: str = "max_tokens",
    ):
        self.client = client
        self.model = model
        self.name = model
        self.max_tokens = max_tokens
        self.idle_timeout_s = idle_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self._secret = secret  # only to scrub it out of provider messages
        self.max_tokens_param = max_tokens_param  # or "none"
        self.stream_options = True  # ask for usage figures in the last chunk
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIModel:
        return cls(
            make_client(settings),
            settings.openai_model,
            max_tokens=settings.max_tokens,
            idle_timeout_s=settings.idle_timeout_s,
            first_token_timeout_s=settings.first_token_timeout_s,
            secret=settings.openai_api_key,
            max_tokens_param=token_param(settings.max_tokens_param, settings.openai_base_url),
        )

    def stream(self, messages: list[dict[str, str]]) -> OpenAIStream:
        return OpenAIStream(self, messages)

    def _optional_fields(self) -> dict:
        with self._lock:
            fields = {}
            if self.max_tokens_param != "none":
                fields[self.max_tokens_param] = self.max_tokens
            if self.stream_options:
                fields["stream_options"] = {"include_usage": True}
            return fields

    def _adapt(self, error: openai.BadRequestError, sent: dict) -> bool:
        """Learn from a 400 that names a field we sent; True if the next request differs."""
        text = f"{getattr(error, 'param', None) or ''} {getattr(error, 'message', '') or ''}"
        named = [field for field in sent if re.search(rf"\b{field}\b", text)]
        with self._lock:
            for field in named:
                self._refused.add(field)
                if field == "stream_options":
                    self.stream_options = False
                else:  # the token budget: try the other field, then none
                    other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
                    self.max_tokens_param = "none" if other in self._refused else other
                log.warning("%s refused %r; sending %s from now on", self.model, field,
                            self.max_tokens_param if field != "stream_options" else "no stream_options")
        return bool(named)

    def _open(self, messages: list[dict[str, str]]):
        """The streaming response, after at most one adjustment per optional field."""
        for _ in range(1 + 2 * 2):
            fields = self._optional_fields()
            try:
                return self.client.chat.completions.create(
                    model=self.model, messages=messages, stream=True, **fields
                )
            except openai.BadRequestError as error:
                if not self._adapt(error, fields):
                    raise
        raise ProviderError("The model provider refused every form of the request.")

    def _pieces(self, messages: list[dict[str, str]], handle: OpenAIStream) -> Iterator[str | Event]:
        try:
            response = self._open(messages)
        except openai.APIError as error:
            raise self._translate(error) from None
        handle._opened(response)
        with response:  # closing the generator closes the HTTP stream too
            finish = None
            visible = False  # any text that is not whitespace
            last_sign_of_life = time.monotonic()
            try:
                for chunk in response:
                    for choice in chunk.choices or []:  # none in the usage-only last chunk
                        delta = choice.delta
                        if delta is not None and delta.content:
                            last_sign_of_life = time.monotonic()
                            visible = visible or not delta.content.isspace()
                            yield delta.content
                        elif delta is not None and _reasoning(delta):
                            last_sign_of_life = time.monotonic()
                            yield THINKING
                        if choice.finish_reason is not None:
                            finish = choice.finish_reason
                            self._check_finish(finish, visible)
                    if chunk.usage is not None:
                        yield _usage(chunk.usage)
                    # Chunks with neither text nor reasoning are not signs of life.
                    allowed = self.idle_timeout_s if visible else self.first_token_timeout_s
                    if time.monotonic() - last_sign_of_life > allowed:
                        raise TimedOut(self._silence_message(allowed))
            except openai.APIError as error:
                if handle.closed:
                    return  # closed on purpose, from another thread
                raise self._translate(error) from None
            except ValueError:  # a line that is not JSON
                raise ProviderError("The model provider sent a malformed response.") from None
            if finish is None and not handle.closed:
                raise ConnectionLost("The reply was cut off before the model finished.")
            if finish is not None:
                yield Finished(finish)

    def _check_finish(self, reason: str, visible: bool) -> None:
        if reason == "content_filter":
            raise ProviderError("The model provider's content filter stopped this reply.")
        if reason == "length" and not visible:
            raise EmptyReply(
                f"The model used its whole budget of {self.max_tokens:,} tokens before writing "
                "anything (reasoning models think first). Raise OPENAI_MAX_TOKENS and ask again."
            )
        if not visible:
            raise EmptyReply("The model finished without writing anything. Try asking again.")

    @staticmethod
    def _silence_message(seconds: float) -> str:
        return f"The model sent nothing for {seconds:g} seconds, so the reply was ended."

    def _translate(self, error: openai.APIError) -> ModelError:
        if isinstance(error, openai.APITimeoutError):
            return TimedOut(self._silence_message(max(self.idle_timeout_s, self.first_token_timeout_s)))
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


def _reasoning(delta) -> bool:
    """Whether a delta carries the model's reasoning, in any of the fields servers use."""
    extra = delta.model_extra or {}
    return any(extra.get(field) for field in REASONING_FIELDS)


def _usage(usage) -> Usage:
    details = getattr(usage, "completion_tokens_details", None)
    return Usage(
        prompt_tokens=usage.prompt_tokens or 0,
        completion_tokens=usage.completion_tokens or 0,
        reasoning_tokens=getattr(details, "reasoning_tokens", None),
    )


class OpenAIStream:
    """The text pieces (and events) of one reply from an OpenAI-compatible server.

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

    def __next__(self) -> str | Event:
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
