"""Fault injection on the real broker and simulator: rebalances, long tasks, outages, crashes."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import httpx
import pytest

from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    API_KEY,
    Names,
    OwnBroker,
    StartBroker,
    committed,
    create_topics,
    feed_slowly,
    join_then_leave,
    make_config,
    metric_value,
    produce,
    read_all,
    read_every_task,
    running_bridge,
    scrape,
    scrape_until,
    sim_create,
    subjects,
    wait_for_commits,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("replicas", "partitions", "tasks"), [(2, 4, 1000), (3, 6, 1500)])
async def test_rebalance_replicas_join_and_leave_while_tasks_flow(
    broker: Broker, sim: Simulator, names: Names, replicas: int, partitions: int, tasks: int
) -> None:
    await create_topics(broker, names, partitions=partitions)
    rng = random.Random(5)
    ids = await sim_create(
        sim,
        [
            {"model": "m", "duration_s": rng.uniform(0.2, 3.0), "outcome": "completed"}
            for _ in range(tasks)
        ],
    )
    configs = [
        make_config(broker, sim.base_url, names, polling={"interval_s": 0.5})
        for _ in range(replicas)
    ]
    async with running_bridge(configs[0]) as a:
        feeding = asyncio.create_task(feed_slowly(broker.bootstrap, names.input, ids, seconds=6.0))
        await asyncio.sleep(1.0)
        others = await join_then_leave(configs[1:])  # partitions move to each, then back
        # they left, last first: their partitions come back to a
        await feeding
        got = await read_every_task(broker.bootstrap, [names.completed], ids, timeout=60)
        text_a = await scrape(a.server.port)
    counts = subjects(got)
    assert set(counts) == set(ids)  # nothing lost
    duplicates = sum(c - 1 for c in counts.values())
    risk = metric_value(text_a, "wavespeed_bridge_rebalance_duplicate_risk_tasks_total") + sum(
        b.metrics.rebalance_duplicates._value.get() for b in others
    )
    # Every duplicate is one the bridges counted as at risk when its partition moved.
    print(
        f"rebalance, {replicas} replicas: {tasks} ids, {len(got)} events,"
        f" {duplicates} duplicates, risk {risk:g}"
    )
    assert duplicates <= risk
    assert metric_value(text_a, "wavespeed_bridge_rebalances_total") >= 2
    positions = await wait_for_commits(
        broker.bootstrap, names.group, names.input, partitions, total=tasks
    )
    assert sum(positions) == tasks


async def test_long_tasks_do_not_get_the_member_ejected(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await create_topics(broker, names)
    ids = await sim_create(
        sim, [{"model": "m/video", "duration_s": 5.0, "outcome": "completed"} for _ in range(4)]
    )
    config = make_config(
        broker,
        sim.base_url,
        names,
        kafka={"max_poll_interval_ms": 2000},
        polling={"max_in_flight": 2, "interval_s": 0.5},
    )
    async with running_bridge(config) as bridge:
        await produce(broker.bootstrap, names.input, ids)
        # At the cap, fetching pauses instead of buffering (the first 5 s task is still out).
        await scrape_until(
            bridge.server.port,
            lambda t: metric_value(t, "wavespeed_bridge_consumer_paused") == 1,
            timeout=10,
        )
        got = await read_all(broker.bootstrap, [names.completed], expect=4, timeout=30)
        text = await scrape(bridge.server.port)
    assert sorted(subjects(got)) == sorted(ids)
    # 10 s of tasks against a 2 s max.poll.interval: still one assignment, no rebalance loop.
    assert metric_value(text, "wavespeed_bridge_rebalances_total") == 1


async def test_duplicate_ids_polled_once_each_offset_committed(
    broker: Broker, sim: Simulator, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sim, "record_poll_times", True)
    await create_topics(broker, names)
    config = make_config(broker, sim.base_url, names, polling={"interval_s": 0.5, "jitter": 0})
    async with running_bridge(config) as bridge:
        (task,) = await sim_create(sim, [{"model": "m", "duration_s": 600, "outcome": "completed"}])
        await produce(broker.bootstrap, names.input, [task, {"id": task, "metadata": {"n": 2}}])
        await wait_until(lambda: task in bridge.tasks, timeout=20)
        await produce(broker.bootstrap, names.input, [task])  # while the first is in flight
        await scrape_until(
            bridge.server.port,
            lambda t: metric_value(t, "wavespeed_bridge_duplicate_tasks_total") == 2,
        )
        await wait_until(lambda: sim.tasks[task].polls >= 3, timeout=20)
        sim_task = sim.tasks[task]
        sim_task.duration_s = time.monotonic() - sim_task.created  # it finishes now
        got = await read_all(broker.bootstrap, [names.completed], expect=1, settle=1.5)
    assert len(got) == 1  # one event for the three messages
    records = got[0].event["data"]["input"]["records"]
    assert [r["offset"] for r in records] == [0, 1, 2]
    # One poller, every 0.5 s: never two polls closer than the interval.
    gaps = [b - a for a, b in itertools.pairwise(sim_task.poll_times)]
    assert gaps and min(gaps) >= 0.45, gaps
    assert await committed(broker.bootstrap, names.group, names.input) == [3]


async def _broker_freeze_scenario(sim: Simulator, own: OwnBroker) -> dict[str, float]:
    """A broker of its own frozen with SIGSTOP for 30 s while tasks finish."""
    names = Names()
    await create_topics(own, names, partitions=2)
    ids = await sim_create(
        sim,
        [{"model": "m", "duration_s": 1.0 + i * 0.5, "outcome": "completed"} for i in range(20)],
    )
    config = make_config(own, sim.base_url, names, polling={"max_in_flight": 50})
    async with running_bridge(config) as bridge:
        await produce(own.bootstrap, names.input, ids)
        await wait_until(lambda: bridge.open_records == 20, timeout=20)
        own.freeze()
        polls_at_freeze = sim.requests
        not_ready = False
        max_pending = 0.0
        for _ in range(300):  # 30 s
            await asyncio.sleep(0.1)
            not_ready = not_ready or not bridge.readiness()[0]
            max_pending = max(max_pending, float(len(bridge.publishing)))
        polls_during = sim.requests - polls_at_freeze
        finished_in_freeze = len(bridge.publishing)
        async with httpx.AsyncClient() as client:
            readyz = await client.get(f"http://127.0.0.1:{bridge.server.port}/readyz")
        own.thaw()
        got = await read_every_task(own.bootstrap, [names.completed], ids, timeout=60, settle=0.0)
        positions = await wait_for_commits(own.bootstrap, names.group, names.input, 2, total=20)
        await wait_until(lambda: bridge.readiness()[0], timeout=30)
    assert set(subjects(got)) == set(ids)
    return {
        "not_ready": float(not_ready),
        "readyz_status": float(readyz.status_code),
        "polls_during": float(polls_during),
        "held": float(finished_in_freeze),
        "max_pending": max_pending,
        "committed": float(sum(positions)),
    }


async def _api_outage_scenario(broker: Broker, mode: str) -> dict[str, object]:
    """The API answers 503 (or refuses connections) for 60 s."""
    names = Names()
    sim = Simulator(api_key=API_KEY, seed=2)
    await sim.start()
    try:
        await create_topics(broker, names)
        done_in_outage, normal = await sim_create(
            sim,
            [
                {"model": "m", "duration_s": 10.0, "outcome": "completed"},
                {"model": "m", "duration_s": 0.5, "outcome": "completed"},
            ],
        )
        (doomed,) = await sim_create(sim, [{"model": "m", "duration_s": 500}])
        config = make_config(
            broker, sim.base_url, names, polling={"interval_s": 1.0, "backoff_max_s": 2.0}
        )
        async with running_bridge(config) as bridge:
            await produce(
                broker.bootstrap,
                names.input,
                [
                    {"id": done_in_outage, "timeout_s": 300},
                    {"id": normal},
                    {"id": doomed, "timeout_s": 20},
                ],
            )
            await read_all(broker.bootstrap, [names.completed], expect=1, timeout=10)
            sim.set_faults(outage_s=60, outage_mode=mode)
            during = await scrape_until(  # the bridge has met the outage
                bridge.server.port,
                lambda t: (
                    metric_value(t, "wavespeed_bridge_api_up") == 0
                    and metric_value(t, "wavespeed_bridge_api_errors_total") > 0
                ),
            )
            ready_during = bridge.readiness()[0]
            # The last event needs the API back: waiting for it outlasts the 60 s outage.
            got = await read_all(broker.bootstrap, names.outputs, expect=3, timeout=90)
    finally:
        await sim.stop()
    events = {r.event["subject"]: r.event for r in got}
    return {
        "events": events,
        "ids": (done_in_outage, normal, doomed),
        "api_up_during": metric_value(during, "wavespeed_bridge_api_up"),
        "errors_during": metric_value(during, "wavespeed_bridge_api_errors_total"),
        "ready_during": ready_during,
    }


async def test_outages_broker_frozen_30s_and_api_down_60s(
    broker: Broker, sim: Simulator, own_broker: StartBroker
) -> None:
    # Run concurrently: three independent stacks, one minute of wall time.
    own = await own_broker()
    frozen, down_503, refused = await asyncio.gather(
        _broker_freeze_scenario(sim, own),
        _api_outage_scenario(broker, "503"),
        _api_outage_scenario(broker, "refuse"),
    )
    # Broker frozen: polling went on, readiness dropped, finished events were held (within
    # the in-flight cap) and everything was published and committed after.
    assert frozen["not_ready"] == 1 and frozen["readyz_status"] == 503
    assert frozen["polls_during"] > 0
    assert 0 < frozen["held"] <= 50 and frozen["max_pending"] <= 50
    assert frozen["committed"] == 20
    for outcome in (down_503, refused):
        ids = outcome["ids"]
        assert isinstance(ids, (list, tuple))
        done_in_outage, normal, doomed = ids
        events = outcome["events"]
        assert isinstance(events, dict)
        assert events[normal]["type"].endswith(".completed")
        # Completed during the outage: reported completed once the API is back.
        assert events[done_in_outage]["type"].endswith(".completed")
        # The deadline genuinely passed during the outage: a timeout that says why.
        assert events[doomed]["type"].endswith(".timeout")
        assert "deadline of 20s passed; last poll:" in events[doomed]["data"]["error"]
        assert outcome["api_up_during"] == 0 and outcome["errors_during"] > 0  # type: ignore[operator]
        assert outcome["ready_during"] is True  # documented: API outages do not unready
    assert "HTTP 503" in down_503["events"][down_503["ids"][2]]["data"]["error"]  # type: ignore[index]
    assert "network error" in refused["events"][refused["ids"][2]]["data"]["error"]  # type: ignore[index]


async def test_broker_restart_mid_flow_loses_nothing_and_resumes_by_itself(
    sim: Simulator, own_broker: StartBroker
) -> None:
    own = await own_broker()
    if not own.features.persistent:
        await _restart_of_a_broker_without_a_log(sim, own)
        return
    names = Names()
    await create_topics(own, names, partitions=2)
    rng = random.Random(11)
    tasks = await sim_create(
        sim,
        [
            {"model": "m", "duration_s": rng.uniform(0.3, 4.0), "outcome": "completed"}
            for _ in range(60)
        ],
    )
    config = make_config(own, sim.base_url, names)
    async with running_bridge(config) as bridge:
        await produce(own.bootstrap, names.input, tasks)
        await read_all(own.bootstrap, [names.completed], expect=10, timeout=30)
        own.stop()  # SIGTERM: the broker shuts down cleanly, its log stays on disk
        await wait_until(lambda: not bridge.readiness()[0], timeout=20)
        down_for = 3.0  # tasks finish at the API meanwhile; their events wait
        await asyncio.sleep(down_for)
        own.start()
        await own.wait_ready()
        got = await read_every_task(own.bootstrap, [names.completed], tasks, timeout=60)
        await wait_until(lambda: bridge.readiness()[0], timeout=30)
        positions = await wait_for_commits(own.bootstrap, names.group, names.input, 2, total=60)
    counts = subjects(got)
    assert set(counts) == set(tasks)  # nothing lost
    duplicates = sum(c - 1 for c in counts.values())
    print(f"broker restart: 60 tasks, {len(got)} events, {duplicates} duplicates")
    assert sum(positions) == 60  # resumed from its committed offsets, to the end


async def _restart_of_a_broker_without_a_log(sim: Simulator, own: OwnBroker) -> None:
    """Tansu keeps its log in memory: a restart recreates empty topics. Nothing is consumed
    before the restart, as the client may still hold its old fetch position."""
    names = Names()
    await create_topics(own, names)
    config = make_config(own, sim.base_url, names)
    async with running_bridge(config) as bridge:
        own.stop()
        await wait_until(lambda: not bridge.readiness()[0], timeout=20)
        own.start()
        await own.wait_ready()
        await create_topics(own, names)
        tasks = await sim_create(
            sim, [{"model": "m", "duration_s": 0.1, "outcome": "completed"} for _ in range(3)]
        )
        await produce(own.bootstrap, names.input, tasks)
        got = await read_every_task(own.bootstrap, [names.completed], tasks, timeout=60, settle=0.0)
        assert set(subjects(got)) == set(tasks)
        await wait_until(lambda: bridge.readiness()[0], timeout=10)
