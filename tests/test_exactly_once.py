"""No duplicates (issue 12), on Apache Kafka, judged by what a read_committed subscriber reads.

At least once: the offsets finished above each commit travel in its metadata, so a crash
repeats only events acknowledged after the last commit, and a clean restart or a
rebalance repeats none. Exactly once: events and offsets commit in one transaction per
partition, so nothing repeats, across crashes, rebalances, a lost partition leader and a
zombie replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from bridge.core import offset_map
from bridge.edges import kafka as kafka_io
from bridge.local.apache_kafka import KafkaCluster
from bridge.local.broker import Broker, free_port
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    Tail,
    config_data,
    create_topics,
    feed_slowly,
    join_then_leave,
    make_config,
    metric_value,
    produce,
    read_all,
    read_every_task,
    read_settled,
    running_bridge,
    scrape,
    scrape_until,
    sim_create,
    spawn_daemon,
    subjects,
    wait_for_commits,
    wait_until,
)

pytestmark = pytest.mark.integration

MODES = ["exactly_once", "at_least_once"]
Delivery = Literal["at_least_once", "exactly_once"]


def _transactional(broker: Broker, delivery: str) -> None:
    if delivery == "exactly_once" and not broker.features.transactions:
        pytest.skip(f"{broker.name} has no transactions")


async def _covered(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, set[int]]:
    """Per partition, the input offsets the group's commits say are done: the committed
    prefix and the offset map in its metadata."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        tps = {TopicPartition(topic, p) for p in range(partitions)}
        starts = await kafka_io.committed_offsets(consumer, tps)
    finally:
        await consumer.stop()
    out: dict[int, set[int]] = {}
    for tp in tps:
        offset, metadata = starts.get(tp, (0, ""))
        out[tp.partition] = set(range(offset)) | offset_map.decode(metadata, offset)
    return out


async def _tasks(sim: Simulator, n: int, seed: int, low: float, high: float) -> list[str]:
    rng = random.Random(seed)
    return await sim_create(
        sim,
        [
            {"model": "m", "duration_s": rng.uniform(low, high), "outcome": "completed"}
            for _ in range(n)
        ],
    )


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        daemon.send_signal(signal.SIGCONT)
        daemon.send_signal(signal.SIGTERM)
    daemon.wait(30)


@pytest.mark.parametrize("delivery", MODES)
async def test_five_sigkills_with_1000_tasks(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path, delivery: str
) -> None:
    _transactional(broker, delivery)
    parts = 4
    await create_topics(broker, names, partitions=parts)
    ids = await _tasks(sim, 1000, seed=9, low=1.0, high=12.0)
    where = {task: (i % parts, i // parts) for i, task in enumerate(ids)}
    config = config_data(broker, sim.base_url, names, polling={"interval_s": 2.0})
    config["delivery"] = delivery
    # What a killed daemon left open is aborted by the broker 12 s on (read_settled waits
    # for it); at aiokafka's 60 s default the read could not settle in its 30 s.
    config["kafka"]["transaction_timeout_ms"] = 12_000
    for p in range(parts):  # ids[i] goes to partition i % parts at offset i // parts
        await produce(broker.bootstrap, names.input, ids[p::parts], partition=p)
    rng = random.Random(9)
    at_risk: set[str] = set()  # acknowledged after the last commit before some kill
    log = tmp_path / "daemon.log"
    daemon = spawn_daemon(config, tmp_path)
    try:
        for _ in range(5):
            await wait_until(functools.partial(_assigned_again, log, _assigned(log)), timeout=30)
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(5)
            # The daemon is dead: the log and the commits are what it left.
            covered = await _covered(broker.bootstrap, names.group, names.input, parts)
            published = set(subjects(await read_settled(broker.bootstrap, [names.completed])))
            # No offset is committed (or listed in a map) ahead of its event.
            behind = {s for s in ids if where[s][1] in covered[where[s][0]]}
            assert behind <= published, "an offset was committed past an unpublished task"
            at_risk |= {s for s in published if where[s][1] not in covered[where[s][0]]}
            daemon = spawn_daemon(config, tmp_path)
        got = await read_every_task(broker.bootstrap, [names.completed], ids, timeout=120)
    finally:
        _stop(daemon)
    counts = subjects(got)
    duplicates = {s for s, c in counts.items() if c > 1}
    print(
        f"sigkill x5, {delivery}: 1000 ids, {len(got)} events, lost {len(set(ids) - set(counts))},"
        f" {sum(c - 1 for c in counts.values())} duplicates,"
        f" {len(at_risk)} acknowledged after the last commit before a kill"
    )
    assert set(counts) == set(ids)
    if delivery == "exactly_once":
        assert duplicates == set()
    else:
        assert duplicates <= at_risk  # only what no commit covered when the daemon died
    positions = await wait_for_commits(
        broker.bootstrap, names.group, names.input, parts, total=1000
    )
    assert sum(positions) == 1000


def _log_count(path: Path, text: str) -> int:
    return path.read_text().count(text) if path.exists() else 0


def _assigned(log: Path) -> int:
    return _log_count(log, '"partitions assigned"')


def _assigned_again(log: Path, before: int) -> bool:
    return _assigned(log) > before


def _transactions(text: str, result: str) -> float:
    return metric_value(text, "wavespeed_bridge_transactions_total", result=result)


@pytest.mark.parametrize("delivery", MODES)
async def test_a_clean_restart_repeats_nothing(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path, delivery: str
) -> None:
    _transactional(broker, delivery)
    await create_topics(broker, names, partitions=2)
    ids = await _tasks(sim, 500, seed=4, low=0.5, high=6.0)
    config = config_data(broker, sim.base_url, names, polling={"interval_s": 0.5})
    config["delivery"] = delivery
    daemon = spawn_daemon(config, tmp_path)
    try:
        await produce(broker.bootstrap, names.input, ids)
        # Stop mid-flow: many finished, many (out of order) still in flight.
        await read_all(broker.bootstrap, [names.completed], expect=150, timeout=60)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        daemon = spawn_daemon(config, tmp_path)
        got = await read_every_task(broker.bootstrap, [names.completed], ids, timeout=90)
    finally:
        _stop(daemon)
    counts = subjects(got)
    duplicates = sum(c - 1 for c in counts.values())
    print(f"SIGTERM and restart, {delivery}: 500 ids, {len(got)} events, {duplicates} duplicates")
    assert set(counts) == set(ids) and duplicates == 0


@pytest.mark.parametrize("delivery", MODES)
async def test_three_replicas_join_and_leave_over_six_partitions(
    broker: Broker, sim: Simulator, names: Names, delivery: str
) -> None:
    _transactional(broker, delivery)
    await create_topics(broker, names, partitions=6)
    ids = await _tasks(sim, 3000, seed=5, low=0.2, high=3.0)
    data: dict[str, Any] = {"polling": {"interval_s": 0.5}}
    configs = [make_config(broker, sim.base_url, names, **data) for _ in range(3)]
    configs = [c.model_copy(update={"delivery": cast(Delivery, delivery)}) for c in configs]
    async with running_bridge(configs[0]):
        feeding = asyncio.create_task(feed_slowly(broker.bootstrap, names.input, ids, 8.0))
        await asyncio.sleep(1.0)
        await join_then_leave(configs[1:])  # scale out, then in
        await feeding
        got = await read_every_task(broker.bootstrap, [names.completed], ids, timeout=90)
    counts = subjects(got)
    duplicates = sum(c - 1 for c in counts.values())
    print(f"three replicas, {delivery}: 3000 ids, {len(got)} events, {duplicates} duplicates")
    assert set(counts) == set(ids)
    if delivery == "exactly_once":
        assert duplicates == 0


async def test_exactly_once_through_a_lost_partition_leader(
    cluster: KafkaCluster, sim: Simulator
) -> None:
    names = Names()
    leader = 1
    await cluster.create_topics([names.input], partitions=2, leader=leader)
    await cluster.create_topics(names.outputs, leader=leader)
    ids = await _tasks(sim, 300, seed=21, low=0.3, high=3.0)
    config = make_config(cluster, sim.base_url, names)
    config = config.model_copy(update={"delivery": "exactly_once"})
    try:
        async with Tail(cluster.bootstrap, [names.completed]) as tail, running_bridge(config):
            await produce(cluster.bootstrap, names.input, ids)
            await tail.wait_for(lambda t: len(t.records) >= 50, timeout=60)
            cluster.kill_node(leader)
            await asyncio.sleep(3.0)
            cluster.start_node(leader)
            await tail.wait_for(lambda t: t.subjects() >= set(ids), timeout=120)
            await asyncio.sleep(1.0)  # anything repeated would be visible by now
            counts = Counter(r.event["subject"] for _, r in tail.records)
    finally:
        cluster.start_node(leader)
        await cluster.wait_ready()
    duplicates = sum(c - 1 for c in counts.values())
    lost = len(set(ids) - set(counts))
    print(f"leader lost, exactly_once: 300 ids, lost {lost}, duplicates {duplicates}")
    assert set(counts) == set(ids) and duplicates == 0


async def test_a_zombie_replica_gets_nothing_through(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    _transactional(broker, "exactly_once")
    await create_topics(broker, names, partitions=2)
    ids = await _tasks(sim, 200, seed=13, low=0.2, high=4.0)
    base = config_data(broker, sim.base_url, names, polling={"interval_s": 0.5})
    base["delivery"] = "exactly_once"
    # The zombie batches for 2 s, so it holds finished events when it freezes.
    zombie_cfg = {**base, "kafka": {**base["kafka"], "commit_interval_s": 2.0}}
    zombie = spawn_daemon(zombie_cfg, tmp_path, log_name="zombie.log")
    other = None
    try:
        await wait_until(functools.partial(_assigned_again, tmp_path / "zombie.log", 0), timeout=30)
        await produce(broker.bootstrap, names.input, ids)
        port = zombie_cfg["server"]["port"]
        await scrape_until(port, lambda t: metric_value(t, "wavespeed_bridge_events_pending") > 0)
        zombie.send_signal(signal.SIGSTOP)  # past its session timeout (4 s): its partitions move
        other_cfg = {**base, "server": {**base["server"], "port": free_port()}}
        other = spawn_daemon(other_cfg, tmp_path, log_name="other.log")
        other_port = other_cfg["server"]["port"]
        await scrape_until(
            other_port, lambda t: metric_value(t, "wavespeed_bridge_assigned_partitions") == 2, 60
        )
        await scrape_until(
            other_port,
            lambda t: _transactions(t, "committed") > 0,
            60,
        )
        zombie.send_signal(signal.SIGCONT)  # it wakes up with a transaction to finish
        fenced = await scrape_until(
            port,
            lambda t: _transactions(t, "fenced") + _transactions(t, "aborted") > 0,
            60,
        )
        got = await read_every_task(
            broker.bootstrap, [names.completed], ids, timeout=90, settle=2.0
        )
    finally:
        _stop(zombie)
        if other is not None:
            _stop(other)
    counts = subjects(got)
    duplicates = sum(c - 1 for c in counts.values())
    refused = _transactions(fenced, "fenced")
    print(f"zombie: 200 ids, {len(got)} events, {duplicates} duplicates, {refused:g} fenced")
    assert set(counts) == set(ids) and duplicates == 0


@pytest.mark.tansu_too
async def test_a_broker_that_drops_commit_metadata_is_reported_once(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await create_topics(broker, names)
    ids = await _tasks(sim, 20, seed=2, low=0.1, high=1.0)
    config = make_config(broker, sim.base_url, names)
    async with running_bridge(config) as bridge:
        await produce(broker.bootstrap, names.input, ids)
        await read_all(broker.bootstrap, [names.completed], expect=20, timeout=30)
        await wait_for_commits(broker.bootstrap, names.group, names.input, 1, total=20)
        text = await scrape(bridge.server.port)
    supported = metric_value(text, "wavespeed_bridge_commit_metadata_supported")
    assert supported == (1.0 if broker.features.commit_metadata else 0.0)
