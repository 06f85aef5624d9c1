"""The global request budget, 429 pauses and backoff (issue 3), in simulated time."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from bench.polling import ModelSpec, Workload, simulate
from bridge.config import build_config
from bridge.core.adaptive import AdaptivePolicy
from bridge.core.book import Core
from bridge.core.clock import ManualClock
from bridge.core.facts import Publish
from bridge.core.messages import Record
from bridge.core.outcomes import Kind, Outcome, Prediction, interpret
from bridge.core.policy import FixedInterval, retry_delay
from bridge.core.scheduler import Scheduler, TokenBucket
from bridge.core.tasks import Task
from tests.test_adaptive import IMAGE, VIDEO, lognormal_jobs, policy, run

WALL = 1_700_000_000.0


def _task(i: int, model: str, created: float, timeout: float = 300.0) -> Task:
    return Task(
        task_id=f"t{i}",
        model=model,
        created=created,
        created_wall=WALL + created,
        first_seen=created,
        timeout_s=timeout,
    )


def test_bucket_caps_rate_and_a_pause_restarts_it_empty() -> None:
    bucket = TokenBucket(rate=10.0, burst=10, now=0.0)
    assert bucket.available(0.0) == 10
    bucket.take(10, 0.0)
    assert bucket.available(0.05) == 0 and bucket.time_until(1, 0.05) == pytest.approx(0.05)
    bucket.drain_until(5.0)  # a 429 at t=0.05 with Retry-After ~5 s
    assert bucket.available(4.0) == 0
    assert bucket.time_until(1, 4.0) == pytest.approx(1.0 + 0.1)
    assert bucket.available(5.25) == 2  # refills from empty when the pause ends


@pytest.mark.parametrize("header", ["3", "date"])
def test_retry_after_pauses_everyone(header: str) -> None:
    """A 429 pauses every task for Retry-After (seconds or an HTTP date), then resumes gently."""
    now0 = 10.0
    value = header
    if header == "date":
        value = format_datetime(datetime.fromtimestamp(WALL + now0 + 3.0, UTC), usegmt=True)
    outcome = interpret(429, value, b"", WALL + now0)
    assert outcome.kind is Kind.RATE_LIMITED and outcome.retry_after_s == pytest.approx(3.0)
    config = build_config(
        {
            "kafka": {"input_topic": "in"},
            # One replica alone: the budget is its own (no coordination to share it).
            "api": {"requests_per_second": 20, "budget_burst": 20, "budget_scope": "replica"},
        },
        env={},
    )
    core = Core(config, policy=FixedInterval(1.0, jitter=0.0), rng=random.Random(1), now=0.0)
    core.assign({("in", 0): (None, "")})  # partition 0 is this member's
    clock = ManualClock(epoch=WALL)
    done = Outcome(Kind.COMPLETED, 200, Prediction(status="completed"))
    sent: list[float] = []
    t = 0.0
    fed = 0
    limited = False
    while t < 30.0:
        at = clock.at(t)
        while fed < 200 and fed * 0.05 <= t + 1e-9:  # steady load: 20/s, each due 1 s later
            raw = json.dumps({"id": f"t{fed}", "created_at": WALL + fed * 0.05}).encode()
            core.on_record(Record("in", 0, fed, None, raw, (), None), at)
            fed += 1
        for task, _ in core.take_due(t, 1000):
            sent.append(t)
            answer = done
            if t >= now0 and not limited:  # this one gets the 429
                limited = True
                answer = outcome
            for effect in core.on_outcome(task, answer, at):
                if isinstance(effect, Publish):
                    core.acknowledged(effect.ticket, at)
        t = round(t + 0.01, 2)
    paused = [x for x in sent if now0 < x < now0 + 3.0]
    assert limited and paused == []  # nobody polled during the pause
    after = [x for x in sent if now0 + 3.0 <= x < now0 + 4.0]
    assert 0 < len(after) <= 21  # resumes at the budget's rate, not with a burst
    assert len(sent) == 201  # every task, plus the retry of the one that got the 429


def test_when_the_budget_binds_polls_go_where_tasks_are_done() -> None:
    p = policy()
    run(p, lognormal_jobs(300, "flux-dev", 3.0, 0.3, rate=5.0))
    run(p, lognormal_jobs(200, "wan-video", 120.0, 0.4, rate=0.5, start=1000.0))
    t0 = 10_000.0
    live = {i: _task(i, "flux-dev" if i % 2 else "wan-video", t0) for i in range(100)}
    s: Scheduler[int] = Scheduler(
        priority=lambda k, due: p.priority(live[k], due),
        budget=TokenBucket(rate=5.0, burst=5, now=t0),
    )
    for i in live:
        s.schedule(i, t0 + 1.0)  # all due at once, at first-come order
    taken: list[int] = []
    t = t0 + 1.0
    while len(taken) < 50:
        taken += s.take(t, 1000)
        t += 0.1
    images = sum(1 for i in taken if live[i].model == "flux-dev")
    assert images == 50  # an image task 10 s old is surely done; a 10 s-old video is not
    assert s.budget_wait_s > 5.0 and s.taken == 50


def test_overdue_and_deadline_polls_first() -> None:
    p = policy()
    run(p, lognormal_jobs(300, "flux-dev", 3.0, 0.3, rate=5.0))
    now = 5_000.0
    fresh = _task(1, "flux-dev", now - 1.0)
    overdue = _task(2, "flux-dev", now - 20.0)
    at_deadline = _task(3, "flux-dev", now - 30.0, timeout=30.0)
    overdue.last_pending_poll = now - 15.0
    assert p.priority(overdue, now) > p.priority(fresh, now)
    assert p.priority(at_deadline, at_deadline.deadline) > p.priority(overdue, now)


BURST_MODELS = (
    ModelSpec("flux-schnell", 1.5, 0.3, share=0.5, timeout_s=30.0),
    ModelSpec("flux-dev", 3.0, 0.4, share=0.3, timeout_s=30.0),
    ModelSpec("wan-video", 120.0, 0.6, share=0.2, timeout_s=600.0),
)


def test_budget_below_the_api_limit_means_no_429s_and_no_wasted_deadlines() -> None:
    """A burst larger than the budget can serve by the deadlines, through the real scheduler."""
    w = Workload("t", "", BURST_MODELS, 1_000, 0.0, budget_rps=20.0, api_limit_rps=25.0)
    r = simulate(w, "adaptive")
    assert r.rate_limited == 0
    # 800 image tasks cannot all be polled within 30 s at 20/s: the deadline sweep times out
    # those the budget held (none later than the deadline by a second) ...
    assert r.expired > 0 and r.missed == 0
    assert r.missed_unspent == 0  # ... but none waited while the budget had room
    assert r.budget_wait_s > 20.0
    fifo = simulate(w, "fixed-1s")
    assert r.expired < fifo.expired  # likely-done tasks first beats first-come-first-served


def test_budget_above_the_api_limit_is_survived() -> None:
    w = Workload("t", "", BURST_MODELS, 1_000, 0.0, budget_rps=30.0, api_limit_rps=25.0)
    r = simulate(w, "adaptive")
    assert 0 < r.rate_limited < 100  # each 429 pauses everyone, so they stay rare
    assert r.missed_unspent == 0


def test_transient_failures_back_off_per_task_with_full_jitter() -> None:
    rng = random.Random(3)
    for failures in (1, 3, 6, 12):
        ceiling = min(30.0, 1.0 * 2**failures)
        delays = [retry_delay(failures, 1.0, 30.0, rng) for _ in range(2000)]
        assert max(delays) <= ceiling
        assert sum(delays) / len(delays) == pytest.approx(ceiling / 2, rel=0.1)  # full jitter
    # One task's failures move that task alone: nobody else's schedule changes.
    s: Scheduler[str] = Scheduler()
    s.schedule("ok", 5.0)
    s.schedule("failing", 1.0)
    assert s.take(1.0, 10) == ["failing"]
    s.schedule("failing", 1.0 + retry_delay(4, 1.0, 30.0, rng))
    assert s.take(5.0, 10) == ["ok"]


def test_adaptive_policy_needs_no_per_task_state() -> None:
    assert "adaptive" not in " ".join(Task.__slots__)
    p = AdaptivePolicy(model_classes=(VIDEO, IMAGE), rng=random.Random(1))
    t = _task(1, "x", 0.0)
    assert math.isfinite(p.priority(t, 1.0)) and p.first_poll(t, 0.0) > 0.0
