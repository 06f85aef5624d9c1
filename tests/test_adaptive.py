"""Adaptive polling (issue 3): deterministic simulations of the real policy inside the real core."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import pytest

from bridge.config import ModelClass, PollingConfig, build_config
from bridge.core import facts
from bridge.core.adaptive import EDGES, NBINS, AdaptivePolicy, solve
from bridge.core.book import Core
from bridge.core.clock import ManualClock
from bridge.core.facts import Publish
from bridge.core.messages import Record
from bridge.core.outcomes import Kind, Outcome, Prediction
from bridge.core.tasks import Task

IMAGE = ModelClass(pattern="*", min_interval_s=0.5, max_interval_s=30.0, median_s=5.0, p90_s=15.0)
VIDEO = ModelClass(
    pattern="*video*", min_interval_s=5.0, max_interval_s=60.0, median_s=120.0, p90_s=300.0
)


@dataclass
class Job:
    created: float
    model: str
    duration: float  # created -> completed at the API; inf: never
    queue: float = 0.2  # part of the duration outside timings.inference
    timeout: float = 300.0
    consumed: float | None = None  # default: 50 ms after creation
    report_inference: bool = True
    polls: list[float] = field(default_factory=list)
    verdict: float | None = None
    first_seen: float = 0.0
    deadline: float = 0.0


def policy(
    *classes: ModelClass, seed: int = 1, jitter: float = 0.1, max_models: int = 1000
) -> AdaptivePolicy:
    return AdaptivePolicy(
        model_classes=classes or (VIDEO, IMAGE),
        jitter=jitter,
        max_models=max_models,
        rng=random.Random(seed),
    )


def run(p: AdaptivePolicy, jobs: list[Job], *, until: float = math.inf) -> Core:
    """Drive ``p`` inside the bridge's real core in simulated time: each job's id arrives
    as an input record, each due poll is answered from the job's true completion time."""
    core = Core(
        build_config({"kafka": {"input_topic": "in"}}, env={}),
        policy=p,
        rng=random.Random(0),
        now=0.0,
    )
    core.assign({("in", 0): (None, "")})  # partition 0 is this member's
    clock = ManualClock(epoch=0.0)  # wall = monotonic: created_at passes through exactly
    order = sorted(range(len(jobs)), key=lambda k: jobs[k].consumed or jobs[k].created + 0.05)
    i, now = 0, 0.0
    while True:
        nxt = math.inf
        if i < len(order):
            j = jobs[order[i]]
            nxt = j.consumed if j.consumed is not None else j.created + 0.05
        wake = core.next_wakeup(now)
        t = min(nxt, math.inf if wake is None else wake)
        if t == math.inf or t > until:
            break
        now = max(now, t)
        at = clock.at(now)
        while i < len(order):
            k = order[i]
            j = jobs[k]
            if (j.consumed if j.consumed is not None else j.created + 0.05) > now:
                break
            value = {
                "id": str(k),
                "model": j.model,
                "timeout_s": j.timeout,
                "created_at": j.created,
            }
            record = Record("in", 0, i, None, json.dumps(value).encode(), (), None)
            (consumed,) = core.on_record(record, at)
            assert isinstance(consumed, facts.Consumed)
            j.first_seen, j.deadline = now, consumed.task.deadline
            i += 1
        for task, _ in core.take_due(now, 1 << 30):
            j = jobs[int(task.task_id)]
            j.polls.append(now)
            if now >= j.created + j.duration:
                inference = int((j.duration - j.queue) * 1000) if j.report_inference else None
                done = Prediction(status="completed", inference_ms=inference)
                out = core.on_outcome(task, Outcome(Kind.COMPLETED, 200, done), at)
            else:
                running = Prediction(status="processing")
                out = core.on_outcome(task, Outcome(Kind.PENDING, 200, running), at)
            for effect in out:
                if isinstance(effect, facts.Finished):
                    j.verdict = now
                elif isinstance(effect, Publish):
                    core.acknowledged(effect.ticket, at)
    return core


def lognormal_jobs(
    n: int,
    model: str,
    median: float,
    sigma: float,
    *,
    rate: float,
    start: float = 0.0,
    seed: int = 7,
    report_inference: bool = True,
) -> list[Job]:
    rng = random.Random(seed)
    out, t = [], start
    for _ in range(n):
        t += rng.expovariate(rate)
        d = median * math.exp(rng.gauss(0.0, sigma))
        queue = min(d / 2, rng.expovariate(1 / 0.2))
        out.append(Job(t, model, d, queue=queue, report_inference=report_inference))
    return out


def q90(median: float, sigma: float) -> float:
    return median * math.exp(1.2815515655446004 * sigma)


# --- learning ------------------------------------------------------------------------------


def test_learning_converges() -> None:
    p = policy()
    run(p, lognormal_jobs(1500, "flux-dev", 4.0, 0.3, rate=5.0))
    median, p90 = p.model_stats()["flux-dev"]
    assert median == pytest.approx(4.0, rel=0.07)
    assert p90 == pytest.approx(q90(4.0, 0.3), rel=0.1)


def test_learning_from_poll_intervals_alone() -> None:
    """Without timings.inference only (last pending poll, terminal poll] is known."""
    p = policy()
    run(p, lognormal_jobs(1500, "flux-dev", 4.0, 0.3, rate=5.0, report_inference=False))
    median, p90 = p.model_stats()["flux-dev"]
    assert median == pytest.approx(4.0, rel=0.15)
    assert p90 == pytest.approx(q90(4.0, 0.3), rel=0.2)


def test_learned_schedule_is_cheaper_than_the_prior() -> None:
    """What is learned is what pays: the schedule's cost approaches the true optimum."""
    cls = ModelClass(
        pattern="*", min_interval_s=0.01, max_interval_s=30.0, median_s=4.0, p90_s=q90(4.0, 0.3)
    )
    optimum = solve(_lognormal(4.0, 0.3), 0.5, cls)
    p = policy(cls)
    jobs = lognormal_jobs(1500, "m", 4.0, 0.3, rate=5.0)
    run(p, jobs)
    late = jobs[500:]  # after the first hundred or so completions
    cost = sum((j.verdict or 0) - j.created - j.duration + 0.5 * len(j.polls) for j in late)
    cost /= len(late)
    expected = _expected_cost(optimum, 4.0, 0.3)
    assert cost <= 1.1 * expected


def test_drift_is_followed() -> None:
    p = policy()
    before = lognormal_jobs(800, "flux-dev", 3.0, 0.4, rate=5.0)
    after = lognormal_jobs(800, "flux-dev", 6.0, 0.4, rate=5.0, start=before[-1].created, seed=8)
    run(p, before)
    assert p.model_stats()["flux-dev"][0] == pytest.approx(3.0, rel=0.1)
    seen = p.observations("flux-dev")
    # Feed the slower model until the learned median is within 10% of the new one.
    needed = None
    for k in range(0, len(after), 10):
        run(p, after[k : k + 10])
        if p.model_stats()["flux-dev"][0] >= 0.9 * 6.0:
            needed = p.observations("flux-dev") - seen
            break
    assert needed is not None and needed <= 150
    run(p, lognormal_jobs(400, "flux-dev", 6.0, 0.4, rate=5.0, start=after[-1].created, seed=9))
    assert p.model_stats()["flux-dev"][0] == pytest.approx(6.0, rel=0.1)


def test_unknown_models_start_from_their_class() -> None:
    p = policy()
    now = 1000.0
    video = Task(
        task_id="v",
        model="acme/video-gen",
        created=now,
        created_wall=0.0,
        first_seen=now,
        timeout_s=3600.0,
    )
    image = Task(
        task_id="i",
        model="acme/image-gen",
        created=now,
        created_wall=0.0,
        first_seen=now,
        timeout_s=300.0,
    )
    assert p.model_class("acme/video-gen") is VIDEO
    assert p.first_poll(video, now) - now > 5 * (p.first_poll(image, now) - now)
    assert p.next_poll(video, now + 30.0) - (now + 30.0) >= VIDEO.min_interval_s
    assert p.model_stats() == {}  # nothing learned yet


def test_memory_is_bounded() -> None:
    p = policy(max_models=5)
    for k in range(20):
        run(p, lognormal_jobs(3, f"model-{k}", 2.0, 0.3, rate=1.0, seed=k))
    assert len(p.model_stats()) == 5
    assert set(p.model_stats()) == {f"model-{k}" for k in range(15, 20)}
    state = p._models["model-19"]
    assert len(state.weights) == NBINS and len(EDGES) == NBINS + 1


# --- scheduling ----------------------------------------------------------------------------


def test_min_and_max_intervals_hold() -> None:
    cls = ModelClass(pattern="*", min_interval_s=1.5, max_interval_s=8.0, median_s=5.0, p90_s=15.0)
    p = policy(cls)
    jobs = lognormal_jobs(600, "m", 10.0, 0.9, rate=2.0)  # a heavy tail: max binds there
    jobs += [Job(jobs[-1].created + 1, "m", math.inf, timeout=1200.0)]  # never finishes
    run(p, jobs)
    gaps = []
    for j in jobs:
        assert j.polls[0] - j.first_seen <= cls.max_interval_s + 1e-9
        for a, b in zip(j.polls, j.polls[1:], strict=False):
            gaps.append(b - a)
            if b < j.deadline:  # the deadline poll alone may come sooner
                assert b - a >= cls.min_interval_s - 1e-9
            assert b - a <= cls.max_interval_s + 1e-9
    assert min(gaps) < 2.0 and max(gaps) > 7.0  # dense near completions, sparse in the tail


def test_sparse_then_dense_then_sparse() -> None:
    cls = ModelClass(
        pattern="*", min_interval_s=0.5, max_interval_s=60.0, median_s=60.0, p90_s=90.0
    )
    p = policy(cls, jitter=0.0)
    run(p, lognormal_jobs(400, "m", 60.0, 0.25, rate=0.5))
    slow = Job(10_000.0, "m", math.inf, timeout=600.0)
    run(p, [slow])
    gaps = [b - a for a, b in zip(slow.polls, slow.polls[1:], strict=False)]
    assert slow.polls[0] - slow.created > 25.0  # nothing is likely early: first poll late
    around = [g for a, g in zip(slow.polls, gaps, strict=False) if 50 <= a - slow.created <= 80]
    tail = [g for a, g in zip(slow.polls, gaps, strict=False) if a - slow.created >= 200]
    assert max(around) < 10.0  # dense where completions happen
    assert min(tail) > 2 * max(around)  # backing off in the long tail


def test_jitter_spreads_a_synchronized_burst() -> None:
    p = policy()
    run(p, lognormal_jobs(300, "flux-dev", 3.0, 0.4, rate=5.0))  # learn first
    burst = [Job(5000.0, "flux-dev", 30.0, timeout=60.0) for _ in range(2000)]
    run(p, burst, until=5000.0 + 20.0)
    firsts = sorted(j.polls[0] for j in burst)
    seconds = sorted(j.polls[1] for j in burst)
    for times in (firsts, seconds):
        spread = times[-1] - times[0]
        assert len(set(times)) == len(times)
        assert spread >= 0.18 * (times[len(times) // 2] - 5000.0)  # ±10% of the delay
        buckets: dict[int, int] = {}
        for t in times:
            buckets[int(t / 0.05)] = buckets.get(int(t / 0.05), 0) + 1
        assert max(buckets.values()) <= 0.1 * len(times)  # not one 50 ms slot gets >10%


def test_deadlines_are_respected() -> None:
    p = policy()
    run(p, lognormal_jobs(200, "wan-video", 120.0, 0.5, rate=0.2))
    jobs = [Job(10_000.0 + k, "wan-video", math.inf, timeout=7.0 + k) for k in range(50)]
    run(p, jobs)
    for j in jobs:
        assert j.deadline == j.created + j.timeout
        assert all(t <= j.deadline + 1e-9 for t in j.polls)
        assert j.polls[-1] == pytest.approx(j.deadline)  # the last poll is at the deadline
        assert j.verdict == pytest.approx(j.deadline)


def _aged(task_id: str, now: float, age_s: float) -> Task:
    """A flux-dev task first seen at ``now``, created ``age_s`` earlier."""
    return Task(
        task_id=task_id,
        model="flux-dev",
        created=now - age_s,
        created_wall=0.0,
        first_seen=now,
        timeout_s=300.0,
    )


def test_a_late_consumed_task_is_polled_at_once() -> None:
    p = policy()
    run(p, lognormal_jobs(300, "flux-dev", 3.0, 0.4, rate=5.0))
    now = 50_000.0
    old = _aged("old", now, 40.0)
    assert p.first_poll(old, now) == now
    # Past the deadline already: polled now, and the poll settles it.
    expired = _aged("x", now, 900.0)
    assert p.first_poll(expired, now) == now
    fresh = _aged("new", now, 0.05)
    assert now + 1.0 < p.first_poll(fresh, now) < now + 5.0


# --- helpers -------------------------------------------------------------------------------


def _lognormal(median: float, sigma: float) -> list[float]:
    def cdf(x: float) -> float:
        return 0.0 if x <= 0 else 0.5 * math.erfc(-math.log(x / median) / (sigma * math.sqrt(2)))

    return [cdf(EDGES[k + 1]) - cdf(EDGES[k]) for k in range(NBINS)]


def _expected_cost(plan: object, median: float, sigma: float, n: int = 20_000) -> float:
    """Monte Carlo cost of following ``plan`` (no jitter) for the true distribution."""
    from bridge.core.adaptive import Plan

    assert isinstance(plan, Plan)
    rng = random.Random(3)
    total = 0.0
    for _ in range(n):
        d = median * math.exp(rng.gauss(0.0, sigma))
        t, polls = plan.first_age, 1
        while t < d:
            nxt = plan.next_age(t)
            t = nxt if nxt is not None else t + plan.max_interval
            polls += 1
        total += t - d + 0.5 * polls
    return total / n


def test_from_config_and_protocol() -> None:
    config = PollingConfig(policy="adaptive")
    p = AdaptivePolicy.from_config(config, rng=random.Random(1))
    assert p.poll_cost == config.poll_cost_s and p.window == config.learning_window
    with pytest.raises(ValueError):
        AdaptivePolicy(poll_cost_s=0.0)
