"""Webhook deliveries in the pure core and the policy that polls only overdue tasks,
driven with a ManualClock."""

from __future__ import annotations

import json
import random
from typing import Any

from bridge.config import build_config
from bridge.core import facts
from bridge.core.book import Core
from bridge.core.clock import ManualClock
from bridge.core.facts import Effect, Publish
from bridge.core.messages import Record
from bridge.core.outcomes import Kind, Outcome, Prediction
from bridge.core.policy import FixedInterval
from bridge.core.tasks import Task
from bridge.core.webhook_policy import MIN_DELIVERED, WINDOW, WebhookAware

T = "in"


def make(clock: ManualClock, **hooks: Any) -> tuple[Core, WebhookAware]:
    config = build_config(
        {
            "kafka": {"input_topic": T},
            "polling": {"interval_s": 1.0, "jitter": 0.0, "default_timeout_s": 600},
            "webhooks": {"enabled": True, **hooks},
        },
        env={},
    )
    policy = WebhookAware(FixedInterval(1.0, jitter=0.0))
    core = Core(config, policy=policy, rng=random.Random(1), now=clock.monotonic())
    core.assign({(T, 0): (None, "")})  # partition 0 is this member's
    return core, policy


def rec(offset: int, task_id: str, model: str = "m") -> Record:
    value = json.dumps({"id": task_id, "model": model}).encode()
    return Record(T, 0, offset, None, value, (), None)


def done(model: str = "m") -> Outcome:
    return Outcome(Kind.COMPLETED, None, Prediction(status="completed", model=model, outputs=["u"]))


def deliver(core: Core, clock: ManualClock, task_id: str, **kw: Any) -> list[Effect]:
    return core.on_delivery(
        task_id,
        kw.pop("outcome", done()),
        webhook_id=f"msg-{task_id}",
        received=clock.time(),
        mine=kw.pop("mine", True),
        at=clock.read(),
    )


def kinds(effects: list[Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


def test_a_delivery_finishes_the_tracked_task_without_a_poll() -> None:
    clock = ManualClock()
    core, _ = make(clock)
    core.on_record(rec(0, "pred_a"), clock.read())
    clock.advance(3.5)  # three polls would have gone out by now
    out = deliver(core, clock, "pred_a")
    assert kinds(out) == ["DeliveryApplied", "Finished", "Publish"]
    applied = out[0]
    assert isinstance(applied, facts.DeliveryApplied) and applied.spared == 3
    (p,) = [e for e in out if isinstance(e, Publish)]
    event = json.loads(p.record.value or b"")
    assert event["type"].endswith(".completed") and event["data"]["polls"] == 0
    assert core.take_due(clock.monotonic() + 100, 10) == []  # nothing left to poll


def test_confirm_by_poll_sends_one_poll_at_once_instead() -> None:
    clock = ManualClock()
    core, _ = make(clock, confirm_by_poll=True)
    core.on_record(rec(0, "pred_a"), clock.read())
    clock.advance(0.3)
    out = deliver(core, clock, "pred_a")
    assert kinds(out) == ["DeliveryApplied"]
    ((task, due),) = core.take_due(clock.monotonic(), 10)
    assert task.task_id == "pred_a" and due == clock.monotonic()


def test_a_delivery_that_is_not_an_outcome_changes_nothing() -> None:
    clock = ManualClock()
    core, _ = make(clock)
    core.on_record(rec(0, "pred_a"), clock.read())
    running = Outcome(Kind.PENDING, None, Prediction(status="processing"))
    assert deliver(core, clock, "pred_a", outcome=running) == []
    assert "pred_a" in core.polling()


def test_a_delivery_before_its_task_is_remembered_then_applied() -> None:
    clock = ManualClock()
    core, _ = make(clock)
    assert deliver(core, clock, "pred_a") == []  # remembered
    clock.advance(2.0)
    out = core.on_record(rec(0, "pred_a"), clock.read())
    assert kinds(out) == ["Consumed", "DeliveryApplied", "Finished", "Publish"]


def test_remembered_deliveries_expire_and_are_bounded() -> None:
    clock = ManualClock()
    core, _ = make(clock, pending_ttl_s=60, pending_max=2)
    deliver(core, clock, "pred_a", mine=True)
    deliver(core, clock, "pred_b", mine=False)
    (evicted,) = deliver(core, clock, "pred_c", mine=True)  # over the bound: the oldest goes
    assert isinstance(evicted, facts.DeliveryExpired) and evicted.task_id == "pred_a"
    core.delivery_applied("pred_c")  # another replica acted on it
    assert core.expire_deliveries(clock.monotonic() + 59) == []
    (expired,) = core.expire_deliveries(clock.monotonic() + 61)
    assert isinstance(expired, facts.DeliveryExpired)
    assert (expired.task_id, expired.mine) == ("pred_b", False)


def _task(i: int, model: str = "m", created: float = 0.0) -> Task:
    return Task(
        task_id=f"t{i}",
        model=model,
        created=created,
        created_wall=1000.0 + created,
        first_seen=created,
        timeout_s=600,
    )


def test_polls_wait_for_overdue_deliveries_once_they_arrive_and_resume_when_they_stop() -> None:
    policy = WebhookAware(FixedInterval(1.0, jitter=0.0))
    fresh = _task(0)
    assert policy.first_poll(fresh, 0.0) == 1.0  # no history: the wrapped schedule
    for i in range(MIN_DELIVERED):  # deliveries at 3 s of age
        policy.finished(_task(i), 1000.0 + 3.0)
    assert policy.trusted("m")
    assert policy.first_poll(fresh, 0.0) == 3.0 * 1.2 + 0.25  # when its delivery is overdue
    assert policy.first_poll(_task(99, model="other"), 0.0) == 1.0  # per model
    for i in range(WINDOW):  # deliveries stop: polls find the tasks
        policy.finished(_task(100 + i), None)
    assert not policy.trusted("m") and policy.first_poll(fresh, 0.0) == 1.0


def test_a_late_delivery_still_counts_as_delivered() -> None:
    policy = WebhookAware(FixedInterval(1.0, jitter=0.0))
    for i in range(MIN_DELIVERED):
        policy.finished(_task(i), 1003.0)
    for i in range(10, 10 + MIN_DELIVERED + 1):
        policy.finished(_task(i), None)  # found by polls first
    assert not policy.trusted("m")  # 5 of 11
    assert policy.late("t10", 1004.0)  # its delivery arrives after all
    assert policy.trusted("m")  # 6 of 11
    assert not policy.late("t10", 1004.0) and not policy.late("unknown", 1004.0)


def _trust(policy: WebhookAware) -> None:
    """Deliveries at 3 s of age: a poll waits until 3 x 1.2 + 0.25 = 3.85 s."""
    for i in range(MIN_DELIVERED):
        policy.finished(_task(1000 + i), 1000.0 + 3.0)
    assert policy.trusted("m")


def _due(core: Core, now: float) -> list[tuple[str, float]]:
    return [(task.task_id, due) for task, due in core.take_due(now, 100)]


def test_polls_wait_for_deliveries_only_while_the_feed_is_live() -> None:
    clock = ManualClock()
    core, policy = make(clock)
    _trust(policy)
    core.on_record(rec(0, "pred_a"), clock.read())
    clock.advance(2.0)
    assert _due(core, clock.monotonic()) == []  # deferred past its 1 s poll

    # The feed stops: the deferred poll goes back on the 1 s schedule, which has passed.
    (down,) = core.webhook_feed(False, clock.monotonic(), "partitions [1] not caught up")
    assert down == facts.WebhookFeed(False, "partitions [1] not caught up", 1)
    assert not policy.trusted("m")
    assert _due(core, clock.monotonic()) == [("pred_a", 2.0)]
    # Still running, it is polled again on the schedule, not when twice as old.
    running = Outcome(Kind.PENDING, 200, Prediction(status="processing", model="m"))
    core.on_outcome(core.polling()["pred_a"], running, clock.read())
    # A task consumed meanwhile is polled as without webhooks.
    core.on_record(rec(1, "pred_b"), clock.read())
    assert _due(core, 2.99) == []
    assert _due(core, 3.0) == [("pred_a", 3.0), ("pred_b", 3.0)]

    # Live again: the next task's poll waits for its delivery once more.
    clock.advance(1.0)
    assert core.webhook_feed(True, clock.monotonic()) == [facts.WebhookFeed(True, "", 0)]
    core.on_record(rec(2, "pred_c"), clock.read())
    assert _due(core, 3.0 + 3.84) == []
    assert _due(core, 3.0 + 3.85) == [("pred_c", 3.0 + 3.85)]


def _rounded(due: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(task_id, round(at, 9)) for task_id, at in due]


def test_a_feed_that_catches_up_puts_the_polls_back_to_wait_for_deliveries() -> None:
    """A restarted replica's feed starts behind (it reads the last pending_ttl_s of the
    topic): tasks taken meanwhile go on the wrapped schedule, and back to waiting for their
    deliveries once the feed has caught up, instead of each costing a poll."""
    clock = ManualClock()
    core, policy = make(clock)
    _trust(policy)  # learned (from the state topic, or before the feed fell behind)
    core.webhook_feed(False, clock.monotonic(), "partitions [0] not caught up")
    core.on_record(rec(0, "pred_a"), clock.read())
    clock.advance(0.5)
    core.on_record(rec(1, "pred_b"), clock.read())
    assert not policy.trusted("m")
    clock.advance(0.2)  # 0.7 s: caught up, before either 1 s poll went out
    assert core.webhook_feed(True, clock.monotonic()) == [facts.WebhookFeed(True, "", 2)]
    assert _due(core, 3.84) == []
    assert _rounded(_due(core, 3.85)) == [("pred_a", 3.85)]  # its delivery is overdue
    assert _due(core, 4.34) == []
    assert _rounded(_due(core, 4.35)) == [("pred_b", 4.35)]


def test_a_feed_going_down_leaves_backoffs_and_confirming_polls_alone() -> None:
    clock = ManualClock()
    core, policy = make(clock, confirm_by_poll=True)
    _trust(policy)
    core.on_record(rec(0, "pred_a"), clock.read())
    core.on_record(rec(1, "pred_b"), clock.read())
    clock.advance(3.85)
    assert [i for i, _ in _due(core, clock.monotonic())] == ["pred_a", "pred_b"]
    failed = Outcome(Kind.TRANSIENT, 503, reason="HTTP 503")
    core.on_outcome(core.polling()["pred_a"], failed, clock.read())  # backs off
    pending = Outcome(Kind.PENDING, 200, Prediction(status="processing", model="m"))
    core.on_outcome(core.polling()["pred_b"], pending, clock.read())  # waits until 7.7 s
    deliver(core, clock, "pred_b")  # confirming poll: now
    (down,) = core.webhook_feed(False, clock.monotonic(), "stalled")
    assert isinstance(down, facts.WebhookFeed) and down.rescheduled == 0
    assert _due(core, clock.monotonic()) == [("pred_b", 3.85)]  # the confirming poll, still
    (retry,) = _due(core, 60.0)
    assert retry[0] == "pred_a" and retry[1] > clock.monotonic()  # its backoff, not "now"
