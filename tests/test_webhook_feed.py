"""The webhook feed finds every partition of its topic and says when it is live; polling
stays the safety net when it is not (issue 17).

Unit tests for the feed's two decisions, then two replicas on Apache Kafka with the
simulator sending signed deliveries: a webhook topic that appears (and grows) after the
replicas started, and a replica whose feed stalls while tasks keep finishing. Detection
delay is read from real outputs: the event's ``observed_at`` minus the simulator's
completion time of the task. With a fixed poll interval I and no jitter, polling alone
finds a task at most I after it completes, plus the request and the gap between the
simulator creating a task and its id reaching the input topic: ``POLLING_BOUND_S``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from bridge.config import Config
from bridge.core.messages import parse_timestamp
from bridge.core.webhook_policy import WebhookAware
from bridge.local.broker import Broker, free_port
from bridge.local.simulator import Simulator
from bridge.shell.app import Bridge
from bridge.shell.webhook_feed import WebhookFeed, not_live, to_read
from tests.helpers import (
    Names,
    Received,
    create_topics,
    has_partitions,
    make_config,
    produce,
    read_all,
    read_every_task,
    running_bridge,
    sim_create,
    subjects,
    wait_until,
)

# --- the decisions -------------------------------------------------------------------------


def test_the_first_partitions_found_are_read_from_the_ttl_and_new_ones_from_the_start() -> None:
    assert to_read(frozenset(), None) == (frozenset(), False)  # no topic yet: nothing
    assert to_read(frozenset(), frozenset({0, 1, 2})) == (frozenset({0, 1, 2}), False)
    assert to_read(frozenset({0, 1, 2}), frozenset({0, 1, 2})) == (frozenset(), True)
    assert to_read(frozenset({0, 1, 2}), frozenset({0, 1, 2, 3})) == (frozenset({3}), True)
    # The metadata lost the topic for a moment: what is read stays read.
    assert to_read(frozenset({0, 1}), None) == (frozenset(), False)


def test_live_means_every_partition_read_and_caught_up_without_failures() -> None:
    every = frozenset({0, 1, 2})
    ends = {0: 5, 1: 0, 2: 7}
    assert not_live(every, every, None, {0: 5, 1: 0, 2: 9}, ends) is None
    assert not_live(None, frozenset(), None, {}, {}) == (
        "the webhook topic is not in the brokers' metadata"
    )
    assert not_live(every, frozenset({0}), None, {0: 5}, {0: 5}) == "partitions [1, 2] not read yet"
    assert not_live(every, every, "KafkaConnectionError", {0: 5, 1: 0, 2: 7}, ends) == (
        "reads failing (KafkaConnectionError)"
    )
    # Behind what the topic held one check ago, or not measured yet.
    assert not_live(every, every, None, {0: 5, 1: 0, 2: 6}, ends) == "partitions [2] not caught up"
    assert not_live(every, every, None, {0: 5, 1: 0, 2: 7}, {0: 5}) == (
        "partitions [1, 2] not caught up"
    )


# --- on Apache Kafka -----------------------------------------------------------------------

INTERVAL_S = 2.0  # polls every 2 s, counted from the task's creation
# Polling alone: the interval, plus the request, the dispatch loop and the gap between the
# simulator creating a task and its id arriving, on a busy test machine.
POLLING_BOUND_S = INTERVAL_S + 1.0


def _config(broker: Broker, sim: Simulator, names: Names) -> Config:
    return make_config(
        broker,
        sim.base_url,
        names,
        polling={"interval_s": INTERVAL_S, "jitter": 0.0, "default_timeout_s": 120},
        webhooks={"enabled": True, "port": free_port(), "topic": _hooks(names)},
    )


def _hooks(names: Names) -> str:
    return f"hooks-{names.tag}"


def _url(bridge: Bridge) -> str:
    assert bridge.webhook_server is not None
    return f"http://127.0.0.1:{bridge.webhook_server.port}/webhooks/wavespeed"


def _gauge(bridge: Bridge, name: str) -> float | None:
    return bridge.metrics.registry.get_sample_value(f"wavespeed_bridge_{name}")


def _feed(bridge: Bridge) -> WebhookFeed:
    assert bridge.webhook_feed is not None
    return bridge.webhook_feed


def _reading(bridge: Bridge, partitions: int) -> bool:
    return (
        _gauge(bridge, "webhook_feed_partitions") == partitions
        and _gauge(bridge, "webhook_feed_live") == 1
    )


async def _submit(
    broker: Broker, sim: Simulator, names: Names, replicas: Sequence[Bridge], n: int, **task: Any
) -> list[str]:
    """``n`` tasks, their deliveries sent to each replica in turn, their ids spread over the
    two input partitions (one per replica)."""
    task = {"model": "m", "outcome": "completed", **task}
    ids = await sim_create(sim, [{**task, "webhook": _url(replicas[i % 2])} for i in range(n)])
    for part in (0, 1):  # with its model, so that its first poll may wait for a delivery
        records = [{"id": i, "model": "m"} for i in ids[part::2]]
        await produce(broker.bootstrap, names.input, records, partition=part)
    return ids


def _pushed(records: list[Received]) -> list[Received]:
    """The deliveries on the webhook topic, without the replicas' marks."""
    return [r for r in records if "applied-by" not in r.headers]


def _delays(sim: Simulator, events: list[Received]) -> dict[str, float]:
    """Per task: its event's observed_at minus when the simulator completed it."""
    out = {}
    for r in events:
        task = sim.tasks[r.event["subject"]]
        observed = parse_timestamp(r.event["data"]["observed_at"])
        assert observed is not None
        out[task.id] = observed - (task.created_wall + task.duration_s)
    return out


def _summary(sim: Simulator, delays: dict[str, float], ids: list[str]) -> str:
    polled = [delays[i] for i in ids if sim.tasks[i].first_terminal_poll is not None]
    pushed = [delays[i] for i in ids if sim.tasks[i].first_terminal_poll is None]
    return (
        f"{len(polled)} found by polls ({_worst(polled)}),"
        f" {len(pushed)} by deliveries ({_worst(pushed)})"
    )


def _worst(delays: list[float]) -> str:
    return f"max {max(delays):.2f} s" if delays else "none"


@contextlib.asynccontextmanager
async def _admin(broker: Broker) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


@pytest.mark.integration
async def test_a_webhook_topic_created_after_start_is_read_whole_and_followed_as_it_grows(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await create_topics(broker, names, partitions=2)  # the webhook topic comes later
    async with (
        running_bridge(
            _config(broker, sim, names), webhook_secret=sim.webhook_secret, wait_ready=False
        ) as a,
        running_bridge(
            _config(broker, sim, names), webhook_secret=sim.webhook_secret, wait_ready=False
        ) as b,
    ):
        # Start-up does not wait for the topic: both consume, neither feed is live.
        await wait_until(lambda: has_partitions(a) and has_partitions(b), timeout=30)
        await wait_until(lambda: _feed(a).live is False and _feed(b).live is False, timeout=10)
        assert _gauge(a, "webhook_feed_live") == 0 and _gauge(a, "webhook_feed_partitions") == 0
        async with _admin(broker) as admin:  # looking for it did not create it
            assert _hooks(names) not in await admin.list_topics()

        await broker.create_topics([_hooks(names)], partitions=3)
        await wait_until(lambda: _reading(a, 3) and _reading(b, 3), timeout=20)
        ids = await _submit(broker, sim, names, (a, b), 30, duration_s=0.3)
        got = await read_every_task(broker.bootstrap, [names.completed], ids, timeout=30)
        hooks = await read_all(
            broker.bootstrap, [_hooks(names)], timeout=10, until=lambda rs: len(_pushed(rs)) >= 30
        )

        # The topic grows: a delivery in the new partition, written before the feeds
        # noticed it, still reaches the task's owner (new partitions are read from the
        # start). The task would run for a minute: only the delivery can finish it now.
        async with _admin(broker) as admin:
            await admin.create_partitions({_hooks(names): NewPartitions(total_count=4)})
        (late,) = await sim_create(sim, [{"model": "m", "duration_s": 60.0}])
        body = {
            "id": late,
            "status": "completed",
            "model": "m",
            "outputs": ["https://x.invalid/p3"],
        }
        await produce(
            broker.bootstrap,
            _hooks(names),
            [json.dumps(body)],
            key=late.encode(),
            headers=[("webhook-id", b"msg_new_partition")],
            partition=3,
        )
        await produce(broker.bootstrap, names.input, [late], partition=0)
        await wait_until(lambda: _reading(a, 4) and _reading(b, 4), timeout=20)
        grown = await read_every_task(broker.bootstrap, [names.completed], [late], timeout=20)

    assert subjects(got) == dict.fromkeys(ids, 1)
    delays = _delays(sim, got)
    print(f"topic created late: 30 tasks, {_summary(sim, delays, ids)}")
    # Every delivery reached its owner, whichever of the three partitions carried it.
    assert {r.partition for r in _pushed(hooks)} == {0, 1, 2}
    assert sum(sim.tasks[i].polls for i in ids) == 0
    assert max(delays.values()) <= POLLING_BOUND_S
    (event,) = [r.event for r in grown if r.event["subject"] == late]
    assert event["data"]["outputs"] == ["https://x.invalid/p3"]  # the delivery's, no poll's


@pytest.mark.integration
async def test_a_stalled_feed_hands_its_tasks_back_to_polling_within_the_polling_bound(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await create_topics(broker, names, partitions=2)
    await broker.create_topics([_hooks(names)], partitions=3)
    async with (
        running_bridge(_config(broker, sim, names), webhook_secret=sim.webhook_secret) as a,
        running_bridge(_config(broker, sim, names), webhook_secret=sim.webhook_secret) as b,
    ):
        await wait_until(lambda: has_partitions(a) and has_partitions(b), timeout=30)
        await wait_until(lambda: _reading(a, 3) and _reading(b, 3), timeout=20)
        # Deliveries come at ~5 s of age: both replicas learn to defer first polls to ~6.3 s.
        warm = await _submit(broker, sim, names, (a, b), 12, duration_s=5.0)
        await read_every_task(broker.bootstrap, [names.completed], warm, timeout=40)
        assert isinstance(a.policy, WebhookAware) and isinstance(b.policy, WebhookAware)
        assert a.policy.trusted("m") and b.policy.trusted("m")

        # b's feed stops reading; tasks of 1 s keep finishing, their deliveries sent to
        # both replicas. b takes its share while still live, deferring their first polls
        # to ~6.3 s: noticing the stall must bring those polls back to the 2 s schedule.
        stalled = _feed(b)._consumer
        stalled.pause(*stalled.assignment())
        first = await _submit(broker, sim, names, (a, b), 20, duration_s=1.0)
        await wait_until(lambda: _gauge(b, "webhook_feed_live") == 0, timeout=20)
        assert _gauge(a, "webhook_feed_live") == 1
        # While it is down, new tasks are polled as without webhooks.
        second = await _submit(broker, sim, names, (a, b), 20, duration_s=1.0)
        ids = warm + first + second
        got = await read_every_task(broker.bootstrap, [names.completed], ids, timeout=40)
        stalled.resume(*stalled.assignment())
        await wait_until(lambda: _gauge(b, "webhook_feed_live") == 1, timeout=20)

    assert subjects(got) == dict.fromkeys(ids, 1)
    delays = _delays(sim, got)
    for label, wave in (("warm-up", warm), ("stall", first), ("down", second)):
        print(f"stalled feed, {label}: {len(wave)} tasks, {_summary(sim, delays, wave)}")
    # b's tasks were found by polls, a's by their deliveries.
    assert any(sim.tasks[i].first_terminal_poll is not None for i in first)
    assert max(delays.values()) <= POLLING_BOUND_S, sorted(delays.values())[-5:]
