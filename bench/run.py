"""Every benchmark in one run, its tables printed and its two plots drawn into docs/.

    python bench/run.py            # about 55 minutes on 2 cores
    python bench/run.py --quick    # fewer repeats and combinations, about 15 minutes
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import asker_bytes
import asker_latency
import db_writes
import scale
import viewers
from common import ROOT

DOCS = ROOT / "docs"


def plot_db(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"append": "append each sentence (this app)", "seed": "rewrite at each sentence (seed)",
              "token": "rewrite at each token"}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for approach, label in labels.items():
        points = [(r["reply_bytes"], r["bytes"]) for r in rows if r["approach"] == approach]
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="reply size (bytes)", ylabel="text bytes handed to SQLite",
           title="Database bytes per reply (200, 2,000 and 20,000 tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_asker(medians: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(medians), figsize=(11, 4.8), dpi=120, sharey=True)
    for ax, (size, by_rate) in zip(axes, medians.items()):
        rates = sorted(by_rate)
        for label, style in (("this app", "-"), ("st.write_stream", "--")):
            for key, marker in (("first_ms", "v"), ("p95", "s"), ("last", "^")):
                name = "first token after Enter" if key == "first_ms" else key
                ax.plot(rates, [by_rate[r][label][key] for r in rates], style, marker=marker, label=f"{label}: {name}")
        ax.plot(rates, [by_rate[r]["bare openai client"]["first_ms"] + 100 for r in rates], ":", color="gray",
                label="target for the first token: bare client + 100 ms")
        ax.set(xscale="log", xlabel="tokens per second from the model", title=f"{size} messages in the room")
        ax.set_xticks(rates, [f"{r:,}" for r in rates])
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("ms (first token: from Enter; others: from token sent)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("The asker's view")
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below the plots
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = 1 if args.quick else 3
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"{time.strftime('%Y-%m-%d')}, {model}, {len(__import__('os').sched_getaffinity(0))} cores, "
          f"Python {platform.python_version()}\n")

    print("1. Database: one reply through the worker at full speed, three ways")
    rows = db_writes.measure()
    db_writes.print_table(rows)
    plot_db(rows, DOCS / "perf-db-bytes.png")

    print("\n2. The asker's view")
    medians = asker_latency.measure(runs)
    asker_latency.print_table(medians, runs)
    plot_asker(medians, DOCS / "perf-asker-latency.png")

    print("\n3. The asker's bytes as replies grow")
    asker_bytes.print_table(asker_bytes.measure())

    print("\n4. Viewers")
    phase_s = 15 if args.quick else 30
    viewers.print_table(viewers.measure(5, phase_s), 5, phase_s)

    print("\n5. Scale")
    scale.print_header()
    scale.measure((5, 20) if args.quick else (5, 10, 20), (1, 5) if args.quick else (1, 3, 5),
                  (40,) if args.quick else (40, 80))

    print("\n6. Replicas: viewers held by 1 and 2 processes, on SQLite and on PostgreSQL")
    scale.print_header()
    scale.print_capacity(scale.measure_replicas(("sqlite",) if args.quick else ("sqlite", "postgresql")))
    print(f"\nplots: {DOCS / 'perf-db-bytes.png'}, {DOCS / 'perf-asker-latency.png'}")


if __name__ == "__main__":
    main()
