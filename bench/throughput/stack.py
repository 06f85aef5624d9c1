"""What runs on core 1 beside the bench, and the :class:`Stack` every phase runs on.

Core 1 (:data:`SIM_CORE`): the bench itself, the WaveSpeed simulator (``bench.simserver``,
:class:`Sim`) and the broker, Apache Kafka (one KRaft node, a JVM) or Tansu (one native
process), started by :func:`start_broker`; children inherit the bench's core and each
broker is pinned there again, every thread of it (:func:`pin`), once it runs. Core 0
(:data:`BRIDGE_CORE`) is for the pollers under test (:mod:`bench.throughput.pollers`).
:class:`Stack` owns the simulator and the first broker for the whole run; every process
is stopped by its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.procs import rss_bytes
from bench.throughput.settings import Settings
from bridge.local import apache_kafka
from bridge.local.broker import Broker, free_port
from bridge.local.tansu import start_tansu

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
API_KEY = "bench-key-not-a-secret"
BRIDGE_CORE = 0
SIM_CORE = 1
P = "wavespeed_bridge"  # the bridge's metric prefix
BROKERS = ("kafka", "tansu")


def say(text: str) -> None:
    print(text, flush=True)


def publish_md(md: str, name: str, *, print_only: bool) -> None:
    """A benchmark's report: printed (``--no-write``), or written to bench/results/``name``."""
    if print_only:
        print(md)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(md)
    say(f"wrote {RESULTS / name}")


def terminate(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- core 1: the simulator ----------------------------------------------------------------


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
        terminate(self.process)


# --- core 1: the brokers ------------------------------------------------------------------


@dataclass(slots=True)
class RunningBroker:
    """A started local broker, its process id and what the report says about it."""

    key: str  # "kafka" or "tansu"
    broker: Broker
    pid: int
    close: Callable[[], None]
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return self.broker.name

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def rss_mb(self) -> float | None:
        try:
            return rss_bytes(self.pid) / 2**20
        except (OSError, RuntimeError):
            return None


def pin(pid: int, core: int) -> list[int]:
    """Every thread of ``pid`` on ``core`` (``taskset -a``); returns the cores it may use."""
    subprocess.run(
        ["taskset", "-a", "-p", "-c", str(core), str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    cores: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            cores |= os.sched_getaffinity(int(tid))
    return sorted(cores)


def java_version() -> str:
    done = subprocess.run(
        [apache_kafka.java_binary(), "-version"], capture_output=True, text=True, check=False
    )
    lines = done.stderr.splitlines()
    return lines[0] if lines else "unknown"


async def start_broker(key: str, workdir: Path, s: Settings) -> RunningBroker:
    """Start a broker on loopback, wait until it answers, pin it to :data:`SIM_CORE`."""
    t0 = time.monotonic()
    broker: Broker
    if key == "tansu":
        tansu = await start_tansu(log_path=workdir / "broker-tansu.log")
        assert tansu.process is not None
        broker, pid, close = tansu, tansu.process.pid, tansu.stop
        info: dict[str, Any] = {
            "runtime": "native process, storage in memory",
            "heap_mb": None,
            "log": "broker-tansu.log",
        }
    elif key == "kafka":
        directory = workdir / "kafka"
        cluster = await apache_kafka.start_cluster(1, directory=directory, heap_mb=s.kafka_heap_mb)
        node = cluster.nodes[0]
        assert node.process is not None

        def close() -> None:
            cluster.close()
            shutil.rmtree(node.directory / "data", ignore_errors=True)

        broker, pid = cluster, node.process.pid
        info = {
            "runtime": f"one KRaft node (broker + controller), log on disk; {java_version()}, "
            f"-Xmx{s.kafka_heap_mb}m, SerialGC",
            "heap_mb": s.kafka_heap_mb,
            "log": str(node.log_path.relative_to(workdir)),
        }
    else:
        raise ValueError(f"unknown broker {key!r}; choose from {', '.join(BROKERS)}")
    try:
        cores = pin(pid, SIM_CORE)
    except BaseException:
        close()
        raise
    info |= {
        "key": key,
        "name": broker.name,
        "idempotence": broker.features.idempotence,
        "startup_s": time.monotonic() - t0,
        "cores": cores,
        "rss_mb_ready": rss_bytes(pid) / 2**20,
    }
    return RunningBroker(key, broker, pid, close, info)


# --- topics and reading them --------------------------------------------------------------


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

    @property
    def all(self) -> list[str]:
        return [self.input, self.completed, self.failed, self.dead_letter]


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


# --- the whole stack ----------------------------------------------------------------------


class Stack:
    """The simulator and the first broker, up for the whole run, and what phases share."""

    def __init__(self, s: Settings, workdir: Path) -> None:
        self.s = s
        self.workdir = workdir
        self.rng = random.Random(s.seed)
        self._sim: Sim | None = None
        self._broker: RunningBroker | None = None
        self.brokers: dict[str, dict[str, Any]] = {}  # key -> info, each broker started
        self.bg: list[asyncio.Task[Any]] = []

    @property
    def sim(self) -> Sim:
        assert self._sim is not None, "stack not started"
        return self._sim

    @property
    def broker(self) -> RunningBroker:
        assert self._broker is not None, "stack not started"
        return self._broker

    async def start(self) -> None:
        self._broker = await self.start_broker(self.s.brokers[0])
        self._sim = Sim(self.workdir)
        await self._sim.wait_ready()

    async def start_broker(self, key: str) -> RunningBroker:
        broker = await start_broker(key, self.workdir, self.s)
        self.brokers[key] = broker.info
        info = broker.info
        heap = f", heap {info['heap_mb']} MB" if info["heap_mb"] else ""
        say(
            f"  {broker.name} on {broker.bootstrap}, core {info['cores']}{heap}, "
            f"RSS {info['rss_mb_ready']:,.0f} MiB, ready in {info['startup_s']:.1f} s"
        )
        return broker

    async def stop(self) -> None:
        for t in self.bg:
            t.cancel()
        await asyncio.gather(*self.bg, return_exceptions=True)
        if self._sim is not None:
            await self._sim.stop()
        if self._broker is not None:
            self.note_broker_rss(self._broker)
            self._broker.close()

    def note_broker_rss(self, broker: RunningBroker) -> None:
        """The broker's RSS at its last use, for the report."""
        rss = broker.rss_mb()
        if rss is not None:
            self.brokers[broker.key]["rss_mb_end"] = rss

    def core1_pids(self, broker: RunningBroker | None = None) -> dict[str, int]:
        """Processes on core 1. ``broker``: the one under test, if not the first; the first
        then counts as ``idle broker``."""
        pids = {"simulator": self.sim.pid, "bench": os.getpid()}
        if broker is None or broker is self._broker:
            pids["broker"] = self.broker.pid
        else:
            pids["broker"] = broker.pid
            pids["idle broker"] = self.broker.pid
        return pids

    async def topics(self, broker: RunningBroker | None = None) -> Topics:
        t = Topics()
        await (broker or self.broker).broker.create_topics(t.all)
        return t

    @contextlib.asynccontextmanager
    async def background(self, task: asyncio.Task[Any]) -> AsyncIterator[asyncio.Task[Any]]:
        """Run ``task`` for the block (stopped with the stack if the block never ends)."""
        self.bg.append(task)
        try:
            yield task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.bg.remove(task)
