"""Group membership on Apache Kafka: one JoinGroup per join, replicas that start together on
a busy machine all get partitions, and a member kept out of its group exits to be restarted."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from bridge.edges import kafka as kafka_io
from bridge.local.broker import Broker, free_port
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    config_data,
    create_topics,
    make_config,
    metric_value,
    produce,
    read_every_task,
    scrape,
    scrape_until,
    sim_create,
    spawn_daemon,
    wait_until,
)

pytestmark = pytest.mark.integration

# Which consumer a log record of aiokafka's comes from: each consumer is started in a task
# of its own with this set, and its coordination task inherits the context.
_member: contextvars.ContextVar[str] = contextvars.ContextVar("member", default="?")


@dataclass
class _Join:
    """One perform_group_join: the JoinGroup requests it sent, as (member id, protocols)."""

    requests: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)


class _JoinLog(logging.Handler):
    """aiokafka's own account of each join: '(Re-)joining group' opens one, then every
    'Sending JoinGroup' request it sends, attributed to the consumer that sent it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.joins: dict[str, list[_Join]] = defaultdict(list)
        self.joined: dict[str, int] = defaultdict(int)

    def emit(self, record: logging.LogRecord) -> None:
        member, msg = _member.get(), str(record.msg)
        if msg.startswith("(Re-)joining group"):
            self.joins[member].append(_Join())
        elif msg.startswith("Sending JoinGroup") and self.joins[member]:
            request: Any = record.args[0]  # type: ignore[index]
            # The request object is aiokafka's; its fields are private (read in a test only).
            names = tuple(name for name, _ in request._group_protocols)
            self.joins[member][-1].requests.append((request._member_id, names))
        elif msg.startswith("Joined group"):
            self.joined[member] += 1


@contextlib.contextmanager
def _join_log() -> Iterator[_JoinLog]:
    logger = logging.getLogger("aiokafka.consumer.group_coordinator")
    handler, level = _JoinLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _member_consumer(name: str, config: Any, topic: str) -> AIOKafkaConsumer:
    async def start() -> AIOKafkaConsumer:
        _member.set(name)
        consumer = kafka_io.make_consumer(config.kafka)
        await consumer.start()
        consumer.subscribe([topic])
        return consumer

    return await asyncio.create_task(start())


def _settled(consumers: list[AIOKafkaConsumer], partitions: int) -> bool:
    owned = [tp.partition for c in consumers for tp in c.assignment()]
    return sorted(owned) == list(range(partitions))


async def test_every_join_sends_one_join_group_that_names_every_protocol(
    broker: Broker, names: Names
) -> None:
    """aiokafka 0.14 sends a JoinGroup per configured assignor in each join; the second one
    changes the member's protocols and restarts the rebalance for everyone. The bridge's
    consumer sends one per join (two on a first join: Kafka asks for a member id first)."""
    await broker.create_topics([names.input], partitions=4)
    config = make_config(broker, "http://127.0.0.1:1", names)
    protocols = tuple(a.name for a in kafka_io.ASSIGNORS)
    with _join_log() as joins:
        a = await _member_consumer("a", config, names.input)
        b: AIOKafkaConsumer | None = None
        try:
            await wait_until(lambda: _settled([a], 4), timeout=30)
            b = await _member_consumer("b", config, names.input)  # a rejoins for it
            await wait_until(lambda: _settled([a, b], 4) and joins.joined["a"] >= 2, timeout=30)
            await b.stop()  # and again when it leaves
            b = None
            await wait_until(lambda: _settled([a], 4) and joins.joined["a"] >= 3, timeout=30)
        finally:
            for c in (a, b):
                if c is not None:
                    await c.stop()
    assert set(joins.joins) == {"a", "b"}
    for member, attempts in joins.joins.items():
        for join in attempts:
            sent = join.requests
            # Two only when the first asked for a member id (KIP-394), then one with it.
            with_id = [m for m, _ in sent if m]
            assert len(with_id) == 1, f"{member} sent {len(sent)} JoinGroups in one join: {sent}"
            assert len(sent) <= 2 and (len(sent) == 1 or sent[0][0] == "")
            assert all(p == protocols for _, p in sent), f"{member}: {sent}"
    assert joins.joined["a"] >= 3 and joins.joined["b"] >= 1


@contextlib.contextmanager
def _busy_cores(n: int) -> Iterator[None]:
    """``n`` processes spinning on the CPU, as a loaded machine has."""
    spinners = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


@contextlib.asynccontextmanager
async def _daemons(configs: list[dict[str, Any]], tmp: Path) -> AsyncIterator[list[int]]:
    """The real daemon once per config, all started at the same instant; their ports."""
    procs = [spawn_daemon(c, tmp, log_name=f"replica-{i}.log") for i, c in enumerate(configs)]
    try:
        yield [c["server"]["port"] for c in configs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def _assigned_partitions(port: int) -> float | None:
    try:
        return metric_value(await scrape(port), "wavespeed_bridge_assigned_partitions")
    except Exception:  # not serving yet
        return None


async def test_replicas_started_together_on_a_busy_machine_all_get_partitions(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    """Three daemons started at the same instant, both cores kept busy: every partition is
    owned by one member and its tasks are processed, within a bound."""
    partitions = 6
    await create_topics(broker, names, partitions=partitions)
    rng = random.Random(7)
    ids = await sim_create(
        sim,
        [
            {"model": "m", "duration_s": rng.uniform(0.2, 2.0), "outcome": "completed"}
            for _ in range(120)
        ],
    )
    configs = [
        config_data(broker, sim.base_url, names, server={"port": free_port()}) for _ in range(3)
    ]
    with _busy_cores(2):
        async with _daemons(configs, tmp_path) as ports:
            # Each partition's tasks, keyed so that every partition gets some.
            for i, task_id in enumerate(ids):
                await produce(broker.bootstrap, names.input, [task_id], partition=i % partitions)
            got = await read_every_task(broker.bootstrap, [names.completed], ids, timeout=60)
            owned = [await _assigned_partitions(p) for p in ports]
            # Settled: no member is left waiting (the gauge is sampled by each member's
            # watch, so a rebalance finishing as the events arrive is waited for).
            for p in ports:
                await scrape_until(
                    p, lambda t: metric_value(t, "wavespeed_bridge_group_unassigned_seconds") == 0
                )
    assert {r.event["subject"] for r in got} == set(ids)
    assert sum(o or 0 for o in owned) == partitions, owned


async def test_a_member_kept_out_of_its_group_exits_with_code_3(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    """A member that never completes a join (here: the group's members speak only a
    protocol the bridge does not, so every JoinGroup is refused) says so in its metrics,
    then exits with code 3 for its orchestrator to restart it."""
    await create_topics(broker, names, partitions=2)
    # A consumer of another application holds the group with round robin only.
    squatter = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=names.group, session_timeout_ms=30_000
    )
    await squatter.start()
    squatter.subscribe([names.input])
    try:
        await wait_until(lambda: len(squatter.assignment()) == 2, timeout=30)
        data = config_data(broker, "http://127.0.0.1:1", names)
        data["kafka"]["rebalance_timeout_ms"] = 3_000  # deadline: 3 x 3 s + 4 s = 13 s
        daemon = spawn_daemon(data, tmp_path)
        try:
            port = data["server"]["port"]
            text = await scrape_until(
                port,
                lambda t: metric_value(t, "wavespeed_bridge_group_unassigned_seconds") > 2,
                timeout=30,
            )
            assert metric_value(text, "wavespeed_bridge_group_join_deadline_seconds") == 13
            code = await asyncio.to_thread(daemon.wait, 60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    finally:
        await squatter.stop()
    assert code == 3
    log = (tmp_path / "daemon.log").read_text()
    assert "no group assignment in time, exiting" in log
