"""The member's place in its group over time (bridge.membership), driven with ``now``."""

from __future__ import annotations

from bridge.config import KafkaConfig
from bridge.core.membership import Membership, State, deadline_s


def test_the_deadline_follows_the_rebalance_and_session_timeouts() -> None:
    assert deadline_s(KafkaConfig()) == 190.0  # 3 x 60 s + 10 s
    quick = KafkaConfig(rebalance_timeout_ms=2_000, session_timeout_ms=4_000)
    assert deadline_s(quick) == 10.0


def test_a_member_that_never_gets_an_assignment_is_stuck_after_the_deadline() -> None:
    m = Membership(deadline_s=30.0, now=100.0)
    assert m.check(110.0, kafka_ok=True).state is State.WAITING
    assert m.check(130.0, kafka_ok=True).waited_s == 30.0
    assert m.check(130.0, kafka_ok=True).state is State.WAITING  # at the deadline, not past
    stuck = m.check(130.5, kafka_ok=True)
    assert stuck.state is State.STUCK and stuck.waited_s == 30.5


def test_an_empty_assignment_settles_the_member() -> None:
    """A replica beyond the partition count is assigned nothing, and is not stuck."""
    m = Membership(deadline_s=30.0, now=0.0)
    m.assigned(5.0)
    assert m.check(500.0, kafka_ok=True).state is State.ASSIGNED
    assert m.check(500.0, kafka_ok=True).waited_s == 0.0


def test_the_wait_restarts_at_each_revocation_and_ends_at_the_assignment() -> None:
    m = Membership(deadline_s=30.0, now=0.0)
    m.assigned(2.0)
    m.revoked(100.0)
    assert m.check(120.0, kafka_ok=True).waited_s == 20.0
    m.revoked(125.0)  # aiokafka revokes once per join; a second call changes nothing
    assert m.check(131.0, kafka_ok=True).state is State.STUCK
    m.assigned(132.0)
    assert m.check(132.0, kafka_ok=True).state is State.ASSIGNED


def test_time_while_kafka_is_unreachable_does_not_count() -> None:
    m = Membership(deadline_s=30.0, now=0.0)
    assert m.check(10.0, kafka_ok=True).waited_s == 10.0
    assert m.check(100.0, kafka_ok=False).state is State.WAITING  # a restart cannot help
    assert m.check(120.0, kafka_ok=True).waited_s == 20.0
    assert m.check(131.0, kafka_ok=True).state is State.STUCK


def test_rebalances_per_minute_counts_assignments_of_the_last_sixty_seconds() -> None:
    m = Membership(deadline_s=30.0, now=0.0)
    for t in (1.0, 3.0, 5.0, 50.0):
        m.revoked(t - 0.5)
        m.assigned(t)
    assert m.rebalances_per_minute(55.0) == 4
    assert m.rebalances_per_minute(62.0) == 3  # the one at 1 s left the window
    assert m.rebalances_per_minute(65.0) == 1
    assert m.rebalances_per_minute(200.0) == 0
