"""A chat room where @gpt answers: the asker sees tokens, everyone else sees sentences.

This script draws what a person sees and handles what they do. Replies are
written by the process-wide ReplyWorker (worker.py) in background threads, as
a script run is stopped by every click or closed tab. The page has two parts:
the settled history, drawn here by a full run of the script, and the live
area (live_view.py), which draws everything newer and keeps it current. How a
message looks is in look.py; how a token travels, in docs/architecture.md.
"""

from __future__ import annotations

import random
import re
import uuid
from functools import partial

import streamlit as st

import store as store_module
from live_view import PAGE_STYLE, STOP_KEY, Places, draw_live_area, my_live_reply, rerun_after_asking, stoppable
from llm import model_from_settings
from look import author_line, bubble_for, note_for, retryable
from markup import escape_markdown, safe_markdown
from settings import ConfigError, Settings
from store import DatabaseUnavailable, InvalidInput, Message, StoreError, check_name, check_room
from worker import ReplyRefused, ReplyWorker

DEFAULT_ROOM = "general"
TAB_TOKEN = re.compile(r"[0-9a-f]{16}")
PAGE_MESSAGES = 30  # messages a page shows at first; "Show earlier messages" adds as many again each time
ADJECTIVES = "Brave Calm Clever Curious Eager Gentle Happy Jolly Kind Lively Lucky Merry Quick Sunny Swift Witty".split()
ANIMALS = "Badger Crane Dolphin Falcon Fox Heron Koala Lynx Marten Otter Owl Panda Puffin Robin Seal Wren".split()


# Process-wide resources ------------------------------------------------------


def release(worker: ReplyWorker) -> None:
    """When Streamlit drops the cached worker (st.cache_resource.clear()): end its replies, close its store."""
    worker.shutdown()
    worker.store.close()


@st.cache_resource(show_spinner=False, on_release=release)
def start_worker(settings: Settings) -> ReplyWorker:
    """One store and one worker per process, started once: first marks replies a dead process left.

    A failure to open the database is not cached, so the next run of the page tries again.
    """
    store = store_module.open_store(settings.database)
    store.recover_interrupted()  # replies of processes that stopped beating (store.STALE_AFTER_S)
    worker = ReplyWorker(
        store,
        model_from_settings(settings),
        system_prompt=settings.system_prompt,
        max_concurrent=settings.max_concurrent,
        replies_per_minute=settings.replies_per_minute,
        idle_timeout_s=settings.idle_timeout_s,
        first_token_timeout_s=settings.first_token_timeout_s,
    )
    worker.shutdown_with_process()  # on SIGTERM, replies end "interrupted" within seconds
    worker.start_housekeeping()
    return worker


def backend() -> tuple[Settings, ReplyWorker]:
    """Settings and the worker (with its store), or a clear message and a stopped page."""
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        st.error(f"The app is not configured correctly: {error}")
        st.stop()
    try:
        return settings, start_worker(settings)
    except DatabaseUnavailable as error:
        hint = "" if settings.database_url else " Set CHAT_DB_PATH to a file in a writable folder."
        st.error(f"{error}.{hint} The page tries again when you reload it.")
        st.stop()


# Who and where ------------------------------------------------------------------


def identify() -> tuple[str, str, str, list[str]]:
    """Room, display name and tab token from the URL, and what was wrong with them.

    Missing or unusable ones are picked and saved in the URL. The tab token
    says which replies are this tab's own to follow and stop, including after
    a reload; the room link to share leaves it out.
    """
    problems = []
    room = st.query_params.get("room", DEFAULT_ROOM)
    try:
        check_room(room)
    except InvalidInput as error:
        problems.append(f"{error} Showing #{DEFAULT_ROOM} instead.")
        room = DEFAULT_ROOM
    name = st.query_params.get("name", "")
    try:
        name = check_name(name)
    except InvalidInput as error:
        if name:
            problems.append(f"{error} You are chatting under another name for now.")
        if "picked_name" not in st.session_state:
            st.session_state.picked_name = (
                f"{random.choice(ADJECTIVES)} {random.choice(ANIMALS)} {random.randint(10, 99)}"
            )
        name = st.session_state.picked_name
        st.query_params["name"] = name  # a reload keeps it
    tab = st.query_params.get("tab", "")
    if not TAB_TOKEN.fullmatch(tab):
        tab = st.session_state.setdefault("picked_tab", uuid.uuid4().hex[:16])
        st.query_params["tab"] = tab
    return room, name, tab, problems


# Actions (widget callbacks, run before the script) ---------------------------------

# Each action ends by saying which run draws what it did. The page sends a
# message or a click together with a refresh tick that lands in the same
# moment, as a run of the live area alone (the tick's fragment): left to
# that, a refusal, a new name or an earlier page would wait for a full run.
#
# A refusal stays on screen until the person's next action, with the refused
# text beside it to copy, since the chat box has already been cleared.


def send(worker: ReplyWorker, room: str, name: str, tab: str) -> None:
    """Chat input callback: store the message and start a reply if it asks @gpt."""
    st.session_state.pop("notice", None)
    text = st.session_state.chat
    try:
        posted = worker.post(room, name, text, asker=tab)
    except (InvalidInput, ReplyRefused) as error:
        st.session_state.notice = (str(error), text)
    except StoreError:
        st.session_state.notice = ("Your message could not be saved just now; please try again.", text)
    else:
        if posted.reply is not None:
            rerun_after_asking()
    st.rerun()


def retry(worker: ReplyWorker, room: str, tab: str, question_id: int) -> None:
    st.session_state.pop("notice", None)
    try:
        worker.ask(room, tab, reply_to=question_id)
    except ReplyRefused as error:
        st.session_state.notice = (str(error), None)
    except StoreError:
        st.session_state.notice = ("The reply could not be started just now; please try again.", None)
    st.rerun()


def change_name() -> None:
    st.session_state.pop("sidebar_notice", None)
    try:
        st.query_params["name"] = check_name(st.session_state.name_field)
    except InvalidInput as error:
        st.session_state.sidebar_notice = str(error)
    st.rerun()


def change_room() -> None:
    st.session_state.pop("sidebar_notice", None)
    typed = st.session_state.room_field.strip().lower()
    try:
        st.query_params["room"] = check_room(typed)
    except InvalidInput as error:
        st.session_state.sidebar_notice = str(error)
    else:
        st.session_state.pop("shown", None)
    st.rerun()


def stop(worker: ReplyWorker, room: str, tab: str) -> None:
    """Stop button callback: stop this tab's newest reply being written, here or on another replica."""
    if (message_id := stoppable(worker, room, tab)) is not None:
        worker.stop(message_id)


def show_earlier() -> None:
    st.session_state.shown += PAGE_MESSAGES
    st.rerun()


# Drawing -------------------------------------------------------------------------


def render_sidebar(settings: Settings, worker: ReplyWorker, room: str, name: str):
    """Draw the sidebar; return the place of its stats panel, which live_area keeps current."""
    with st.sidebar:
        st.text_input("Your name", value=name, key="name_field", on_change=change_name, max_chars=40)
        st.text_input("Room", value=room, key="room_field", on_change=change_room, max_chars=40)
        notice = st.empty()
        if text := st.session_state.get("sidebar_notice"):
            notice.warning(text)
        base = (st.context.url or "").split("?")[0]
        st.caption("Share this room:")
        st.code(f"{base}?room={room}", language=None, wrap_lines=True)

        st.markdown(f"**Model:** {escape_markdown(worker.model.name)}")
        demo = st.empty()
        if settings.uses_demo_model:
            demo.caption(
                "No API key is set, so replies come from the offline demo model. "
                "Add an `OPENAI_API_KEY` secret (or `OPENAI_BASE_URL` for a local server) "
                "to talk to a real model."
            )
        return st.empty()


def render_message(message: Message, name: str, questions: dict[int, Message], on_retry) -> None:
    """One settled message as a chat bubble, with Retry under a failed reply this person asked for.

    Every bubble has the same four places (author line, text, note, button),
    filled or empty, so one drawn over another leaves nothing of it behind.
    """
    who, avatar = bubble_for(message, name)
    with st.chat_message(who, avatar=avatar):
        st.caption(author_line(message, name))
        text_place, note_place, button_place = st.empty(), st.empty(), st.empty()
        if message.text:
            text_place.markdown(safe_markdown(message.text))
        if note := note_for(message):
            note_place.caption(note)
        if retryable(message, name, questions):
            button_place.button("Retry", key=f"retry-{message.id}", on_click=on_retry, args=(message.reply_to,))


def render_notice(message: str, refused_text: str | None) -> None:
    st.warning(message)
    if refused_text and refused_text.strip():
        with st.expander("Your message, not sent"):
            st.code(refused_text, language=None, wrap_lines=True)


def main() -> None:
    st.set_page_config(page_title="Chat with @gpt", page_icon="💬")
    settings, worker = backend()
    store = worker.store
    room, name, tab, problems = identify()
    st.chat_input(
        f"Message #{room}; mention @gpt to ask the assistant",
        key="chat", on_submit=send, args=(worker, room, name, tab),
    )
    stats_place = render_sidebar(settings, worker, room, name)
    st.html(PAGE_STYLE)
    with st.empty().container():
        for problem in problems:
            st.warning(problem)
    st.subheader(f"#{room}")
    # Fixed places: every run draws each of these, so nothing an earlier run
    # drew is left behind, and the refresh trigger inside live_area is never
    # loaded anew.
    earlier_place, settled_area, live, notice_area = st.empty(), st.empty(), st.container(), st.empty()
    # Drawn before live_area, which goes on following the room.
    st.button("Stop", icon=":material/stop_circle:", key=STOP_KEY, on_click=stop, args=(worker, room, tab))

    # A page shows the room's latest messages only: when a run starts, even a
    # fragment's, the browser redraws every chat bubble on the page, and with
    # a hundred of them that held the first token of a reply up by 150 ms.
    shown = st.session_state.setdefault("shown", PAGE_MESSAGES)
    history = store.recent(room, shown + 1)
    floor = 0  # the live area shows what is newer than this, and than the settled messages
    if len(history) > shown:
        floor, history = history[0].id, history[1:]
        earlier_place.button("Show earlier messages", key="earlier", on_click=show_earlier, type="tertiary")
    # Settled messages are drawn once per full run; from the first reply still
    # being written on, live_area draws them and keeps them fresh.
    split = next((i for i, m in enumerate(history) if m.status == "streaming"), len(history))
    settled = history[:split]
    questions = {m.id: m for m in settled if m.role == "user"}

    places = Places(settled_area.container(), "settled_places")
    for message in settled:
        with places.take().container():
            render_message(message, name, questions, partial(retry, worker, room, tab))
    if not history and my_live_reply(worker, room, tab) is None:
        places.take().caption("No messages yet. Say hello, or ask @gpt something.")
    places.cover()
    if notice := st.session_state.get("notice"):
        with notice_area.container():
            render_notice(*notice)
    with live:
        draw_live_area(store, worker, room, name, tab, settled[-1].id if settled else floor, questions, stats_place)


main()
