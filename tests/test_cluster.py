"""A three-node Apache Kafka cluster (replication factor 3, min.insync.replicas 2) losing a
broker while tasks flow: the bridge recovers by itself and every task gets its event."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer

from bridge.local.apache_kafka import KafkaCluster
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    Tail,
    make_config,
    metric_value,
    running_bridge,
    scrape,
    sim_create,
    wait_for_commits,
)

pytestmark = pytest.mark.integration

LEADER = 1  # leads every partition of the test's topics, so losing it moves them all


@pytest.fixture
async def three(cluster: KafkaCluster) -> AsyncIterator[KafkaCluster]:
    """The session's cluster, whole again after the test whatever the test did to it."""
    yield cluster
    for node in cluster.nodes:
        if node.process is None:
            cluster.start_node(node.node_id)
        else:
            cluster.thaw_node(node.node_id)
    await cluster.wait_ready()


async def _tasks(sim: Simulator, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return await sim_create(
        sim,
        [
            {"model": "m", "duration_s": rng.uniform(0.3, 3.0), "outcome": "completed"}
            for _ in range(n)
        ],
    )


async def _feed(bootstrap: str, topic: str, ids: list[str], seconds: float) -> None:
    """Spread the ids over ``seconds``, so tasks are still arriving when the broker goes.

    One producer throughout: it knows every broker before one of them goes silent.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, request_timeout_ms=5000
    )
    await producer.start()
    try:
        chunks = 20
        size = max(1, len(ids) // chunks)
        for i in range(0, len(ids), size):
            sent = [await producer.send(topic, v.encode()) for v in ids[i : i + size]]
            await asyncio.gather(*sent)
            await asyncio.sleep(seconds / chunks)
    finally:
        await producer.stop()


async def test_partition_leader_killed_mid_flow_then_restarted(
    three: KafkaCluster, sim: Simulator
) -> None:
    names = Names()
    await three.create_topics([names.input], partitions=2, leader=LEADER)
    await three.create_topics(names.outputs, leader=LEADER)
    ids = await _tasks(sim, 300, seed=21)
    config = make_config(three, sim.base_url, names)
    async with Tail(three.bootstrap, [names.completed]) as tail, running_bridge(config) as bridge:
        feeding = asyncio.create_task(_feed(three.bootstrap, names.input, ids, seconds=6.0))
        await tail.wait_for(lambda t: len(t.records) >= 50, timeout=60)
        killed_at = time.monotonic()
        before = len(tail.records)
        three.kill_node(LEADER)  # SIGKILL: no controlled shutdown, leadership moves on fencing
        await tail.wait_for(lambda t: len(t.records) > before, timeout=60)
        recovered_s = time.monotonic() - killed_at
        await asyncio.sleep(3.0)  # the cluster runs on two nodes for a while
        three.start_node(LEADER)
        await feeding
        await tail.wait_for(lambda t: t.subjects() >= set(ids), timeout=120)
        positions = await wait_for_commits(three.bootstrap, names.group, names.input, 2, total=300)
        text = await scrape(bridge.server.port)
    counts = Counter(r.event["subject"] for _, r in tail.records)
    lost = len(set(ids) - set(counts))
    duplicates = sum(c - 1 for c in counts.values())
    print(
        f"leader failover: 300 tasks, {before} events before the kill, lost {lost},"
        f" duplicates {duplicates}, first event {recovered_s:.1f}s after the kill"
    )
    assert lost == 0
    assert sum(positions) == 300
    # The daemon rode it out itself: the same process, still ready, nothing given up.
    assert metric_value(text, "wavespeed_bridge_ready") == 1
    assert metric_value(text, "wavespeed_bridge_events_published_total", kind="completed") >= 300


async def test_one_broker_of_three_frozen_past_its_session_then_resumed(
    three: KafkaCluster, sim: Simulator
) -> None:
    names = Names()
    await three.create_topics([names.input], partitions=2, leader=LEADER)
    await three.create_topics(names.outputs, leader=LEADER)
    ids = await _tasks(sim, 200, seed=22)
    config = make_config(three, sim.base_url, names)
    async with Tail(three.bootstrap, [names.completed]) as tail, running_bridge(config):
        feeding = asyncio.create_task(_feed(three.bootstrap, names.input, ids, seconds=5.0))
        await tail.wait_for(lambda t: len(t.records) >= 30, timeout=60)
        three.freeze_node(LEADER)  # SIGSTOP: alive to the kernel, silent to everyone else
        before = len(tail.records)
        # Longer than broker.session.timeout.ms (3 s): the controller fences it and the
        # other two take over; events keep flowing while it is frozen.
        await tail.wait_for(lambda t: len(t.records) > before + 20, timeout=60)
        three.thaw_node(LEADER)
        await feeding
        await tail.wait_for(lambda t: t.subjects() >= set(ids), timeout=120)
        positions = await wait_for_commits(three.bootstrap, names.group, names.input, 2, total=200)
    counts = Counter(r.event["subject"] for _, r in tail.records)
    duplicates = sum(c - 1 for c in counts.values())
    print(f"frozen broker: 200 tasks, lost {len(set(ids) - set(counts))}, duplicates {duplicates}")
    assert set(counts) == set(ids)
    assert sum(positions) == 200
    await three.wait_in_sync([names.input, *names.outputs])
