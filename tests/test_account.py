"""The pure parts of one account, many replicas: the budget's shares (bridge.core.budget),
the learned state's records (bridge.core.learning), and what the core does with them."""

from __future__ import annotations

import json
import random

import pytest

from bridge.config import build_config
from bridge.core import budget as shared
from bridge.core import facts, learning
from bridge.core.adaptive import AdaptivePolicy
from bridge.core.book import Core
from bridge.core.clock import ManualClock
from bridge.core.messages import Record
from bridge.core.policy import FixedInterval
from bridge.core.webhook_policy import WebhookAware
from tests.test_adaptive import IMAGE, lognormal_jobs, run

LIMIT = 100.0


def budget(replica: str = "a") -> shared.SharedBudget:
    return shared.SharedBudget(LIMIT, replica, fallback_share=0.25, interval_s=0.5)


def report(replica: str, demand: float, at: float = 0.0, leaving: bool = False) -> shared.Report:
    return shared.Report(replica, at, demand, leaving)


def test_alone_and_not_yet_heard_back_a_replica_keeps_to_the_safe_share() -> None:
    b = budget()
    assert b.share(0.0) == 25.0 and not b.coordinated(0.0)
    b.heard(report("b", 50.0), 0.0)  # others are known, but not its own echo
    assert b.share(0.1) == 25.0
    b.heard(report("a", 50.0), 0.2)
    assert b.coordinated(0.2) and b.share(0.2) == 25.0  # a rise waits an interval
    assert b.share(0.7) == pytest.approx(0.97 * LIMIT / 2)


def test_shares_follow_demand_and_add_up_under_the_limit() -> None:
    views = {name: budget(name) for name in "abc"}
    demands = {"a": 900.0, "b": 100.0, "c": 0.0}
    for b in views.values():
        for name, d in demands.items():
            b.heard(report(name, d), 1.0)
    shares = {name: (b.share(1.0), b.share(1.5))[1] for name, b in views.items()}
    assert sum(shares.values()) == pytest.approx(0.97 * LIMIT)
    assert shares["a"] / sum(shares.values()) >= 0.85  # 90% of the demand
    assert 0 < shares["c"] <= 0.03 * LIMIT  # nothing due: the floor only


def test_a_replica_that_stops_reporting_is_dropped_and_one_that_leaves_at_once() -> None:
    b = budget()
    for t in (0.0, 0.5, 1.0):
        b.heard(report("a", 50.0, t), t)
        b.heard(report("b", 50.0, t), t)
        b.heard(report("c", 50.0, t), t)
    b.share(0.0)
    assert b.share(1.0) == pytest.approx(0.97 * LIMIT / 3)
    b.heard(report("c", 0.0, 1.2, leaving=True), 1.2)  # c leaves cleanly
    b.share(1.2)
    assert b.share(1.7) == pytest.approx(0.97 * LIMIT / 2)
    for t in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0):  # b is killed after 1.0: only a reports
        b.heard(report("a", 50.0, t), t)
    assert set(b.live(3.4)) == {"a", "b"}  # within five intervals of its last report
    assert set(b.live(3.6)) == {"a"}
    b.share(3.6)
    assert b.share(4.1) == pytest.approx(0.97 * LIMIT)


def test_when_demand_moves_the_shares_never_add_up_past_the_limit() -> None:
    """Demand moves from a to b, and b reads the new reports 0.15 s before a does (each
    replica reads the topic on its own). Raising at once, b would run at its new share
    while a still runs at its old one. A rise waits an interval, a fall does not: the
    shares never add up past the headroom's limit."""
    a, b = budget("a"), budget("b")
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        for view in (a, b):
            view.heard(report("a", 900.0, t), t)
            view.heard(report("b", 100.0, t), t)
            view.share(t)
    flipped = [report("a", 100.0, 1.25), report("b", 900.0, 1.25)]
    worst = 0.0
    for step in range(40):
        t = 1.25 + 0.05 * step
        for r in flipped:
            b.heard(r, t)
            if step >= 3:
                a.heard(r, t)
        worst = max(worst, a.share(t) + b.share(t))
    assert worst <= 0.97 * LIMIT + 1e-9
    assert b.share(4.0) > 0.8 * LIMIT  # and the gain is taken once agreed


def test_a_report_read_late_does_not_replace_a_newer_one() -> None:
    b = budget()
    b.heard(report("a", 10.0, 5.0), 5.0)
    b.heard(report("b", 10.0, 5.0), 5.0)
    b.heard(report("b", 990.0, 1.0), 5.1)  # older, from a replay of the topic
    assert b.live(5.1)["b"] == 10.0


def test_coordination_records_round_trip_and_strangers_are_refused() -> None:
    for message in (report("pod-1", 12.5, 1e9), shared.Pause(1e9 + 3, "rate_limited", "pod-2")):
        assert shared.decode(*shared.encode(message)) == message
    key, _ = shared.encode(report("pod-1", 1.0))
    for bad in (
        json.dumps({"v": 2, "at": 1.0, "demand": 1.0}).encode(),  # another release's
        json.dumps({"v": 1, "at": "soon", "demand": 1.0}).encode(),
        json.dumps({"v": 1, "at": 1.0, "demand": -1.0}).encode(),
        json.dumps({"v": 1, "at": 1.0, "demand": float("nan")}).encode(),
        b"\xff not json",
    ):
        assert shared.decode(key, bad) is None
    assert shared.decode(b"pause", json.dumps({"v": 1, "until": 1.0}).encode()) is None


def test_demand_is_what_was_let_out_plus_what_waits() -> None:
    d = shared.Demand(taken=100, now=10.0)
    assert d.read(taken=150, waiting=20, now=11.0) == pytest.approx(50 + 20)
    assert d.read(taken=150, waiting=0, now=12.0) == 0.0


def core(clock: ManualClock, **api: object) -> Core:
    config = build_config(
        {"kafka": {"input_topic": "in"}, "api": {"requests_per_second": LIMIT, **api}}, env={}
    )
    return Core(config, policy=FixedInterval(1.0), rng=random.Random(1), now=clock.monotonic())


def test_the_core_starts_at_the_safe_share_and_takes_the_agreed_one() -> None:
    clock = ManualClock()
    c = core(clock)
    assert c.sample(0.0).budget_rate == 25.0
    c.set_budget_rate(40.0, 0.0)
    assert c.sample(0.0).budget_rate == 40.0
    assert core(clock, budget_scope="replica").sample(0.0).budget_rate == LIMIT


def test_a_peers_pause_stops_every_poll_here_until_it_ends() -> None:
    clock = ManualClock()
    c = core(clock, budget_scope="replica")
    c.assign({("in", 0): (None, "")})
    c.on_record(Record("in", 0, 0, None, b"pred_a", (), None), clock.read())
    (paused,) = c.pause_from_peer(clock.time() + 3.0, "rate_limited", "pod-2", clock.read())
    assert isinstance(paused, facts.PausedByPeer) and paused.added_s == pytest.approx(3.0)
    clock.advance(2.9)
    assert c.take_due(clock.monotonic(), 10) == []
    clock.advance(0.2)
    assert len(c.take_due(clock.monotonic(), 10)) == 1
    assert c.pause_from_peer(clock.time() - 1.0, "rate_limited", "pod-2", clock.read()) == []


def test_learned_state_round_trips_and_a_colder_replica_takes_it() -> None:
    teacher = AdaptivePolicy(model_classes=(IMAGE,), learning_window=200, rng=random.Random(1))
    run(teacher, lognormal_jobs(300, "flux-dev", 4.0, 0.3, rate=5.0))
    (published,) = learning.to_publish(teacher, "pod-1", 1e9)
    assert learning.to_publish(teacher, "pod-1", 1e9) == []  # nothing learned since
    record = learning.decode(*learning.encode(published))
    assert record == published and len(learning.encode(published)[1]) < 16_000
    student = AdaptivePolicy(model_classes=(IMAGE,), learning_window=200, rng=random.Random(2))
    assert student.learn_from(record.model, record.data)
    assert student.observations(record.model) == teacher.observations(record.model)
    for q in (0.1, 0.5, 0.9):
        assert student.completion_quantile(record.model, q) == pytest.approx(
            teacher.completion_quantile(record.model, q), rel=1e-6
        )
    assert not teacher.learn_from(record.model, record.data)  # it knows as much already


def test_a_record_this_release_cannot_read_is_refused_whole() -> None:
    policy = AdaptivePolicy(rng=random.Random(1))
    good = {"bins": 0, "weights": {"3": 1.0}, "seen": 5, "queue": 0.1}
    assert not policy.learn_from("m", good)  # another binning
    key, value = learning.encode(learning.Learned("m", {"x": 1}, "pod", 1.0))
    body = json.loads(value)
    assert learning.decode(key, json.dumps({**body, "v": 2}).encode()) is None
    assert learning.decode(b"model/other", value) is None  # key and body disagree
    assert learning.decode(key, b"x" * (learning.MAX_RECORD_BYTES + 1)) is None
    assert learning.learner(FixedInterval(1.0)) is None  # nothing learned, nothing shared


def test_webhook_statistics_travel_with_the_models_completion_times() -> None:
    hooks = WebhookAware(AdaptivePolicy(rng=random.Random(1)))
    data = {"webhooks": {"delivered": [True] * 40 + [False] * 2, "ages": [3.0] * 40}}
    assert hooks.learn_from("m", data)
    assert hooks.trusted("m")  # 95% of deliveries came: polls wait for them
    assert hooks.learned("m") == data
    assert not hooks.learn_from("m", {"webhooks": {"delivered": [True], "ages": [1.0]}})
