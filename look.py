"""What a message and the reply figures look like: avatars, author lines, notes.

Shared by the settled history (app.py) and the live area (live_view.py), so
that a message looks the same wherever it is drawn. Nothing here draws.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from markup import escape_markdown
from store import Message

if TYPE_CHECKING:
    from worker import LiveReply

ASSISTANT_AVATAR = ":material/smart_toy:"  # nobody else can have it: the name GPT is reserved
OWN_AVATAR = "user"
OTHER_AVATAR = ":material/face:"
CURSOR = "▌"
STATUS_NOTES = {
    "truncated": "✂️ Cut short: the reply reached its token limit (OPENAI_MAX_TOKENS).",
    "stopped": "⏹ Stopped before the end.",
    "interrupted": "⚠️ Interrupted: the server restarted while this reply was being written.",
}


def is_own(message: Message, name: str) -> bool:
    return message.role == "user" and message.author == name


def bubble_for(message: Message, name: str) -> tuple[str, str]:
    """The ``st.chat_message`` name and avatar a message is drawn with."""
    if message.role == "assistant":
        return "assistant", ASSISTANT_AVATAR
    if is_own(message, name):
        return "user", OWN_AVATAR
    return message.author, OTHER_AVATAR


def author_line(message: Message, name: str) -> str:
    return (f"**{escape_markdown(message.author)}**" + (" · you" if is_own(message, name) else "")
            + (" · writing…" if message.status == "streaming" else ""))


def note_for(message: Message) -> str | None:
    """The line under a reply that failed or ended early, if any."""
    if message.status == "error":
        return f"⚠️ {message.error or 'This reply failed.'}"
    return STATUS_NOTES.get(message.status)


def thinking(since: float) -> str:
    """What a reply shows before its first word: the model is thinking (reasoning models can take minutes)."""
    return f"💭 Thinking… {max(0, int(time.time() - since))} s"


def retryable(message: Message, name: str, questions: dict[int, Message]) -> bool:
    """Whether this person may ask again for a reply that did not complete."""
    question = questions.get(message.reply_to or -1)
    failed = message.status in ("error", "interrupted", "stopped")
    return failed and question is not None and question.author == name


def stats_parts(reply: LiveReply | None) -> list[tuple[str, str] | None]:
    """The sidebar's figures for the room's latest reply, in four parts, each
    (``"markdown"`` or ``"caption"``, text) or None: heading, state, figures,
    the provider's count."""
    heading = ("markdown", "**Latest reply**")
    if reply is None:
        return [heading, ("caption", "No reply in this room since the server started."), None, None]
    stats = reply.stats
    state = None if reply.done else ("caption", "Still being written: figures so far.")
    figures = ("markdown", (
        f"{stats.tokens:,} tokens streamed · {stats.chunks:,} chunks persisted · "
        f"{stats.bytes_written:,} bytes written to the database in {stats.commits:,} commits\n\n"
        "| to persist it by | bytes written |\n|---|---:|\n"
        f"| appending each sentence (this app) | {stats.bytes_written:,} |\n"
        f"| rewriting the text at each sentence | {stats.seed_bytes:,} |\n"
        f"| rewriting the text at each token | {stats.per_token_bytes:,} |"
    ))
    usage = None
    if (counted := reply.usage) is not None:
        reasoning = f", {counted.reasoning_tokens:,} of them reasoning" if counted.reasoning_tokens else ""
        usage = ("caption", (f"The provider counted {counted.prompt_tokens:,} prompt tokens and "
                             f"{counted.completion_tokens:,} completion tokens{reasoning}."))
    return [heading, state, figures, usage]
