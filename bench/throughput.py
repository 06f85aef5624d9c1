"""Throughput benchmark (issue 6): can one core track 10,000 concurrent tasks?

Run from the repo root, in the project's venv with the ``bench`` extra and py-spy::

    python -m bench.throughput          # ~7.5 minutes on a 2-core machine

It starts a Tansu broker and the WaveSpeed simulator (``bench.simserver``) on core 1,
runs every poller under test pinned to core 0 (``taskset -c 0``), and in one run measures:

1. bare polling loops (aiohttp; httpx over httpx-aiohttp; the bridge's own ``ApiClient``;
   httpx's default transport) against the same simulator: what each HTTP stack costs;
2. sustained end to end: the real daemon (``python -m bridge run``) fed ids of tasks that
   complete on the first poll, so every poll is a consume, a GET, a produce with acks=all
   and a commit; polls/s and tasks/s, then a py-spy profile of the same load; the same
   for the naive implementation (``bench.naive``), and for ``api.transport: httpx``;
3. 10,000 concurrent: a closed loop keeps ``--concurrent`` tasks of a mix of image and
   video models in flight at fixed intervals (``--intervals``); poll lateness (the
   simulator's poll time minus the time the schedule set for it), publish latency, the
   bridge's CPU share, a profile; then the naive implementation on the same load;
4. memory: RSS per in-flight task at 10,000 and 100,000 tasks in flight.

``--policy adaptive`` runs the same with the adaptive policy (lateness then needs the
bridge's ``poll_lateness_seconds`` histogram).

Writes ``bench/results/throughput.md`` and ``throughput.png`` (``--no-write``: print the
markdown instead); working files (configs, logs, raw profiles, ``results.json``) go to a
temporary directory named in the output. Everything it starts is stopped by process id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.procs import (
    CpuSample,
    Scrape,
    cpu_shares,
    histogram_bucket,
    histogram_count,
    histogram_quantile,
    histogram_share_within,
    rss_bytes,
    sample_cpu,
)
from bridge.events import rfc3339
from bridge.local.broker import free_port
from bridge.local.tansu import TansuBroker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
API_KEY = "bench-key-not-a-secret"
BRIDGE_CORE = 0
SIM_CORE = 1
P = "wavespeed_bridge"


# --- settings ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelMix:
    model: str
    share: float  # of task starts
    median_s: float
    sigma: float  # lognormal shape
    failure_rate: float = 0.02


# Starts per model; in flight, video dominates (it runs ~15x longer). Mean duration ~100 s,
# so 10,000 in flight complete ~100 tasks/s: the Ultra tier's 5,000 starts per minute.
MIX = (
    ModelMix("wavespeed-ai/flux-dev", 0.20, 8.0, 0.5),
    ModelMix("wavespeed-ai/flux-schnell", 0.10, 2.0, 0.4),
    ModelMix("wavespeed-ai/wan-2.1-i2v-480p-video", 0.70, 120.0, 0.6),
)


@dataclass(frozen=True, slots=True)
class Settings:
    policy: str = "fixed"
    # Fixed-policy intervals of the concurrent scenario, one run each; the first is the
    # headline and the naive comparison. 10 s offers 1,000 polls/s at 10,000 in flight,
    # about what the adaptive policy asks for this mix (~750/s measured); 5 s is
    # WaveSpeed's minimum for video, a stress point.
    intervals_s: tuple[float, ...] = (10.0, 5.0)
    transport: str = "aiohttp"
    compare_transports: tuple[str, ...] = ("httpx",)
    concurrency: int = 100  # api.max_concurrent_requests and the bare loops' connections
    concurrent: int = 10_000
    memory_sizes: tuple[int, ...] = (10_000, 100_000)
    bare_clients: tuple[str, ...] = (
        "aiohttp",
        "bridge-api",
        "httpx-aiohttp",
        "bridge-api-httpx",
        "httpx",
    )
    bare_seconds: float = 6.0
    sustained_warmup_s: float = 5.0
    sustained_seconds: float = 20.0
    compare_seconds: float = 12.0
    profile_seconds: float = 15.0
    concurrent_warmup_s: float = 20.0
    concurrent_seconds: float = 40.0
    naive_concurrent_seconds: float = 30.0
    phases: tuple[str, ...] = ("ceilings", "sustained", "naive", "concurrent", "memory")
    seed: int = 6


# --- processes on core 1: broker and simulator ------------------------------------------------


def _say(text: str) -> None:
    print(text, flush=True)


class Sim:
    """``bench.simserver`` in a child process (inherits this process's core)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log = (workdir / "simulator.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.simserver", "--port", str(self.port)],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, "WAVESPEED_API_KEY": API_KEY},
            start_new_session=True,
        )
        log.close()
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=60.0)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_ready(self) -> None:
        for _ in range(200):
            if self.process.poll() is not None:
                raise RuntimeError("simulator exited; see simulator.log")
            with contextlib.suppress(httpx.HTTPError):
                await self.counters()
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("simulator did not start")

    async def counters(self) -> dict[str, Any]:
        r = await self.http.get("/_bench/counters")
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    async def requests(self) -> int:
        return int((await self.counters())["requests"])

    async def create(
        self, model: str, durations: list[float], ages: list[float], outcome: str
    ) -> list[tuple[str, str]]:
        """Create tasks; returns ``(id, created_at)`` for each."""
        out: list[tuple[str, str]] = []
        for i in range(0, len(durations), 5000):
            r = await self.http.post(
                "/_bench/tasks",
                json={
                    "model": model,
                    "durations": durations[i : i + 5000],
                    "ages": ages[i : i + 5000],
                    "outcome": outcome,
                },
            )
            r.raise_for_status()
            out += [(t[0], t[1]) for t in r.json()["tasks"]]
        return out

    async def record(self, on: bool) -> None:
        (await self.http.post("/_bench/record", json={"on": on, "clear": on})).raise_for_status()

    async def polls(self) -> dict[str, tuple[float, list[float], bool]]:
        """Task id to (created, poll times, seen finished), monotonic seconds."""
        r = await self.http.get("/_bench/polls")
        r.raise_for_status()
        return {row[0]: (row[1], row[2], row[3]) for row in r.json()}

    async def stop(self) -> None:
        await self.http.aclose()
        _terminate(self.process)


def _terminate(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- task feeding -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    model: str
    duration_s: float
    age_s: float = 0.0  # how long the simulator's task has been running
    outcome: str = "completed"
    # created_at in the Kafka message, as seconds ago; None: the API's own created_at
    message_age_s: float | None = None


@dataclass(slots=True)
class Fed:
    task_id: str
    model: str
    created_at: str

    @property
    def created_monotonic(self) -> float:
        wall = datetime.fromisoformat(self.created_at.replace("Z", "+00:00")).timestamp()
        return wall - (time.time() - time.monotonic())


class Feeder:
    """Creates tasks in the simulator and produces their ids to the input topic."""

    def __init__(self, sim: Sim, bootstrap: str, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1_048_576
        )
        self.fed: dict[str, Fed] = {}

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    def draw(self, n: int) -> list[tuple[ModelMix, float, str]]:
        """``n`` (model, duration, outcome) drawn from :data:`MIX`."""
        models = self.rng.choices(MIX, weights=[m.share for m in MIX], k=n)
        out = []
        for m in models:
            duration = m.median_s * math.exp(self.rng.gauss(0.0, m.sigma))
            outcome = "failed" if self.rng.random() < m.failure_rate else "completed"
            out.append((m, duration, outcome))
        return out

    async def feed(
        self,
        topic: str,
        specs: list[Spec],
        *,
        timeout_s: float | None = None,
    ) -> list[Fed]:
        """Create the tasks in the simulator and produce their ids."""
        groups: dict[tuple[str, str], list[Spec]] = {}
        for spec in specs:
            groups.setdefault((spec.model, spec.outcome), []).append(spec)
        fed: list[Fed] = []
        for (model, outcome), group in groups.items():
            created = await self.sim.create(
                model, [g.duration_s for g in group], [g.age_s for g in group], outcome
            )
            now = time.time()
            for (task_id, created_at), g in zip(created, group, strict=True):
                said = created_at if g.message_age_s is None else rfc3339(now - g.message_age_s)
                fed.append(Fed(task_id, model, said))
        futures = []
        for f in fed:
            value: dict[str, Any] = {"id": f.task_id, "model": f.model, "created_at": f.created_at}
            if timeout_s is not None:
                value["timeout_s"] = timeout_s
            futures.append(
                await self.producer.send(topic, json.dumps(value).encode(), key=f.task_id.encode())
            )
            self.fed[f.task_id] = f
        await asyncio.gather(*futures)
        return fed


@dataclass(slots=True)
class Topics:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def input(self) -> str:
        return f"bench-in-{self.tag}"

    @property
    def completed(self) -> str:
        return f"bench-done-{self.tag}"

    @property
    def failed(self) -> str:
        return f"bench-failed-{self.tag}"

    @property
    def dead_letter(self) -> str:
        return f"bench-dlq-{self.tag}"

    @property
    def group(self) -> str:
        return f"bench-group-{self.tag}"

    @property
    def outputs(self) -> list[str]:
        return [self.completed, self.failed]


async def end_offsets(bootstrap: str, topics: list[str]) -> int:
    # Tansu answers with the last batch's base offset + 1: short by under one batch at each
    # end of a measuring window, which is noise against thousands of events.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        offsets = await consumer.end_offsets([TopicPartition(t, 0) for t in topics])
        return int(sum(offsets.values()))
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def event_stream(bootstrap: str, topics: list[str]) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        parts = [TopicPartition(t, 0) for t in topics]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        yield consumer
    finally:
        await consumer.stop()


# --- pollers on core 0: the bridge and the naive implementation ---------------------------------


class BridgeProc:
    """``taskset -c 0 python -m bridge run --config X.yaml``."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.port = int(config["server"]["port"])
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                "taskset",
                "-c",
                str(BRIDGE_CORE),
                sys.executable,
                "-m",
                "bridge",
                "run",
                "--config",
                str(self.config_path),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, "WAVESPEED_API_KEY": API_KEY},
            start_new_session=True,
        )
        log.close()
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=30.0)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bridge exited; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"bridge not ready; see {self.log_path}")

    async def scrape(self) -> Scrape:
        r = await self.http.get("/metrics")
        r.raise_for_status()
        return Scrape(r.text)

    async def stop(self) -> None:
        await self.http.aclose()
        await asyncio.to_thread(_terminate, self.process, 30.0)


def bridge_config(
    s: Settings,
    bootstrap: str,
    base_url: str,
    topics: Topics,
    *,
    interval_s: float,
    max_in_flight: int,
    transport: str | None = None,
    policy: str | None = None,
) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": topics.group,
            "input_topic": topics.input,
            "completed_topic": topics.completed,
            "failed_topic": topics.failed,
            "dead_letter_topic": topics.dead_letter,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        "api": {
            "base_url": base_url,
            "transport": transport or s.transport,
            "max_concurrent_requests": s.concurrency,
        },
        "polling": {
            "policy": policy or s.policy,
            "interval_s": interval_s,
            "jitter": 0.0,  # so the schedule can be reconstructed from the poll times
            "max_in_flight": max_in_flight,
            "default_timeout_s": 7200,
        },
        "server": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"format": "json", "level": "INFO"},
        "shutdown_grace_s": 5,
    }


def start_naive(
    workdir: Path,
    name: str,
    bootstrap: str,
    base_url: str,
    topics: Topics,
    interval_s: float,
    seconds: float,
) -> subprocess.Popen[bytes]:
    out = (workdir / f"{name}.out").open("ab")
    process = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(BRIDGE_CORE),
            sys.executable,
            "-m",
            "bench.naive",
            "naive",
            "--bootstrap",
            bootstrap,
            "--input-topic",
            topics.input,
            "--output-topic",
            topics.completed,
            "--group",
            topics.group,
            "--interval",
            str(interval_s),
            "--base-url",
            base_url,
            "--seconds",
            str(seconds),
        ],
        cwd=ROOT,
        stdout=out,
        stderr=out,
        env={**os.environ, "WAVESPEED_API_KEY": API_KEY},
        start_new_session=True,
    )
    out.close()
    return process


# --- measurement helpers ------------------------------------------------------------------


class Bench:
    def __init__(self, s: Settings, workdir: Path) -> None:
        self.s = s
        self.workdir = workdir
        self.rng = random.Random(s.seed)
        self.broker = TansuBroker(log_path=workdir / "broker.log")
        self.sim: Sim | None = None
        self.feeder: Feeder | None = None
        self.results: dict[str, Any] = {"settings": _settings_dict(s)}
        self.bg: list[asyncio.Task[Any]] = []

    # --- lifecycle

    async def start(self) -> None:
        self.broker.start()
        await self.broker.wait_ready()
        self.sim = Sim(self.workdir)
        await self.sim.wait_ready()
        self.feeder = Feeder(self.sim, self.broker.bootstrap, self.rng)
        await self.feeder.start()

    async def stop(self) -> None:
        for t in self.bg:
            t.cancel()
        await asyncio.gather(*self.bg, return_exceptions=True)
        if self.feeder is not None:
            with contextlib.suppress(Exception):
                await self.feeder.stop()
        if self.sim is not None:
            await self.sim.stop()
        self.broker.stop()

    def core1_pids(self) -> dict[str, int]:
        assert self.sim is not None and self.broker.process is not None
        return {
            "simulator": self.sim.pid,
            "broker": self.broker.process.pid,
            "bench": os.getpid(),
        }

    async def topics(self) -> Topics:
        t = Topics()
        await self.broker.create_topics([t.input, t.completed, t.failed, t.dead_letter])
        return t

    # --- 1. ceilings

    async def ceilings(self) -> None:
        assert self.sim is not None
        s = self.s
        created = await self.sim.create(MIX[0].model, [1e6] * 2000, [0.0] * 2000, "completed")
        ids = json.dumps([t for t, _ in created]).encode()
        out: dict[str, Any] = {}
        for client in s.bare_clients:
            proc = await asyncio.create_subprocess_exec(
                "taskset",
                "-c",
                str(BRIDGE_CORE),
                sys.executable,
                "-m",
                "bench.naive",
                "bare",
                "--client",
                client,
                "--concurrency",
                str(s.concurrency),
                "--base-url",
                self.sim.base_url,
                "--seconds",
                str(s.bare_seconds),
                "--warmup",
                "3.0",  # httpcore's pool takes seconds to reach its pace
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "WAVESPEED_API_KEY": API_KEY},
            )
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(ids)
            proc.stdin.close()
            await asyncio.wait_for(proc.stdout.readline(), 60)  # "measuring"
            a = sample_cpu(self.core1_pids())
            line = await asyncio.wait_for(proc.stdout.readline(), s.bare_seconds + 60)
            b = sample_cpu(self.core1_pids())
            await proc.wait()
            result: dict[str, Any] = json.loads(line)
            result["core1"] = cpu_shares(a, b)
            out[client] = result
            _say(
                f"  bare {client:<16} {result['rps']:8,.0f} req/s  "
                f"client CPU {result['cpu_share']:.0%}  "
                f"simulator CPU {result['core1'].get('simulator', 0):.0%}"
            )
        self.results["ceilings"] = out

    # --- 2. sustained end to end

    async def _top_up(
        self, topic: str, polled: Callable[[], Awaitable[int]], backlog: int, chunk: int = 5000
    ) -> None:
        """Keep ``backlog`` tasks fed and not yet polled: done on the first poll, due now."""
        assert self.feeder is not None
        model = MIX[0].model
        while True:
            fed = len(self.feeder.fed)
            if fed - await polled() < backlog:
                await self.feeder.feed(topic, [Spec(model, 0.0, 600.0)] * chunk)
            else:
                await asyncio.sleep(0.25)

    async def sustained(self, transport: str, *, seconds: float, profile: bool) -> dict[str, Any]:
        assert self.sim is not None and self.feeder is not None
        s, sim = self.s, self.sim
        topics = await self.topics()
        base = await sim.requests()

        async def polled() -> int:
            return await sim.requests() - base

        self.feeder.fed.clear()
        await self.feeder.feed(topics.input, [Spec(MIX[0].model, 0.0, 600.0)] * 20_000)
        config = bridge_config(
            s,
            self.broker.bootstrap,
            sim.base_url,
            topics,
            interval_s=2.0,
            max_in_flight=10_000,
            transport=transport,
        )
        bridge = BridgeProc(self.workdir, f"bridge-sustained-{transport}", config)
        top_up = asyncio.create_task(self._top_up(topics.input, polled, 20_000))
        self.bg.append(top_up)
        try:
            await bridge.wait_ready()
            await wait_until(
                lambda: _metric_above(bridge, f"{P}_tasks_finished_total", 0), timeout=60
            )
            await asyncio.sleep(s.sustained_warmup_s)
            pids = {"bridge": bridge.pid, **self.core1_pids()}
            m0, r0, c0 = await bridge.scrape(), await sim.requests(), sample_cpu(pids)
            gauges = await _watch_gauges(bridge, seconds)
            m1, r1, c1 = await bridge.scrape(), await sim.requests(), sample_cpu(pids)
            result = _rates(m0, m1, r0, r1, c0, c1)
            result["gauges"] = gauges
            result["transport"] = transport
            result["rss_mb"] = rss_bytes(bridge.pid) / 2**20
            if profile:
                result["profile"] = await self._profile(bridge, f"sustained-{transport}")
        finally:
            top_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await top_up
            self.bg.remove(top_up)
            await bridge.stop()
        result["log_publish_retries"] = count_log_events(
            bridge.log_path, "publish failed, retrying"
        )
        _say(
            f"  bridge ({transport:<7}) {result['polls_per_s']:8,.0f} polls/s "
            f"{result['tasks_per_s']:8,.0f} tasks/s  bridge CPU {result['cpu']['bridge']:.0%}  "
            f"simulator CPU {result['cpu'].get('simulator', 0):.0%}"
        )
        return result

    async def _profile(self, bridge: BridgeProc, name: str) -> dict[str, Any]:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            return {"error": "py-spy not installed (pip install py-spy)"}
        raw = self.workdir / f"profile-{name}.txt"
        proc = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(bridge.pid),
            "--duration",
            str(int(self.s.profile_seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(raw),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.wait_for(proc.wait(), self.s.profile_seconds + 60)
        if not raw.exists():
            return {"error": f"py-spy failed (exit {proc.returncode})"}
        return summarize_profile(raw.read_text())

    async def naive_sustained(self) -> None:
        assert self.sim is not None and self.feeder is not None
        s, sim = self.s, self.sim
        topics = await self.topics()
        base = await sim.requests()

        async def polled() -> int:
            return await sim.requests() - base

        self.feeder.fed.clear()
        backlog = 300  # about what its pool serves per second: busy, not buried
        await self.feeder.feed(topics.input, [Spec(MIX[0].model, 0.0, 600.0)] * backlog)
        seconds = s.compare_seconds + 30
        proc = start_naive(
            self.workdir,
            "naive-sustained",
            self.broker.bootstrap,
            sim.base_url,
            topics,
            1.0,
            seconds,
        )
        top_up = asyncio.create_task(self._top_up(topics.input, polled, backlog, chunk=250))
        self.bg.append(top_up)
        try:

            async def produced() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError("naive poller exited early")
                return await end_offsets(self.broker.bootstrap, topics.outputs) > 0

            with contextlib.suppress(TimeoutError):  # measure it anyway: it may be stuck
                await wait_until(produced, timeout=45)
            await asyncio.sleep(s.sustained_warmup_s)
            pids = {"naive": proc.pid, **self.core1_pids()}
            e0, r0, c0 = (
                await end_offsets(self.broker.bootstrap, topics.outputs),
                await sim.requests(),
                sample_cpu(pids),
            )
            await asyncio.sleep(s.compare_seconds)
            e1, r1, c1 = (
                await end_offsets(self.broker.bootstrap, topics.outputs),
                await sim.requests(),
                sample_cpu(pids),
            )
        finally:
            top_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await top_up
            self.bg.remove(top_up)
            await asyncio.to_thread(_terminate, proc)
        dt = c1.wall - c0.wall
        result: dict[str, Any] = {
            "polls_per_s": (r1 - r0) / dt,
            "tasks_per_s": (e1 - e0) / dt,
            "cpu": cpu_shares(c0, c1),
        }
        self.results["naive_sustained"] = result
        _say(
            f"  naive            {result['polls_per_s']:8,.0f} polls/s "
            f"{result['tasks_per_s']:8,.0f} tasks/s  naive CPU {result['cpu']['naive']:.0%}"
        )

    # --- 3. 10,000 concurrent

    async def _keep_in_flight(
        self, topics: Topics, interval_s: float, finished: Counter[str]
    ) -> None:
        """Closed loop: every event read from the output topics starts a new task."""
        assert self.feeder is not None
        async with event_stream(self.broker.bootstrap, topics.outputs) as consumer:
            while True:
                batch = await consumer.getmany(timeout_ms=100)
                n = sum(len(msgs) for msgs in batch.values())
                if n:
                    finished["events"] += n
                    specs = [Spec(m.model, d, 0.0, o) for m, d, o in self.feeder.draw(n)]
                    await self.feeder.feed(topics.input, specs)

    def _prefill_specs(self, n: int, interval_s: float) -> list[Spec]:
        """``n`` tasks as found in flight at a random moment of the steady state.

        A task is in flight in proportion to its duration, so models are weighted by share
        x mean duration, durations are length-biased (lognormal(mu + sigma^2, sigma)) and
        each task has run a uniform fraction of its duration (so completions start at the
        steady rate). In steady state poll phases are uniform; so that the bridge does not
        start with all 10,000 due at once, each message's ``created_at`` is up to one
        interval ago, which spreads first polls over the first interval.
        """
        weights = [m.share * m.median_s * math.exp(m.sigma**2 / 2) for m in MIX]
        out = []
        for m in self.rng.choices(MIX, weights=weights, k=n):
            d = m.median_s * math.exp(m.sigma**2 + m.sigma * self.rng.gauss(0.0, 1.0))
            o = "failed" if self.rng.random() < m.failure_rate else "completed"
            age = self.rng.uniform(0.0, d)
            out.append(Spec(m.model, d, age, o, self.rng.uniform(0.0, min(age, interval_s))))
        return out

    async def concurrent(self, interval: float, *, profile: bool) -> dict[str, Any]:
        assert self.sim is not None and self.feeder is not None
        s, sim = self.s, self.sim
        n = s.concurrent
        topics = await self.topics()
        config = bridge_config(
            s,
            self.broker.bootstrap,
            sim.base_url,
            topics,
            interval_s=interval,
            max_in_flight=2 * n,
        )
        tag = f"{interval:g}s" if s.policy == "fixed" else "adaptive"
        bridge = BridgeProc(self.workdir, f"bridge-concurrent-{tag}", config)
        finished: Counter[str] = Counter()
        loop: asyncio.Task[None] | None = None
        try:
            await bridge.wait_ready()
            self.feeder.fed.clear()
            await sim.record(True)
            await self.feeder.feed(topics.input, self._prefill_specs(n, interval))
            loop = asyncio.create_task(self._keep_in_flight(topics, interval, finished))
            self.bg.append(loop)
            deadline = time.monotonic() + 60
            while (await bridge.scrape()).sum(f"{P}_tasks_in_flight") < 0.95 * n:
                if time.monotonic() > deadline:
                    raise TimeoutError("in-flight never reached the target")
                await asyncio.sleep(0.5)
            await asyncio.sleep(s.concurrent_warmup_s)
            pids = {"bridge": bridge.pid, **self.core1_pids()}
            m0, r0, c0 = await bridge.scrape(), await sim.requests(), sample_cpu(pids)
            gauges = await _watch_gauges(bridge, s.concurrent_seconds)
            m1, r1, c1 = await bridge.scrape(), await sim.requests(), sample_cpu(pids)
            rss = rss_bytes(bridge.pid)
            await sim.record(False)
            stopped = time.monotonic()
            polls = await sim.polls()
            name = f"concurrent-{interval:g}s" if s.policy == "fixed" else "concurrent-adaptive"
            prof = await self._profile(bridge, name) if profile else None
        finally:
            if loop is not None:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
                self.bg.remove(loop)
            await bridge.stop()
        result = _rates(m0, m1, r0, r1, c0, c1)
        result["interval_s"] = interval if s.policy == "fixed" else None
        if prof is not None:
            result["profile"] = prof
        if s.policy == "fixed":  # the schedule is known from the poll times alone
            result["lateness"] = lateness(
                polls, self.feeder.fed, interval, c0.wall, c1.wall, stopped
            )
        result["lateness_metric"] = _metric_lateness(m0, m1)
        result["gauges"] = gauges
        result["in_flight_min"] = gauges["tasks_in_flight"]["min"]
        result["in_flight_mean"] = gauges["tasks_in_flight"]["mean"]
        result["offered_polls_per_s"] = n / interval if s.policy == "fixed" else None
        result["rss_mb"] = rss / 2**20
        late = result.get("lateness") or {}
        _say(
            f"  bridge, {_schedule(result)}: {result['polls_per_s']:,.0f} polls/s, "
            "lateness p50/p99 "
            f"{_ms(late.get('p50'))}/{_ms(late.get('p99'))}, publish p99 "
            f"{_ms(result['publish_latency']['p99'])}, bridge CPU {result['cpu']['bridge']:.0%}"
        )
        return result

    async def naive_concurrent(self, interval: float) -> None:
        assert self.sim is not None and self.feeder is not None
        s, sim = self.s, self.sim
        n = s.concurrent
        topics = await self.topics()
        warmup = max(s.concurrent_warmup_s, 10.0)
        self.feeder.fed.clear()
        await sim.record(True)
        await self.feeder.feed(topics.input, self._prefill_specs(n, interval))
        proc = start_naive(
            self.workdir,
            "naive-concurrent",
            self.broker.bootstrap,
            sim.base_url,
            topics,
            interval,
            warmup + s.naive_concurrent_seconds + 30,
        )
        finished: Counter[str] = Counter()
        loop = asyncio.create_task(self._keep_in_flight(topics, interval, finished))
        self.bg.append(loop)
        try:
            await asyncio.sleep(warmup)
            pids = {"naive": proc.pid, **self.core1_pids()}
            r0, c0 = await sim.requests(), sample_cpu(pids)
            await asyncio.sleep(s.naive_concurrent_seconds)
            r1, c1 = await sim.requests(), sample_cpu(pids)
            await sim.record(False)
            stopped = time.monotonic()
            polls = await sim.polls()
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            self.bg.remove(loop)
            await asyncio.to_thread(_terminate, proc)
        result: dict[str, Any] = {
            "polls_per_s": (r1 - r0) / (c1.wall - c0.wall),
            "cpu": cpu_shares(c0, c1),
            # Its first poll is due an interval after it consumed the id, which the bench
            # does not see: created_at is used, early by the feed's few milliseconds.
            "lateness": lateness(polls, self.feeder.fed, interval, c0.wall, c1.wall, stopped),
            "interval_s": interval,
        }
        self.results["naive_concurrent"] = result
        late = result["lateness"]
        _say(
            f"  naive every {interval:g} s: {result['polls_per_s']:,.0f} polls/s, lateness p50/p99 "
            f"{_ms(late.get('p50'))}/{_ms(late.get('p99'))}, CPU {result['cpu']['naive']:.0%}"
        )

    # --- 4. memory

    async def memory(self) -> None:
        assert self.sim is not None and self.feeder is not None
        s, sim = self.s, self.sim
        sizes = sorted(s.memory_sizes)
        topics = await self.topics()
        hour = 3600.0
        # Fixed policy with an hour's interval: every task is polled once (so it holds the
        # API's answer, as a task in flight does), then waits.
        config = bridge_config(
            s,
            self.broker.bootstrap,
            sim.base_url,
            topics,
            interval_s=hour,
            max_in_flight=max(sizes) + 1000,
            policy="fixed",
        )
        bridge = BridgeProc(self.workdir, "bridge-memory", config)
        points: list[dict[str, float]] = []
        try:
            await bridge.wait_ready()
            await asyncio.sleep(2.0)
            base_requests = await sim.requests()
            points.append({"in_flight": 0, "rss": rss_bytes(bridge.pid)})
            self.feeder.fed.clear()
            fed = 0
            for size in sizes:
                t0 = time.monotonic()
                specs = [Spec(m.model, 2 * hour, hour) for m, _, _ in self.feeder.draw(size - fed)]
                await self.feeder.feed(topics.input, specs)
                fed = size
                deadline = time.monotonic() + 240
                while True:
                    polled = await sim.requests() - base_requests
                    held = (await bridge.scrape()).sum(f"{P}_tasks_in_flight")
                    if polled >= size and held >= size:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"memory: {polled} polled, {held} held of {size}")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2.0)
                rss = rss_bytes(bridge.pid)
                points.append({"in_flight": size, "rss": rss, "fill_s": time.monotonic() - t0})
                _say(f"  memory: {size:>7,} in flight, RSS {rss / 2**20:7.1f} MiB")
        finally:
            await bridge.stop()
        rss0 = points[0]["rss"]
        for p in points[1:]:
            p["per_task"] = (p["rss"] - rss0) / p["in_flight"]
        self.results["memory"] = points


_GAUGES = (
    "tasks_in_flight",
    "polls_due",
    "api_requests_in_flight",
    "events_pending",
    "consumer_paused",
)


async def _watch_gauges(bridge: BridgeProc, seconds: float) -> dict[str, dict[str, float]]:
    """Min, mean and max of the bridge's gauges, scraped every 2 s for ``seconds``.

    Not faster: rendering ``/metrics`` costs the bridge CPU (Prometheus scrapes every 15 s
    or more).
    """
    seen: dict[str, list[float]] = {g: [] for g in _GAUGES}
    end = time.monotonic() + seconds
    while True:
        m = await bridge.scrape()
        for g in _GAUGES:
            seen[g].append(m.sum(f"{P}_{g}"))
        left = end - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(2.0, left))
    return {
        g: {"min": min(v), "mean": sum(v) / len(v), "max": max(v)} for g, v in seen.items() if v
    }


def count_log_events(path: Path, event: str) -> int:
    """Lines of the bridge's JSON log with this ``event``, over the whole run."""
    needle = json.dumps(event)
    with path.open(encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if f'"event": {needle}' in line)


async def wait_until(check: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.2)


async def _metric_above(bridge: BridgeProc, name: str, value: float) -> bool:
    return (await bridge.scrape()).sum(name) > value


def _ms(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "> 10 s"
    return f"{v * 1000:,.1f} ms"


def _settings_dict(s: Settings) -> dict[str, Any]:
    return {k: getattr(s, k) for k in s.__slots__}


def _rates(
    m0: Scrape, m1: Scrape, r0: int, r1: int, c0: CpuSample, c1: CpuSample
) -> dict[str, Any]:
    dt = c1.wall - c0.wall
    pub0 = m0.buckets(f"{P}_publish_latency_seconds")
    pub1 = m1.buckets(f"{P}_publish_latency_seconds")
    api0 = m0.buckets(f"{P}_api_request_duration_seconds")
    api1 = m1.buckets(f"{P}_api_request_duration_seconds")
    finished = m1.sum(f"{P}_tasks_finished_total") - m0.sum(f"{P}_tasks_finished_total")
    failures = m1.sum(f"{P}_publish_failures_total") - m0.sum(f"{P}_publish_failures_total")
    return {
        "seconds": dt,
        "publish_failures_per_s": failures / dt,
        "polls_per_s": (r1 - r0) / dt,
        "bridge_requests_per_s": histogram_count(api0, api1) / dt,
        "tasks_per_s": finished / dt,
        "cpu": cpu_shares(c0, c1),
        "publish_latency": {
            "p50": histogram_quantile(0.5, pub0, pub1),
            "p99": histogram_quantile(0.99, pub0, pub1),
            "p99_bucket": histogram_bucket(0.99, pub0, pub1),
            "within_50ms": histogram_share_within(0.05, pub0, pub1),
            "count": histogram_count(pub0, pub1),
        },
        "api_request_duration": {
            "p50": histogram_quantile(0.5, api0, api1),
            "p99": histogram_quantile(0.99, api0, api1),
        },
    }


def _metric_lateness(m0: Scrape, m1: Scrape) -> dict[str, Any] | None:
    """The bridge's own poll-lateness histogram, once it exports one."""
    name = f"{P}_poll_lateness_seconds"
    b0, b1 = m0.buckets(name), m1.buckets(name)
    if not b1:
        return None
    return {
        "p50": histogram_quantile(0.5, b0, b1),
        "p99": histogram_quantile(0.99, b0, b1),
        "count": histogram_count(b0, b1),
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def lateness(
    polls: dict[str, tuple[float, list[float], bool]],
    fed: dict[str, Fed],
    interval: float,
    t0: float,
    t1: float,
    stopped: float,
) -> dict[str, Any]:
    """Actual poll time minus scheduled time, for the polls of the window ``[t0, t1]``.

    Fixed policy without jitter: the first poll is due one interval after the task's
    ``created_at``, every later one an interval after the previous poll. Poll times are the
    simulator's, so they include the request's trip (sub-millisecond on loopback). The
    window's polls: those scheduled up to ``t1`` and made from ``t0`` on, and those
    scheduled up to ``t1`` and still not made when recording ``stopped``, which count with
    the lateness they had by then (a lower bound): a poller that falls behind cannot hide.
    Seconds in ``series`` are by scheduled time, clamped to the window.
    """
    made: list[float] = []
    firsts: list[float] = []
    overdue: list[float] = []
    by_second: dict[int, list[float]] = {}
    for task_id, f in fed.items():
        _, times, finished = polls.get(task_id, (0.0, [], False))
        due = f.created_monotonic + interval  # what the bridge schedules from
        for i, t in enumerate(times):
            if due <= t1 and t >= t0:
                (firsts if i == 0 else made).append(t - due)
                by_second.setdefault(max(0, int(due - t0)), []).append(t - due)
            due = t + interval
        if not finished and due <= t1:
            overdue.append(stopped - due)
            by_second.setdefault(max(0, int(due - t0)), []).append(stopped - due)
    every = made + firsts + overdue
    series = [
        (sec, len(v), _percentile(v, 0.5), _percentile(v, 0.99), max(v))
        for sec, v in sorted(by_second.items())
    ]
    return {
        "count": len(every),
        "overdue": len(overdue),
        "p50": _percentile(every, 0.5),
        "p99": _percentile(every, 0.99),
        "max": max(every) if every else math.nan,
        "later_p99": _percentile(made, 0.99),
        "first_p99": _percentile(firsts, 0.99),
        "series": series,  # per second of due time: count, p50, p99, max
        "sample": random.Random(0).sample(every, min(len(every), 20_000)),
    }


# --- profile summary ----------------------------------------------------------------------

_GROUPS = (
    ("httpx_aiohttp/", "httpx-aiohttp"),
    ("httpx/", "httpx"),
    ("httpcore/", "httpcore"),
    ("aiohttp/", "aiohttp"),
    ("yarl/", "aiohttp"),
    ("multidict/", "aiohttp"),
    ("aiokafka/", "aiokafka"),
    ("kafka/", "aiokafka"),
    ("structlog/", "structlog + logging"),
    ("logging/", "structlog + logging"),
    ("prometheus_client/", "prometheus_client"),
    ("json/", "json"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("bridge/", "bridge"),
)


_TRANSPARENT = ("contextlib.py", "functools.py", "abc.py", "<frozen abc>")


def _frame_file(frame: str) -> str:
    head, _, rest = frame.rpartition(" (")
    return rest.rsplit(":", 1)[0] if head else frame


def _frame_func(frame: str) -> str:
    head, _, rest = frame.rpartition(" (")
    if not head:
        return frame
    return f"{head} ({rest.rsplit(':', 1)[0]})"


def _group(frame: str) -> str:
    path = _frame_file(frame)
    for needle, name in _GROUPS:
        if needle in path:
            return name
    return "other: " + path.rsplit("/", 1)[-1]


def summarize_profile(raw: str, top: int = 20) -> dict[str, Any]:
    """Own and total time per function, and own time per library, from py-spy's raw output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    called: Counter[str] = Counter()  # where the bridge's own calls go, inclusive
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        leaf = frames[-1]
        own[_frame_func(leaf)] += count
        groups[_group(leaf)] += count
        for func in {_frame_func(f) for f in frames}:
            total[func] += count
        # Inclusive cost of what bridge code calls: the first frame below the deepest
        # bridge frame (looking through wrappers like contextlib) names the library doing
        # the work on the bridge's behalf.
        deepest = max(
            (i for i, f in enumerate(frames) if "bridge/" in _frame_file(f)), default=None
        )
        if deepest is None:
            called["(outside bridge code) " + _group(frames[min(len(frames) - 1, 5)])] += count
        elif deepest == len(frames) - 1:
            called["bridge code itself"] += count
        else:
            callee = deepest + 1
            while callee < len(frames) - 1 and _frame_file(frames[callee]).endswith(_TRANSPARENT):
                callee += 1
            owner = _frame_func(frames[deepest]).split(" (")[0]
            called[f"{owner} -> {_group(frames[callee])}"] += count

    def pct(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, v / samples) for k, v in c.most_common(n)]

    skip = (
        "run_forever",
        "run_until_complete",
        "_run_once",
        "<module>",
        "_run_code",
        "_run_module_as_main",
        "main (",
        "run (",
        "Runner.run",
        "_run (",
    )
    totals = [(k, v) for k, v in pct(total, 200) if not k.startswith(skip) and v < 0.97]
    return {
        "samples": samples,
        "own": pct(own, top),
        "total": totals[:top],
        "groups": pct(groups, 15),
        "called": pct(called, top),
    }


# --- report -------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _cpu(result: dict[str, Any], key: str) -> str:
    return _pct(result.get("cpu", {}).get(key))


def report(results: dict[str, Any], workdir: Path, elapsed: float, command: str) -> str:
    s = results["settings"]
    lines: list[str] = []
    add = lines.append
    add("# Throughput: one core, 10,000 concurrent tasks (issue 6)")
    add("")
    add(
        f"Produced by `{command}` in {elapsed / 60:.1f} min on {os.cpu_count()} cores "
        f"({platform.machine()}), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Pollers under test run pinned to core "
        f"{BRIDGE_CORE} (`taskset`); the simulator, the Tansu broker and the bench's feeder "
        f"share core {SIM_CORE}. Policy `{s['policy']}` (jitter 0), `api.transport: "
        f"{s['transport']}`, `api.max_concurrent_requests: {s['concurrency']}`, production "
        "logging (JSON, INFO). Working files: see Method."
    )
    add("")
    ceil = results.get("ceilings", {})
    sus = results.get("sustained", {})
    main = sus.get(s["transport"], {})
    nv = results.get("naive_sustained")
    cons: list[dict[str, Any]] = results.get("concurrent", [])
    ncon = results.get("naive_concurrent")
    mem = results.get("memory", [])
    bare = ceil.get("aiohttp", {}).get("rps")

    add("## Targets")
    add("")
    add("| target | measured | met |")
    add("|---|---|---|")
    if main:
        e2e = _e2e(main)
        ratio = f" = {e2e / bare:.1%} of the bare aiohttp loop" if bare else ""
        add(
            "| ≥ 1,000 polls/s sustained end to end, one core (every poll completes its task: "
            f"the rate is tasks acknowledged per second) | {e2e:,.0f}/s{ratio} "
            f"({main['polls_per_s']:,.0f} polls/s, {main['tasks_per_s']:,.0f} tasks/s) | "
            f"{_met(1000, e2e)} |"
        )
    if cons:
        c = cons[0]
        late = c.get("lateness") or c.get("lateness_metric") or {}
        add(
            f"| {s['concurrent']:,} concurrent, p99 poll lateness < 250 ms "
            f"({_schedule(c)}) | {_ms(late.get('p99'))} | {_met(late.get('p99'), 0.25)} |"
        )
        pub = c["publish_latency"]
        add(
            f"| publish latency p99 < 50 ms at that load | {_ms(pub['p99'])}"
            f"{_bucket_note(pub)} | {_met_publish(pub)} |"
        )
    big = [p for p in mem if p["in_flight"] >= 100_000]
    if big:
        add(
            f"| < 2 KB RSS per in-flight task at {big[-1]['in_flight']:,} | "
            f"{big[-1]['per_task']:,.0f} B | {_met(big[-1]['per_task'], 2048)} |"
        )
    add("")

    add("## Throughput and CPU")
    add("")
    add(
        "| measurement | poller (core 0) | rate | poller CPU | simulator CPU | broker CPU "
        "| bench CPU | core 0 / core 1 busy |"
    )
    add("|---|---|---|---|---|---|---|---|")
    names = {
        "aiohttp": "aiohttp `ClientSession`",
        "httpx-aiohttp": "httpx over httpx-aiohttp",
        "bridge-api": "the bridge's `ApiClient` (aiohttp session, size cap, `interpret`)",
        "httpx": "httpx, default transport (httpcore)",
        "bridge-api-httpx": "the bridge's `ApiClient`, httpx default transport",
    }
    for client, r in ceil.items():
        c1 = r["core1"]
        add(
            f"| bare polling loop, {s['concurrency']} connections | {names.get(client, client)} "
            f"| {r['rps']:,.0f} req/s, {_us(r['cpu_share'], r['rps'])} | "
            f"{_pct(r['cpu_share'])} | {_pct(c1.get('simulator'))} "
            f"| {_pct(c1.get('broker'))} | {_pct(c1.get('bench'))} | "
            f"{_pct(c1.get('cpu0'))} / {_pct(c1.get('cpu1'))} |"
        )
    for transport, r in sus.items():
        ratio = f" ({_e2e(r) / bare:.1%} of bare aiohttp)" if bare else ""
        retries = r.get("publish_failures_per_s")
        note = f"; {retries:,.0f} publish retries/s" if retries else ""
        add(
            f"| sustained end to end, done on 1st poll | bridge, `transport: {transport}` | "
            f"{r['polls_per_s']:,.0f} polls/s, {r['tasks_per_s']:,.0f} tasks/s{ratio}, "
            f"{_us(r['cpu'].get('bridge', 0.0), _e2e(r))}{note} | " + _cpu_cells(r, "bridge")
        )
    if nv:
        ratio = f" ({_e2e(nv) / bare:.1%} of bare aiohttp)" if bare else ""
        add(
            f"| sustained end to end, done on 1st poll | naive: coroutine per task, sleep(1), "
            f"default httpx | {nv['polls_per_s']:,.0f} polls/s, {nv['tasks_per_s']:,.0f} "
            f"tasks/s{ratio} | " + _cpu_cells(nv, "naive")
        )
    for c in cons:
        offered = c.get("offered_polls_per_s")
        add(
            f"| {s['concurrent']:,} concurrent, {_schedule(c)} | bridge | "
            f"{c['polls_per_s']:,.0f} polls/s (offered "
            f"{'n/a' if offered is None else f'{offered:,.0f}'}), {c['tasks_per_s']:,.0f} "
            "tasks/s | " + _cpu_cells(c, "bridge")
        )
    if ncon:
        add(
            f"| {s['concurrent']:,} concurrent, every {ncon['interval_s']:g} s | naive (sleeps "
            f"{ncon['interval_s']:g} s) | {ncon['polls_per_s']:,.0f} polls/s | "
            + _cpu_cells(ncon, "naive")
        )
    add("")

    if cons or ncon:
        add(f"## {s['concurrent']:,} tasks in flight: lateness and publish latency")
        add("")
        add(
            "| poller, schedule | tasks in flight (mean) | poll lateness p50 / p99 | "
            "p99 first polls / later polls | polls due in window / not made by its end | "
            "publish latency p50 / p99 | poller CPU | RSS |"
        )
        add("|---|---|---|---|---|---|---|---|")
        rows = [("bridge", c) for c in cons] + ([("naive", ncon)] if ncon else [])
        for who, c in rows:
            late = c.get("lateness") or c.get("lateness_metric") or {}
            pub = c.get("publish_latency")
            pub_text = f"{_ms(pub['p50'])} / {_ms(pub['p99'])}" if pub else "n/a"
            flight = (
                f"{c['in_flight_mean']:,.0f}"
                if "in_flight_mean" in c
                else "~" + str(s["concurrent"])
            )
            rss = f"{c['rss_mb']:,.0f} MiB" if "rss_mb" in c else "n/a"
            add(
                f"| {who}, {_schedule(c)} | {flight} | {_ms(late.get('p50'))} / "
                f"{_ms(late.get('p99'))} | {_ms(late.get('first_p99'))} / "
                f"{_ms(late.get('later_p99'))} | {late.get('count', 0):,} / "
                f"{late.get('overdue', 0):,} | {pub_text} | "
                f"{_pct(c['cpu'].get(who))} | {rss} |"
            )
        add("")
    if main:
        pub = main["publish_latency"]
        g = main.get("gauges", {})
        retries = main.get("log_publish_retries")
        add(
            f"Sustained load (`transport: {s['transport']}`), for reference: publish latency "
            f"p50 / p99 {_ms(pub['p50'])} / {_ms(pub['p99'])}; events produced and not yet "
            f"acknowledged (mean) {g.get('events_pending', {}).get('mean', math.nan):,.0f}; "
            f"requests in flight (mean) "
            f"{g.get('api_requests_in_flight', {}).get('mean', math.nan):.0f} of "
            f"{s['concurrency']}; polls due (mean) "
            f"{g.get('polls_due', {}).get('mean', math.nan):,.0f}"
            + (
                f'; "publish failed, retrying" (KafkaTimeoutError) logged {retries:,} times '
                "over the phase (window and profile)."
                if retries is not None
                else "."
            )
        )
        add("")
    if mem:
        add("## Memory")
        add("")
        add("| tasks in flight | bridge RSS | RSS per task over the idle bridge | target |")
        add("|---|---|---|---|")
        for p in mem:
            per = f"{p['per_task']:,.0f} B" if "per_task" in p else "-"
            target = "< 2,048 B" if p["in_flight"] >= 100_000 else ""
            add(f"| {p['in_flight']:,} | {p['rss'] / 2**20:,.1f} MiB | {per} | {target} |")
        if len(mem) >= 3:
            a, b = mem[-2], mem[-1]
            marginal = (b["rss"] - a["rss"]) / (b["in_flight"] - a["in_flight"])
            add("")
            add(
                f"Marginal cost between {a['in_flight']:,} and {b['in_flight']:,}: "
                f"{marginal:,.0f} B per task."
            )
        add("")
    for label, prof in (
        ("the sustained load", main.get("profile") if main else None),
        (
            f"{s['concurrent']:,} in flight, {_schedule(cons[0])}" if cons else "",
            cons[0].get("profile") if cons else None,
        ),
    ):
        if prof and "error" not in prof:
            add(_profile_md(prof, label))
        elif prof:
            add(f"Profile of {label}: {prof['error']}")
            add("")
    add("## Method")
    add("")
    first = cons[0]["interval_s"] if cons and cons[0].get("interval_s") else 10.0
    add(_METHOD.format(interval=first, n=s["concurrent"], workdir=workdir))
    return "\n".join(lines) + "\n"


def _us(cpu_share: float, rate: float) -> str:
    """CPU time per request (or per acknowledged poll)."""
    return f"{1e6 * cpu_share / rate:,.0f} µs CPU each" if rate > 0 else "n/a"


def _met_publish(pub: dict[str, Any]) -> str:
    """p99 < 50 ms, decided exactly from the 50 ms bucket when there is one."""
    within = pub.get("within_50ms")
    if within is None:
        return _met(pub["p99"], 0.05)
    return "yes" if within >= 0.99 else "**no**"


def _bucket_note(pub: dict[str, Any]) -> str:
    b = pub.get("p99_bucket")
    if not b:
        return ""
    note = f" (interpolated in the histogram's {_ms(b[0])} to {_ms(b[1])} bucket"
    within = pub.get("within_50ms")
    if within is not None:
        note += f"; exactly {within:.2%} of events within 50 ms"
    return note + ")"


def _e2e(r: dict[str, Any]) -> float:
    """End-to-end rate when every poll completes its task: a poll counts once acknowledged."""
    return float(min(r["polls_per_s"], r["tasks_per_s"]))


def _schedule(c: dict[str, Any]) -> str:
    interval = c.get("interval_s")
    return f"fixed every {interval:g} s" if interval else "adaptive"


def _cpu_cells(r: dict[str, Any], poller: str) -> str:
    return (
        f"{_cpu(r, poller)} | {_cpu(r, 'simulator')} | {_cpu(r, 'broker')} | "
        f"{_cpu(r, 'bench')} | {_cpu(r, 'cpu0')} / {_cpu(r, 'cpu1')} |"
    )


def _met(value: float | None, limit: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "yes" if value < limit else "**no**"


def _profile_md(prof: dict[str, Any], label: str) -> str:
    out = [
        f"## Profile: the bridge under {label} (py-spy, {prof['samples']:,} samples of CPU)",
        "",
        "| own time by library (top of stack) | share |",
        "|---|---|",
    ]
    out += [f"| {k} | {v:.1%} |" for k, v in prof["groups"][:12]]
    out += [
        "",
        "| what the bridge's code calls (inclusive: deepest bridge frame → library) | share |",
        "|---|---|",
    ]
    out += [f"| `{k}` | {v:.1%} |" for k, v in prof["called"][:14]]
    out += ["", "| function, inclusive | share |", "|---|---|"]
    out += [f"| `{k}` | {v:.1%} |" for k, v in prof["total"][:16]]
    out += ["", "| function, own time | share |", "|---|---|"]
    out += [f"| `{k}` | {v:.1%} |" for k, v in prof["own"][:12]]
    out.append("")
    return "\n".join(out)


_METHOD = """\
- **Bare loops** (`bench.naive bare`): 100 workers GET the result URL of 2,000 pending
  tasks round-robin and decode the JSON body, nothing else: what each HTTP stack costs
  (after a 3 s warm-up: httpcore's pool takes seconds to reach its pace). The
  `bridge-api` loops are the bridge's own `ApiClient.fetch` (size cap and `interpret`
  included), over each transport, so the price of httpx's client layer shows in one run.
- **Sustained** (`python -m bridge run`): tasks that finish on the first poll (created
  10 min ago, duration 0) are fed ahead of the bridge (a backlog of ~20,000), so it never
  lacks due work and every poll is consume → GET → CloudEvent → produce (acks=all) →
  commit. polls/s is the simulator's request counter, tasks/s the bridge's
  `tasks_finished_total` (acknowledged events), over a window after a warm-up. The py-spy
  profile (200 Hz) is taken right after the window, on the same load.
- **{n:,} concurrent**: a closed loop (every event read from the output topics starts a
  new task) keeps {n:,} tasks in flight: 20% flux-dev (median 8 s), 10% flux-schnell
  (2 s), 70% video (120 s) of starts, lognormal, 2% failures; mean ~100 s, so ~100
  completions/s, the Ultra tier's 5,000 starts per minute. The first {n:,} are drawn as
  found in flight in steady state (length-biased durations, uniform ages) with message
  `created_at`s that spread first polls over one interval. Fixed policy without jitter,
  so every poll's scheduled time is known: the first is due one interval after the
  message's `created_at`, each later one an interval after the previous poll (as seen
  by the simulator). **Lateness** = the simulator's arrival time of a poll minus that, for
  every poll *scheduled* in the window; one still not made when the window's data is
  read counts with the lateness it had then. It includes the request's trip (loopback).
  10 s is the headline: 1,000 polls/s at {n:,} in flight, about what the adaptive
  policy asks for this mix; 5 s (2,000 polls/s) is WaveSpeed's minimum for video.
  **Publish latency** is the bridge's `publish_latency_seconds` histogram (terminal
  poll's response → broker ack), quantiles interpolated within its buckets.
- **Naive** (`bench.naive naive`): a coroutine per task: `asyncio.sleep`, GET with a
  default `httpx.AsyncClient`, `send_and_wait` when terminal; auto-commit. Sustained it
  sleeps 1 s (the SDKs' loop) with a backlog of 300 ids; at {n:,} in flight it sleeps
  the headline interval so both follow the same schedule (its first poll is due an
  interval after it consumed the id, which the bench approximates by `created_at`).
- **Memory**: a fresh bridge (fixed policy, interval 1 h) is fed tasks created an hour
  ago, so each is polled once and then held with the API's answer; RSS
  (`/proc/<pid>/status`) minus the idle bridge's, over the tasks in flight.
- CPU shares from `/proc/<pid>/stat` and `/proc/stat` (core busy time: core 0 busy minus
  the poller's share is interference, e.g. loopback softirqs or other processes).
- Working files (configs, logs, raw py-spy profiles, `results.json`): `{workdir}`.
"""


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
    s = results["settings"]
    cons: list[dict[str, Any]] = results.get("concurrent", [])
    ncon = results.get("naive_concurrent")

    ax = axes[0][0]
    labels: list[str] = []
    rates: list[float] = []
    colors: list[str] = []
    for client, r in results.get("ceilings", {}).items():
        labels.append("bare\n" + client.replace("proto-", "proto\n"))
        rates.append(r["rps"])
        colors.append("#9aa5b1")
    for transport, r in results.get("sustained", {}).items():
        labels.append(f"bridge e2e\n{transport}")
        rates.append(_e2e(r))
        colors.append("#2b6cb0")
    if "naive_sustained" in results:
        labels.append("naive e2e")
        rates.append(_e2e(results["naive_sustained"]))
        colors.append("#c05621")
    ax.bar(labels, rates, color=colors)
    for i, v in enumerate(rates):
        ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(1000, color="red", linestyle="--", linewidth=1, label="target 1,000 polls/s")
    ax.set_ylabel("per second on one core: requests (bare), acknowledged polls (e2e)")
    ax.set_title("Throughput: bare HTTP loops vs end to end")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)

    ax = axes[0][1]
    runs = [(f"bridge, {_schedule(c)}", c) for c in cons]
    if ncon:
        runs.append((f"naive, every {ncon['interval_s']:g} s", ncon))
    for label, c in runs:
        late = c.get("lateness")
        if not late or not late["sample"]:
            continue
        xs = sorted(max(1e-3, v) for v in late["sample"])
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.axvline(0.25, color="red", linestyle="--", linewidth=1, label="p99 target 250 ms")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("poll lateness, s (log; < 1 ms shown at 1 ms)")
    ax.set_ylabel("fraction of polls")
    ax.set_title(f"Poll lateness CDF, {s['concurrent']:,} in flight")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    for label, c in runs:
        late = c.get("lateness")
        if not late or not late["series"]:
            continue
        ax.plot([r[0] for r in late["series"]], [r[3] for r in late["series"]], label=label)
    ax.axhline(0.25, color="red", linestyle="--", linewidth=1, label="250 ms")
    ax.set_yscale("log")
    ax.set_xlabel("second of the measurement window (by scheduled time)")
    ax.set_ylabel("p99 lateness of polls due that second, s")
    ax.set_title("Lateness over time")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    mem = results.get("memory", [])
    if mem:
        xs2 = [p["in_flight"] for p in mem]
        ax.plot(xs2, [p["rss"] / 2**20 for p in mem], marker="o", label="bridge RSS")
        base = mem[0]["rss"] / 2**20
        ax.plot(xs2, [base + 2048 * x / 2**20 for x in xs2], "r--", label="budget: 2 KB/task")
        for p in mem[1:]:
            ax.annotate(
                f"{p['per_task']:,.0f} B/task",
                (p["in_flight"], p["rss"] / 2**20),
                textcoords="offset points",
                xytext=(8, -14),
                fontsize=8,
            )
        ax.set_xlabel("tasks in flight")
        ax.set_ylabel("RSS, MiB")
        ax.set_title("Memory")
        ax.legend(fontsize=8)

    ax = axes[1][1]
    bars: list[tuple[str, dict[str, float]]] = []
    for client, r in results.get("ceilings", {}).items():
        bars.append((client.replace("proto-", "p-"), {"poller": r["cpu_share"], **r["core1"]}))
    for transport, r in results.get("sustained", {}).items():
        bars.append((f"e2e\n{transport}", {"poller": r["cpu"].get("bridge", 0), **r["cpu"]}))
    if "naive_sustained" in results:
        nv = results["naive_sustained"]["cpu"]
        bars.append(("e2e\nnaive", {"poller": nv.get("naive", 0), **nv}))
    for c in cons:
        bars.append((f"10k\n{_schedule(c)[6:]}", {"poller": c["cpu"].get("bridge", 0), **c["cpu"]}))
    if ncon:
        bars.append(("10k\nnaive", {"poller": ncon["cpu"].get("naive", 0), **ncon["cpu"]}))
    procs = ("poller", "simulator", "broker", "bench")
    width = 0.2
    for j, proc in enumerate(procs):
        vals = [100 * cpu.get(proc, 0.0) for _, cpu in bars]
        ax.bar([i + j * width for i in range(len(bars))], vals, width, label=proc)
    ax.set_xticks([i + 1.5 * width for i in range(len(bars))], [b[0] for b in bars], fontsize=6)
    ax.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("% of one core")
    ax.set_title("CPU by process (poller: core 0; the rest share core 1)")
    ax.legend(fontsize=8)

    ax = axes[1][2]
    pubs = [(label, c["publish_latency"]) for label, c in runs if "publish_latency" in c]
    for j, q in enumerate(("p50", "p99")):
        vals = [1000 * min(10.0, pub[q] or 0.0) for _, pub in pubs]
        ax.bar([i + j * 0.35 for i in range(len(pubs))], vals, 0.35, label=q)
    ax.set_xticks([i + 0.175 for i in range(len(pubs))], [label for label, _ in pubs])
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="p99 target 50 ms")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("ms (poll response → broker ack)")
    ax.set_title(f"Publish latency, {s['concurrent']:,} in flight")
    ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("wavespeed-bridge on one core")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------


async def run(s: Settings, workdir: Path) -> dict[str, Any]:
    os.sched_setaffinity(0, {SIM_CORE})  # children (broker, simulator, py-spy) inherit it
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    bench = Bench(s, workdir)
    try:
        _say(f"starting broker and simulator on core {SIM_CORE} (work files: {workdir})")
        await bench.start()
        if "ceilings" in s.phases:
            _say("1. HTTP ceilings (bare loops)")
            await bench.ceilings()
        if "sustained" in s.phases:
            _say("2. sustained end to end")
            sus: dict[str, Any] = {}
            sus[s.transport] = await bench.sustained(
                s.transport, seconds=s.sustained_seconds, profile=True
            )
            for transport in s.compare_transports:
                if transport != s.transport:
                    sus[transport] = await bench.sustained(
                        transport, seconds=s.compare_seconds, profile=False
                    )
            bench.results["sustained"] = sus
        if "naive" in s.phases:
            await bench.naive_sustained()
        if "concurrent" in s.phases:
            _say(f"3. {s.concurrent:,} concurrent")
            intervals = s.intervals_s if s.policy == "fixed" else s.intervals_s[:1]
            bench.results["concurrent"] = [
                await bench.concurrent(interval, profile=i == 0)
                for i, interval in enumerate(intervals)
            ]
            if "naive" in s.phases:
                await bench.naive_concurrent(intervals[0])
        if "memory" in s.phases:
            _say("4. memory")
            await bench.memory()
    finally:
        await bench.stop()
    return bench.results


def parse_args(argv: list[str] | None = None) -> tuple[Settings, bool, str | None]:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__,
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
        concurrent=a.concurrent,
        concurrency=a.concurrency,
        phases=tuple(x for x in a.phases.split(",") if x),
    )
    if a.quick:
        s = Settings(
            policy=s.policy,
            intervals_s=s.intervals_s,
            transport=s.transport,
            compare_transports=s.compare_transports,
            concurrent=min(s.concurrent, 2000),
            concurrency=s.concurrency,
            memory_sizes=(2000, 10_000),
            bare_seconds=2.0,
            sustained_warmup_s=2.0,
            sustained_seconds=5.0,
            compare_seconds=4.0,
            profile_seconds=4.0,
            concurrent_warmup_s=6.0,
            concurrent_seconds=8.0,
            naive_concurrent_seconds=6.0,
            phases=s.phases,
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
        _say(f"wrote {RESULTS / 'throughput.md'} and throughput.png")
    _say(f"done in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
