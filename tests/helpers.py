"""Test helpers: configs for the real broker and simulator, a bridge runner, event readers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bridge.config import Config, build_config
from bridge.local.apache_kafka import KafkaCluster
from bridge.local.broker import Broker, free_port
from bridge.local.simulator import Simulator
from bridge.local.tansu import TansuBroker
from bridge.shell.app import Bridge

API_KEY = "test-key-7f3a9c"

# A broker a test started for itself and may stop, freeze and restart (see conftest).
OwnBroker = KafkaCluster | TansuBroker
StartBroker = Callable[..., Awaitable[OwnBroker]]


async def wait_until(predicate: Callable[[], bool], *, timeout: float, step: float = 0.05) -> None:
    """Until ``predicate()`` holds: wait for an outcome, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)


@dataclass
class Names:
    """Unique topic and group names for one test."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def input(self) -> str:
        return f"in-{self.tag}"

    @property
    def completed(self) -> str:
        return f"done-{self.tag}"

    @property
    def failed(self) -> str:
        return f"failed-{self.tag}"

    @property
    def dead_letter(self) -> str:
        return f"dlq-{self.tag}"

    @property
    def group(self) -> str:
        return f"group-{self.tag}"

    @property
    def coordination(self) -> str:
        return f"coord-{self.tag}"

    @property
    def state(self) -> str:
        return f"state-{self.tag}"

    @property
    def outputs(self) -> list[str]:
        return [self.completed, self.failed, self.dead_letter]


def config_data(
    broker: Broker, base_url: str, names: Names, **sections: dict[str, Any]
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "group_id": names.group,
            "input_topic": names.input,
            "completed_topic": names.completed,
            "failed_topic": names.failed,
            "dead_letter_topic": names.dead_letter,
            "session_timeout_ms": 4000,
            "heartbeat_interval_ms": 1000,
            "commit_interval_s": 0.2,
            "health_check_interval_s": 0.5,
            "request_timeout_ms": 5000,
            "enable_idempotence": broker.features.idempotence,
        },
        "api": {"base_url": base_url, "connect_timeout_s": 1.0, "read_timeout_s": 2.0},
        "polling": {
            "interval_s": 0.2,
            "default_timeout_s": 30,
            "backoff_base_s": 0.1,
            "backoff_max_s": 0.5,
        },
        "server": {"host": "127.0.0.1", "port": free_port()},
        # The test's own (created by the tests that use them): replicas of other tests
        # never share a budget or learning with this one.
        "cluster": {"coordination_topic": names.coordination, "state_topic": names.state},
        "logging": {"format": "json", "level": "INFO"},
        "shutdown_grace_s": 5,
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def make_config(broker: Broker, base_url: str, names: Names, **sections: dict[str, Any]) -> Config:
    return build_config(config_data(broker, base_url, names, **sections), env={})


async def create_topics(broker: Broker, names: Names, partitions: int = 1) -> None:
    await broker.create_topics([names.input], partitions=partitions)
    await broker.create_topics(names.outputs)


@contextlib.asynccontextmanager
async def running_bridge(
    config: Config,
    *,
    api_key: str | None = API_KEY,
    wait_ready: bool = True,
    webhook_secret: str | None = None,
) -> AsyncIterator[Bridge]:
    bridge = Bridge(config, api_key=api_key, webhook_secret=webhook_secret)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        if wait_ready:
            deadline = time.monotonic() + 20
            while not bridge.readiness()[0]:
                if task.done():
                    task.result()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"bridge not ready: {bridge.readiness()[1]}")
                await asyncio.sleep(0.05)
        yield bridge
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def feed_slowly(bootstrap: str, topic: str, ids: list[str], seconds: float) -> None:
    """The ids in 20 chunks over ``seconds``, so tasks keep arriving while replicas change."""
    chunk = max(1, len(ids) // 20)
    for i in range(0, len(ids), chunk):
        await produce(bootstrap, topic, ids[i : i + chunk])
        await asyncio.sleep(seconds / 20)


def has_partitions(bridge: Bridge) -> bool:
    return bool(bridge.metrics.assigned_partitions._value.get() > 0)


async def join_then_leave(configs: Sequence[Config], stay_s: float = 1.5) -> list[Bridge]:
    """Start a bridge per config one by one (each waits for its partitions and stays
    ``stay_s``), then stop them, the last first: scale out, then in."""
    joined: list[Bridge] = []
    async with contextlib.AsyncExitStack() as stack:
        for config in configs:
            bridge = await stack.enter_async_context(running_bridge(config))
            joined.append(bridge)
            await wait_until(functools.partial(has_partitions, bridge), timeout=30)
            await asyncio.sleep(stay_s)
    return joined


async def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes | str | dict[str, Any]],
    *,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = []
        for v in values:
            raw = (
                v
                if isinstance(v, bytes)
                else v.encode()
                if isinstance(v, str)
                else json.dumps(v).encode()
            )
            futures.append(
                await producer.send(topic, value=raw, key=key, headers=headers, partition=partition)
            )
        for f in futures:
            await f
    finally:
        await producer.stop()


@dataclass
class Received:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int

    @property
    def event(self) -> dict[str, Any]:
        assert self.value is not None
        obj: dict[str, Any] = json.loads(self.value)
        return obj


async def read_all(
    bootstrap: str,
    topics: list[str],
    *,
    expect: int = 0,
    timeout: float = 30.0,
    settle: float = 0.0,
    until: Callable[[list[Received]], bool] | None = None,
) -> list[Received]:
    """Read output topics from the beginning until ``expect`` records (then ``settle`` more s)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
        request_timeout_ms=6000,  # a frozen broker must not hold the reader for 40 s
        isolation_level="read_committed",  # what subscribers see
    )
    await consumer.start()
    out: list[Received] = []
    try:
        parts = [TopicPartition(t, p) for t in topics for p in await _partitions(consumer, t)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            enough = until(out) if until is not None else len(out) >= expect
            if enough and settle_until is None:
                settle_until = now + settle
            if settle_until is not None and now >= settle_until:
                break
            if now > deadline:
                break
            batch = await consumer.getmany(timeout_ms=200)
            out += [_received(m) for msgs in batch.values() for m in msgs]
    finally:
        await consumer.stop()
    return out


async def read_settled(
    bootstrap: str, topics: list[str], *, timeout: float = 30.0
) -> list[Received]:
    """Every committed record of ``topics``, read once no transaction on them is open.

    For topics nobody writes to any more (their producer was killed): the broker aborts what
    it left open when the transaction times out, and only then is the committed set final.
    Read to the end offsets, not for a while: a count taken early would miss records.
    """
    deadline = time.monotonic() + timeout
    levels = ("read_committed", "read_uncommitted")
    consumers = [
        AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level=level)
        for level in levels
    ]
    for c in consumers:
        await c.start()
    try:
        parts = [TopicPartition(t, p) for t in topics for p in await _partitions(consumers[0], t)]
        while True:  # last stable offset == high watermark: nothing in doubt
            stable, high = [await c.end_offsets(parts) for c in consumers]
            if stable == high:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"transactions still open: {stable} < {high}")
            await asyncio.sleep(0.2)
        reader = consumers[0]
        reader.assign(parts)
        await reader.seek_to_beginning(*parts)
        out: list[Received] = []
        while not await _at(reader, high):
            if time.monotonic() > deadline:
                raise TimeoutError("could not read to the end offsets")
            batch = await reader.getmany(timeout_ms=200)
            out += [_received(m) for msgs in batch.values() for m in msgs]
        return out
    finally:
        for c in consumers:
            await c.stop()


async def _at(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    positions = [await consumer.position(tp) for tp in ends]
    return all(p >= end for p, end in zip(positions, ends.values(), strict=True))


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    return {0}


def _received(m: Any) -> Received:
    return Received(m.topic, m.key, m.value, dict(m.headers or ()), m.partition, m.offset)


def subjects(records: Sequence[Received]) -> Counter[str]:
    """Events per task id (the CloudEvents ``subject``)."""
    return Counter(r.event["subject"] for r in records)


async def read_every_task(
    bootstrap: str, topics: list[str], ids: Sequence[str], *, timeout: float, settle: float = 1.0
) -> list[Received]:
    """Read until every task in ``ids`` has an event, then ``settle`` s more for repeats."""
    wanted = set(ids)
    return await read_all(
        bootstrap,
        topics,
        timeout=timeout,
        settle=settle,
        until=lambda rs: set(subjects(rs)) >= wanted,
    )


class Tail:
    """Reads topics from the beginning in the background, noting when each record arrived."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.records: list[tuple[float, Received]] = []
        self._bootstrap, self._topics = bootstrap, topics
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Tail:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        def note(rs: list[Received]) -> bool:
            now = time.monotonic()
            self.records += [(now, r) for r in rs[len(self.records) :]]
            return False

        await read_all(self._bootstrap, self._topics, timeout=3600, until=note)

    def subjects(self) -> set[str]:
        return {r.event["subject"] for _, r in self.records}

    async def wait_for(self, predicate: Callable[[Tail], bool], timeout: float) -> None:
        await wait_until(lambda: predicate(self), timeout=timeout, step=0.1)


async def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        out = []
        for p in range(partitions):
            out.append(await consumer.committed(TopicPartition(topic, p)) or 0)
        return out
    finally:
        await consumer.stop()


async def wait_for_commits(
    bootstrap: str, group: str, topic: str, partitions: int, *, total: int, timeout: float = 30.0
) -> list[int]:
    """The group's committed positions, once they add up to ``total`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        positions = await committed(bootstrap, group, topic, partitions)
        if sum(positions) >= total or time.monotonic() > deadline:
            return positions
        await asyncio.sleep(0.2)


async def sim_create(sim: Simulator, items: list[dict[str, Any]]) -> list[str]:
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        response = await client.post("/_sim/tasks", json=items)
        response.raise_for_status()
        ids: list[str] = response.json()["ids"]
        return ids


async def scrape(port: int) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/metrics")).text


async def scrape_until(port: int, check: Callable[[str], bool], timeout: float = 30) -> str:
    """The first scrape for which ``check`` holds: metrics are waited for, never slept for."""
    deadline = time.monotonic() + timeout
    text, missing = "", ""
    while True:
        # A series not exported yet (LookupError) is waited for like a value.
        with contextlib.suppress(httpx.HTTPError):
            text = await scrape(port)
            try:
                if check(text):
                    return text
            except LookupError as exc:
                missing = f" ({exc})"
        if time.monotonic() > deadline:
            raise TimeoutError(f"metrics never matched within {timeout}s{missing}: {text[-500:]}")
        await asyncio.sleep(0.1)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``; LookupError when no
    sample matches (a renamed metric or label must fail the test, not read as 0)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise LookupError(f"no sample of {name} with {labels or 'any labels'}")
    return total


def spawn_daemon(
    config: dict[str, Any],
    tmp: Path,
    *,
    env: dict[str, str] | None = None,
    log_name: str = "daemon.log",
) -> subprocess.Popen[bytes]:
    """The real daemon as a subprocess (``python -m bridge run``), logs to a file."""
    path = tmp / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp / log_name, "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--config", str(path)],
        stdout=log,
        stderr=log,
        env={**os.environ, "WAVESPEED_API_KEY": API_KEY, **(env or {})},
    )
