"""How far this 2-core machine goes: viewers times concurrent replies.

For 5, 10 and 20 viewer sessions with 1, 3 and 5 replies streaming at once
(50 tokens/s each, 400 tokens, in a room of 100 messages), then more viewers
until it breaks. Every session is a ``WireSession`` (tests/wire_client.py):
the page's side of Streamlit's websocket, without a browser rendering it on
the server's own two cores. The viewers' sessions run in processes of their
own, VIEWERS_PER_PROCESS each, as people's browsers run on their own
machines: in the measuring process, with the askers, their reading would
delay the askers' arrivals (one interpreter lock), more so the more
viewers, and so cap what replicas seem to hold. Every session connects to
its replica directly. One Chromium page more watches as a viewer, to show
what a person sees on screen.

Measured: the askers' p95 latency (token sent to token arriving in the
asker's session), the viewers' staleness (a sentence stored to it arriving;
stored is taken as its last token being sent, which precedes the commit by a
millisecond or two), the same on the Chromium viewer's screen, the server's
CPU as a share of one core, how busy the whole machine was, the load
generator's own CPU (sessions, model server, browser driver), and the time
the replies took against the model's time.

With --replicas: sessions spread over 1 and then 2 processes of the app on one
database, SQLite and then PostgreSQL, climbing from 8 viewers (with 5 replies)
4 at a time up to 96 and 8 at a time beyond, until the askers' p95 passes
150 ms or the viewers' following p95 1.3 s. No Chromium page watches
there: a person's browser runs on their own machine, and here it would take
the cores the replicas share. At each step 1 replica runs, then 2, so that
the machine's ups and downs fall on both alike. A step holds when most of
its runs (2 of 3) hold: the third runs only when the first two disagree. A
climb ends at its first step that does not hold.

    python bench/scale.py [--viewers 5 10 20] [--replies 1 3 5] [--beyond 40 80]
    python bench/scale.py --replicas [--engines sqlite postgresql]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asker_latency
from common import CHROMIUM, CHROMIUM_ARGS, ROOT, App, cpu_seconds, free_port, machine_busy
from viewers import ROOM, percentile, seed
from wire_client import TickClock, WireSession

from fake_openai import FakeOpenAI, Reply  # noqa: E402

RATE, TOKENS = 50, 400
SENTENCE = 12  # words per sentence in the test server's tagged replies
# For each reply tag (r0, r1, ...) on the page: when each word count first showed.
OBSERVE = """() => {
    window.__seen = {};
    const look = () => {
        const now = performance.timeOrigin + performance.now();
        const counts = {};
        for (const m of (document.body.innerText.match(/r\\d+w\\d+/g) || [])) {
            const tag = m.split('w')[0];
            counts[tag] = (counts[tag] || 0) + 1;
        }
        for (const [tag, count] of Object.entries(counts)) {
            const seen = window.__seen[tag] = window.__seen[tag] || {};
            if (!(count in seen)) seen[count] = now;
        }
    };
    new MutationObserver(() => requestAnimationFrame(look))
        .observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def lags(seen: dict, stamps: list[tuple[float, int]], step: int = 1) -> list[tuple[float, float]]:
    """(sent, lag) in ms for every ``step``-th token and the last: from the token being sent to the
    session first having at least that many words (``seen``: word count -> epoch ms)."""
    shown = [(int(count), at) for count, at in seen.items()]
    result = []
    for count in sorted({*range(step, len(stamps) + 1, step), len(stamps)}):
        arrivals = [at for n, at in shown if n >= count]
        if arrivals:
            sent = stamps[count - 1][0] * 1000
            result.append((sent, min(arrivals) - sent))
    return result


def following(pairs: list[tuple[float, float]], seen: dict) -> list[float]:
    """The lags of sentences stored after the viewer first saw the reply.

    Noticing the reply is itself a step a viewer waits for (the first
    sentence); after it, what the staleness target is about.
    """
    noticed = min(seen.values(), default=float("inf"))
    return [lag for sent, lag in pairs if sent >= noticed]


def in_ms(seen: dict[int, float]) -> dict[int, float]:
    return {count: at * 1000 for count, at in seen.items()}


def session(url: str, clock: TickClock, name: str) -> WireSession:
    return WireSession(url, f"room={ROOM}&name={name}&tab={uuid.uuid4().hex[:16]}", clock)


VIEWERS_PER_PROCESS = 12


def watch(sessions: list[tuple[str, str]], conn) -> None:
    """A viewer process: open the (url, name) sessions, say when all are ready,
    and when told, send back what each saw (``WireSession.seen``) and close them."""
    clock = TickClock()
    try:
        watchers = [session(url, clock, name) for url, name in sessions]
        for s in watchers:
            s.wait_ready()
    except Exception as error:  # told to the measuring process, which stops
        conn.send(f"{type(error).__name__}: {error}")
        raise
    conn.send("ready")
    conn.recv()
    conn.send([s.seen for s in watchers])
    for s in watchers:
        s.close()
    clock.stop()


class Viewers:
    """Viewer sessions spread over processes of their own (``watch``), VIEWERS_PER_PROCESS each."""

    def __init__(self, sessions: list[tuple[str, str]]):
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self.processes = []
        count = math.ceil(len(sessions) / VIEWERS_PER_PROCESS)
        for k in range(count):
            here, there = context.Pipe()
            process = context.Process(target=watch, args=(sessions[k::count], there), daemon=True)
            process.start()
            self.processes.append((process, here))

    def wait_ready(self, timeout: float = 120) -> None:
        for _, conn in self.processes:
            said = conn.recv() if conn.poll(timeout) else f"nothing in {timeout} s"
            if said != "ready":
                raise RuntimeError(f"viewer sessions did not start: {said}")

    def cpu(self) -> float:
        return sum(cpu_seconds(process.pid) for process, _ in self.processes)

    def seen(self) -> list[dict]:
        """What each viewer saw (``WireSession.seen``); this ends the sessions."""
        for _, conn in self.processes:
            conn.send("stop")
        result = [seen for _, conn in self.processes for seen in conn.recv()]
        self.close()
        return result

    def close(self) -> None:
        for process, _ in self.processes:
            process.join(15)
            if process.is_alive():
                process.kill()


def run(browser, server: FakeOpenAI, viewers: int, replies: int, database: Path | str, fast_asker: bool = False,
        replicas: int = 1, screen: bool = True) -> dict:
    """One combination, on an SQLite file or a PostgreSQL URL, with sessions spread over
    ``replicas`` processes of the app (as a balancer with affinity spreads them). With
    ``fast_asker`` the last reply is asked from Chromium in a room of its own and streamed
    at 2,000 tokens/s, measured as in bench/asker_latency.py. Without ``screen``, no
    Chromium page watches (its rendering would take the replicas' cores)."""
    server.default = Reply(tagged=TOKENS, delay_s=1 / RATE)
    sent_before = len(server.sent)
    env = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "x",
           "CHAT_MAX_CONCURRENT": str(replies), "CHAT_REPLIES_PER_MINUTE": "1000",
           **({"DATABASE_URL": database} if isinstance(database, str) else {"CHAT_DB_PATH": str(database)})}
    with contextlib.ExitStack() as stack:
        apps = [stack.enter_context(App(ROOT / "app.py", env)) for _ in range(replicas)]
        clock = TickClock()
        watchers = Viewers([(apps[i % replicas].direct_url, f"V{i}") for i in range(viewers)])
        stack.callback(watchers.close)
        askers = [session(apps[k % replicas].direct_url, clock, f"A{k}") for k in range(replies - fast_asker)]
        for s in askers:
            s.wait_ready()
        watchers.wait_ready()
        page = browser.new_context(viewport={"width": 1000, "height": 700}).new_page() if screen else None
        if page is not None:
            page.goto(f"{apps[-1].url}/?room={ROOM}&name=Chromium", wait_until="commit")
            page.wait_for_selector("[data-testid=stChatInput] textarea", timeout=120_000)
            page.evaluate(OBSERVE)
        time.sleep(2)
        me = os.getpid()
        cpu0, own0, started, machine0 = sum(a.cpu() for a in apps), cpu_seconds(me) + watchers.cpu(), time.monotonic(), machine_busy()
        for k, asker in enumerate(askers):
            asker.chat(f"@gpt r{k}")
        fast = None
        if fast_asker:
            time.sleep(0.5)  # while the others stream
            fast = asker_latency.one_reply(browser, apps[0], server, 2_000, 2_000, "/?room={room}&name=Fast", 100)
        deadline = time.monotonic() + TOKENS / RATE * 4 + 30
        while time.monotonic() < deadline:
            done = [s for s in server.sent[sent_before:] if s.done.is_set()]
            if len(done) == replies:
                break
            time.sleep(0.2)
        took = time.monotonic() - started
        cpu = (sum(a.cpu() for a in apps) - cpu0) / took * 100
        own = (cpu_seconds(me) + watchers.cpu() - own0) / took * 100
        machine1 = machine_busy()
        machine = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1]) * 100
        time.sleep(3)  # the last refresh reaches every viewer
        stamps = {s.text.split("w")[0]: s.stamps for s in server.sent[sent_before:]}
        asker_lags, viewer_lags, steady_lags, screen_lags = [], [], [], []
        for k, asker in enumerate(askers):
            asker_lags += [lag for _, lag in lags(in_ms(asker.seen.get(f"r{k}", {})), stamps[f"r{k}"])]
        for watched in watchers.seen():
            for tag, seen in watched.items():
                if tag in stamps:
                    pairs = lags(in_ms(seen), stamps[tag], step=SENTENCE)
                    viewer_lags += [lag for _, lag in pairs]
                    steady_lags += following(pairs, in_ms(seen))
        if page is not None:
            for tag, seen in page.evaluate("() => window.__seen").items():
                if tag in stamps:
                    screen_lags += following(lags(seen, stamps[tag], step=SENTENCE), seen)
            page.context.close()
        for s in askers:
            s.close()
        clock.stop()
    return {"replicas": replicas, "viewers": viewers, "replies": replies, "asker_p95": percentile(asker_lags, 0.95),
            "viewer_p50": statistics.median(viewer_lags) if viewer_lags else float("nan"),
            "viewer_p95": percentile(viewer_lags, 0.95), "steady_p95": percentile(steady_lags, 0.95),
            "screen_p95": percentile(screen_lags, 0.95),
            "cpu": cpu, "machine": machine, "load": own, "took": took, "model_s": TOKENS / RATE, "fast": fast}


def measure(viewer_counts=(5, 10, 20), reply_counts=(1, 3, 5), beyond=(40, 80)) -> tuple[list[dict], dict]:
    """The grid, then more viewers with the most replies until it breaks, then the
    2,000 tokens/s asker in Chromium while 20 viewers and 4 other replies run."""
    from playwright.sync_api import sync_playwright

    rows = []
    combos = [(v, r) for v in viewer_counts for r in reply_counts] + [(v, max(reply_counts)) for v in beyond]
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for viewers, replies in combos:
            db = Path(tmp) / f"{viewers}x{replies}.db"
            seed(db)
            rows.append(run(browser, server, viewers, replies, db))
            print_row(rows[-1])
        db = Path(tmp) / "fast.db"
        seed(db)
        loaded = run(browser, server, 20, 5, db, fast_asker=True)
        browser.close()
    print_fast(loaded)
    return rows, loaded


def print_fast(row: dict) -> None:
    m = row["fast"]
    print(f"\nThe asker at 2,000 tokens/s (Chromium, its own room of 100 messages) while {row['viewers']} viewers "
          f"and {row['replies'] - 1} other replies run:")
    print(f"first token {m['first_ms']:.0f} ms after Enter, p50 {m['p50']:.0f}, p95 {m['p95']:.0f}, "
          f"last {m['last']:.0f} ms after sent, longest frame {m['longest_frame_ms']:.0f} ms; "
          f"viewers meanwhile: following p95 {row['steady_p95']:.0f} ms")


HOLD_ASKER_P95_MS = 150  # what "holds" means: the askers' p95 ...
HOLD_FOLLOWING_P95_MS = 1_300  # ... and the viewers' following p95, within these
LADDER = (*range(8, 97, 4), 104, 112, 120, 128)  # viewers, each step with 5 replies


TRIALS = 3  # runs a step may take: it holds when most of them do


def holds(row: dict) -> bool:
    return row["asker_p95"] <= HOLD_ASKER_P95_MS and row["steady_p95"] <= HOLD_FOLLOWING_P95_MS


def step_holds(runs: list[bool], trials: int = TRIALS) -> bool | None:
    """Whether most of ``trials`` runs hold, once ``runs`` (the first few) settle it; else None."""
    most = trials // 2 + 1
    if runs.count(True) >= most:
        return True
    if runs.count(False) >= most:
        return False
    return None


def capacities(browser, server: FakeOpenAI, database, replica_counts=(1, 2), replies: int = 5,
               ladder=LADDER, trials: int = TRIALS) -> dict[int, tuple[int, dict | None]]:
    """For each number of replicas: the most viewers that hold with ``replies`` replies, and
    the first step that did not (its last run that did not hold). The counts climb the ladder
    side by side (each run of a step runs 1 replica, then 2), so that the machine's ups and
    downs fall on both alike; a step holds when most of its ``trials`` runs do, and a count
    stops at its first step that does not hold. ``database()`` gives a new, seeded database."""
    held, broke = dict.fromkeys(replica_counts, 0), dict.fromkeys(replica_counts)
    for viewers in ladder:
        runs = {n: [] for n in replica_counts if broke[n] is None}
        if not runs:
            break
        while undecided := [n for n in runs if step_holds(runs[n], trials) is None]:
            for replicas in undecided:
                row = run(browser, server, viewers, replies, database(), replicas=replicas, screen=False)
                print_row(row)
                runs[replicas].append(holds(row))
                if not runs[replicas][-1]:
                    broke[replicas] = row
        for replicas, outcomes in runs.items():
            print(f"   {replicas} replica{'s' if replicas > 1 else ''}, {viewers} viewers: "
                  f"{outcomes.count(True)} of {len(outcomes)} runs held", flush=True)
            if step_holds(outcomes, trials):
                held[replicas], broke[replicas] = viewers, None
    return {n: (held[n], broke[n]) for n in replica_counts}


def measure_replicas(engines=("sqlite", "postgresql"), replica_counts=(1, 2), ladder=LADDER) -> list[dict]:
    """How many viewers (with 5 replies) 1 and 2 replicas hold, on each engine."""
    from playwright.sync_api import sync_playwright

    from deploy.local_postgres import LocalPostgres  # ROOT is on sys.path (common.py)

    results = []
    with FakeOpenAI() as server, tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # In a folder of its own: the server runs as the postgres user, who cannot enter `tmp`.
        postgres = (LocalPostgres(Path(tempfile.mkdtemp(prefix="chat-pg-")), free_port()).start()
                    if "postgresql" in engines else None)
        databases = itertools.count()
        try:
            for engine in engines:
                def database(engine=engine):
                    n = next(databases)
                    where = postgres.create_database(f"scale{n}") if engine == "postgresql" else Path(tmp) / f"{n}.db"
                    seed(where)
                    return where
                print(f"-- {engine}", flush=True)
                for replicas, (held, broke) in capacities(browser, server, database, replica_counts, ladder=ladder).items():
                    results.append({"engine": engine, "replicas": replicas, "held": held, "broke": broke})
        finally:
            if postgres is not None:
                postgres.stop()
                shutil.rmtree(postgres.folder, ignore_errors=True)
            browser.close()
    return results


def print_capacity(results: list[dict]) -> None:
    print(f"\nViewers held with 5 replies streaming (asker p95 within {HOLD_ASKER_P95_MS} ms, "
          f"viewers' following p95 within {HOLD_FOLLOWING_P95_MS / 1000:g} s):")
    print(f"{'engine':<10} {'replicas':>8} {'holds':>5} {'vs 1 replica':>12}  first step that did not hold")
    for r in results:
        one = next(x["held"] for x in results if x["engine"] == r["engine"] and x["replicas"] == 1)
        ratio = f"{r['held'] / one:.1f}x" if one else "-"
        b = r["broke"]
        why = (f"{b['viewers']} viewers: asker p95 {b['asker_p95']:.0f} ms, following p95 {b['steady_p95']:.0f} ms, "
               f"server CPU {b['cpu']:.0f}%, machine {b['machine']:.0f}%") if b else "none (top of the ladder)"
        print(f"{r['engine']:<10} {r['replicas']:>8} {r['held']:>5} {ratio:>12}  {why}")


def print_header() -> None:
    print(f"{RATE} tokens/s, {TOKENS} tokens per reply, 100 messages in the room; ms unless said.")
    print("asker / viewer: arrival in the session; following: once the viewer has seen the reply;")
    print("on screen: the Chromium viewer; load: the sessions, model server and browser driver")
    print(f"{'replicas':>8} {'viewers':>7} {'replies':>7} {'asker p95':>9} {'viewer p50':>10} {'viewer p95':>10} {'following p95':>13} "
          f"{'on screen p95':>13} "
          f"{'server CPU %':>12} {'machine busy %':>14} {'load CPU %':>10} {'replies took s':>14}")


def print_row(r: dict) -> None:
    print(f"{r['replicas']:>8} {r['viewers']:>7} {r['replies']:>7} {r['asker_p95']:>9.0f} {r['viewer_p50']:>10.0f} "
          f"{r['viewer_p95']:>10.0f} {r['steady_p95']:>13.0f} {r['screen_p95']:>13.0f} {r['cpu']:>12.0f} {r['machine']:>14.0f} "
          f"{r['load']:>10.0f} {r['took']:>8.1f} / {r['model_s']:.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--viewers", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--replies", type=int, nargs="*", default=[1, 3, 5])
    parser.add_argument("--beyond", type=int, nargs="*", default=[40, 80], help="viewers, with the most replies")
    parser.add_argument("--replicas", action="store_true",
                        help="instead: how many viewers 1 and 2 replicas hold, on SQLite and on PostgreSQL")
    parser.add_argument("--engines", nargs="*", default=["sqlite", "postgresql"])
    args = parser.parse_args()
    print_header()
    if args.replicas:
        print_capacity(measure_replicas(tuple(args.engines)))
    else:
        measure(args.viewers, args.replies, args.beyond)


if __name__ == "__main__":
    main()
