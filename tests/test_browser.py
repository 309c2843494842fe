"""The app in a real browser: Chromium driven by Playwright, against `streamlit run`.

Replies come from the local OpenAI-compatible test server through the real
openai client; the database is a real SQLite file.
"""

import os
import re
import time
from pathlib import Path


from fake_openai import Reply
from live import (
    CHAT_INPUT,
    KEY,
    READ_MESSAGES,
    WARNING,
    as_pieces,
    assistant_body,
    messages,
    require_chromium,
    send,
    stored_messages,
    stored_replies,
    stored_reply,
    wait_until,
)

require_chromium()


def side_by_side(left: Path, right: Path, out: Path) -> None:
    from PIL import Image

    images = [Image.open(left), Image.open(right)]
    canvas = Image.new("RGB", (sum(i.width for i in images) + 16, max(i.height for i in images)), "#d0d7de")
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (images[0].width + 16, 0))
    canvas.save(out)


def test_asker_sees_tokens_and_the_other_session_sees_sentences(pages, app, model, tmp_path):
    room = "duo"
    sentences = [f"Sentence {n} of this reply has exactly ten short words." for n in range(1, 13)]
    model.enqueue(Reply(pieces=as_pieces(sentences), delay_s=0.07))  # about 8 s in all
    asker, viewer = pages(app, room, "Ada", "Bob")
    viewer.click(CHAT_INPUT)
    viewer.keyboard.type("a draft I am still typing")

    send(asker, "@gpt please write twelve sentences")
    asker_states, viewer_states = [], []
    shots = Path(os.environ.get("CHAT_SCREENSHOT_DIR", tmp_path))
    shot_taken = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for page, states in ((asker, asker_states), (viewer, viewer_states)):
            body = assistant_body(page)
            if body is not None and (not states or states[-1] != body):
                states.append(body)
        if not shot_taken and len(viewer_states) >= 2 and len(asker_states) > 40:
            asker.screenshot(path=shots / "asker.png")
            viewer.screenshot(path=shots / "viewer.png")
            side_by_side(shots / "asker.png", shots / "viewer.png", shots / "two-sessions.png")
            shot_taken = True
        if model.sent and model.sent[-1].done.is_set() and asker_states[-1:] == viewer_states[-1:] != []:
            if asker_states[-1] == model.sent[-1].text:
                break
        time.sleep(0.03)

    sent = model.sent[-1].text
    stored = stored_reply(app.db, room)
    assert stored["status"] == "complete" and stored["text"] == sent
    # The asker saw the reply grow token by token, never shrinking, and end exactly as sent.
    assert len(asker_states) >= 30, asker_states
    assert all(b.startswith(a) for a, b in zip(asker_states, asker_states[1:]))
    assert asker_states[-1] == sent
    # The other session saw only what was stored: whole chunks, sentence by sentence.
    steps = {"".join(stored["chunks"][:k]) for k in range(len(stored["chunks"]) + 1)}  # "": none stored yet
    assert len(stored["chunks"]) <= len(sentences) + 1
    assert set(viewer_states) <= steps, viewer_states
    assert len([s for s in viewer_states if s]) >= 3  # it grew in sentence steps, then completed
    assert viewer_states[-1] == sent
    # Typing in the other session survived all those refreshes.
    assert viewer.input_value(CHAT_INPUT) == "a draft I am still typing"
    assert viewer.evaluate("() => document.activeElement.tagName") == "TEXTAREA"
    assert shot_taken


# How many times this page has loaded the refresh trigger's iframe, from its resource timing.
TRIGGER_LOADS = """() => performance.getEntriesByType('resource')
    .filter(entry => entry.name.includes('st_autorefresh') && entry.initiatorType === 'iframe').length"""


def latest_reply_figures(page) -> str:
    """The sidebar's stats panel, as shown."""
    sidebar = page.locator("[data-testid=stSidebar]").inner_text()
    return sidebar[sidebar.find("Latest reply"):]


def test_a_short_reply_reaches_a_viewer_in_sentence_steps_and_both_sidebars_show_its_figures(pages, app, model):
    room = "short"
    sentences = [f"Short sentence number {n} has exactly eight words." for n in range(1, 16)]
    model.enqueue(Reply(pieces=as_pieces(sentences), delay_s=0.025))  # 120 tokens at 40 a second: 3 s
    asker, viewer = pages(app, room, "Ada", "Bob")
    replies_before = len(model.sent)
    send(asker, "@gpt a short answer, please")
    viewer_states, asker_figures_while_writing = [], []
    wait_until(lambda: len(model.sent) > replies_before)
    while not model.sent[-1].done.is_set():
        body = assistant_body(viewer)
        if body and body not in viewer_states:
            viewer_states.append(body)
        if "Still being written" in (figures := latest_reply_figures(asker)):
            asker_figures_while_writing.append(figures)
        time.sleep(0.03)
    wait_until(lambda: stored_reply(app.db, room)["status"] == "complete")
    stored = stored_reply(app.db, room)
    wait_until(lambda: assistant_body(viewer) == stored["text"])
    # The viewer saw it grow a sentence at a time, at least twice before the end.
    steps = {"".join(stored["chunks"][:k]) for k in range(1, len(stored["chunks"]))}
    assert set(viewer_states) - {stored["text"]} <= steps
    assert len(set(viewer_states) & steps) >= 2, viewer_states
    # The asker's sidebar followed its own reply too, and ends with what the viewer's shows.
    assert any(re.search(r"[1-9][0-9]* tokens streamed", f) for f in asker_figures_while_writing)
    wait_until(lambda: "120 tokens streamed" in latest_reply_figures(asker))
    wait_until(lambda: latest_reply_figures(viewer) == latest_reply_figures(asker))
    assert "Still being written" not in latest_reply_figures(viewer)


def test_the_refresh_trigger_is_loaded_once_while_replies_come_and_settle(pages, app, model):
    """The trigger keeps its place in the page; a trigger that moves is loaded anew (82 KB of script)."""
    asker, viewer = pages(app, "steady", "Ada", "Bob")
    for question in ("@gpt one", "a plain message", "@gpt two"):
        if "@gpt" in question:
            model.enqueue(Reply(pieces=as_pieces(["A short reply."] * 3), delay_s=0.05))
        send(asker, question)
        wait_until(lambda: all(m["caption"].find("writing") < 0 for m in messages(viewer))
                   and any(question == m["body"] for m in messages(viewer)))
    wait_until(lambda: len(stored_replies(app.db, "steady")) == 2
               and all(r["status"] == "complete" for r in stored_replies(app.db, "steady")))
    for page in (asker, viewer):
        wait_until(lambda: sum(m["body"] == "A short reply. A short reply. A short reply." for m in messages(page)) == 2)
    asker.wait_for_timeout(2_500)  # the full runs end, and the ticks that carry on after them
    # Counted by each page since it opened, however late its first load finished.
    assert [page.evaluate(TRIGGER_LOADS) for page in (asker, viewer)] == [1, 1]


# Counts the warnings taken out of the page: a warning drawn afresh is taken out first.
COUNT_REMOVED_WARNINGS = """() => {
    window.removedWarnings = 0;
    new MutationObserver(records => {
        for (const record of records) for (const node of record.removedNodes) {
            const alert = '[data-testid=stAlertContentWarning]';
            if (node.nodeType === 1 && (node.matches(alert) || node.querySelector(alert))) window.removedWarnings++;
        }
    }).observe(document.body, {childList: true, subtree: true});
}"""


def test_a_refusal_stays_put_while_new_messages_settle_above_it(pages, app):
    ada, bob = pages(app, "notices", "Ada", "Bob")
    send(ada, "x" * 4_001)
    warning = ada.locator(WARNING)
    warning.wait_for()
    ada.evaluate(COUNT_REMOVED_WARNINGS)
    for text in ("first news from Bob", "second news from Bob"):
        send(bob, text)
        wait_until(lambda: any(m["body"] == text for m in messages(ada)))
    ada.wait_for_timeout(1_000)  # the full run that settles them
    assert "limit is 4,000" in warning.inner_text()
    assert ada.evaluate("window.removedWarnings") == 0


def test_stop_keeps_the_partial_text_for_everyone(pages, app, model):
    room = "stopping"
    model.enqueue(Reply(pieces=as_pieces(["word"] * 300), delay_s=0.03))
    asker, viewer = pages(app, room, "Ada", "Bob")
    send(asker, "@gpt talk for a long time")
    wait_until(lambda: len(assistant_body(asker) or "") > 60)
    asker.get_by_role("button", name="Stop").click()
    wait_until(lambda: stored_reply(app.db, room)["status"] == "stopped")
    stored = stored_reply(app.db, room)
    assert 60 < len(stored["text"]) < len(" word" * 300)
    # The page ends with each message once. (A full run draws the history before
    # the live area, so for a moment the live area's copy can still be there.)
    expected = [("Ada", "@gpt talk for a long time"), ("GPT\n⏹ Stopped before the end.", stored["text"])]
    for page in (asker, viewer):
        wait_until(lambda: [(m["caption"].replace(" · you", ""), m["body"]) for m in messages(page)] == expected)
    assert model.sent[-1].done.wait(5) and model.sent[-1].aborted  # the model stream was closed


def test_provider_error_shows_a_short_note_and_no_traceback(pages, app, model):
    room = "failing"
    body = {"error": {"message": f"backend exploded near {KEY}"}}
    model.enqueue(*[Reply(status=500, error_body=body, headers={"retry-after-ms": "1"})] * 3)
    asker, viewer = pages(app, room, "Ada", "Bob")
    send(asker, "@gpt will this work?")
    for page in (asker, viewer):
        note = wait_until(
            lambda: next((m["caption"] for m in page.evaluate(READ_MESSAGES) if "answered 500" in m["caption"]), None),
        )
        assert "backend exploded" in note
        html = page.content()
        assert "Traceback" not in html and KEY not in html
    # Retry comes with the full run that folds the failed reply into the
    # history (no widget works in the live area), a moment after its note.
    asker.get_by_role("button", name="Retry").wait_for(state="visible", timeout=10_000)
    assert stored_reply(app.db, room)["status"] == "error"


def test_the_asker_re_attaches_after_a_rerun_and_after_a_reload(pages, app, model):
    room = "reattach"
    # About 15 s of reply: it is still being written after two page loads and
    # a reload, which take several seconds each on a busy machine.
    sentences = [f"Part {n} of a reply that keeps going for a while." for n in range(1, 21)]
    model.enqueue(Reply(pieces=as_pieces(sentences), delay_s=0.07))
    asker = pages(app, room, "Ada")
    send(asker, "@gpt keep talking")
    wait_until(lambda: len(assistant_body(asker) or "") > 40)
    send(asker, "a plain message in the middle")  # reruns the page mid-stream
    before = assistant_body(asker)
    wait_until(lambda: len(assistant_body(asker) or "") > len(before or "") + 20)
    assert asker.get_by_role("button", name="Stop").is_visible()  # still the asker's live view
    namesake = pages(app, room, "Ada")  # someone else who happens to be called Ada
    wait_until(lambda: "writing" in " ".join(m["caption"] for m in messages(namesake)))
    assert namesake.get_by_role("button", name="Stop").count() == 0  # not theirs to stop
    asker.reload()  # a new session for the same person
    asker.wait_for_selector(CHAT_INPUT)
    # Re-attached: up to 15 s, as a reload's first run took over 5 s at a load average of 20.
    asker.get_by_role("button", name="Stop").wait_for(timeout=15_000)
    assert stored_reply(app.db, room)["status"] == "streaming"
    seen = len(assistant_body(asker) or "")
    wait_until(lambda: len(assistant_body(asker) or "") > seen)  # and still growing
    wait_until(lambda: stored_reply(app.db, room)["status"] == "complete")
    wait_until(lambda: assistant_body(asker) == model.sent[-1].text)
    assert stored_reply(app.db, room)["text"] == model.sent[-1].text


def test_history_opens_scrolled_to_the_newest_message(pages, app):
    from store import Store

    store = Store(app.db)
    for i in range(100):
        store.add_message("long", "Bob", f"message number {i}")
    page = pages(app, "long", "Ada")
    page.wait_for_selector("text=message number 99")
    at_bottom = """() => { const main = document.querySelector('[data-testid=stAppScrollToBottomContainer]')
        || document.scrollingElement; return main.scrollHeight - main.scrollTop - main.clientHeight; }"""
    assert wait_until(lambda: page.evaluate(at_bottom) < 5 or None, timeout=5) is not None
    assert page.locator("[data-testid=stChatMessage]").count() == 30
    page.get_by_role("button", name="Show earlier messages").click()
    page.wait_for_selector("text=message number 40")
    assert page.locator("[data-testid=stChatMessage]").count() == 60


# Markup that would run script or load something from off the machine if rendered
# as HTML or trusted Markdown. 127.0.0.2 stands for "somewhere else": nothing listens there.
PAYLOADS = [
    "<script>window.__pwned = 1</script>",
    '<img src=x onerror="window.__pwned = 1">',
    '<svg onload="window.__pwned = 1"></svg>',
    "<svg><script>window.__pwned = 1</script></svg>",
    '<iframe src="javascript:parent.__pwned = 1"></iframe>',
    '<iframe src="http://127.0.0.2:9/frame"></iframe>',
    "[click](javascript:window.__pwned=1)",
    "[click](JaVaScRiPt:window.__pwned=1)",
    "[click](&#106;avascript:window.__pwned=1)",
    "[click](data:text/html;base64,PHNjcmlwdD53aW5kb3cuX19wd25lZD0xPC9zY3JpcHQ+)",
    '<a href="javascript:window.__pwned = 1">link</a>',
    "![pixel](http://127.0.0.2:9/pixel.png)",
    "![pixel][ref]\n\n[ref]: http://127.0.0.2:9/ref.png",
    '<img src="http://127.0.0.2:9/img.png">',
    '<div style="background:url(http://127.0.0.2:9/bg.png)">styled</div>',
    "<style>body { background: url(http://127.0.0.2:9/css.png) }</style>",
    '<link rel="stylesheet" href="http://127.0.0.2:9/x.css">',
    "&lt;script&gt;window.__pwned = 1&lt;/script&gt;",
    '<details open ontoggle="window.__pwned = 1">x</details>',
    '<object data="http://127.0.0.2:9/object"></object>',
    '<video><source onerror="window.__pwned = 1"></video>',
    '<math><mtext><img src=x onerror="window.__pwned = 1"></mtext></math>',
    r"$\href{javascript:window.__pwned=1}{click}$",
    '<form action="javascript:window.__pwned = 1"><button>go</button></form>',
    "<http://127.0.0.2:9/autolink> and :red[colour] :material/warning:",
]


def assert_harmless(page, app) -> None:
    assert page.evaluate("() => window.__pwned") is None
    chat = page.locator("[data-testid=stChatMessage]")
    assert chat.locator("img, script, iframe, object, embed, video, svg image, link, style, form").count() == 0
    hrefs = chat.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href') || '')")
    assert not [h for h in hrefs if h.strip().lower().startswith(("javascript", "data", "vbscript"))], hrefs


def test_markup_in_messages_and_replies_runs_nothing_and_loads_nothing(pages, app, model):
    room = "hostile"
    reply = "\n\n".join(PAYLOADS)
    model.enqueue(Reply(pieces=[reply[i : i + 7] for i in range(0, len(reply), 7)], delay_s=0.002))
    sender, viewer = pages(app, room, "Mallory", "Victim")
    requests = []
    for page in (sender, viewer):
        page.on("request", lambda request: requests.append(request.url))
    for payload in PAYLOADS:
        send(sender, payload)
        wait_until(lambda: len(stored_messages(app.db, room)) > PAYLOADS.index(payload))
    send(sender, "@gpt repeat all of that")
    wait_until(lambda: stored_reply(app.db, room)["status"] == "complete")
    assert stored_reply(app.db, room)["text"] == reply
    for page in (sender, viewer):
        wait_until(lambda: len(page.locator("[data-testid=stChatMessage]").all()) == len(PAYLOADS) + 2)
        wait_until(lambda: "writing" not in " ".join(m["caption"] for m in messages(page)))
        assert_harmless(page, app)
    assert [m["text"] for m in stored_messages(app.db, room)[: len(PAYLOADS)]] == PAYLOADS  # stored as typed
    leaving = [url for url in requests if not url.startswith(app.url)]
    assert leaving == [], leaving


# Counts how often the text of the newest chat message changes on screen.
COUNT_REDRAWS = """() => {
    window.__redraws = [];
    const watch = () => {
        const all = document.querySelectorAll('[data-testid=stChatMessage]');
        const last = all[all.length - 1];
        const text = last ? last.innerText : '';
        if (text !== window.__lastText) { window.__lastText = text; window.__redraws.push(performance.now()); }
    };
    new MutationObserver(watch).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_a_fast_model_is_drawn_at_most_about_twenty_times_a_second(pages, app, model):
    room = "fast"
    model.enqueue(Reply(pieces=["tok "] * 3000, delay_s=0.0005))  # 2,000 tokens/s and more
    asker = pages(app, room, "Ada")
    asker.evaluate(COUNT_REDRAWS)
    send(asker, "@gpt go fast")
    wait_until(lambda: stored_reply(app.db, room)["status"] == "complete")
    wait_until(lambda: assistant_body(asker) == "tok " * 2999 + "tok")
    redraws = asker.evaluate("() => window.__redraws")
    streaming_s = (redraws[-1] - redraws[0]) / 1000
    assert len(redraws) <= streaming_s * 20 * 1.5 + 5, (len(redraws), streaming_s)
    assert len(redraws) >= 5  # and it did stream, rather than jump to the end


def test_both_pages_show_how_long_the_model_thinks_and_never_its_reasoning(pages, app, model):
    room = "thinking"
    sentences = ["Here is what I concluded.", "It took a while to get there."] + [
        f"Then came part {n} of the answer." for n in range(1, 6)]
    model.enqueue(Reply(reasoning=[f"secret step {i} " for i in range(20)], delay_s=0.15, pieces=as_pieces(sentences)))
    asker, viewer = pages(app, room, "Ada", "Bob")
    send(asker, "@gpt think hard about this")
    for page in (asker, viewer):
        clocks = set()
        wait_until(lambda: clocks.update(re.findall(r"Thinking… (\d+) s", page.inner_text("body"))) or len(clocks) >= 2)
    # Once the first sentence is stored, the clock is gone from both pages
    # while the reply is still being written (about 7 s of words).
    wait_until(lambda: stored_reply(app.db, room)["chunks"])
    for page in (asker, viewer):
        wait_until(lambda: (assistant_body(page) or "").startswith("Here is what I concluded."))
        wait_until(lambda: "Thinking" not in page.inner_text("body"))
    assert stored_reply(app.db, room)["status"] == "streaming"
    wait_until(lambda: stored_reply(app.db, room)["status"] == "complete")
    for page in (asker, viewer):
        wait_until(lambda: assistant_body(page) == " ".join(sentences))
        assert "Thinking" not in page.inner_text("body")
        assert "secret" not in page.content()
    assert stored_reply(app.db, room)["text"] == " ".join(sentences)


def test_a_reasoning_model_on_an_openai_like_server_answers_after_thinking_in_silence(start_app, pages, fake):
    # It refuses max_tokens as OpenAI's reasoning models do, then thinks in
    # silence for longer than the idle timeout before its first word.
    fake.refuse = {"max_tokens"}
    fake.enqueue(Reply(think_s=3, pieces=as_pieces(["Considered at length.", "Here it is."]), delay_s=0.02))
    app = start_app(OPENAI_MODEL="o4-mini", OPENAI_BASE_URL=fake.base_url, CHAT_IDLE_TIMEOUT_S="1",
                    CHAT_FIRST_TOKEN_TIMEOUT_S="20")
    asker = pages(app, "reasoning", "Ada")
    send(asker, "@gpt a hard question")
    wait_until(lambda: "Thinking… 2 s" in asker.inner_text("body"))
    wait_until(lambda: stored_reply(app.db, "reasoning")["status"] == "complete")
    wait_until(lambda: assistant_body(asker) == "Considered at length. Here it is.")
    assert fake.refused == ["max_tokens"]
    assert fake.requests[-1]["body"]["max_completion_tokens"] == 1024


# Every kind of block, with blank lines inside code and math, streamed a few
# characters at a time so that the split points fall everywhere.
BLOCKS_REPLY = """Here is the plan, in **three** parts.

1. First step
   - detail a
   - detail b

2. Second step, after a blank line

| Name | Value |
|------|-------|
| a    | 1     |
| b    | 2     |

```python
def double(x):

    return x * 2
```

$$
a^2 + b^2 = c^2

\\int_0^1 x \\, dx = \\frac{1}{2}
$$

> A quote that
> spans two lines.

Final words with `code`, a [link](https://example.com) and $x^2$ inline."""

# The rendered Markdown of the newest assistant message: its top-level elements, in order.
RENDERED_BLOCKS = """() => {
    const replies = [...document.querySelectorAll('[data-testid=stChatMessage]')]
        .filter(m => m.querySelector('[data-testid=stChatMessageContent]').getAttribute('aria-label').endsWith('assistant'));
    const last = replies[replies.length - 1];
    const containers = [...last.querySelectorAll('[data-testid=stMarkdownContainer]')]
        .filter(e => !e.closest('[data-testid=stCaptionContainer]') && !e.closest('button'));
    return {elements: containers.length, html: containers.flatMap(c => [...c.children].map(e => e.outerHTML))};
}"""


def test_a_reply_drawn_block_by_block_ends_exactly_as_the_whole_text_renders(pages, app, model):
    room = "blocks"
    text = BLOCKS_REPLY
    model.enqueue(Reply(pieces=[text[i : i + 5] for i in range(0, len(text), 5)], delay_s=0.01))
    asker, viewer = pages(app, room, "Ada", "Bob")
    send(asker, "@gpt show me every kind of block")
    wait_until(lambda: stored_reply(app.db, room)["status"] == "complete")
    assert stored_reply(app.db, room)["text"] == text
    late = pages(app, room, "Cy")  # draws the reply as settled history: the whole text in one element
    # Streamlit shows a skeleton in an element's place until the code that draws it
    # (math, here) has loaded: read the page once that is done.
    wait_until(lambda: late.locator("[data-testid=stChatMessage] [data-testid=stSkeleton]").count() == 0)
    whole = late.evaluate(RENDERED_BLOCKS)
    assert whole["elements"] == 1
    assert len(whole["html"]) == 7  # paragraph, list, table, code, math, quote, paragraph
    for page in (asker, viewer):  # drew it block by block while it was written
        wait_until(lambda: "writing" not in " ".join(m["caption"] for m in messages(page)))
        shown = page.evaluate(RENDERED_BLOCKS)
        assert shown["elements"] == 7 and shown["html"] == whole["html"]


# Last, after everything above has run against this app.
def test_the_key_is_not_in_the_logs_or_the_database(app):
    assert KEY not in app.log_text()
    for suffix in ("", "-wal"):
        path = Path(str(app.db) + suffix)
        if path.exists():
            assert KEY.encode() not in path.read_bytes()


def test_asking_right_after_sending_a_message_keeps_the_whole_history_on_the_page(pages, app, model):
    """Each send starts a run that drops what the last one had not yet handed to the browser."""
    from store import Store

    store = Store(app.db)
    for i in range(25):
        store.add_message("quick", "Bob", f"earlier message {i}")
    page = pages(app, "quick", "Ada")
    model.enqueue(Reply(pieces=as_pieces(["Answered at once."])))
    page.fill(CHAT_INPUT, "a plain message first")
    page.keyboard.press("Enter")
    # As soon as it shows, as a person would: two Enters within the same few
    # milliseconds reach the script as one run with only the newer text, since
    # Streamlit merges rerun requests that are still waiting to start.
    wait_until(lambda: "a plain message first" in [m["body"] for m in messages(page)])
    page.fill(CHAT_INPUT, "@gpt and a question straight after")
    page.keyboard.press("Enter")
    wait_until(lambda: stored_reply(app.db, "quick")["status"] == "complete")
    wait_until(lambda: assistant_body(page) == "Answered at once.")
    page.wait_for_timeout(3_000)  # every run so far has ended or is following the room
    bodies = [m["body"] for m in messages(page)]
    assert bodies == [f"earlier message {i}" for i in range(25)] + [
        "a plain message first", "@gpt and a question straight after", "Answered at once."]
