"""The pure core, driven directly with a ManualClock: every decision the daemon makes,
including those only the integration tests reached before (rebalances, duplicates in
flight, acknowledgements out of order, pauses, deadlines under a binding budget)."""

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
from bridge.core.tasks import State

T = "in"  # the input topic


def make(clock: ManualClock, **sections: Any) -> Core:
    data: dict[str, Any] = {
        "kafka": {"input_topic": T},
        "polling": {"interval_s": 1.0, "jitter": 0.0, "default_timeout_s": 10},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    config = build_config(data, env={})
    policy = FixedInterval(1.0, jitter=0.0)
    core = Core(config, policy=policy, rng=random.Random(1), now=clock.monotonic())
    core.assign({(T, p): (None, "") for p in range(4)})  # this member's partitions
    return core


def to_commit(core: Core) -> dict[tuple[str, int], int]:
    """The positions the commit loop would commit now (the path production takes)."""
    return {part: planned.position for part, planned in core.commit_plan().items()}


def rec(offset: int, value: str | bytes | dict[str, Any], partition: int = 0) -> Record:
    raw = (
        value
        if isinstance(value, bytes)
        else (value.encode() if isinstance(value, str) else json.dumps(value).encode())
    )
    return Record(T, partition, offset, b"k", raw, (("h", b"v"),), None)


def kinds(effects: list[Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


def published(effects: list[Effect]) -> list[Publish]:
    return [e for e in effects if isinstance(e, Publish)]


def completed(model: str = "m") -> Outcome:
    return Outcome(Kind.COMPLETED, 200, Prediction(status="completed", model=model, outputs=["u"]))


def pending() -> Outcome:
    return Outcome(Kind.PENDING, 200, Prediction(status="processing"))


def poll_all(core: Core, clock: ManualClock, outcome: Outcome) -> list[Effect]:
    out: list[Effect] = []
    for task, _ in core.take_due(clock.monotonic(), 100):
        out += core.on_outcome(task, outcome, clock.read())
    return out


def ack_all(core: Core, clock: ManualClock, effects: list[Effect]) -> list[Effect]:
    out: list[Effect] = []
    for p in published(effects):
        out += core.acknowledged(p.ticket, clock.read())
    return out


def test_a_task_is_polled_at_its_interval_and_its_event_commits_its_offset() -> None:
    clock = ManualClock()
    core = make(clock)
    (fact,) = core.on_record(rec(0, "pred_a"), clock.read())
    assert isinstance(fact, facts.Consumed) and fact.task.task_id == "pred_a"
    assert core.take_due(0.99, 10) == []
    clock.advance(1.0)
    assert poll_all(core, clock, pending()) == []  # polled again in a second
    assert core.next_wakeup(clock.monotonic()) == 2.0
    clock.advance(1.0)
    done = poll_all(core, clock, completed())
    assert kinds(done) == ["Finished", "Publish"]
    event = json.loads(published(done)[0].record.value or b"")
    assert event["type"] == "ai.wavespeed.prediction.completed" and event["data"]["polls"] == 2
    assert to_commit(core) == {}  # not before the broker has it
    assert core.publishing().keys() == {"pred_a"}
    (delivered,) = ack_all(core, clock, done)
    assert isinstance(delivered, facts.Delivered) and delivered.kind == "completed"
    assert to_commit(core) == {(T, 0): 1}
    assert core.in_flight == 0 and core.open_records == 0


def test_bad_input_is_dead_lettered_and_still_commits() -> None:
    clock = ManualClock()
    core = make(clock)
    out = core.on_record(rec(0, b"{not json"), clock.read())
    assert kinds(out) == ["DeadLettered", "Publish"]
    record = published(out)[0].record
    headers = dict(record.headers)
    assert record.topic == "wavespeed.dead-letter" and headers["dlq.reason"] == b"invalid_json"
    assert record.value == b"{not json" and headers["h"] == b"v"
    reduced = published(out)[0].reduced
    assert reduced is not None and reduced().value is None and "h" not in dict(reduced().headers)
    assert kinds(ack_all(core, clock, out)) == ["DeadLetterDelivered"]
    assert to_commit(core) == {(T, 0): 1}


def test_an_undecodable_record_is_dead_lettered_by_offset() -> None:
    clock = ManualClock()
    core = make(clock)
    out = core.on_undecodable(T, 3, 17, "UnsupportedCodecError: lz4")
    (p,) = published(out)
    headers = dict(p.record.headers)
    assert headers["dlq.offset"] == b"17" and headers["dlq.partition"] == b"3"
    assert b"lz4" in (headers["dlq.detail"] or b"") and p.record.value is None
    assert core.on_undecodable(T, 3, 17, "again") == []  # the same offset twice: once


def test_a_duplicate_in_flight_joins_the_task_and_one_event_answers_both() -> None:
    clock = ManualClock()
    core = make(clock)
    core.on_record(rec(0, "pred_a"), clock.read())
    joined = core.on_record(rec(1, {"id": "pred_a", "metadata": {"n": 2}}), clock.read())
    assert kinds(joined) == ["Joined"]
    clock.advance(1.0)
    due = core.take_due(clock.monotonic(), 10)
    assert len(due) == 1  # one poller for both records
    done = core.on_outcome(due[0][0], completed(), clock.read())
    event = json.loads(published(done)[0].record.value or b"")
    assert [r["offset"] for r in event["data"]["input"]["records"]] == [0, 1]
    ack_all(core, clock, done)
    assert to_commit(core) == {(T, 0): 2}


def test_the_same_id_after_its_event_was_built_is_a_new_task() -> None:
    clock = ManualClock()
    core = make(clock)
    core.on_record(rec(0, "pred_a"), clock.read())
    clock.advance(1.0)
    first = poll_all(core, clock, completed())
    again = core.on_record(rec(1, "pred_a"), clock.read())  # the first event is not acked
    assert kinds(again) == ["Consumed"]
    assert core.polling().keys() == {"pred_a"} and core.publishing().keys() == {"pred_a"}
    ack_all(core, clock, first)
    assert to_commit(core) == {(T, 0): 1}  # offset 1 waits for its own event
    clock.advance(1.0)
    ack_all(core, clock, poll_all(core, clock, completed()))
    assert to_commit(core) == {(T, 0): 2}


def test_acknowledgements_out_of_order_commit_only_the_finished_prefix() -> None:
    clock = ManualClock()
    core = make(clock)
    for i in range(3):
        core.on_record(rec(i, f"pred_{i}"), clock.read())
    clock.advance(1.0)
    events = {
        t.task_id: core.on_outcome(t, completed(), clock.read())
        for t, _ in core.take_due(clock.monotonic(), 10)
    }
    ack_all(core, clock, events["pred_1"] + events["pred_2"])
    assert to_commit(core) == {}  # offset 0 is still open
    ack_all(core, clock, events["pred_0"])
    assert to_commit(core) == {(T, 0): 3}
    core.committed(core.commit_plan())  # the broker stored it
    assert to_commit(core) == {}


def test_pending_past_the_deadline_times_out_with_the_last_status() -> None:
    clock = ManualClock()
    core = make(clock)
    core.on_record(rec(0, {"id": "pred_a", "timeout_s": 2.5}), clock.read())
    out: list[Effect] = []
    for _ in range(5):
        clock.at(core.next_wakeup(clock.monotonic()) or clock.monotonic())
        out += poll_all(core, clock, pending())
    (finished,) = [e for e in out if isinstance(e, facts.Finished)]
    assert finished.kind == "timeout" and clock.monotonic() == 2.5  # the last poll at the deadline
    assert finished.reason == "deadline of 2.5s passed; last status: processing"
    event = json.loads(published(out)[0].record.value or b"")
    assert event["type"].endswith(".timeout") and event["data"]["polls"] == 3


def test_a_429_pauses_every_poll_and_is_announced_once() -> None:
    clock = ManualClock()
    core = make(clock)
    for i in range(3):
        core.on_record(rec(i, f"pred_{i}"), clock.read())
    clock.advance(1.0)
    limited = Outcome(Kind.RATE_LIMITED, 429, reason="HTTP 429", retry_after_s=5.0)
    out = poll_all(core, clock, limited)
    paused = [e for e in out if isinstance(e, facts.Paused)]
    assert [p.announce for p in paused] == [True, False, False]
    assert paused[0].added_s == 5.0 and sum(p.added_s for p in paused) == 5.0
    clock.advance(4.9)
    assert core.take_due(clock.monotonic(), 10) == []  # nobody polls in the pause
    assert core.next_wakeup(clock.monotonic()) == 6.0
    clock.advance(0.1)
    assert len(core.take_due(clock.monotonic(), 10)) == 3


def test_an_auth_error_pauses_for_the_configured_time() -> None:
    clock = ManualClock()
    core = make(clock, api={"auth_error_pause_s": 30})
    core.on_record(rec(0, "pred_a"), clock.read())
    clock.advance(1.0)
    (paused,) = poll_all(core, clock, Outcome(Kind.AUTH, 401, reason="HTTP 401"))
    assert isinstance(paused, facts.Paused) and paused.reason == "auth" and paused.seconds == 30
    assert core.scheduler.paused_until == 31.0


def test_transient_errors_back_off_and_a_passed_deadline_names_the_last_error() -> None:
    clock = ManualClock()
    core = make(clock, polling={"backoff_base_s": 1.0, "backoff_max_s": 2.0})
    core.on_record(rec(0, {"id": "pred_a", "timeout_s": 4}), clock.read())
    clock.advance(1.0)
    error = Outcome(Kind.TRANSIENT, 503, reason="HTTP 503")
    out: list[Effect] = []
    while not out:
        before = clock.monotonic()
        out = poll_all(core, clock, error)
        wake = core.next_wakeup(clock.monotonic())
        if wake is not None:
            assert before + 0.1 <= wake <= min(before + 2.0, 4.0)  # capped, floored, <= deadline
            clock.at(wake)
    (finished,) = [e for e in out if isinstance(e, facts.Finished)]
    assert finished.kind == "timeout" and finished.reason == (
        "deadline of 4s passed; last poll: HTTP 503"
    )


def test_a_deadline_does_not_wait_for_a_budget_that_binds() -> None:
    clock = ManualClock()
    core = make(
        clock, api={"requests_per_second": 1.0, "budget_burst": 1, "budget_scope": "replica"}
    )
    for i in range(5):
        core.on_record(rec(i, {"id": f"pred_{i}", "timeout_s": 2}), clock.read())
    timeouts: list[float] = []
    while len(timeouts) < 5 and clock.monotonic() < 5:
        clock.advance(0.05)
        out: list[Effect] = poll_all(core, clock, pending())
        out += core.expire_overdue(clock.read())[0]
        timeouts += [clock.monotonic() for e in out if isinstance(e, facts.Finished)]
    assert len(timeouts) == 5
    # Those the budget held are timed out by the sweep, within a second of the deadline.
    assert all(2.0 <= t <= 3.0 for t in timeouts), timeouts


def test_a_revoked_partition_parks_its_tasks_and_they_come_back_with_their_history() -> None:
    clock = ManualClock()
    core = make(clock)
    core.on_record(rec(0, "pred_a", partition=0), clock.read())
    core.on_record(rec(0, "pred_b", partition=1), clock.read())
    clock.advance(1.0)
    poll_all(core, clock, pending())
    core.revoke({(T, 0)})
    assert core.parked().keys() == {"pred_a"}
    (released,) = core.release({(T, 0)}, "revoked")
    assert isinstance(released, facts.Released) and released.duplicate_risk == 0
    clock.advance(1.0)
    assert [t.task_id for t, _ in core.take_due(clock.monotonic(), 10)] == ["pred_b"]
    (assigned,) = core.assign({(T, 0): (None, ""), (T, 1): (None, "")})
    assert isinstance(assigned, facts.Assigned) and assigned.kept_parked == 1
    (revived,) = core.on_record(rec(0, "pred_a", partition=0), clock.read())
    assert isinstance(revived, facts.Revived) and revived.task.polls == 1
    assert revived.task.state is State.POLLING


def test_parked_tasks_of_partitions_gone_elsewhere_are_handed_over() -> None:
    clock = ManualClock()
    core = make(clock)
    core.on_record(rec(0, "pred_a", partition=0), clock.read())
    core.revoke({(T, 0)})
    core.release({(T, 0)}, "revoked")
    (assigned,) = core.assign({(T, 1): (None, "")})
    assert isinstance(assigned, facts.Assigned) and assigned.handed_over == 1
    assert core.parked() == {}


def test_release_counts_what_the_next_owner_publishes_again() -> None:
    clock = ManualClock()
    core = make(clock)
    for i in range(4):
        core.on_record(rec(i, f"pred_{i}"), clock.read())
    clock.advance(1.0)
    events = {
        t.task_id: core.on_outcome(t, completed(), clock.read())
        for t, _ in core.take_due(clock.monotonic(), 10)
        if t.task_id != "pred_0"
    }
    ack_all(core, clock, events["pred_1"] + events["pred_2"])  # finished behind offset 0
    # pred_3's event is out but not acknowledged.
    core.revoke({(T, 0)})
    (released,) = core.release({(T, 0)}, "revoked")
    assert isinstance(released, facts.Released) and released.duplicate_risk == 3


def test_a_backlog_task_gets_one_real_poll_without_a_deadline_cut() -> None:
    clock = ManualClock(start=100.0)
    core = make(clock)
    old = clock.time() - 60  # created a minute ago with a 10 s timeout
    core.on_record(rec(0, {"id": "pred_a", "created_at": old}), clock.read())
    ((task, _),) = core.take_due(clock.monotonic(), 10)  # due at once
    assert core.request_limit(task, clock.monotonic()) is None
    done = core.on_outcome(task, completed(), clock.read())
    assert kinds(done) == ["Finished", "Publish"]  # its real result, not a timeout


def test_an_outcome_for_a_task_no_longer_polled_changes_nothing() -> None:
    clock = ManualClock()
    core = make(clock)
    core.on_record(rec(0, "pred_a"), clock.read())
    clock.advance(1.0)
    ((task, _),) = core.take_due(clock.monotonic(), 10)
    core.revoke({(T, 0)})
    assert core.on_outcome(task, completed(), clock.read()) == []
    assert task.polls == 0 and core.acknowledged(12345, clock.read()) == []


def test_counts_follow_every_state_change() -> None:
    clock = ManualClock()
    core = make(clock)
    for i in range(3):
        core.on_record(rec(i, f"pred_{i}"), clock.read())
    assert core.in_flight == 3
    clock.advance(1.0)
    ((first, _), *_) = core.take_due(clock.monotonic(), 1)
    done = core.on_outcome(first, completed(), clock.read())
    assert core.in_flight == 3 and len(core.publishing()) == 1
    ack_all(core, clock, done)
    assert core.in_flight == 2
    core.revoke({(T, 0)})
    assert core.in_flight == 0 and len(core.parked()) == 2
    core.release({(T, 0)}, "revoked")
    (assigned,) = core.assign({(T, 1): (None, "")})
    assert isinstance(assigned, facts.Assigned) and assigned.handed_over == 2
    assert core.in_flight == 0 and core.parked() == {}
