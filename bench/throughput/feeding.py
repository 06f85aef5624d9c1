"""What the bridge is fed: the model mix, task specs, and the feeder that creates tasks in
the simulator and produces their ids to the input topic, open loop (:func:`top_up`) or
closed (:func:`keep_in_flight`)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.throughput.stack import Sim, Topics, event_stream
from bridge.core.events import rfc3339


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
class Spec:
    model: str
    duration_s: float
    age_s: float = 0.0  # how long the simulator's task has been running
    outcome: str = "completed"
    # created_at in the Kafka message, as seconds ago; None: the API's own created_at
    message_age_s: float | None = None


def done_on_first_poll(n: int) -> list[Spec]:
    """Tasks created 10 minutes ago that took no time: the first poll finds them done."""
    return [Spec(MIX[0].model, 0.0, 600.0)] * n


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
    """Creates tasks in the simulator and produces their ids to the input topic.

    ``async with Feeder(...)``: one producer (acks=all) for the block.
    """

    def __init__(self, sim: Sim, bootstrap: str, rng: random.Random) -> None:
        self.sim = sim
        self.rng = rng
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1_048_576
        )
        self.fed: dict[str, Fed] = {}

    async def __aenter__(self) -> Feeder:
        await self.producer.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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

    def prefill(self, n: int, interval_s: float) -> list[Spec]:
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


async def top_up(
    feeder: Feeder,
    topic: str,
    polled: Callable[[], Awaitable[int]],
    backlog: int,
    chunk: int = 5000,
) -> None:
    """Open loop: keep ``backlog`` tasks fed and not yet polled, done on the first poll."""
    while True:
        fed = len(feeder.fed)
        if fed - await polled() < backlog:
            await feeder.feed(topic, done_on_first_poll(chunk))
        else:
            await asyncio.sleep(0.25)


async def paced(feeder: Feeder, topic: str, rate: float, step_s: float = 0.1) -> None:
    """Open loop at a fixed rate: ``rate`` tasks per second, done on the first poll."""
    due = 0.0
    while True:
        started = time.monotonic()
        due += rate * step_s
        n = int(due)
        if n:
            due -= n
            await feeder.feed(topic, done_on_first_poll(n))
        await asyncio.sleep(max(0.0, step_s - (time.monotonic() - started)))


async def keep_in_flight(
    feeder: Feeder, bootstrap: str, topics: Topics, finished: Counter[str]
) -> None:
    """Closed loop: every event read from the output topics starts a new task."""
    async with event_stream(bootstrap, topics.outputs) as consumer:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            n = sum(len(msgs) for msgs in batch.values())
            if n:
                finished["events"] += n
                specs = [Spec(m.model, d, 0.0, o) for m, d, o in feeder.draw(n)]
                await feeder.feed(topics.input, specs)
