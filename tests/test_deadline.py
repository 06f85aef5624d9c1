"""Timeout events come on time whatever the API does (issue 10, defects 5 and 6).

A poll is cut at the task's deadline plus a grace (``policy.request_limit``); a task whose
poll cannot even be sent (a pause, the budget, every request slot taken) is timed out by
the deadline itself (``policy.overdue``). A backlog task, consumed after its deadline,
still gets its one real poll.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from bridge.core.policy import DEADLINE_GRACE_S, overdue, request_limit
from bridge.core.tasks import Task
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    Received,
    create_topics,
    make_config,
    produce,
    read_all,
    running_bridge,
    sim_create,
)


def _task(*, created: float, timeout_s: float, first_seen: float) -> Task:
    return Task(
        task_id="t",
        model=None,
        created=created,
        created_wall=1e9 + created,
        first_seen=first_seen,
        timeout_s=timeout_s,
    )


def test_a_poll_ends_by_the_deadline_plus_the_grace() -> None:
    task = _task(created=100.0, timeout_s=10.0, first_seen=100.5)
    assert request_limit(task, 101.0) == pytest.approx(9.0 + DEADLINE_GRACE_S)
    assert request_limit(task, 110.0) == pytest.approx(DEADLINE_GRACE_S)
    assert request_limit(task, 120.0) == 0.1  # late already: a short look, not none at all
    task.polls = 3
    assert request_limit(task, 109.9) == pytest.approx(0.1 + DEADLINE_GRACE_S)


def test_a_backlog_task_gets_one_full_poll() -> None:
    task = _task(created=100.0, timeout_s=10.0, first_seen=500.0)  # consumed long after
    assert task.deadline == 500.0
    assert request_limit(task, 500.0) is None  # only the client's total limit
    assert not overdue(task, 600.0)  # never timed out before its one poll
    task.polls = 1
    assert request_limit(task, 500.2) == pytest.approx(0.3)
    assert overdue(task, 500.0 + DEADLINE_GRACE_S)


def test_a_waiting_poll_is_overdue_after_the_deadline_and_grace() -> None:
    task = _task(created=100.0, timeout_s=10.0, first_seen=100.5)
    assert not overdue(task, 110.0 + DEADLINE_GRACE_S - 0.01)
    assert overdue(task, 110.0 + DEADLINE_GRACE_S)  # even if it was never polled
    task.polls = 2
    assert overdue(task, 111.0)


# --- the daemon -------------------------------------------------------------------------------

TIMEOUT_S = 3.0


def _lateness(r: Received) -> float:
    """Seconds from the task's deadline (the API's created_at + timeout_s) to the event."""
    d = r.event["data"]
    created = datetime.fromisoformat(d["created_at"].replace("Z", "+00:00")).timestamp()
    sent = datetime.fromisoformat(r.event["time"].replace("Z", "+00:00")).timestamp()
    return sent - (created + TIMEOUT_S)


async def _timeouts(
    broker: Broker, sim: Simulator, names: Names, ids: list[str], **api: object
) -> list[Received]:
    await create_topics(broker, names)
    config = make_config(
        broker,
        sim.base_url,
        names,
        api={"read_timeout_s": 10.0, "total_timeout_s": 60.0, **api},
        polling={"interval_s": 0.5, "backoff_base_s": 0.2, "backoff_max_s": 0.5},
    )
    async with running_bridge(config):
        await produce(
            broker.bootstrap, names.input, [{"id": i, "timeout_s": TIMEOUT_S} for i in ids]
        )
        got = await read_all(broker.bootstrap, [names.failed], expect=len(ids), timeout=30)
    assert sorted(r.event["subject"] for r in got) == sorted(ids)
    for r in got:
        assert r.event["type"] == "ai.wavespeed.prediction.timeout", r.event
    return got


@pytest.mark.integration
async def test_a_stalled_or_trickling_api_does_not_delay_the_timeout(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    """Read timeout 10 s, total 60 s: before, a poll at the deadline held the event ~10 s
    (stall) or for ever (trickle). One request slot: the tasks behind the stalled ones
    cannot be polled at all, and time out by the deadline too."""
    ids = await sim_create(
        sim,
        [
            {"model": "m/slow", "duration_s": 0.1, "behaviour": "stall"},
            {"model": "m/slow", "duration_s": 0.1, "behaviour": "trickle"},
            {"model": "m/slow", "duration_s": 0.1, "behaviour": "stall"},
        ],
    )
    got = await _timeouts(broker, sim, names, ids, max_concurrent_requests=1)
    for r in got:
        assert 0.0 <= _lateness(r) <= 1.0, (r.event["data"]["error"], _lateness(r))
    errors = [r.event["data"]["error"] for r in got]
    assert any("last poll: timeout (no complete response within" in e for e in errors), errors


@pytest.mark.integration
async def test_a_long_rate_limit_pause_does_not_delay_the_timeout(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    """Every poll gets 429 with Retry-After 60: polling pauses past the deadline."""
    ids = await sim_create(sim, [{"model": "m/busy", "duration_s": 0.1} for _ in range(3)])
    sim.set_faults(rate_429=1.0, retry_after_s=60)
    got = await _timeouts(broker, sim, names, ids)
    for r in got:
        assert 0.0 <= _lateness(r) <= 1.0, (r.event["data"]["error"], _lateness(r))
    assert any("last poll: HTTP 429" in r.event["data"]["error"] for r in got)
