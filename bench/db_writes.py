"""What persisting one streamed reply costs SQLite, three ways, side by side.

For replies of 200, 2,000 and 20,000 tokens, streamed at full speed:
  append    this app: the ReplyWorker appends one chunk per sentence (store.py)
  seed      rewrite the whole text at every sentence, as the original article's code does
  token     rewrite the whole text at every token

Each approach writes to a real SQLite file in WAL mode. "Text bytes" are the
bytes of text handed to SQLite; "per reply byte" divides them by the reply's size.
"Pages per commit" are the pages each of this app's commits adds to the
write-ahead log (a reader holds the log open meanwhile, so no checkpoint hides
any): what a sentence costs the database file. (The rewrites would need
gigabytes of log to count theirs.)

    python bench/db_writes.py
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chunker import SentenceChunker  # noqa: E402
from engines.sqlite import connect  # noqa: E402
from store import Store  # noqa: E402
from worker import ReplyWorker  # noqa: E402

WORDS = (
    "the a streaming reply database sentence token viewer room chat model write commit "
    "persist chunk browser server quick simple every person sees grows steady small "
    "answer question thread stored append text light fast"
).split()


def reply_tokens(count: int, seed: int = 7) -> list[str]:
    """``count`` word tokens in sentences of 6 to 24 words, deterministic."""
    rng = random.Random(seed)
    tokens: list[str] = []
    while len(tokens) < count:
        length = rng.randint(6, 24)
        words = [rng.choice(WORDS) for _ in range(length)]
        words[0] = words[0].capitalize()
        words[-1] += rng.choice(".!?")
        tokens += [(" " if tokens or i else "") + w for i, w in enumerate(words)]
    return tokens[:count]


class ListModel:
    name = "bench"

    def __init__(self, tokens: list[str]):
        self.tokens = tokens

    def stream(self, messages):
        yield from self.tokens


class WalPages:
    """Pages written to a database's write-ahead log while it is open (``with``)."""

    def __init__(self, path: Path):
        self.path = path
        self.wal = path.with_name(path.name + "-wal")
        self.pages = 0

    def __enter__(self) -> Self:
        self.reader = connect(self.path)
        self.reader.execute("BEGIN")
        self.reader.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()  # a snapshot no checkpoint passes
        self.page_size = self.reader.execute("PRAGMA page_size").fetchone()[0]
        self.before = self.wal.stat().st_size
        return self

    def __exit__(self, *exc) -> None:
        self.pages = (self.wal.stat().st_size - self.before) // (self.page_size + 24)  # a frame: header + page
        self.reader.close()


def run_append(tokens: list[str], folder: Path) -> dict:
    store = Store(folder / "append.db")
    worker = ReplyWorker(store, ListModel(tokens), system_prompt="", max_concurrent=1)
    with WalPages(folder / "append.db") as wal:
        started = time.perf_counter()
        reply = worker.ask("bench", "bench")
        for _ in reply.follow(timeout=1):
            pass
        took = time.perf_counter() - started
    worker.shutdown()
    assert store.get(reply.message_id).text == "".join(tokens)
    stats = reply.stats
    return {"bytes": stats.bytes_written, "commits": stats.commits, "seconds": took,
            "sentences": stats.chunks, "pages": wal.pages}


def run_rewrite(tokens: list[str], folder: Path, name: str, per_token: bool) -> dict:
    db = connect(folder / f"{name}.db")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT, status TEXT)")
    message_id = db.execute("INSERT INTO messages (body, status) VALUES ('', 'streaming')").lastrowid
    handed, commits = 0, 1
    chunker = SentenceChunker()
    text = ""

    def write(body: str) -> None:
        nonlocal handed, commits
        db.execute("UPDATE messages SET body = ? WHERE id = ?", [body, message_id])
        handed += len(body.encode())
        commits += 1

    started = time.perf_counter()
    for token in tokens:
        text += token
        if per_token:
            write(text)
        elif chunker.feed(token):
            write(text[: len(text) - len(chunker.pending)])
    write(text)  # the final status write carries the whole text
    took = time.perf_counter() - started
    return {"bytes": handed, "commits": commits, "seconds": took}


LENGTHS = (200, 2_000, 20_000)


def measure(lengths=LENGTHS) -> list[dict]:
    """One row per reply length and approach."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for count in lengths:
            tokens = reply_tokens(count)
            size = len("".join(tokens).encode())
            sentences = sum("".join(tokens).count(mark) for mark in ".!?")
            results = {
                "append": run_append(tokens, folder),
                "seed": run_rewrite(tokens, folder, f"seed{count}", per_token=False),
                "token": run_rewrite(tokens, folder, f"token{count}", per_token=True),
            }
            for name, r in results.items():
                rows.append({"tokens": count, "reply_bytes": size, "sentences": sentences, "approach": name,
                             "bytes": r["bytes"], "commits": r["commits"], "ms": r["seconds"] * 1000,
                             "pages_per_commit": r["pages"] / r["commits"] if "pages" in r else None})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'tokens':>7} {'reply bytes':>11} {'sentences':>9} {'approach':>8} {'text bytes':>13} "
          f"{'per reply byte':>14} {'commits':>7} {'pages per commit':>16} {'ms':>8}")
    for r in rows:
        pages = "" if r["pages_per_commit"] is None else f"{r['pages_per_commit']:.2f}"
        print(f"{r['tokens']:>7,} {r['reply_bytes']:>11,} {r['sentences']:>9,} {r['approach']:>8} {r['bytes']:>13,} "
              f"{r['bytes'] / r['reply_bytes']:>14.1f} {r['commits']:>7,} {pages:>16} {r['ms']:>8.1f}")


def main() -> None:
    print_table(measure())


if __name__ == "__main__":
    main()
