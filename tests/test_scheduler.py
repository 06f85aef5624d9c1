from __future__ import annotations

import heapq
import itertools
import random

from hypothesis import example, given
from hypothesis import strategies as st

from bridge.core.policy import FixedInterval, retry_delay
from bridge.core.scheduler import FairPools, MinQueue, Scheduler, TokenBucket
from bridge.core.tasks import Task

# An operation on a scheduler of keys 0..7 at times 0..20: (what, key, time, limit).
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["schedule", "cancel", "take"]),
        st.integers(0, 7),
        st.integers(0, 20).map(float),
        st.integers(0, 4),
    ),
    max_size=80,
)


@given(st.lists(st.one_of(st.integers(-50, 50), st.none()), max_size=200))
def test_min_queue_gives_the_smallest_entry_first_whatever_the_push_order(
    ops: list[int | None],
) -> None:
    """``None`` pops; an integer pushes (with a sequence number, as every entry has)."""
    q: MinQueue[tuple[int, int]] = MinQueue()
    model: list[tuple[int, int]] = []
    seq = itertools.count()
    for op in ops:
        if op is None:
            assert q.peek() == (model[0] if model else None)
            if model:
                assert q.pop() == heapq.heappop(model)
        else:
            entry = (op, next(seq))
            q.push(entry)
            heapq.heappush(model, entry)
        assert len(q) == len(model)
    assert [q.pop() for _ in range(len(q))] == sorted(model)


_DUE_AGAIN = [("schedule", 0, 0.0, 0), ("take", 0, 0.0, 0), ("schedule", 0, 1.0, 0)]


@given(_OPS, st.booleans())
@example(ops=[*_DUE_AGAIN, ("take", 0, 1.0, 1)], pooled=False)  # due, then due again later
@example(ops=[*_DUE_AGAIN, ("take", 0, 1.0, 1)], pooled=True)
def test_scheduler_takes_what_a_plain_model_would_in_any_order_of_schedules(
    ops: list[tuple[str, int, float, int]], pooled: bool
) -> None:
    """Due times out of order, back in time, rescheduled and cancelled: the keys taken are
    the due ones, oldest due first (then first scheduled), each once; the same through
    the tenants' pools with one tenant (``pooled``)."""
    fair = FairPools[int](lambda key: "t", lambda tenant: 1.0, lambda tenant: None)
    s: Scheduler[int] = Scheduler(fair=fair if pooled else None)
    due: dict[int, tuple[float, int]] = {}  # key -> (due, order scheduled)
    order = itertools.count()
    now = 0.0
    for what, key, at, limit in ops:
        if what == "schedule":
            s.schedule(key, at)
            due[key] = (at, next(order))
        elif what == "cancel":
            s.cancel(key)
            due.pop(key, None)
        else:
            now = max(now, at)  # the clock only moves on
            ready = sorted((d, k) for k, d in due.items() if d[0] <= now)
            expected = [(k, d[0]) for d, k in ready[:limit]]
            assert s.take_due(now, limit) == expected
            for k, _ in expected:
                del due[k]
        assert len(s) == len(due)
    wake = s.next_wakeup(now)
    assert wake == (None if not due else max(now, min(d for d, _ in due.values())))


def test_due_order_cancel_and_reschedule() -> None:
    s: Scheduler[str] = Scheduler()
    s.schedule("a", 3.0)
    s.schedule("b", 1.0)
    s.schedule("c", 2.0)
    s.cancel("c")
    s.schedule("b", 5.0)  # replaces the earlier time
    assert s.next_wakeup(0.0) == 3.0
    assert s.take(2.9, 10) == []
    assert s.take(3.0, 10) == ["a"]
    assert s.take(4.0, 10) == []
    assert s.take(6.0, 10) == ["b"]
    assert len(s) == 0 and s.next_wakeup(7.0) is None


def test_take_due_reports_when_each_key_was_due() -> None:
    s: Scheduler[str] = Scheduler()
    s.schedule("late", 1.0)
    s.schedule("on_time", 4.0)
    assert sorted(s.take_due(4.0, 10)) == [("late", 1.0), ("on_time", 4.0)]
    assert s.taken == 2


def test_limit_leaves_the_rest_ready() -> None:
    s: Scheduler[int] = Scheduler()
    for i in range(5):
        s.schedule(i, float(i))
    assert s.take(10.0, 2) == [0, 1]  # oldest due first
    assert s.ready_count(10.0) == 3
    assert s.next_wakeup(10.0) == 10.0
    assert s.take(10.0, 10) == [2, 3, 4]


def test_budget_caps_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=10, now=0.0)
    s: Scheduler[int] = Scheduler(budget=bucket)
    for i in range(100):
        s.schedule(i, 0.0)
    taken = 0
    t = 0.0
    while t <= 5.0:
        taken += len(s.take(t, 1000))
        t += 0.01
    assert 55 <= taken <= 61  # 10 burst + 10/s for 5 s
    assert s.budget_wait_s > 0


def test_pause_holds_everything() -> None:
    s: Scheduler[str] = Scheduler()
    s.schedule("a", 0.0)
    s.pause_until(30.0)
    assert s.take(10.0, 5) == []
    assert s.next_wakeup(10.0) == 30.0
    assert s.take(30.0, 5) == ["a"]


def test_fixed_policy_schedule() -> None:
    p = FixedInterval(2.0, jitter=0.0)
    t = Task(
        task_id="x", model=None, created=100.0, created_wall=0.0, first_seen=100.0, timeout_s=5.0
    )
    assert p.first_poll(t, 100.0) == 102.0
    assert p.next_poll(t, 104.0) == 105.0  # clamped to the deadline
    late = Task(
        task_id="y", model=None, created=0.0, created_wall=0.0, first_seen=100.0, timeout_s=300.0
    )
    assert p.first_poll(late, 100.0) == 100.0  # created long ago: poll now


def test_retry_delay_full_jitter_capped() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 1.0, 30.0, rng) for n in range(1, 12) for _ in range(50)]
    assert max(delays) <= 30.0 and min(delays) >= 0.1
    assert max(retry_delay(1, 1.0, 30.0, rng) for _ in range(200)) <= 2.0
