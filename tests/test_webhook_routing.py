"""Webhooks first, polling as the safety net (issue 13), on Apache Kafka with the simulator
sending signed deliveries over real HTTP: a delivery reaches the replica that tracks its
task through the webhook topic, whichever replica received it."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.config import Config
from bridge.core.webhook_signature import signed_headers
from bridge.local.broker import Broker, free_port
from bridge.local.simulator import Simulator
from bridge.shell.app import Bridge
from tests.helpers import (
    Names,
    config_data,
    create_topics,
    has_partitions,
    make_config,
    metric_value,
    produce,
    read_all,
    running_bridge,
    scrape,
    scrape_until,
    sim_create,
    spawn_daemon,
    subjects,
    wait_until,
)

pytestmark = pytest.mark.integration


def _webhooks(names: Names, port: int, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "port": port, "topic": f"hooks-{names.tag}", **extra}


def _config(broker: Broker, sim: Simulator, names: Names, port: int, **hooks: Any) -> Config:
    # Polls every 30 s: a task finished within seconds was finished by its delivery.
    return make_config(
        broker,
        sim.base_url,
        names,
        polling={"interval_s": 30.0, "jitter": 0.0, "default_timeout_s": 120},
        webhooks=_webhooks(names, port, **hooks),
    )


def _url(bridge: Bridge) -> str:
    assert bridge.webhook_server is not None
    return f"http://127.0.0.1:{bridge.webhook_server.port}/webhooks/wavespeed"


async def _topics(broker: Broker, names: Names, partitions: int = 2) -> None:
    await create_topics(broker, names, partitions=partitions)
    await broker.create_topics([f"hooks-{names.tag}"], partitions=2)


def _polls(sim: Simulator, ids: list[str]) -> int:
    return sum(sim.tasks[i].polls for i in ids)


def _answered(sim: Simulator, ids: list[str]) -> int:
    wanted = set(ids)
    return sum(1 for a in sim.webhook_attempts if a.task_id in wanted and a.status is not None)


async def test_a_delivery_received_by_one_replica_is_applied_by_the_owner(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await _topics(broker, names)
    secret = sim.webhook_secret
    a_cfg = _config(broker, sim, names, free_port())
    b_cfg = _config(broker, sim, names, free_port())
    async with (
        running_bridge(a_cfg, webhook_secret=secret) as a,
        running_bridge(b_cfg, webhook_secret=secret) as b,
    ):
        # One partition each.
        await wait_until(lambda: has_partitions(a) and has_partitions(b), timeout=30)
        # Every delivery goes to replica a, whichever replica tracks the task.
        ids = await sim_create(
            sim, [{"model": "m", "duration_s": 0.5, "webhook": _url(a)} for _ in range(20)]
        )
        for i, task in enumerate(ids):
            await produce(broker.bootstrap, names.input, [task], partition=i % 2)
        got = await read_all(broker.bootstrap, [names.completed], expect=20, timeout=30, settle=1.0)
        # The receiver counts a delivery before it answers, and the simulator records the answer.
        await wait_until(lambda: _answered(sim, ids) == 20, timeout=10)
        text_a, text_b = await scrape(a.server.port), await scrape(b.server.port)
    events = subjects(got)
    received_a = metric_value(
        text_a, "wavespeed_bridge_webhook_deliveries_total", result="accepted"
    )
    received_b = metric_value(
        text_b, "wavespeed_bridge_webhook_deliveries_total", result="accepted"
    )
    applied_b = metric_value(
        text_b, "wavespeed_bridge_webhook_finished_tasks_total", how="delivery"
    )
    applied_a = metric_value(
        text_a, "wavespeed_bridge_webhook_finished_tasks_total", how="delivery"
    )
    print(
        f"routing: 20 tasks, a received {received_a:g}, b received {received_b:g}; "
        f"a applied {applied_a:g}, b applied {applied_b:g}; {_polls(sim, ids)} polls"
    )
    assert events == dict.fromkeys(ids, 1)  # exactly one event per task
    assert received_a == 20 and received_b == 0
    assert applied_a + applied_b == 20 and applied_b > 0  # b acted on deliveries a received
    assert _polls(sim, ids) == 0  # no task needed a poll
    assert (
        metric_value(text_a, "wavespeed_bridge_webhook_deliveries_total", result="unknown_task")
        == 0
    )


DELIVERIES = "wavespeed_bridge_webhook_deliveries_total"
FINISHED = "wavespeed_bridge_webhook_finished_tasks_total"


def _deliveries(text: str, result: str) -> float:
    return metric_value(text, DELIVERIES, result=result)


async def test_forged_stale_replayed_and_oversized_deliveries_change_nothing(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await _topics(broker, names, partitions=1)
    secret = sim.webhook_secret
    config = _config(broker, sim, names, free_port(), max_body_bytes=4096)
    (task,) = await sim_create(sim, [{"model": "m", "duration_s": 0.2}])  # no webhook of its own
    async with running_bridge(config, webhook_secret=secret) as bridge:
        await produce(broker.bootstrap, names.input, [task])
        await wait_until(lambda: task in bridge.tasks, timeout=20)
        body = json.dumps({"id": task, "status": "completed", "model": "m", "outputs": ["u"]})
        now = int(time.time())
        good = signed_headers(secret, "msg_1", now, body.encode())
        forged = signed_headers("whsec_not-the-secret", "msg_2", now, body.encode())
        stale = signed_headers(secret, "msg_3", now - 3600, body.encode())
        async with httpx.AsyncClient() as client:
            url = _url(bridge)
            answers = {
                "forged": await client.post(url, content=body, headers=forged),
                "stale": await client.post(url, content=body, headers=stale),
                "unsigned": await client.post(url, content=body),
                "oversized": await client.post(
                    url,
                    content=b"x" * 10_000,
                    headers=signed_headers(secret, "msg_4", now, b"x" * 10_000),
                ),
            }
            # Had any of them been applied, its event would be out within this window.
            before = await read_all(
                broker.bootstrap, [names.completed], timeout=2.0, until=lambda rs: bool(rs)
            )
            still_tracked = task in bridge.tasks
            accepted = await client.post(url, content=body, headers=good)
            replayed = await client.post(url, content=body, headers=good)
        got = await read_all(broker.bootstrap, [names.completed], expect=1, timeout=20, settle=1.0)
        text = await scrape(bridge.server.port)
    codes = {k: r.status_code for k, r in answers.items()}
    assert codes == {"forged": 401, "stale": 400, "unsigned": 401, "oversized": 413}
    assert before == [] and still_tracked  # nothing changed
    assert accepted.status_code == 200 and replayed.status_code == 200
    assert [r.event["subject"] for r in got] == [task]  # one event, replay or not
    counted = {
        r: _deliveries(text, r)
        for r in ("bad_signature", "stale", "unsigned", "too_large", "accepted", "replay")
    }
    assert counted == {
        "bad_signature": 1,
        "stale": 1,
        "unsigned": 1,
        "too_large": 1,
        "accepted": 1,
        "replay": 1,
    }


async def test_every_task_still_finishes_when_every_delivery_is_lost(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await _topics(broker, names, partitions=1)
    sim.set_webhook_faults(loss_rate=1.0)
    config = make_config(
        broker,
        sim.base_url,
        names,
        polling={"interval_s": 0.5, "default_timeout_s": 60},
        webhooks=_webhooks(names, free_port()),
    )
    async with running_bridge(config, webhook_secret=sim.webhook_secret) as bridge:
        ids = await sim_create(
            sim, [{"model": "m", "duration_s": 0.5, "webhook": _url(bridge)} for _ in range(20)]
        )
        await produce(broker.bootstrap, names.input, ids)
        got = await read_all(broker.bootstrap, [names.completed], expect=20, timeout=40)
        text = await scrape(bridge.server.port)
    assert sorted(subjects(got)) == sorted(ids)
    assert len(sim.webhooks_lost) == 20
    assert metric_value(text, FINISHED) == 0
    assert _polls(sim, ids) >= 20  # every task found by polling


async def test_a_delivery_before_its_task_id_is_applied_when_the_id_arrives(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await _topics(broker, names, partitions=1)
    config = _config(broker, sim, names, free_port())
    async with running_bridge(config, webhook_secret=sim.webhook_secret) as bridge:
        (task,) = await sim_create(
            sim, [{"model": "m", "duration_s": 0.2, "webhook": _url(bridge)}]
        )

        # The delivery is in before the task id.
        await scrape_until(bridge.server.port, lambda t: _deliveries(t, "accepted") > 0, timeout=20)
        await produce(broker.bootstrap, names.input, [task])
        got = await read_all(broker.bootstrap, [names.completed], expect=1, timeout=20)
    assert [r.event["subject"] for r in got] == [task]
    assert sim.tasks[task].polls == 0  # applied from memory, no poll needed


async def test_a_delivery_acknowledged_just_before_a_crash_still_takes_effect(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await _topics(broker, names, partitions=1)
    secret = sim.webhook_secret
    # The receiver: a daemon of its own (another group and input), killed after its 200.
    other = Names()
    await create_topics(broker, other)
    port = free_port()
    receiver_cfg = config_data(broker, sim.base_url, other, webhooks=_webhooks(names, port))
    receiver = spawn_daemon(
        receiver_cfg, tmp_path, env={"WAVESPEED_WEBHOOK_SECRET": secret}, log_name="receiver.log"
    )
    owner_cfg = _config(broker, sim, names, free_port())
    try:
        # Receiver listening first, so the delivery, not an overdue poll, finishes the task.
        await scrape_until(
            receiver_cfg["server"]["port"],
            lambda t: metric_value(t, "wavespeed_bridge_webhooks_enabled") == 1,
            timeout=60,
        )
        async with running_bridge(owner_cfg, webhook_secret=secret) as owner:
            (task,) = await sim_create(sim, [{"model": "m", "duration_s": 0.1}])
            await produce(broker.bootstrap, names.input, [task])
            await wait_until(lambda: task in owner.tasks, timeout=20)
            body = json.dumps({"id": task, "status": "completed", "model": "m"}).encode()
            headers = signed_headers(secret, "msg_crash", int(time.time()), body)
            url = f"http://127.0.0.1:{port}/webhooks/wavespeed"
            answer = await _post_when_up(url, body, headers)
            receiver.send_signal(signal.SIGKILL)  # right after its 2xx
            receiver.wait(5)
            got = await read_all(broker.bootstrap, [names.completed], expect=1, timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(5)
    assert answer.status_code == 200
    assert [r.event["subject"] for r in got] == [task]
    assert sim.tasks[task].polls == 0  # the delivery, not a poll, finished it


async def _post_when_up(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while True:
            try:
                return await client.post(url, content=body, headers=headers)
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
