"""The per-task steps issue 22's last changes replaced, timed beside what they replaced, in
one process (pure: no broker, no HTTP). Each pair runs interleaved, ``--repeat`` times, and
the table gives the median µs per call of each side and what a task saves (calls per task
times the difference). ``bench/results/cost.md`` measures the whole task end to end.

Run: ``.venv/bin/python -m bench.hot_path [--repeat 7] [--no-write]``.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry, Counter, Histogram

from bench.throughput.stack import publish_md
from bridge.edges import logs
from bridge.edges.kafka import KeyPartitioner
from bridge.edges.metrics import Tallies

LATENCY_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600)
KEY = b"0123456789abcdef0123456789abcdef"  # a task id as the event's key
PARTITIONS = list(range(12))


@dataclass(frozen=True)
class Pair:
    what: str
    per_task: int  # calls per task done on its first poll
    before: str
    after: str
    old: Callable[[], Any]
    new: Callable[[], Any]


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def log_line(stamper: Any) -> Callable[[], None]:
    """A ``task finished`` line through the daemon's pipeline with ``stamper`` in it."""
    logs.configure(fmt="json", stream=io.StringIO())
    processors = list(structlog.get_config()["processors"])
    processors[1] = stamper
    structlog.configure(processors=processors)
    log = structlog.get_logger("wavespeed_bridge").bind()

    def line() -> None:
        log.info(
            "task finished",
            task_id="0123456789abcdef0123456789abcdef",
            model="wavespeed-ai/flux-dev",
            outcome="completed",
            polls=1,
            reason=None,
            partition=3,
            offset=123456,
            trace=None,
        )

    return line


def pairs() -> list[Pair]:
    default, ours = DefaultPartitioner(), KeyPartitioner()
    registry = CollectorRegistry()
    tallies = Tallies(registry)
    histogram = Histogram("h", "h", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
    counter = Counter("c", "c", ["model"], registry=registry)
    h_child, c_child = histogram.labels("a"), counter.labels("a")
    h_tallied, c_tallied = tallies.of(histogram.labels("b")), tallies.of(counter.labels("b"))
    return [
        Pair(
            "partition of an event's key (32 bytes)",
            1,
            "aiokafka's murmur2 (pure Python)",
            "murmurhash2 package",
            lambda: default(KEY, PARTITIONS, PARTITIONS),
            lambda: ours(KEY, PARTITIONS, PARTITIONS),
        ),
        Pair(
            "a `task finished` log line",
            1,
            "structlog's ISO TimeStamper",
            "Stamper (seconds formatted once)",
            log_line(structlog.processors.TimeStamper(fmt="iso", utc=True)),
            log_line(logs.Stamper()),
        ),
        Pair(
            "a histogram observation",
            7,
            "prometheus_client `observe`",
            "Tallied, folded in bulk",
            lambda: h_child.observe(7.3),
            lambda: h_tallied.observe(7.3),
        ),
        Pair(
            "a counter increment",
            4,
            "prometheus_client `inc`",
            "Tallied, folded in bulk",
            c_child.inc,
            c_tallied.inc,
        ),
    ]


def measure(repeat: int, n: int) -> list[tuple[Pair, float, float]]:
    out = []
    for pair in pairs():
        old, new = [], []
        for _ in range(repeat):
            old.append(per_call_us(pair.old, n))
            new.append(per_call_us(pair.new, n))
        out.append((pair, statistics.median(old), statistics.median(new)))
    return out


def report(rows: list[tuple[Pair, float, float]], repeat: int, n: int) -> str:
    lines = [
        "# The per-task steps replaced last (issue 22)",
        "",
        f"`python -m bench.hot_path`, {time.strftime('%Y-%m-%d %H:%M')}, Python "
        f"{platform.python_version()}: each side {n:,} calls, {repeat} times interleaved, "
        "the median µs per call. Saved per task: calls per task times the difference. The "
        "end-to-end effect is in `cost.md`.",
        "",
        "| step | calls per task | before | µs | after | µs | saved per task |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    total = 0.0
    for pair, old, new in rows:
        saved = pair.per_task * (old - new)
        total += saved
        lines.append(
            f"| {pair.what} | {pair.per_task} | {pair.before} | {old:.2f} | {pair.after} | "
            f"{new:.2f} | {saved:.1f} µs |"
        )
    lines += [f"| **total** | | | | | | **{total:.1f} µs** |", ""]
    lines += [
        "Not here: the `task consumed` line per task, now one `tasks consumed` line per "
        "partition and fetch (a log line's cost, ~5-7 µs, per task), and the logs' and "
        "metrics' share of the event loop's time.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hot_path", description=__doc__)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--no-write", action="store_true", help="print the report, write nothing")
    a = p.parse_args(argv)
    md = report(measure(a.repeat, a.calls), a.repeat, a.calls)
    publish_md(md, "hot_path.md", print_only=a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
