"""Tracing's cost (issue 20), on Apache Kafka with the daemon itself, the simulator and a
real OTLP backend (Jaeger v2, built by ``scripts/jaeger``). Run from the repo root::

    python -m bench.tracing           # ~6 minutes

1. **Throughput**: a backlog of tasks (each done after ~2 polls) drained as fast as the
   daemon can, no request budget, in three settings run interleaved, ``--rounds`` times
   each: tracing off; on with a 1% ratio sampler (``OTEL_TRACES_SAMPLER=traceidratio``,
   inputs without a context: the bridge decides); on and fully sampled (``always_on``:
   every consume, poll and send span exported). Tasks per second from the first event to
   the last, the median round of each; ratios against off.
2. **Memory per task**: 10,000 long tasks taken, then 10,000 more, polled rarely; the RSS
   growth over the second 10,000 per task (what tracing costs once, its SDK, exporter and
   span queue, is in the first), tracing off against fully sampled.

Writes ``bench/results/tracing.md`` (``--no-write`` prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.procs import cpu_seconds, kafka_section, rss_bytes
from bench.tenants import scrape, sim_tasks, spawn
from bridge.local.apache_kafka import KafkaCluster, start_cluster
from bridge.local.broker import free_port
from bridge.local.jaeger import Jaeger, start_jaeger
from bridge.local.simulator import Simulator

RESULTS = Path(__file__).parent / "results"
BACKLOG = 6_000
IN_FLIGHT = 20_000

SETTINGS: dict[str, dict[str, str] | None] = {
    "off": None,
    "on, 1% sampled": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "on, all sampled": {"OTEL_TRACES_SAMPLER": "always_on"},
}


def config(bootstrap: str, sim_url: str, tag: str, tracing: bool, **polling: Any) -> dict[str, Any]:
    return {
        "kafka": kafka_section(bootstrap, tag),
        "api": {"base_url": sim_url, "budget_scope": "replica", "max_concurrent_requests": 256},
        "polling": {"policy": "fixed", "jitter": 0.1, "default_timeout_s": 7200, **polling},
        "cluster": {"coordination_topic": None, "state_topic": None},
        "server": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"format": "json", "level": "WARNING"},
        "tracing": {"enabled": tracing},
    }


async def start(
    cluster: KafkaCluster,
    workdir: Path,
    cfg: dict[str, Any],
    jaeger: Jaeger,
    otel: dict[str, str] | None,
) -> subprocess.Popen[bytes]:
    k = cfg["kafka"]
    await cluster.create_topics([k["input_topic"]], partitions=2)
    await cluster.create_topics([k["completed_topic"], k["failed_topic"], k["dead_letter_topic"]])
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_endpoint, **(otel or {})}
    proc = spawn(workdir, cfg, env)
    for _ in range(600):
        s = await scrape(cfg["server"]["port"])
        if s is not None and s.sum("wavespeed_bridge_assigned_partitions") == 2:
            return proc
        await asyncio.sleep(0.1)
    raise TimeoutError("daemon not assigned")


async def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(proc.wait, 60)


async def produce(bootstrap: str, topic: str, ids: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = [await producer.send(topic, i.encode(), partition=n % 2) for n, i in enumerate(ids)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def throughput(
    cluster: KafkaCluster, workdir: Path, sim: Simulator, jaeger: Jaeger, name: str, n: int
) -> dict[str, float]:
    otel = SETTINGS[name]
    tag = f"tp{n}"
    cfg = config(
        cluster.bootstrap,
        sim.base_url,
        tag,
        otel is not None,
        interval_s=0.5,
        max_in_flight=BACKLOG,
    )
    proc = await start(cluster, workdir, cfg, jaeger, otel)
    port = cfg["server"]["port"]
    try:
        ids = await sim_tasks(sim, [{"model": "m", "duration_s": 0.7}] * BACKLOG)
        cpu0 = cpu_seconds(proc.pid)
        requests0 = sim.requests
        await produce(cluster.bootstrap, cfg["kafka"]["input_topic"], ids)
        began = time.monotonic()
        done = 0.0
        while done < BACKLOG:
            await asyncio.sleep(0.2)
            s = await scrape(port)
            done = s.sum("wavespeed_bridge_tasks_finished_total") if s else 0.0
            if time.monotonic() - began > 600:
                raise TimeoutError(f"{name}: {done:.0f} of {BACKLOG} in 600 s")
        elapsed = time.monotonic() - began
        cpu = cpu_seconds(proc.pid) - cpu0
        requests = sim.requests - requests0
    finally:
        await stop(proc)
    return {
        "tasks_per_s": BACKLOG / elapsed,
        "polls_per_task": requests / BACKLOG,
        "cpu_ms_per_task": 1000 * cpu / BACKLOG,
    }


async def memory(
    cluster: KafkaCluster, workdir: Path, sim: Simulator, jaeger: Jaeger, name: str
) -> dict[str, float]:
    otel = SETTINGS[name]
    cfg = config(
        cluster.bootstrap,
        sim.base_url,
        f"mem{len(name)}",
        otel is not None,
        interval_s=120.0,
        max_in_flight=IN_FLIGHT + 1000,
    )
    ids = await sim_tasks(sim, [{"model": "m", "duration_s": 3600.0}] * IN_FLIGHT)
    proc = await start(cluster, workdir, cfg, jaeger, otel)
    port = cfg["server"]["port"]
    half = IN_FLIGHT // 2
    rss: list[int] = []
    try:
        for part in (ids[:half], ids[half:]):
            await produce(cluster.bootstrap, cfg["kafka"]["input_topic"], part)
            want = half * (len(rss) + 1)
            for _ in range(1200):
                s = await scrape(port)
                if s is not None and s.sum("wavespeed_bridge_tasks_in_flight") >= want:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(5.0)  # the spans exported, the buffers settled
            rss.append(rss_bytes(proc.pid))
    finally:
        await stop(proc)
    # The second half's growth: what each task adds, not what tracing costs once.
    return {"in_flight": float(IN_FLIGHT), "per_task": (rss[1] - rss[0]) / half}


def report(tp: dict[str, list[dict[str, float]]], mem: dict[str, dict[str, float]]) -> str:
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in tp[name])

    off = med("off", "tasks_per_s")
    targets = {"off": "-", "on, 1% sampled": ">= 0.97x", "on, all sampled": ">= 0.85x"}
    lines = [
        "# Tracing (issue 20)",
        "",
        "Apache Kafka (one node), the simulator, the daemon, Jaeger v2 receiving OTLP/HTTP."
        f" Throughput: a backlog of {BACKLOG:,} tasks (done after ~2 polls each) drained with"
        " no request budget; the settings run interleaved, the median round of each"
        f" ({len(tp['off'])} rounds). `python -m bench.tracing`.",
        "",
        "| tracing | tasks/s (rounds) | vs off | target | daemon CPU per task | polls per task |",
        "|---|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        rounds = ", ".join(f"{r['tasks_per_s']:.0f}" for r in tp[name])
        lines.append(
            f"| {name} | {med(name, 'tasks_per_s'):.0f} ({rounds}) |"
            f" {med(name, 'tasks_per_s') / off:.2f}x | {targets[name]} |"
            f" {med(name, 'cpu_ms_per_task'):.2f} ms | {med(name, 'polls_per_task'):.2f} |"
        )
    m_off, m_on = mem["off"], mem["on, all sampled"]
    lines += [
        "",
        f"Memory: RSS growth per task from {IN_FLIGHT // 2:,} to {IN_FLIGHT:,} tasks in flight.",
        "",
        "| tracing | per task | tasks in flight |",
        "|---|---|---|",
        f"| off | {m_off['per_task']:.0f} B | {m_off['in_flight']:,.0f} |",
        f"| on, all sampled | {m_on['per_task']:.0f} B | {m_on['in_flight']:,.0f} |",
        f"| difference (target <= +64 B) | {m_on['per_task'] - m_off['per_task']:+.0f} B | |",
        "",
    ]
    return "\n".join(lines)


async def main_async(write: bool, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        workdir = Path(tmp)
        cluster = await start_cluster(1, directory=workdir / "kafka")
        jaeger = await start_jaeger(workdir / "jaeger")
        sim = Simulator(api_key="bench-key", seed=20)
        await sim.start()
        tp: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
        mem: dict[str, dict[str, float]] = {}
        try:
            n = 0
            for _ in range(rounds):
                for name in SETTINGS:
                    n += 1
                    tp[name].append(await throughput(cluster, workdir, sim, jaeger, name, n))
                    print(name, tp[name][-1], flush=True)
            for name in ("off", "on, all sampled"):
                mem[name] = await memory(cluster, workdir, sim, jaeger, name)
                print("memory", name, mem[name], flush=True)
        finally:
            await sim.stop()
            jaeger.close()
            cluster.close()
    text = report(tp, mem)
    print(text)
    if write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "tracing.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    asyncio.run(main_async(not args.no_write, args.rounds))


if __name__ == "__main__":
    main()
