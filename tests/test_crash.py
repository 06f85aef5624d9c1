"""The real daemon process, killed with SIGKILL mid-flight and restarted: nothing is lost."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    committed,
    config_data,
    create_topics,
    metric_value,
    produce,
    read_all,
    read_every_task,
    scrape_until,
    sim_create,
    spawn_daemon,
)

pytestmark = pytest.mark.integration


async def _wait_for_events(broker: Broker, names: Names, n: int, timeout: float) -> int:
    got = await read_all(broker.bootstrap, [names.completed], expect=n, timeout=timeout)
    return len(got)


async def test_sigkill_mid_flight_then_restart_loses_nothing(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await create_topics(broker, names, partitions=2)
    rng = random.Random(3)
    config = config_data(broker, sim.base_url, names)
    daemon = spawn_daemon(config, tmp_path)
    try:
        # Tasks start their clocks once the daemon is up: however slow its start, the kill
        # below lands while some are still running.
        await scrape_until(
            config["server"]["port"], lambda t: metric_value(t, "wavespeed_bridge_ready") == 1, 60
        )
        ids = await sim_create(
            sim,
            [
                {"model": "m", "duration_s": rng.uniform(0.5, 4.0), "outcome": "completed"}
                for _ in range(60)
            ],
        )
        await produce(broker.bootstrap, names.input, ids)
        # Kill once some events are out and others are still in flight.
        for _ in range(200):
            if await _wait_for_events(broker, names, 10, timeout=0.3) >= 10:
                break
            await asyncio.sleep(0.05)
        before = await read_all(broker.bootstrap, [names.completed], expect=60, timeout=0.3)
        assert 10 <= len(before) < 60, "kill should land while tasks are in flight"
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(5)
        # Events observed before the kill are the first life's. (Not the log-end offset: Tansu
        # reports the last batch's base offset + 1, short of a multi-record batch.)
        killed_at = datetime.now(UTC)
        daemon = spawn_daemon(config, tmp_path)
        got = await read_every_task(broker.bootstrap, [names.completed], ids, timeout=60)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
    counts = Counter(r.event["subject"] for r in got)
    assert set(counts) == set(ids)  # every task has its terminal event
    first_life = [r for r in got if datetime.fromisoformat(r.event["time"]) <= killed_at]
    assert len(first_life) >= len(before)
    # Only tasks whose event was out but whose offset was not yet committed at the kill can
    # repeat: each duplicate is a task the killed daemon had already published.
    published = Counter(r.event["subject"] for r in first_life)
    assert max(published.values()) == 1
    assert all(c == 1 + published[s] for s, c in counts.items() if c > 1)
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= len(first_life)
    print(f"kill after {len(first_life)} events; {duplicates} repeated after restart")
    assert sum(await committed(broker.bootstrap, names.group, names.input, 2)) == 60
    assert daemon.returncode == 0  # the restarted daemon shut down cleanly on SIGTERM
    log = (tmp_path / "daemon.log").read_text()
    events = [json.loads(line).get("event") for line in log.splitlines() if line.startswith("{")]
    assert "stopped" in events  # the last line, written at exit
