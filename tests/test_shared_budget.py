"""One account, many replicas (issue 18), on Apache Kafka with the daemon itself: the request
budget shared through the coordination topic across a join, a SIGKILL and a leave; a 429
seen by one replica pausing all; a restarted replica polling like a warm one; and no
coordination topic meaning the safe share."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.local.broker import Broker, free_port
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    config_data,
    create_topics,
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

LIMIT = 40.0  # the account's requests/s, in the bridge's config and at the simulator


def _shared(broker: Broker, sim: Simulator, names: Names, **polling: Any) -> dict[str, Any]:
    data = config_data(
        broker,
        sim.base_url,
        names,
        api={"requests_per_second": LIMIT, "budget_scope": "account"},
        polling={"interval_s": 0.2, "jitter": 0.0, "default_timeout_s": 600, **polling},
        cluster={"report_interval_s": 0.5, "state_topic": None},
    )
    return data


def _replica(data: dict[str, Any]) -> dict[str, Any]:
    """The same deployment, another pod: its own metrics port."""
    return {**data, "server": {**data["server"], "port": free_port()}}


@contextlib.contextmanager
def _daemons() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


async def _value(port: int, name: str, **labels: str) -> float:
    return metric_value(await scrape(port), name, **labels)


async def _sees(ports: list[int], replicas: int, timeout: float = 30) -> None:
    """Until every replica at ``ports`` counts ``replicas`` sharing the budget."""
    for port in ports:
        await scrape_until(
            port,
            lambda t: (
                metric_value(t, "wavespeed_bridge_budget_replicas") == replicas
                and metric_value(t, "wavespeed_bridge_budget_coordinated") == 1
            ),
            timeout,
        )


async def _shares(ports: list[int], timeout: float = 10) -> float:
    """The replicas' shares summed, once they add up to 90% of the limit (a share rises
    an interval after the reports call for it): the sum then."""
    name = "wavespeed_bridge_budget_share_requests_per_second"
    deadline = time.monotonic() + timeout
    while True:
        total = sum([await _value(p, name) for p in ports])
        if total >= 0.9 * LIMIT or time.monotonic() > deadline:
            return total
        await asyncio.sleep(0.1)


async def test_three_replicas_share_one_budget_through_a_join_a_kill_and_a_leave(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await create_topics(broker, names, partitions=6)
    await broker.create_topics([names.coordination])
    sim.set_faults(requests_per_second=LIMIT)  # the account's own limit, at the API
    # Tasks that run for minutes, polled every 0.2 s: demand far above the budget.
    ids = await sim_create(sim, [{"model": "m", "duration_s": 600} for _ in range(300)])
    await produce(broker.bootstrap, names.input, ids)
    data = _shared(broker, sim, names)
    configs = [data, _replica(data), _replica(data)]
    ports = [c["server"]["port"] for c in configs]
    with _daemons() as procs:
        procs.append(spawn_daemon(configs[0], tmp_path, log_name="a.log"))
        await _sees(ports[:1], 1)
        procs += [
            spawn_daemon(c, tmp_path, log_name=f"{n}.log")
            for c, n in zip(configs[1:], "bc", strict=True)
        ]
        await _sees(ports, 3)  # joined: three shares
        three = await _shares(ports)
        procs[2].send_signal(signal.SIGKILL)  # died: its share goes to the others
        procs[2].wait()
        await _sees(ports[:2], 2)
        two = await _shares(ports[:2])
        procs[1].send_signal(signal.SIGTERM)  # left cleanly: at once
        left_at = time.monotonic()
        await _sees(ports[:1], 1)
        left_in = time.monotonic() - left_at
        one = await _shares(ports[:1])
        assert await asyncio.to_thread(procs[1].wait, 30) == 0
    limit = sum(sim.limited_per_second.values())
    print(
        f"shared budget: shares {three:.1f} / {two:.1f} / {one:.1f} req/s with 3 / 2 / 1"
        f" replicas, leave seen in {left_in:.1f}s, {limit} 429s,"
        f" busiest second {max(sim.per_second.values())} requests"
    )
    assert limit == 0  # the account's limit was never hit
    for total in (three, two, one):  # the whole budget, less the headroom, never more
        assert 0.9 * LIMIT <= total <= LIMIT
    assert left_in < 5.0  # a clean leave is known within a few report intervals


async def test_a_429_seen_by_one_replica_pauses_every_replica(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await create_topics(broker, names, partitions=4)
    await broker.create_topics([names.coordination])
    ids = await sim_create(sim, [{"model": "m", "duration_s": 600} for _ in range(100)])
    await produce(broker.bootstrap, names.input, ids)
    data = _shared(broker, sim, names)
    configs = [data, _replica(data)]
    ports = [c["server"]["port"] for c in configs]
    with _daemons() as procs:
        procs += [
            spawn_daemon(c, tmp_path, log_name=f"{n}.log")
            for c, n in zip(configs, "ab", strict=True)
        ]
        await _sees(ports, 2)
        sim.set_faults(next_429s=1, retry_after_s=4)  # whoever polls next is told to wait 4 s
        await wait_until(lambda: sum(sim.limited_per_second.values()) == 1, timeout=30)
        (second,) = sim.limited_per_second
        for port in ports:  # both paused, each counts the pause
            await scrape_until(
                port,
                lambda t: (
                    metric_value(
                        t, "wavespeed_bridge_api_pause_seconds_total", reason="rate_limited"
                    )
                    > 0
                ),
            )
        peers = [await _value(p, "wavespeed_bridge_peer_pauses_total") for p in ports]
        await wait_until(lambda: time.time() > second + 6, timeout=30)
    # The pause ran from within `second` to 4 s later; the other replica heard of it within
    # a report interval: the two seconds after the next were silent.
    assert sorted(peers) == [0, 1]  # one replica saw the 429, the other was told
    assert sim.per_second[second + 2] == 0 and sim.per_second[second + 3] == 0, dict(sim.per_second)


async def test_without_the_coordination_topic_a_replica_keeps_to_the_safe_share(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await create_topics(broker, names)  # and no coordination topic, yet
    ids = await sim_create(sim, [{"model": "m", "duration_s": 600} for _ in range(50)])
    await produce(broker.bootstrap, names.input, ids)
    data = _shared(broker, sim, names)
    port = data["server"]["port"]
    log = tmp_path / "daemon.log"
    with _daemons() as procs:
        procs.append(spawn_daemon(data, tmp_path))
        text = await scrape_until(
            port, lambda t: metric_value(t, "wavespeed_bridge_api_responses_total") > 20, 30
        )
        assert metric_value(text, "wavespeed_bridge_budget_coordinated") == 0
        assert metric_value(text, "wavespeed_bridge_budget_share_requests_per_second") == 10.0
        await broker.create_topics([names.coordination])  # found by the next look
        await _sees([port], 1, timeout=30)
        share = await _shares([port])
    missing = [line for line in log.read_text().splitlines() if "cluster topic missing" in line]
    assert len(missing) == 1 and names.coordination in missing[0]  # said once
    assert share == pytest.approx(0.97 * LIMIT)


async def test_a_replica_that_restarts_polls_like_a_warm_one(
    broker: Broker, sim: Simulator, tmp_path: Path
) -> None:
    """Tasks of a model that takes 20 s, where the prior guesses 5 s: a replica that learned
    it publishes what it learned; a new replica reads it and polls as warm, while one with
    an empty state topic polls as the prior says."""
    runs: dict[str, float] = {}
    learned, cold = Names(), Names()
    for n in (learned, cold):
        await create_topics(broker, n, partitions=2)
        await broker.create_topics([n.coordination, n.state])

    async def tasks(n: Names, count: int) -> list[str]:
        ids = await sim_create(
            sim, [{"model": "m", "duration_s": 20.0, "outcome": "completed"} for _ in range(count)]
        )
        await produce(broker.bootstrap, n.input, ids)
        return ids

    def config(n: Names) -> dict[str, Any]:
        return config_data(
            broker,
            sim.base_url,
            n,
            polling={"policy": "adaptive", "default_timeout_s": 120},
            cluster={"report_interval_s": 0.5, "state_interval_s": 5.0},
        )

    async def run(n: Names, name: str, count: int) -> float:
        """Polls per task of ``count`` tasks on a daemon of its own."""
        ids = await tasks(n, count)
        with _daemons() as procs:
            procs.append(spawn_daemon(config(n), tmp_path, log_name=f"{name}.log"))
            await read_every_task(broker.bootstrap, [n.completed], ids, timeout=120)
            procs[0].send_signal(signal.SIGTERM)  # publishes what it learned on the way out
            assert await asyncio.to_thread(procs[0].wait, 30) == 0
        return sum(sim.tasks[i].polls for i in ids) / count

    runs["first, cold"] = await run(learned, "first", 40)
    runs["restarted"] = await run(learned, "restarted", 40)
    runs["cold"] = await run(cold, "cold", 40)
    print("polls per task:", {k: round(v, 2) for k, v in runs.items()})
    adopted = (tmp_path / "restarted.log").read_text()
    assert "learned state taken from the state topic" in adopted
    assert runs["restarted"] <= 0.7 * runs["cold"]  # warm: far fewer polls than the prior's
