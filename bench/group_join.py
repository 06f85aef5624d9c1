"""Replicas started together on a loaded machine (issue 16): before and after the fix.

Run from the repo root (Java 17 and Maven for Kafka)::

    python -m bench.group_join            # ten runs of each variant, ~30 minutes

Each run: one Apache Kafka node, the simulator (in this process), four ``yes`` processes
keeping both cores busy, and two daemons started at the same instant with webhooks on (4
input partitions, 300 tasks of 2-20 s, submitted with one replica's webhook URL or the
other's, as a load balancer would spread them). Variants, alternated run by run:

- ``before``: the daemon of commit 0a3d1de (``--before``), checked out in a git worktree:
  its consumer has two assignors, so aiokafka sends a JoinGroup per assignor in every
  join, and aiokafka's rebalance timeout (the session timeout);
- ``after``: the daemon of this checkout.

``--broker fresh`` (default) starts a Kafka node for each run, ``shared`` one for all: on
this machine the old join storm showed mostly against a broker that had just started.
Per run: tasks without an event at the cut-off (150 s), seconds from the start until every
input partition had a record taken (from the daemons' ``task consumed`` log lines), and
assignments received (``rebalances_total``, both replicas). Writes
``bench/results/group_join_<broker>_broker.md`` (``--no-write`` prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.procs import Scrape, kafka_section
from bridge.local.apache_kafka import start_cluster
from bridge.local.broker import free_port
from bridge.local.simulator import Simulator

RESULTS = Path(__file__).parent / "results"
API_KEY = "bench-key"
PARTITIONS = 4
TASKS = 300
CUTOFF_S = 150.0
BUSY = 4  # yes processes, two per core
BROKERS = {"fresh": "started for each run", "shared": "one for all runs"}
ROOT = Path(__file__).resolve().parent.parent
# main before the fix: the consumer with two assignors (aiokafka sends a JoinGroup per
# assignor in every join) and aiokafka's rebalance timeout (the session timeout).
BEFORE_REF = "0a3d1de"
VARIANTS = ("before", "after")


@dataclass
class Run:
    variant: str
    missing: int
    all_partitions_s: float | None  # None: some partition never had a record taken
    rebalances: int


@contextlib.contextmanager
def busy(n: int) -> Iterator[None]:
    spinners = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def daemon_config(bootstrap: str, sim_url: str, tag: str) -> dict[str, Any]:
    return {
        "kafka": kafka_section(bootstrap, tag),
        "api": {"base_url": sim_url},
        "polling": {"policy": "adaptive", "default_timeout_s": 120},
        "server": {"host": "127.0.0.1", "port": free_port()},
        "webhooks": {"enabled": True, "port": free_port(), "topic": f"hooks-{tag}"},
        "logging": {"format": "json", "level": "INFO"},
    }


def spawn(code: Path, config: dict[str, Any], log: Path, secret: str) -> subprocess.Popen[bytes]:
    """The daemon of the checkout at ``code`` (python -m from its root imports its bridge/)."""
    path = log.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "WAVESPEED_API_KEY": API_KEY, "WAVESPEED_WEBHOOK_SECRET": secret}
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--config", str(path)],
        cwd=code,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def first_taken(log: Path) -> dict[int, float]:
    """Unix time of the first ``tasks consumed`` line per input partition (``task consumed``,
    one per task, in revisions before issue 22)."""
    out: dict[int, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") not in ("tasks consumed", "task consumed"):
                continue
            at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
            part = int(entry["partition"])
            out[part] = min(out.get(part, at), at)
    return out


async def one_run(
    variant: str, code: Path, bootstrap: str, broker: Any, workdir: Path, seed: int
) -> Run:
    tag = f"{seed}-{random.Random(seed).getrandbits(32):08x}"
    sim = Simulator(api_key=API_KEY, seed=seed)
    await sim.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        configs = [daemon_config(bootstrap, sim.base_url, tag) for _ in range(2)]
        k = configs[0]["kafka"]
        await broker.create_topics([k["input_topic"]], partitions=PARTITIONS)
        outputs = [k["completed_topic"], k["failed_topic"]]
        await broker.create_topics([*outputs, k["dead_letter_topic"]])
        await broker.create_topics([configs[0]["webhooks"]["topic"]], partitions=3)
        logs = [workdir / f"{tag}-{i}.log" for i in range(len(configs))]
        start = time.time()
        for cfg, log in zip(configs, logs, strict=True):
            procs.append(spawn(code, cfg, log, sim.webhook_secret))
        rng = random.Random(seed)
        hooks = [f"http://127.0.0.1:{c['webhooks']['port']}/webhooks/wavespeed" for c in configs]
        async with httpx.AsyncClient(base_url=sim.base_url) as client:
            items = [
                {"model": "m", "duration_s": rng.uniform(2.0, 20.0), "webhook": hooks[i % 2]}
                for i in range(TASKS)
            ]
            ids: list[str] = (await client.post("/_sim/tasks", json=items)).json()["ids"]
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            sent = [await producer.send(k["input_topic"], i.encode()) for i in ids]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        done = await read_until(
            bootstrap, [k["completed_topic"], k["failed_topic"]], set(ids), start
        )
        rebalances = 0
        async with httpx.AsyncClient(timeout=5) as client:
            for cfg in configs:
                with contextlib.suppress(httpx.HTTPError):
                    text = (
                        await client.get(f"http://127.0.0.1:{cfg['server']['port']}/metrics")
                    ).text
                    rebalances += int(Scrape(text).sum("wavespeed_bridge_rebalances_total"))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        await sim.stop()
    firsts: dict[int, float] = {}
    for log in logs:
        for part, at in first_taken(log).items():
            firsts[part] = min(firsts.get(part, at), at)
    every = max(firsts.values()) - start if len(firsts) == PARTITIONS else None
    return Run(variant, len(set(ids) - done), every, rebalances)


async def read_until(bootstrap: str, topics: list[str], wanted: set[str], start: float) -> set[str]:
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    seen: set[str] = set()
    try:
        while not wanted <= seen and time.time() - start < CUTOFF_S:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        seen.add(json.loads(r.value)["subject"])
    finally:
        await consumer.stop()
    return seen & wanted


def report(runs: list[Run], before: str, broker: str) -> str:
    lines = [
        "# Replicas started together on a loaded machine (issue 16)",
        "",
        f"Two daemons started at the same instant with webhooks on, {PARTITIONS} input"
        f" partitions, {TASKS} tasks of 2-20 s, {BUSY} `yes` processes on the 2 cores; one"
        f" Apache Kafka node ({BROKERS[broker]});"
        f" cut-off {CUTOFF_S:.0f} s. `before` is the daemon of {before}"
        " (two assignors: aiokafka sends a JoinGroup per assignor in every join), `after`"
        " this checkout's. Runs alternate. `python -m bench.group_join`.",
        "",
        "| run | variant | tasks without an event | every partition taken after (s) |"
        " assignments received |",
        "|---:|---|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        every = f"{r.all_partitions_s:.1f}" if r.all_partitions_s is not None else "never"
        lines.append(f"| {i} | {r.variant} | {r.missing} | {every} | {r.rebalances} |")
    lines += [
        "",
        "| variant | runs | runs with a task left | tasks left (sum) |"
        " every partition taken, median / max (s) | assignments, median / max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        rs = [r for r in runs if r.variant == variant]
        if not rs:
            continue
        takes = [r.all_partitions_s if r.all_partitions_s is not None else float("inf") for r in rs]
        rebal = [r.rebalances for r in rs]
        lines.append(
            f"| {variant} | {len(rs)} | {sum(1 for r in rs if r.missing)} |"
            f" {sum(r.missing for r in rs)} | {_s(statistics.median(takes))} / {_s(max(takes))} |"
            f" {statistics.median(rebal):g} / {max(rebal)} |"
        )
    return "\n".join(lines) + "\n"


def _s(x: float) -> str:
    return "never" if x == float("inf") else f"{x:.1f}"


async def measure(runs: int, code: dict[str, Path], workdir: Path, fresh: bool) -> list[Run]:
    """``runs`` pairs, alternating which variant goes first; on one broker for all, or
    (``fresh``) on a broker started for each run, before the machine is loaded."""
    results: list[Run] = []
    shared = None if fresh else await start_cluster(1, directory=workdir / "kafka")
    try:
        for i in range(runs):
            for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                cluster = shared or await start_cluster(
                    1, directory=workdir / f"kafka-{i}-{variant}"
                )
                try:
                    with busy(BUSY):
                        r = await one_run(
                            variant, code[variant], cluster.bootstrap, cluster, workdir, 100 + i
                        )
                finally:
                    if shared is None:
                        cluster.close()
                print(r, flush=True)
                results.append(r)
    finally:
        if shared is not None:
            shared.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.group_join")
    parser.add_argument("--runs", type=int, default=10, help="runs of each variant")
    parser.add_argument("--before", default=BEFORE_REF, help="the commit to compare with")
    parser.add_argument(
        "--broker",
        choices=("fresh", "shared"),
        default="fresh",
        help="a Kafka node started for each run (default), or one for all runs",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-group-") as tmp:
        workdir = Path(tmp)
        old = workdir / "before"
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", str(old), args.before], check=True)
        try:
            code = {"before": old, "after": ROOT}
            fresh = args.broker == "fresh"
            results = asyncio.run(measure(args.runs, code, workdir, fresh))
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(old)], check=False)
    text = report(results, args.before, args.broker)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"group_join_{args.broker}_broker.md").write_text(text)


if __name__ == "__main__":
    main()
