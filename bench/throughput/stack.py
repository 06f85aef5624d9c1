"""What runs on core 1 beside the bench, and the :class:`Stack` every phase runs on.

Core 1 (:data:`SIM_CORE`): the bench itself, the WaveSpeed simulator (``bench.simserver``,
:class:`Sim`) and the Tansu broker; children inherit the bench's core. Core 0
(:data:`BRIDGE_CORE`) is for the pollers under test (:mod:`bench.throughput.pollers`).
:class:`Stack` owns the simulator and the broker for the whole run; every process is
stopped by its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.throughput.settings import Settings
from bridge.local.broker import free_port
from bridge.local.tansu import TansuBroker

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
API_KEY = "bench-key-not-a-secret"
BRIDGE_CORE = 0
SIM_CORE = 1
P = "wavespeed_bridge"  # the bridge's metric prefix


def say(text: str) -> None:
    print(text, flush=True)


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
    """The simulator and the broker, up for the whole run, and what phases share."""

    def __init__(self, s: Settings, workdir: Path) -> None:
        self.s = s
        self.workdir = workdir
        self.rng = random.Random(s.seed)
        self.broker = TansuBroker(log_path=workdir / "broker.log")
        self._sim: Sim | None = None
        self.bg: list[asyncio.Task[Any]] = []

    @property
    def sim(self) -> Sim:
        assert self._sim is not None, "stack not started"
        return self._sim

    async def start(self) -> None:
        self.broker.start()
        await self.broker.wait_ready()
        self._sim = Sim(self.workdir)
        await self._sim.wait_ready()

    async def stop(self) -> None:
        for t in self.bg:
            t.cancel()
        await asyncio.gather(*self.bg, return_exceptions=True)
        if self._sim is not None:
            await self._sim.stop()
        self.broker.stop()

    def core1_pids(self) -> dict[str, int]:
        assert self.broker.process is not None
        return {
            "simulator": self.sim.pid,
            "broker": self.broker.process.pid,
            "bench": os.getpid(),
        }

    async def topics(self) -> Topics:
        t = Topics()
        await self.broker.create_topics(t.all)
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
