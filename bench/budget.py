"""One account, many replicas (issue 18): the shared request budget and the shared learning,
measured on Apache Kafka with the real daemon and the simulator enforcing the account's
limit. Run from the repo root (Java 17 and Maven for Kafka)::

    python -m bench.budget            # ~10 minutes

1. **Join, kill, leave** (1 -> 3 -> 1 replicas): a backlog that keeps the budget binding
   (tasks that run for minutes, polled every second), account limit 100 requests/s in the
   bridge and at the simulator. Replica changes are read off the coordination topic (a
   replica's first report, its leaving report, the kill). Per sliding 1-second window (from
   the simulator's 100 ms counters), more than 2 s after a change: the most requests, and
   the mean while demand exceeds the budget; 429s over the whole run.
2. **Skewed demand**: two deployments of one account (two input topics and groups, one
   coordination topic), one with 90% of the due polls: its share of the requests.
3. **Rolling restart** (webhooks on behind one URL that passes each delivery to a live
   replica, as a Kubernetes Service; 1% of deliveries lost; adaptive polling; tasks of
   8-20 s arriving steadily): polls per task of the tasks created in the first minute
   after every replica was restarted, and after a new replica joined, against the steady
   state before (tasks created 60 to 25 s before the restart: finished before it); and the
   same restart without the state topic (cold), for comparison.

Writes ``bench/results/budget.md`` (``--no-write`` prints it).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.procs import Scrape
from bridge.core import budget as shared
from bridge.local.apache_kafka import KafkaCluster, start_cluster
from bridge.local.broker import free_port
from bridge.local.simulator import Simulator

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-key"
LIMIT = 100.0
SETTLE_S = 2.0  # windows this soon after a change do not count against the limit
WARM_S = 180.0  # of steady traffic before the rolling restart
LOSS = 0.01  # of webhook deliveries the simulator drops


@dataclass
class Deployment:
    """Topics and daemons of one deployment (one consumer group) of the account."""

    tag: str
    sim_url: str
    bootstrap: str
    coordination: str
    state: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    hook_ports: list[int] = field(default_factory=list)  # 0: that replica is gone

    @property
    def input(self) -> str:
        return f"in-{self.tag}"

    @property
    def outputs(self) -> list[str]:
        return [f"done-{self.tag}", f"failed-{self.tag}", f"dlq-{self.tag}"]

    def config(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "group_id": f"group-{self.tag}",
                "input_topic": self.input,
                "completed_topic": self.outputs[0],
                "failed_topic": self.outputs[1],
                "dead_letter_topic": self.outputs[2],
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            },
            "api": {"base_url": self.sim_url, "requests_per_second": LIMIT},
            "polling": {"policy": "fixed", "interval_s": 1.0, "jitter": 0.1},
            "server": {"host": "127.0.0.1", "port": free_port()},
            "cluster": {"coordination_topic": self.coordination, "state_topic": self.state},
            "logging": {"format": "json", "level": "INFO"},
        }
        for section, values in self.extra.items():
            data[section] = {**data.get(section, {}), **values}
        return data

    def start(self, workdir: Path, secret: str) -> int:
        config = self.config()
        path = workdir / f"{self.tag}-{len(self.procs)}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = (workdir / f"{self.tag}-{len(self.procs)}.log").open("wb")
        env = {**os.environ, "WAVESPEED_API_KEY": API_KEY, "WAVESPEED_WEBHOOK_SECRET": secret}
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "--config", str(path)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        self.ports.append(config["server"]["port"])
        return len(self.procs) - 1

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def scrape(port: int) -> Scrape | None:
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            return Scrape((await client.get(f"http://127.0.0.1:{port}/metrics")).text)
    except httpx.HTTPError:
        return None


async def until(check: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


async def sees(d: Deployment, index: int, replicas: int, timeout: float = 60) -> None:
    async def check() -> bool:
        s = await scrape(d.ports[index])
        return (
            s is not None
            and s.sum("wavespeed_bridge_budget_replicas") == replicas
            and s.sum("wavespeed_bridge_budget_coordinated") == 1
        )

    await until(check, timeout, f"{d.tag}[{index}] seeing {replicas} replicas")


async def produce(bootstrap: str, topic: str, values: Sequence[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = [await producer.send(topic, v) for v in values]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def sim_tasks(sim: Simulator, items: list[dict[str, Any]]) -> list[str]:
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        ids: list[str] = (await client.post("/_sim/tasks", json=items)).json()["ids"]
    return ids


async def changes(bootstrap: str, topic: str) -> list[float]:
    """When replicas came (first report), left (leaving report) or went quiet (last report
    before a gap): the moments the shares had to move."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    reports: dict[str, list[shared.Report]] = {}
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                break
            for records in batch.values():
                for r in records:
                    message = shared.decode(r.key, r.value)
                    if isinstance(message, shared.Report):
                        reports.setdefault(message.replica, []).append(message)
    finally:
        await consumer.stop()
    out: list[float] = []
    for series in reports.values():
        out.append(series[0].at)
        out.append(series[-1].at)  # a leave, a kill, or the end of the run
    return sorted(out)


def windows(sim: Simulator, start: float, end: float) -> list[tuple[float, int]]:
    """(window start, requests) for every sliding 1-second window in [start, end)."""
    out = []
    tick = int(start * 10)
    while tick + 10 <= int(end * 10):
        out.append((tick / 10, sum(sim.per_tenth[t] for t in range(tick, tick + 10))))
        tick += 1
    return out


async def join_kill_leave(cluster: KafkaCluster, workdir: Path) -> dict[str, Any]:
    sim = Simulator(api_key=API_KEY, seed=1)
    await sim.start()
    sim.set_faults(requests_per_second=LIMIT)
    d = Deployment("jkl", sim.base_url, cluster.bootstrap, "coord-jkl", None)
    try:
        await cluster.create_topics([d.input], partitions=6)
        await cluster.create_topics([*d.outputs, d.coordination])
        ids = await sim_tasks(sim, [{"model": "m", "duration_s": 3600.0} for _ in range(3000)])
        await produce(cluster.bootstrap, d.input, [i.encode() for i in ids])
        began = time.time()
        d.start(workdir, sim.webhook_secret)
        await sees(d, 0, 1)
        await asyncio.sleep(20)
        d.start(workdir, sim.webhook_secret)
        d.start(workdir, sim.webhook_secret)
        await sees(d, 0, 3)
        await asyncio.sleep(20)
        killed = time.time()
        d.procs[2].send_signal(signal.SIGKILL)
        await sees(d, 0, 2)
        await asyncio.sleep(20)
        d.procs[1].send_signal(signal.SIGTERM)
        await sees(d, 0, 1)
        await asyncio.sleep(20)
        ended = time.time()
    finally:
        d.stop_all()
        await sim.stop()
    moments = [*await changes(cluster.bootstrap, d.coordination), killed]
    steady = [
        (at, n)
        for at, n in windows(sim, began, ended)
        if not any(m - 1.0 < at + 1.0 and at < m + SETTLE_S for m in moments) and at > began + 5.0
    ]
    counts = [n for _, n in steady]
    return {
        "windows": len(steady),
        "max": max(counts),
        "mean": statistics.fmean(counts),
        "limited": sum(sim.limited_per_second.values()),
        "changes": len(moments),
        "busiest_any": max(n for _, n in windows(sim, began, ended)),
    }


async def skewed(cluster: KafkaCluster, workdir: Path) -> dict[str, Any]:
    sim = Simulator(api_key=API_KEY, seed=2)
    await sim.start()
    sim.set_faults(requests_per_second=LIMIT)
    busy = Deployment("busy", sim.base_url, cluster.bootstrap, "coord-skew", None)
    quiet = Deployment("quiet", sim.base_url, cluster.bootstrap, "coord-skew", None)
    try:
        await cluster.create_topics([busy.coordination])
        for d, n in ((busy, 900), (quiet, 100)):
            await cluster.create_topics([d.input], partitions=2)
            await cluster.create_topics(d.outputs)
            ids = await sim_tasks(sim, [{"model": "m", "duration_s": 3600.0} for _ in range(n)])
            await produce(cluster.bootstrap, d.input, [i.encode() for i in ids])
            d.start(workdir, sim.webhook_secret)
        await sees(busy, 0, 2)
        await sees(quiet, 0, 2)
        await asyncio.sleep(10)
        before = [await scrape(d.ports[0]) for d in (busy, quiet)]
        await asyncio.sleep(20)
        after = [await scrape(d.ports[0]) for d in (busy, quiet)]
    finally:
        for d in (busy, quiet):
            d.stop_all()
        await sim.stop()
    name = "wavespeed_bridge_api_responses_total"
    sent = [a.sum(name) - b.sum(name) for a, b in zip(after, before, strict=True) if a and b]
    shares = [a.sum("wavespeed_bridge_budget_share_requests_per_second") for a in after if a]
    return {
        "busy_requests": sent[0],
        "quiet_requests": sent[1],
        "busy_share": sent[0] / sum(sent),
        "shares": shares,
        "limited": sum(sim.limited_per_second.values()),
    }


class Balancer:
    """The webhook endpoint as a Kubernetes Service would be: one URL, each request passed
    to a live replica in turn (a refused connection tries the next one)."""

    def __init__(self, ports: Callable[[], list[int]]) -> None:
        self._ports = ports
        self._turn = 0
        self._runner: web.AppRunner | None = None
        self._client: httpx.AsyncClient | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self._client = httpx.AsyncClient(timeout=10.0)
        self.url = f"http://127.0.0.1:{port}"

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._client is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        ports = self._ports()
        for _ in range(len(ports)):
            self._turn += 1
            port = ports[self._turn % len(ports)]
            try:
                r = await self._client.post(
                    f"http://127.0.0.1:{port}{request.path}", content=body, headers=headers
                )
            except httpx.TransportError:
                continue  # that pod is gone or not listening yet
            return web.Response(status=r.status_code, body=r.content)
        return web.Response(status=503)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._runner is not None:
            await self._runner.cleanup()


async def rolling(cluster: KafkaCluster, workdir: Path, warm: bool) -> dict[str, Any]:
    """Two replicas, webhooks on (1% lost), tasks of 8-20 s arriving at 8/s; a rolling
    restart, then a third replica joins. Polls per task by when the task was created."""
    sim = Simulator(api_key=API_KEY, seed=3, record_poll_times=True)
    await sim.start()
    sim.set_webhook_faults(loss_rate=LOSS)
    tag = f"roll-{'warm' if warm else 'cold'}"
    d = Deployment(
        tag,
        sim.base_url,
        cluster.bootstrap,
        f"coord-{tag}",
        f"state-{tag}" if warm else None,
        extra={
            "polling": {"policy": "adaptive", "default_timeout_s": 120},
            "cluster": {"state_interval_s": 10.0},
        },
    )
    created: list[tuple[float, str]] = []
    stop = asyncio.Event()

    balancer = Balancer(lambda: [p for p in d.hook_ports if p])
    await balancer.start()

    async def feed() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, linger_ms=5)
        await producer.start()
        rng = random.Random(3)
        try:
            while not stop.is_set():
                # One URL for every task, as a Kubernetes Service in front of the replicas.
                hook = f"{balancer.url}/webhooks/wavespeed"
                (task_id,) = await sim_tasks(
                    sim,
                    [{"model": "m", "duration_s": rng.uniform(8.0, 20.0), "webhook": hook}],
                )
                created.append((time.time(), task_id))
                await producer.send(d.input, task_id.encode())
                await asyncio.sleep(0.125)
        finally:
            await producer.stop()

    try:
        await cluster.create_topics([d.input], partitions=4)
        await cluster.create_topics([*d.outputs, d.coordination, f"hooks-{tag}"])
        if d.state is not None:
            await cluster.create_topics([d.state])
        for _ in range(2):
            hook_port = free_port()
            d.extra["webhooks"] = {"enabled": True, "port": hook_port, "topic": f"hooks-{tag}"}
            d.start(workdir, sim.webhook_secret)
            d.hook_ports.append(hook_port)
        await sees(d, 0, 2)
        feeding = asyncio.create_task(feed())
        fed_at = time.time()
        await asyncio.sleep(WARM_S)  # learned: deliveries trusted, completion times known
        # Steady state: tasks created from a minute into the feed (learning done) to 25 s
        # before the restart, all finished (8-20 s) before it touches anything.
        restart_at = time.time()
        steady = (fed_at + 60, restart_at - 25)
        for i in range(2):  # a rolling restart: each pod replaced in turn
            d.procs[i].send_signal(signal.SIGTERM)
            await asyncio.to_thread(d.procs[i].wait, 30)
            d.hook_ports[i] = 0
            hook_port = free_port()
            d.extra["webhooks"] = {"enabled": True, "port": hook_port, "topic": f"hooks-{tag}"}
            index = d.start(workdir, sim.webhook_secret)
            d.hook_ports.append(hook_port)
            await sees(d, index, 2)
        restarted = time.time()
        await asyncio.sleep(60 + 25)  # the window's tasks (8-20 s) finish before the join
        hook_port = free_port()
        d.extra["webhooks"] = {"enabled": True, "port": hook_port, "topic": f"hooks-{tag}"}
        joined_index = d.start(workdir, sim.webhook_secret)
        d.hook_ports.append(hook_port)
        await sees(d, joined_index, 3)
        joined = time.time()
        await asyncio.sleep(60)
        stop.set()
        await feeding

        async def drained() -> bool:
            """Every task finished, lost deliveries included (found by their poll)."""
            live = [d.ports[i] for i, p in enumerate(d.procs) if p.poll() is None]
            scrapes = [await scrape(port) for port in live]
            return all(
                s is not None and s.sum("wavespeed_bridge_tasks_in_flight") == 0 for s in scrapes
            )

        await until(drained, 300, f"{tag}: every task finished")
    finally:
        stop.set()
        d.stop_all()
        await balancer.stop()
        await sim.stop()

    lost = set(sim.webhooks_lost)

    def polls(since: float, until_: float) -> float:
        chosen = [t for at, t in created if since <= at < until_]
        return statistics.fmean(sim.tasks[t].polls for t in chosen) if chosen else float("nan")

    def at_nominal_loss(since: float, until_: float) -> float:
        """Polls per task as if exactly LOSS of the window's deliveries were lost: polls per
        delivered task and per lost task, weighted by the nominal rate. Which tasks the
        simulator drops is a lottery (2-4 of a window's few hundred), and the raw mean
        follows it; this one measures what the bridge does with each kind."""
        chosen = [t for at, t in created if since <= at < until_]
        gone = [sim.tasks[t].polls for t in chosen if t in lost]
        kept = [sim.tasks[t].polls for t in chosen if t not in lost]
        per_lost = statistics.fmean(gone) if gone else 1.0  # at least one poll finds it
        return (1 - LOSS) * statistics.fmean(kept) + LOSS * per_lost

    def where(since: float, until_: float) -> dict[str, Any]:
        """Diagnosis: the window's polls before and after their task finished; for each
        early poll, when its task was created (s after the window opened), its duration,
        and how long after creation the poll went."""
        chosen = [(at, sim.tasks[t]) for at, t in created if since <= at < until_]
        early = [
            (round(at - since, 1), round(t.duration_s, 1), round(p - t.created, 1))
            for at, t in chosen
            for p in t.poll_times
            if p < t.done_at
        ]
        after = sum(1 for _, t in chosen for p in t.poll_times if p >= t.done_at)
        return {
            "tasks": len(chosen),
            "lost": sum(1 for _, t in chosen if t.id in lost),
            "polls_before_done": len(early),
            "polls_after_done": after,
            "early": early[:20],
        }

    windows = {
        "steady": steady,
        "after_restart": (restarted, restarted + 60),
        "after_join": (joined, joined + 60),
    }
    print("rolling diagnosis", {k: where(*w) for k, w in windows.items()}, flush=True)
    print("rolling windows (unix)", windows, flush=True)
    out: dict[str, Any] = {k: polls(*w) for k, w in windows.items()}
    out.update({f"{k}_nominal": at_nominal_loss(*w) for k, w in windows.items()})
    out.update({f"{k}_tasks": where(*w)["tasks"] for k, w in windows.items()})
    out.update({f"{k}_lost": where(*w)["lost"] for k, w in windows.items()})
    return out


def report(
    jkl: dict[str, Any], skew: dict[str, Any], warm: dict[str, Any], cold: dict[str, Any]
) -> str:
    def ratio(d: dict[str, Any], key: str) -> str:
        nominal = (
            f"{d[key + '_nominal']:.4f} / {d['steady_nominal']:.4f}"
            f" = {d[key + '_nominal'] / d['steady_nominal']:.2f}x"
        )
        raw = f"{d[key]:.3f} / {d['steady']:.3f} = {d[key] / d['steady']:.2f}x"
        counts = (
            f"{d[key + '_tasks']} tasks, {d[key + '_lost']} lost / {d['steady_tasks']},"
            f" {d['steady_lost']} lost"
        )
        return f"{nominal} (raw {raw}; {counts})"

    busy = f"{100 * skew['busy_share']:.1f}%"
    rows = [
        (
            f"1 -> 3 -> 1 replicas (join, SIGKILL, leave), limit {LIMIT:.0f}/s: most requests"
            f" in a sliding 1 s window more than {SETTLE_S:.0f} s after a change"
            f" ({jkl['windows']} windows, {jkl['changes']} changes)",
            "<= 105",
            str(jkl["max"]),
        ),
        ("the same: mean requests/s in those windows", ">= 90", f"{jkl['mean']:.1f}"),
        ("the same: 429s over the whole run (limits equal)", "0", str(jkl["limited"])),
        ("the same: most requests in any 1 s window", "-", str(jkl["busiest_any"])),
        (
            "skewed demand (90% / 10% of the due polls): the busy replica's share of requests",
            ">= 80%",
            f"{busy} ({skew['busy_requests']:.0f} / {skew['quiet_requests']:.0f};"
            f" 429s {skew['limited']})",
        ),
        (
            "rolling restart, webhooks on, 1% lost: polls per task in the first minute after"
            " every replica was replaced / steady state",
            "<= 1.2x",
            ratio(warm, "after_restart"),
        ),
        (
            "a replica joins: polls per task, its first minute / steady",
            "<= 1.2x",
            ratio(warm, "after_join"),
        ),
        ("the same restart, no state topic (cold)", "-", ratio(cold, "after_restart")),
        ("the same join, no state topic (cold)", "-", ratio(cold, "after_join")),
    ]
    lines = [
        "# One account, many replicas (issue 18)",
        "",
        "Apache Kafka (one node), the simulator enforcing the account's limit (above it a 429",
        "with the Retry-After a token takes), the daemon itself. `python -m bench.budget`.",
        "",
        "| measure | target | measured |",
        "|---|---|---|",
        *(f"| {m} | {t} | {v} |" for m, t, v in rows),
        "",
        "Polls per task in the rolling-restart rows are given at the nominal loss rate first:",
        "polls per delivered task and per lost task, weighted 99:1. Which deliveries the",
        f"simulator drops is a lottery ({LOSS:.0%} of a window's few hundred tasks, so 2 to 8),",
        "and the raw mean (in brackets, with the counts) follows the lottery more than the",
        "bridge: one lost delivery more or less moves a raw ratio by 0.3x. Every window's",
        "tasks have finished, lost deliveries found by their poll, before anything is counted.",
    ]
    return "\n".join(lines) + "\n"


async def main_async(write: bool, phases: set[str], keep: Path | None = None) -> None:
    jkl: dict[str, Any] = {}
    skew: dict[str, Any] = {}
    warm: dict[str, Any] = {}
    cold: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        workdir = keep or Path(tmp)  # --keep: the daemons' logs and configs stay there
        workdir.mkdir(parents=True, exist_ok=True)
        cluster = await start_cluster(1, directory=workdir / "kafka")
        try:
            if "share" in phases:
                jkl = await join_kill_leave(cluster, workdir)
                print("join/kill/leave", jkl, flush=True)
                skew = await skewed(cluster, workdir)
                print("skewed", skew, flush=True)
            if phases & {"rolling", "warm"}:  # warm: the state topic's run alone
                warm = await rolling(cluster, workdir, warm=True)
                print("rolling, warm", warm, flush=True)
            if "rolling" in phases:
                cold = await rolling(cluster, workdir, warm=False)
                print("rolling, cold", cold, flush=True)
        finally:
            cluster.close()
    if phases != {"share", "rolling"}:
        return  # a partial run: printed, not written
    text = report(jkl, skew, warm, cold)
    print(text)
    if write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "budget.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.budget")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--phases",
        default="share,rolling",
        help="share, rolling (warm and cold) or warm; both written",
    )
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (logs)")
    args = parser.parse_args()
    asyncio.run(main_async(not args.no_write, set(args.phases.split(",")), args.keep))


if __name__ == "__main__":
    main()
