"""Configuration from environment variables (on Community Cloud: root-level secrets)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEFAULT_SYSTEM_PROMPT = (
    "You are GPT, a friendly assistant in a group chat room. Several people talk here; "
    "their messages reach you as 'Name: text'. Someone mentioned @gpt to ask you something: "
    "answer them by name when it helps, briefly and warmly, in plain Markdown."
)


# "auto": max_completion_tokens for OpenAI and Azure OpenAI, max_tokens elsewhere.
MAX_TOKENS_PARAMS = ("auto", "max_completion_tokens", "max_tokens", "none")


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    openai_api_key: str | None = field(default=None, repr=False)  # never printed
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    max_tokens: int = 1024
    max_tokens_param: str = "auto"  # which request field carries max_tokens; see llm.token_param()
    db_path: Path = HERE / "chat.db"
    database_url: str | None = field(default=None, repr=False)  # PostgreSQL; holds a password
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    idle_timeout_s: float = 30.0
    first_token_timeout_s: float = 120.0
    max_concurrent: int = 4
    replies_per_minute: int = 5
    demo_tokens_per_s: float = 40.0

    @property
    def database(self) -> str:
        """Where the chat is stored: the PostgreSQL URL when there is one, else the SQLite file."""
        return self.database_url or str(self.db_path)

    @property
    def uses_demo_model(self) -> bool:
        """No key and no server: answer with the offline demo model."""
        return not self.openai_api_key and not self.openai_base_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def text(name: str, default: str | None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        def number(name: str, default: float, kind: type, low: float, high: float):
            raw = text(name, None)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number, not {raw!r}.") from None
            if not low <= value <= high:
                raise ConfigError(f"{name} must be between {low} and {high}, not {raw}.")
            return value

        def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
            value = (text(name, None) or default).lower()
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {value!r}.")
            return value

        database_url = text("DATABASE_URL", None)
        if database_url and not database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("DATABASE_URL must be a postgresql:// URL (unset, the app uses the SQLite file CHAT_DB_PATH).")
        return cls(
            database_url=database_url,
            openai_api_key=text("OPENAI_API_KEY", None),
            openai_base_url=text("OPENAI_BASE_URL", None),
            openai_model=text("OPENAI_MODEL", cls.openai_model),
            max_tokens=number("OPENAI_MAX_TOKENS", cls.max_tokens, int, 1, 100_000),
            max_tokens_param=choice("OPENAI_MAX_TOKENS_PARAM", cls.max_tokens_param, MAX_TOKENS_PARAMS),
            db_path=Path(text("CHAT_DB_PATH", str(cls.db_path))),
            system_prompt=text("CHAT_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
            idle_timeout_s=number("CHAT_IDLE_TIMEOUT_S", cls.idle_timeout_s, float, 0.1, 600),
            first_token_timeout_s=number("CHAT_FIRST_TOKEN_TIMEOUT_S", cls.first_token_timeout_s, float, 0.1, 3600),
            max_concurrent=number("CHAT_MAX_CONCURRENT", cls.max_concurrent, int, 1, 100),
            replies_per_minute=number("CHAT_REPLIES_PER_MINUTE", cls.replies_per_minute, int, 1, 1000),
            demo_tokens_per_s=number("CHAT_DEMO_TOKENS_PER_S", cls.demo_tokens_per_s, float, 1, 100_000),
        )
