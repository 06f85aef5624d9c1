"""``python -m bench.throughput``: the options, the run phase by phase, and the results
written (or rendered again from a saved ``results.json`` with ``--report-from``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench.throughput
from bench.throughput.plot import plot
from bench.throughput.report import report
from bench.throughput.scenarios.ceilings import ceilings
from bench.throughput.scenarios.concurrent import concurrent, naive_concurrent
from bench.throughput.scenarios.memory import memory
from bench.throughput.scenarios.sustained import naive_sustained, sustained_all
from bench.throughput.settings import Settings
from bench.throughput.stack import BROKERS, RESULTS, SIM_CORE, Stack, say


async def run(s: Settings, workdir: Path) -> dict[str, Any]:
    os.sched_setaffinity(0, {SIM_CORE})  # children (brokers, simulator, py-spy) inherit it
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    results: dict[str, Any] = {"settings": s.as_dict(), "started": time.strftime("%Y-%m-%d %H:%M")}
    load: list[dict[str, Any]] = []
    results["load"] = load

    def phase(name: str) -> None:
        load.append({"at": name, "loadavg": list(os.getloadavg())})

    stack = Stack(s, workdir)
    results["brokers"] = stack.brokers
    try:
        say(f"starting {s.brokers[0]} and the simulator on core {SIM_CORE} (work files: {workdir})")
        phase("start")
        await stack.start()
        if "ceilings" in s.phases:
            say("1. HTTP ceilings (bare loops)")
            phase("ceilings")
            results["ceilings"] = await ceilings(stack)
        if "sustained" in s.phases:
            say("2. sustained end to end")
            phase("sustained")
            results["sustained"] = await sustained_all(stack)
        if "naive" in s.phases:
            phase("naive")
            results["naive_sustained"] = await naive_sustained(stack)
        if "concurrent" in s.phases:
            say(f"3. {s.concurrent:,} concurrent")
            phase("concurrent")
            intervals = s.intervals_s if s.policy == "fixed" else s.intervals_s[:1]
            results["concurrent"] = [
                await concurrent(stack, interval, profile=i == 0)
                for i, interval in enumerate(intervals)
            ]
            if "naive" in s.phases:
                results["naive_concurrent"] = await naive_concurrent(stack, intervals[0])
        if "memory" in s.phases:
            say("4. memory")
            phase("memory")
            results["memory"] = await memory(stack)
        phase("end")
    finally:
        await stack.stop()
    return results


def _brokers(text: str) -> tuple[str, ...]:
    keys = tuple(x for x in text.split(",") if x)
    unknown = [k for k in keys if k not in BROKERS]
    if not keys or unknown or len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(
            f"a comma-separated list of distinct brokers from {', '.join(BROKERS)}"
        )
    return keys


def parse_args(argv: list[str] | None = None) -> tuple[Settings, bool, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=bench.throughput.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--policy", choices=("fixed", "adaptive"), default="fixed")
    p.add_argument(
        "--intervals",
        default="10,5",
        help="fixed-policy intervals of the concurrent scenario, s (comma-separated; "
        "the first is the headline; adaptive runs once)",
    )
    p.add_argument(
        "--transports",
        default="aiohttp,httpx",
        help="api.transport values to run the sustained scenario with; the first is used "
        "everywhere else",
    )
    p.add_argument(
        "--brokers",
        type=_brokers,
        default=("kafka", "tansu"),
        help="local brokers, comma-separated (kafka: Apache Kafka, tansu: Tansu); the first "
        "serves every phase, the sustained scenario runs on each (default: kafka,tansu)",
    )
    p.add_argument(
        "--kafka-heap-mb",
        type=int,
        default=1024,
        help="the Apache Kafka JVM's heap limit (-Xmx), MB",
    )
    p.add_argument("--concurrent", type=int, default=10_000)
    p.add_argument(
        "--concurrency",
        type=int,
        default=100,
        help="api.max_concurrent_requests of the bridge, and the bare loops' connections",
    )
    p.add_argument(
        "--phases",
        default="ceilings,sustained,naive,concurrent,memory",
        help="comma-separated subset",
    )
    p.add_argument("--quick", action="store_true", help="short windows, small sizes (smoke)")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    p.add_argument(
        "--report-from",
        metavar="RESULTS_JSON",
        help="render the report and plot from a saved results.json instead of running",
    )
    a = p.parse_args(argv)
    s = Settings(
        policy=a.policy,
        intervals_s=tuple(float(x) for x in a.intervals.split(",") if x),
        transport=a.transports.split(",")[0],
        compare_transports=tuple(x for x in a.transports.split(",")[1:] if x),
        brokers=a.brokers,
        kafka_heap_mb=a.kafka_heap_mb,
        concurrent=a.concurrent,
        concurrency=a.concurrency,
        phases=tuple(x for x in a.phases.split(",") if x),
    )
    if a.quick:
        s = dataclasses.replace(
            s,
            concurrent=min(s.concurrent, 2000),
            memory_sizes=(2000, 10_000),
            bare_seconds=2.0,
            sustained_warmup_s=2.0,
            sustained_seconds=5.0,
            compare_seconds=4.0,
            profile_seconds=4.0,
            concurrent_warmup_s=6.0,
            concurrent_seconds=8.0,
            naive_concurrent_seconds=6.0,
        )
    return s, a.no_write, a.report_from


def main(argv: list[str] | None = None) -> int:
    s, no_write, report_from = parse_args(argv)
    if report_from:
        saved = json.loads(Path(report_from).read_text())
        if "settings" in saved:  # an older file: the results alone
            saved = {"results": saved, "elapsed": math.nan, "command": "python -m bench.throughput"}
        results, elapsed = saved["results"], saved["elapsed"]
        workdir, command = Path(report_from).parent, saved["command"]
    else:
        workdir = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
        t0 = time.monotonic()
        results = asyncio.run(run(s, workdir))
        elapsed = time.monotonic() - t0
        args = sys.argv[1:] if argv is None else argv
        command = " ".join(["python -m bench.throughput", *args])
        saved = {"results": results, "elapsed": elapsed, "command": command}
        (workdir / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    md = report(results, workdir, elapsed, command.strip())
    if no_write:
        print(md)
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "throughput.md").write_text(md)
        plot(results, RESULTS / "throughput.png")
        say(f"wrote {RESULTS / 'throughput.md'} and throughput.png")
    say(f"done in {elapsed / 60:.1f} min")
    return 0
