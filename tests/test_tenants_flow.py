"""Tenants on Apache Kafka with the daemon itself (issue 19): a quiet tenant's tasks behind
another's flood on the same partition, weights sharing the budget, and a restart with held
records in exactly-once mode losing and repeating nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    Tail,
    config_data,
    create_topics,
    metric_value,
    produce,
    read_every_task,
    scrape_until,
    sim_create,
    spawn_daemon,
    subjects,
)

pytestmark = pytest.mark.integration

# Tasks that complete (never fail, which would put their events on another topic).
LONG = {"model": "m", "duration_s": 600, "outcome": "completed"}
SHORT = {"model": "m", "duration_s": 0.5, "outcome": "completed"}
SECOND = {"model": "m", "duration_s": 1.0, "outcome": "completed"}


def _config(broker: Broker, sim: Simulator, names: Names, **extra: Any) -> dict[str, Any]:
    data = config_data(
        broker,
        sim.base_url,
        names,
        api={"requests_per_second": 20, "budget_scope": "replica"},
        polling={"interval_s": 1.0, "jitter": 0.0, "default_timeout_s": 300, "max_in_flight": 40},
        tenants={"key": "key", **extra.pop("tenants", {})},
    )
    data.update(extra)
    return data


async def _produce_for(broker: Broker, topic: str, tenant: str, ids: list[str]) -> None:
    await produce(broker.bootstrap, topic, ids, key=tenant.encode(), partition=0)


async def test_a_quiet_tenants_tasks_behind_a_flood_are_polled_at_once(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await create_topics(broker, names)
    flood = await sim_create(sim, [LONG for _ in range(400)])
    quiet = await sim_create(sim, [SHORT for _ in range(10)])
    data = _config(broker, sim, names)
    daemon = spawn_daemon(data, tmp_path)
    try:
        async with Tail(broker.bootstrap, [names.completed]) as tail:
            await _produce_for(broker, names.input, "noisy", flood)
            produced = time.monotonic()
            await _produce_for(broker, names.input, "quiet", quiet)  # behind the 400
            await tail.wait_for(lambda t: t.subjects() >= set(quiet), timeout=60)
            quiet_in = time.monotonic() - produced
        text = await scrape_until(
            data["server"]["port"],
            lambda t: metric_value(t, "wavespeed_bridge_tenant_records_held", tenant="noisy") > 0,
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
    held = metric_value(text, "wavespeed_bridge_tenant_records_held", tenant="noisy")
    in_flight = metric_value(text, "wavespeed_bridge_tenant_tasks_in_flight", tenant="noisy")
    print(f"quiet tenant's 10 tasks done {quiet_in:.1f}s after the flood; noisy held {held:.0f}")
    assert quiet_in < 15  # the flood is 400 tasks polled at 20 requests/s: 20 s each round
    assert held >= 400 - 40 and in_flight <= 40  # the flood waits past its share


async def test_weights_share_the_budget_between_busy_tenants(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await create_topics(broker, names)
    gold = await sim_create(sim, [LONG for _ in range(100)])
    tin = await sim_create(sim, [LONG for _ in range(100)])
    data = _config(
        broker,
        sim,
        names,
        tenants={"rules": [{"tenant": "gold", "weight": 3}]},
        polling={"interval_s": 0.2, "jitter": 0.0, "default_timeout_s": 300, "max_in_flight": 400},
    )
    daemon = spawn_daemon(data, tmp_path)
    try:
        await _produce_for(broker, names.input, "gold", gold)
        await _produce_for(broker, names.input, "tin", tin)
        await scrape_until(
            data["server"]["port"],
            lambda t: metric_value(t, "wavespeed_bridge_api_responses_total") > 100,
            timeout=30,
        )
        before = {i: sim.tasks[i].polls for i in gold + tin}
        await asyncio.sleep(5.0)  # a window of the budget binding (20/s against 1,000/s)
        polls = Counter(
            "gold" if i in set(gold) else "tin"
            for i in gold + tin
            for _ in range(sim.tasks[i].polls - before[i])
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
    print(f"weights 3:1: polls {dict(polls)}")
    assert polls["gold"] / polls["tin"] == pytest.approx(3.0, rel=0.2)


async def test_a_restart_with_held_records_loses_and_repeats_nothing_exactly_once(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await create_topics(broker, names)
    flood = await sim_create(sim, [SECOND for _ in range(200)])
    quiet = await sim_create(sim, [SECOND for _ in range(20)])
    data = _config(broker, sim, names, delivery="exactly_once")
    data["polling"]["max_in_flight"] = 20  # most of the flood is held at any time
    port = data["server"]["port"]
    daemon = spawn_daemon(data, tmp_path)
    try:
        await _produce_for(broker, names.input, "noisy", flood)
        await _produce_for(broker, names.input, "quiet", quiet)
        await scrape_until(
            port, lambda t: metric_value(t, "wavespeed_bridge_tenant_records_held") > 50
        )
        daemon.send_signal(signal.SIGTERM)  # with records held: not committed past them
        assert await asyncio.to_thread(daemon.wait, 30) == 0
        daemon = spawn_daemon(data, tmp_path, log_name="again.log")
        got = await read_every_task(broker.bootstrap, [names.completed], flood + quiet, timeout=120)
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
    counts = subjects(got)
    assert set(counts) == set(flood + quiet)
    assert max(counts.values()) == 1  # read_committed: each event once
