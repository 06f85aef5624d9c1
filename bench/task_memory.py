"""Bytes per task in flight, by structure: where the memory phase's RSS per task goes.

Builds the core (``bridge.core.book.Core``) as the memory phase's bridge has it (fixed
policy, an hour's interval, one input partition), feeds it ``--tasks`` input records as
intake does (the feeder's JSON value, the task id as key, no headers), answers one poll
each with the pending answer the simulator gives (through ``outcomes.interpret``, as the
HTTP client does), and reports:

- the bytes tracemalloc sees allocated per task (exact, deterministic);
- the same bytes by structure, from walking what the core holds (each object counted once,
  in the first structure that reaches it; shared objects cost nothing per task), with
  pymalloc's 16-byte rounding beside them (closer to what RSS pays);
- gc-tracked objects per task, by type;
- the lines that allocated the bytes.

RSS pays a little more again (pymalloc's arenas and pools, and the dicts' free slots).

Run: ``.venv/bin/python -m bench.task_memory [--tasks 100000]``. Pure: no broker, no HTTP.
"""

from __future__ import annotations

import argparse
import collections
import enum
import gc
import json
import random
import sys
import tracemalloc
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.config import build_config
from bridge.core.book import Core
from bridge.core.clock import Instant
from bridge.core.events import rfc3339
from bridge.core.messages import Record
from bridge.core.outcomes import interpret
from bridge.core.policy import FixedInterval

HOUR = 3600.0
# The feeder's model mix (bench/throughput/feeding.MIX), by share of task starts.
MODELS = (
    ("wavespeed-ai/flux-dev", 0.20),
    ("wavespeed-ai/flux-schnell", 0.10),
    ("wavespeed-ai/wan-2.1-i2v-480p-video", 0.70),
)
TAG = "0123abcd"  # bench/throughput/stack.Topics: an 8-hex tag per run
SIM_URL = "http://127.0.0.1:40000"
EPOCH = 1_780_000_000.0  # wall clock at monotonic 0


def pymalloc(size: int) -> int:
    """What pymalloc takes for ``size`` bytes: 16-byte blocks up to 512, else the size."""
    return (size + 15) // 16 * 16 if size <= 512 else size


def build_core(n: int) -> Core:
    """The memory phase's bridge config (bench/throughput/pollers.bridge_config)."""
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": "127.0.0.1:9092",
            "group_id": f"bench-{TAG}",
            "input_topic": f"bench-in-{TAG}",
            "completed_topic": f"bench-done-{TAG}",
            "failed_topic": f"bench-failed-{TAG}",
            "dead_letter_topic": f"bench-dlq-{TAG}",
        },
        "api": {"base_url": SIM_URL},
        "polling": {
            "policy": "fixed",
            "interval_s": HOUR,
            "jitter": 0.0,
            "max_in_flight": n + 1000,
            "default_timeout_s": 7200,
        },
    }
    config = build_config(data, env={})
    policy = FixedInterval(config.polling.interval_s, jitter=config.polling.jitter)
    core = Core(config, policy=policy, rng=random.Random(1), now=0.0)
    # The topic name as aiokafka hands it over: one string object for every record.
    topic = config.kafka.input_topic
    core.starting({(topic, 0)})
    core.assign({(topic, 0): (None, "")})
    return core


def feed_and_poll(core: Core, n: int, rng: random.Random) -> None:
    """``n`` records, each polled once and answered "processing" (the simulator's view).

    Every call reads the clock afresh, as intake and dispatch do: no two tasks share a
    time's float."""
    topic = core.config.kafka.input_topic
    mono = 10.0

    def read() -> Instant:
        nonlocal mono
        mono += 1e-5
        return Instant(mono, EPOCH + mono)

    created = rfc3339(EPOCH - HOUR)  # the simulator's created_at, an hour ago
    models = rng.choices([m for m, _ in MODELS], weights=[w for _, w in MODELS], k=n)
    for offset, model in enumerate(models):
        task_id = f"{rng.getrandbits(128):032x}"  # the simulator's: 16 random bytes, hex
        value = json.dumps({"id": task_id, "model": model, "created_at": created}).encode()
        ts = int(EPOCH * 1000) + offset // 100
        core.on_record(Record(topic, 0, offset, task_id.encode(), value, (), ts), read())
    while due := core.take_due(read().mono, 64):  # api.max_concurrent_requests at a time
        for task, _ in due:
            data: dict[str, Any] = {
                "id": task.task_id,
                "model": task.model,
                "outputs": [],
                "urls": {"get": f"{SIM_URL}/api/v3/predictions/{task.task_id}/result"},
                "has_nsfw_contents": [],
                "created_at": created,
                "status": "processing",
            }
            body = json.dumps({"code": 200, "message": "success", "data": data}).encode()
            at = read()
            core.on_outcome(task, interpret(200, None, body, at.wall), at)


Sizes = collections.Counter[str]  # type name -> bytes (or objects)


class Walker:
    """Sizes of what is reachable from a root, by type; each object is counted once
    overall, in the first structure that reaches it."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.rows: dict[str, tuple[Sizes, Sizes, Sizes]] = {}  # bytes, pymalloc, objects

    def add(self, row: str, roots: Iterable[object], *, shallow: bool = False) -> None:
        exact, rounded, count = self.rows.setdefault(
            row, (collections.Counter(), collections.Counter(), collections.Counter())
        )
        stack = list(roots)
        while stack:
            obj = stack.pop()
            if id(obj) in self.seen or _shared(obj):
                continue
            self.seen.add(id(obj))
            size, name = sys.getsizeof(obj), type(obj).__name__
            exact[name] += size
            rounded[name] += pymalloc(size)
            count[name] += 1
            if not shallow:
                stack.extend(_children(obj))


def _shared(obj: object) -> bool:
    """The interpreter's own (None, small ints, the empty tuple) or the program's (classes,
    functions, modules): nothing a task pays for."""
    if obj is None or obj == () or isinstance(obj, bool | type | enum.Enum):
        return True
    if isinstance(obj, int) and type(obj) is int:
        return -5 <= obj <= 256
    return callable(obj) and not isinstance(obj, Core)


def _children(obj: object) -> Iterable[object]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, list | tuple | set | frozenset | collections.deque):
        return obj
    out = [getattr(obj, name) for name in _slot_names(type(obj)) if hasattr(obj, name)]
    if hasattr(obj, "__dict__"):
        out.append(obj.__dict__)
    return out


def _slot_names(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return names


def attribute(core: Core) -> Walker:
    """The core's memory by structure, tasks first (their fields one row each)."""
    w = Walker()
    tasks = list(core._active.values())
    w.add("Task object", tasks, shallow=True)
    for name in sorted(_slot_names(type(tasks[0]))):
        w.add(f"Task.{name}", [getattr(t, name) for t in tasks if hasattr(t, name)])
    w.add("Core._active (dict)", [core._active])
    s = core.scheduler
    w.add("Scheduler._timers (heap)", [s._timers])
    w.add("Scheduler._due (dict)", [s._due])
    w.add("Scheduler ready pool", [s._ready, s._in_ready, s.fair])
    w.add("Partitions (offsets, commits)", [core._partitions])
    w.add("Core, the rest", [core])
    return w


@dataclass
class Measured:
    n: int  # tasks in flight
    traced: int  # bytes tracemalloc saw allocated for them, in all
    rounded: int  # the same in pymalloc's 16-byte blocks
    walk: Walker
    objects: collections.Counter[str]  # gc-tracked objects added, by type
    sites: list[tuple[str, int, int]]  # (file:line, bytes, allocations), the largest first


def measure(n: int, seed: int = 1) -> Measured:
    rng = random.Random(seed)
    gc.collect()
    tracemalloc.start(1)
    core = build_core(n)
    gc.collect()
    base = tracemalloc.take_snapshot()
    base_objects = collections.Counter(type(o).__name__ for o in gc.get_objects())
    feed_and_poll(core, n, rng)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    objects = collections.Counter(type(o).__name__ for o in gc.get_objects())
    objects.subtract(base_objects)
    objects.pop("Counter", None)  # base_objects itself
    traced = sum(t.size for t in after.traces) - sum(t.size for t in base.traces)
    rounded = sum(pymalloc(t.size) for t in after.traces) - sum(
        pymalloc(t.size) for t in base.traces
    )
    root = str(Path(__file__).resolve().parent.parent) + "/"
    sites = [
        (str(d.traceback[0]).removeprefix(root), d.size_diff, d.count_diff)
        for d in after.compare_to(base, "lineno")[:12]
    ]
    assert len(core._active) == n, "every task held"
    return Measured(n, traced, rounded, attribute(core), objects, sites)


def render(m: Measured) -> str:
    n, w = m.n, m.walk
    lines = [
        f"Bytes per task at {n:,} tasks in flight, each polled once and held with its"
        " pending answer (`python -m bench.task_memory`).",
        "",
        "| structure | bytes/task | pymalloc bytes/task | objects/task | by type (bytes/task) |",
        "|---|---:|---:|---:|---|",
    ]
    walked = walked_rounded = 0
    for row, (exact, rounded, count) in w.rows.items():
        b, r, c = sum(exact.values()), sum(rounded.values()), sum(count.values())
        walked, walked_rounded = walked + b, walked_rounded + r
        if b < n // 2:  # less than half a byte per task: shared
            continue
        detail = ", ".join(f"{k} {v / n:.0f}" for k, v in exact.most_common() if v >= n // 2)
        lines.append(f"| {row} | {b / n:.1f} | {r / n:.1f} | {c / n:.2f} | {detail} |")
    traced, rounded_total = m.traced, m.rounded
    lines += [
        f"| *walked, in all* | {walked / n:.1f} | {walked_rounded / n:.1f} | | |",
        f"| *not reached by the walk* | {(traced - walked) / n:.1f} |"
        f" {(rounded_total - walked_rounded) / n:.1f} | | |",
        f"| **tracemalloc, in all** | **{traced / n:.1f}** | **{rounded_total / n:.1f}** | | |",
        "",
        "gc-tracked objects per task: "
        + ", ".join(f"{k} {v / n:.2f}" for k, v in m.objects.most_common() if v >= n // 100)
        + f" (in all {sum(v for v in m.objects.values() if v > 0) / n:.2f})",
        "",
        "Where tracemalloc saw the bytes allocated (bytes/task, allocations/task):",
        "",
        "| allocation site | bytes/task | allocations/task |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{site}` | {size / n:.1f} | {count / n:.2f} |" for site, size, count in m.sites]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print, do not write")
    args = parser.parse_args(argv)
    text = render(measure(args.tasks, args.seed))
    if args.no_write:
        print(text)
        return
    out = Path(__file__).resolve().parent / "results" / "task_memory.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
