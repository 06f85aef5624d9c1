"""Tenants (issue 19): a noisy tenant's flood beside a quiet tenant, on Apache Kafka with the
daemon itself and the simulator. Run from the repo root (Java 17 and Maven for Kafka)::

    python -m bench.tenants           # ~6 minutes

Budget 100 requests/s, polls every second (fixed), tenants read from the record key, the
input topic's two partitions shared by both tenants:

1. **Alone**: the quiet tenant produces 5 tasks/s (2-6 s each) for a minute; its detection
   delay (the simulator's first poll that saw a task finished, minus when it finished).
2. **Beside a flood**: the noisy tenant drops 50,000 tasks (that run for an hour) at once,
   then the quiet tenant does as in 1. The quiet tenant's detection delay; its first record
   behind the flood (on the same partition), from produced to first polled; the budget's
   use (requests per second at the simulator while the flood waits).
3. **Memory per held record**: the same flood into a daemon with ``polling.max_in_flight``
   100, so nearly all of it is held; RSS growth over the records held.

Writes ``bench/results/tenants.md`` (``--no-write`` prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiokafka import AIOKafkaProducer

from bench.procs import Scrape, kafka_section, rss_bytes
from bridge.local.apache_kafka import KafkaCluster, start_cluster
from bridge.local.broker import free_port
from bridge.local.simulator import Simulator

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-key"
BUDGET = 100.0
FLOOD = 50_000
QUIET_RATE = 5.0
QUIET_S = 60.0


def config(bootstrap: str, sim_url: str, tag: str, max_in_flight: int) -> dict[str, Any]:
    return {
        "kafka": kafka_section(bootstrap, tag),
        "api": {"base_url": sim_url, "requests_per_second": BUDGET, "budget_scope": "replica"},
        "polling": {
            "policy": "fixed",
            "interval_s": 1.0,
            "jitter": 0.1,
            "default_timeout_s": 7200,
            "max_in_flight": max_in_flight,
        },
        "tenants": {"key": "key"},
        "cluster": {"coordination_topic": None, "state_topic": None},
        "server": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"format": "json", "level": "WARNING"},
    }


async def daemon(
    cluster: KafkaCluster, workdir: Path, cfg: dict[str, Any]
) -> subprocess.Popen[bytes]:
    k = cfg["kafka"]
    await cluster.create_topics([k["input_topic"]], partitions=2)
    await cluster.create_topics([k["completed_topic"], k["failed_topic"], k["dead_letter_topic"]])
    return spawn(workdir, cfg)


def spawn(
    workdir: Path, cfg: dict[str, Any], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    k = cfg["kafka"]
    path = workdir / f"{k['group_id']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--config", str(path)],
        cwd=ROOT,
        stdout=(workdir / f"{k['group_id']}.log").open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "WAVESPEED_API_KEY": API_KEY, **(env or {})},
    )


async def scrape(port: int) -> Scrape | None:
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            return Scrape((await client.get(f"http://127.0.0.1:{port}/metrics")).text)
    except httpx.HTTPError:
        return None


async def ready(port: int) -> None:
    for _ in range(600):
        s = await scrape(port)
        if s is not None and s.sum("wavespeed_bridge_assigned_partitions") == 2:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("daemon not assigned")


async def sim_tasks(sim: Simulator, items: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=60) as client:
        for i in range(0, len(items), 5000):
            ids += (await client.post("/_sim/tasks", json=items[i : i + 5000])).json()["ids"]
    return ids


async def flood(producer: AIOKafkaProducer, topic: str, sim: Simulator) -> list[str]:
    ids = await sim_tasks(sim, [{"model": "m", "duration_s": 3600.0}] * FLOOD)
    sent = [
        await producer.send(topic, i.encode(), key=b"noisy", partition=n % 2)
        for n, i in enumerate(ids)
    ]
    await asyncio.gather(*sent)
    return ids


async def quiet(producer: AIOKafkaProducer, topic: str, sim: Simulator) -> dict[str, float]:
    """The quiet tenant's tasks, at QUIET_RATE for QUIET_S: id -> when produced (monotonic)."""
    rng = random.Random(19)
    produced: dict[str, float] = {}
    end = time.monotonic() + QUIET_S
    n = 0
    while time.monotonic() < end:
        (task,) = await sim_tasks(sim, [{"model": "m", "duration_s": rng.uniform(2.0, 6.0)}])
        await (await producer.send(topic, task.encode(), key=b"quiet", partition=n % 2))
        produced[task] = time.monotonic()
        n += 1
        await asyncio.sleep(1.0 / QUIET_RATE)
    return produced


def delays(sim: Simulator, ids: list[str]) -> list[float]:
    out = []
    for i in ids:
        t = sim.tasks[i]
        if t.first_terminal_poll is not None:
            out.append(t.first_terminal_poll - t.done_at)
    return out


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else float("nan")


async def finished(sim: Simulator, ids: list[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while any(sim.tasks[i].first_terminal_poll is None for i in ids):
        if time.monotonic() > end:
            return
        await asyncio.sleep(0.5)


async def alone(cluster: KafkaCluster, workdir: Path, sim: Simulator) -> dict[str, Any]:
    cfg = config(cluster.bootstrap, sim.base_url, "alone", 10_000)
    proc = await daemon(cluster, workdir, cfg)
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap)
    await producer.start()
    try:
        await ready(cfg["server"]["port"])
        produced = await quiet(producer, cfg["kafka"]["input_topic"], sim)
        await finished(sim, list(produced), 30)
    finally:
        await producer.stop()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    d = delays(sim, list(produced))
    return {"tasks": len(produced), "p50": statistics.median(d), "p99": p99(d)}


async def beside(cluster: KafkaCluster, workdir: Path, sim: Simulator) -> dict[str, Any]:
    cfg = config(cluster.bootstrap, sim.base_url, "beside", 10_000)
    proc = await daemon(cluster, workdir, cfg)
    topic = cfg["kafka"]["input_topic"]
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, linger_ms=20)
    await producer.start()
    try:
        await ready(cfg["server"]["port"])
        await flood(producer, topic, sim)
        began = int(time.time()) + 1
        produced = await quiet(producer, topic, sim)
        ended = int(time.time()) - 1
        await finished(sim, list(produced), 30)
        metrics = await scrape(cfg["server"]["port"])
    finally:
        await producer.stop()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
    d = delays(sim, list(produced))
    first = min(produced, key=lambda t: produced[t])  # right behind the flood
    first_poll = (
        sim.tasks[first].poll_times[0] - produced[first]
        if sim.tasks[first].poll_times
        else float("inf")
    )
    per_second = [sim.per_second[s] for s in range(began, ended)]
    held = metrics.sum("wavespeed_bridge_tenant_records_held", tenant="noisy") if metrics else 0.0
    return {
        "tasks": len(produced),
        "p50": statistics.median(d),
        "p99": p99(d),
        "first_poll_s": first_poll,
        "utilisation": statistics.fmean(per_second) / BUDGET,
        "held": held,
    }


async def memory(cluster: KafkaCluster, workdir: Path, sim: Simulator) -> dict[str, Any]:
    cfg = config(cluster.bootstrap, sim.base_url, "memory", 100)
    proc = await daemon(cluster, workdir, cfg)
    port = cfg["server"]["port"]
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, linger_ms=20)
    await producer.start()
    try:
        await ready(port)
        await asyncio.sleep(3.0)
        before = rss_bytes(proc.pid)
        await flood(producer, cfg["kafka"]["input_topic"], sim)
        held = 0.0
        for _ in range(600):
            s = await scrape(port)
            held = s.sum("wavespeed_bridge_tenant_records_held") if s else 0.0
            if held >= FLOOD - 200:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)
        after = rss_bytes(proc.pid)
    finally:
        await producer.stop()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
    return {
        "held": held,
        "rss_before": before,
        "rss_after": after,
        "per_held": (after - before) / held,
    }


def report(a: dict[str, Any], b: dict[str, Any], m: dict[str, Any]) -> str:
    rows = [
        (
            "the quiet tenant's detection delay p99, beside the flood / alone",
            "<= 1.2x",
            f"{b['p99']:.2f} s / {a['p99']:.2f} s = {b['p99'] / a['p99']:.2f}x"
            f" (p50 {b['p50']:.2f} / {a['p50']:.2f} s; {b['tasks']} / {a['tasks']} tasks)",
        ),
        (
            "the budget used while the flood waits (requests/s at the simulator / budget)",
            ">= 95%",
            f"{100 * b['utilisation']:.1f}%",
        ),
        (
            f"the quiet tenant's first record behind the {FLOOD:,} on its partition:"
            " produced to first polled",
            "<= 5 s",
            f"{b['first_poll_s']:.2f} s",
        ),
        (
            "memory per held record (RSS growth / records held, max_in_flight 100)",
            "<= 300 B",
            f"{m['per_held']:.0f} B ({m['held']:,.0f} held, RSS {m['rss_before'] / 2**20:.0f}"
            f" -> {m['rss_after'] / 2**20:.0f} MiB)",
        ),
    ]
    lines = [
        "# Tenants (issue 19)",
        "",
        f"Apache Kafka (one node), the simulator, the daemon; budget {BUDGET:.0f} requests/s, polls"
        " every second, tenants from the record key, both tenants on the same two partitions."
        " `python -m bench.tenants`.",
        "",
        "| measure | target | measured |",
        "|---|---|---|",
        *(f"| {m_} | {t} | {v} |" for m_, t, v in rows),
        "",
    ]
    return "\n".join(lines)


async def main_async(write: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as tmp:
        workdir = Path(tmp)
        cluster = await start_cluster(1, directory=workdir / "kafka")
        sim = Simulator(api_key=API_KEY, seed=19, record_poll_times=True)
        await sim.start()
        try:
            a = await alone(cluster, workdir, sim)
            print("alone", a, flush=True)
            b = await beside(cluster, workdir, sim)
            print("beside", b, flush=True)
            m = await memory(cluster, workdir, sim)
            print("memory", m, flush=True)
        finally:
            await sim.stop()
            cluster.close()
    text = report(a, b, m)
    print(text)
    if write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "tenants.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tenants")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    asyncio.run(main_async(not args.no_write))


if __name__ == "__main__":
    main()
