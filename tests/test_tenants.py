"""Tenants (bridge.core.tenants, the scheduler's fair pools and the core's held records),
driven directly with a ManualClock: keys, weighted fair queuing of the budget, shares of the
in-flight slots, and records held without the committed offsets passing them."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from bridge.config import TenantsConfig, build_config
from bridge.core import facts
from bridge.core.book import Core
from bridge.core.clock import ManualClock
from bridge.core.facts import Effect, Publish
from bridge.core.messages import Record
from bridge.core.outcomes import Kind, Outcome, Prediction
from bridge.core.policy import FixedInterval
from bridge.core.scheduler import FairPools, Scheduler, TokenBucket
from bridge.core.tenants import TenantKey, Weights

T = "in"
P = (T, 0)


def test_the_tenant_is_read_where_configured_and_missing_means_the_default() -> None:
    by_key = TenantKey(TenantsConfig(key="key"))
    assert by_key.of(b"acme", (), None) == ("acme", True)
    assert by_key.of(None, (), None) == ("default", False)
    assert by_key.of(b"\xff\xfe", (), None) == ("default", False)  # not UTF-8
    by_header = TenantKey(TenantsConfig(key="header:x-tenant", default="nobody"))
    assert by_header.of(None, (("x-tenant", b"globex"),), None) == ("globex", True)
    assert by_header.of(None, (("other", b"globex"),), None) == ("nobody", False)
    by_json = TenantKey(TenantsConfig(key="json:metadata.tenant"))
    assert by_json.field == ("metadata", "tenant")
    assert by_json.of(None, (), 42) == ("42", True)
    assert by_json.of(None, (), {"not": "text"}) == ("default", False)
    assert not TenantKey(TenantsConfig()).enabled


def pools(
    weights: dict[str, float] | None = None, caps: dict[str, float] | None = None
) -> Scheduler[str]:
    w, c = weights or {}, caps or {}
    fair: FairPools[str] = FairPools(
        lambda key: key.split("-")[0], lambda t: w.get(t, 1.0), lambda t: c.get(t)
    )
    return Scheduler(budget=TokenBucket(10.0, 10, 0.0), fair=fair)


def taken_by_tenant(s: Scheduler[str], seconds: int) -> Counter[str]:
    got: Counter[str] = Counter()
    for t in range(seconds * 10):
        for key, _ in s.take_due(t / 10, 1000):
            got[key.split("-")[0]] += 1
    return got


def test_a_flood_does_not_starve_a_quiet_tenant_of_the_budget() -> None:
    s = pools()
    for i in range(1000):
        s.schedule(f"noisy-{i}", 0.0)
    for i in range(10):
        s.schedule(f"quiet-{i}", 0.0)
    first = [key for t in range(15) for key, _ in s.take_due(t / 10, 1000)]
    quiet = [i for i, key in enumerate(first) if key.startswith("quiet")]
    assert len(quiet) == 10 and quiet[-1] < 21  # taken in turns, not behind the thousand


def test_weights_share_the_budget_and_an_idle_tenants_share_goes_to_the_others() -> None:
    s = pools(weights={"gold": 2.0})
    for i in range(1000):
        s.schedule(f"gold-{i}", 0.0)
        s.schedule(f"tin-{i}", 0.0)
    got = taken_by_tenant(s, 30)
    assert got["gold"] + got["tin"] == pytest.approx(310, abs=2)  # 10/s and the burst
    assert got["gold"] / got["tin"] == pytest.approx(2.0, rel=0.05)
    alone = pools(weights={"gold": 2.0})
    for i in range(1000):
        alone.schedule(f"tin-{i}", 0.0)
    assert taken_by_tenant(alone, 30)["tin"] == pytest.approx(310, abs=2)  # work-conserving


def test_a_tenant_returning_from_idle_gets_no_credit_saved_up() -> None:
    s = pools()
    for i in range(200):
        s.schedule(f"a-{i}", 0.0)
    taken_by_tenant(s, 10)  # a alone for 10 s: ~110 taken
    for i in range(200):
        s.schedule(f"b-{i}", 10.0)
    got: Counter[str] = Counter()
    for t in range(100, 150):
        for key, _ in s.take_due(t / 10, 1000):
            got[key.split("-")[0]] += 1
    assert abs(got["a"] - got["b"]) <= 2  # even from b's return: no burst owed to it


def test_a_tenants_own_rate_cap_holds_and_the_others_use_the_rest() -> None:
    s = pools(caps={"capped": 2.0})
    for i in range(500):
        s.schedule(f"capped-{i}", 0.0)
        s.schedule(f"free-{i}", 0.0)
    got = taken_by_tenant(s, 20)
    assert got["capped"] <= 2 * 20 + 2  # its cap and its burst
    assert got["capped"] + got["free"] >= 205  # the budget (10/s, a burst of 10) all used


def test_within_a_tenant_the_most_likely_finished_goes_first() -> None:
    scores = {"a-late": 5.0, "a-early": 1.0, "b-x": 0.0}
    fair: FairPools[str] = FairPools(lambda k: k.split("-")[0], lambda t: 1.0, lambda t: None)
    s: Scheduler[str] = Scheduler(priority=lambda k, due: scores[k], fair=fair)
    for key in scores:
        s.schedule(key, 0.0)
    order = [k for k, _ in s.take_due(0.0, 10)]
    assert order.index("a-late") < order.index("a-early")


def make(clock: ManualClock, **tenants: Any) -> Core:
    config = build_config(
        {
            "kafka": {"input_topic": T},
            "polling": {
                "interval_s": 1.0,
                "jitter": 0.0,
                "default_timeout_s": 600,
                "max_in_flight": 10,
            },
            "tenants": {"key": "key", **tenants},
        },
        env={},
    )
    core = Core(config, policy=FixedInterval(1.0, jitter=0.0), rng=random.Random(1), now=0.0)
    core.assign({P: (0, "")})
    return core


def rec(offset: int, tenant: str) -> Record:
    return Record(T, 0, offset, tenant.encode(), f"pred_{offset}".encode(), (), None)


def test_a_tenant_over_its_share_of_in_flight_slots_is_held_and_others_go_on() -> None:
    clock = ManualClock()
    core = make(clock)
    out: list[Effect] = []
    for offset in range(30):  # noisy alone: its share is the whole cap, 10
        out += core.on_record(rec(offset, "noisy"), clock.read())
    assert sum(isinstance(e, facts.Held) for e in out) == 20 and core.held_count == 20
    assert core.intake_room() == 10 + 100_000 - 30  # held records do not stop fetching
    (consumed,) = core.on_record(rec(30, "quiet"), clock.read())  # behind the flood
    assert isinstance(consumed, facts.Consumed)  # polled at once
    sample = core.tenants_sample(0.0)
    assert (sample["noisy"].in_flight, sample["noisy"].held) == (10, 20)
    assert sample["quiet"].in_flight == 1


def finish_all(core: Core, clock: ManualClock) -> list[Effect]:
    done = Outcome(Kind.COMPLETED, 200, Prediction(status="completed", outputs=["u"]))
    out: list[Effect] = []
    for task, _ in core.take_due(clock.monotonic(), 1000):
        out += core.on_outcome(task, done, clock.read())
    return out


def test_held_records_become_tasks_as_their_tenants_share_frees() -> None:
    clock = ManualClock()
    core = make(clock)
    for offset in range(25):
        core.on_record(rec(offset, "noisy"), clock.read())
    clock.advance(1.0)
    events = [e for e in finish_all(core, clock) if isinstance(e, Publish)]
    assert len(events) == 10 and core.held_count == 15
    assert {p.position for p in core.commit_plan().values()} <= {0}  # nothing acked yet
    released: list[Effect] = []
    for p in events:
        released += core.acknowledged(p.ticket, clock.read())
    assert sum(isinstance(e, facts.Consumed) for e in released) == 10
    assert core.held_count == 5
    # The committed position follows the acknowledged prefix, never past a held record.
    assert core.commit_plan()[P].position == 10


def test_weights_and_caps_shape_the_in_flight_shares() -> None:
    clock = ManualClock()
    core = make(
        clock, rules=[{"tenant": "gold", "weight": 3}, {"tenant": "small", "max_in_flight": 2}]
    )
    for offset in range(20):
        core.on_record(rec(offset, "small"), clock.read())
    assert core.tenants_sample(0.0)["small"].in_flight == 2  # its own cap, though alone
    weights = Weights(core.config.tenants)
    assert weights.in_flight_share("gold", 100, 4.0) == 75  # 3 of 4 (gold and another)
    assert weights.in_flight_share("tin", 100, 4.0) == 25
    assert weights.in_flight_share("tin", 100, 1.0) == 100  # alone: all of it


def test_held_records_of_a_partition_that_leaves_are_the_next_owners() -> None:
    clock = ManualClock()
    core = make(clock)
    for offset in range(15):
        core.on_record(rec(offset, "noisy"), clock.read())
    assert core.held_count == 5
    core.revoke({P})
    assert core.held_count == 0
    core.release({P}, "revoked")
    assert (
        core.tenants_sample(0.0).get("noisy") is None or core.tenants_sample(0.0)["noisy"].held == 0
    )


def test_without_tenants_records_are_never_held() -> None:
    clock = ManualClock()
    config = build_config({"kafka": {"input_topic": T}, "polling": {"max_in_flight": 10}}, env={})
    core = Core(config, policy=FixedInterval(1.0), rng=random.Random(1), now=0.0)
    core.assign({P: (0, "")})
    out = [e for o in range(30) for e in core.on_record(rec(o, "noisy"), clock.read())]
    assert not any(isinstance(e, facts.Held) for e in out) and core.held_count == 0
    assert core.intake_room() == 10 - 30  # the cap pauses fetching, as it always did
    assert core.scheduler.fair is None and core.tenants_sample(0.0) == {}
