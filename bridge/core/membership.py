"""This member's place in the consumer group over time: assigned, or waiting, and for how long.

Pure, driven with ``now``. A member waits for an assignment from its start and from every
revocation (each rebalance begins with one) until the next assignment, which may be empty:
a replica beyond the partition count is assigned nothing and is settled all the same. A
member that has waited longer than :func:`deadline_s` while the brokers answered is stuck,
whatever the cause (a group that never settles, a client wedged in its join), and the shell
exits so that the orchestrator starts a fresh one. Time while Kafka is unreachable does not
count: a restart cannot bring a broker back.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from bridge.config import KafkaConfig

RATE_WINDOW_S = 60.0


def deadline_s(config: KafkaConfig) -> float:
    """How long a member may wait for an assignment before it gives up.

    A join completes within one rebalance timeout once every member has rejoined; a member
    that died is dropped after its session timeout, and a join that fails (a sync refused
    because yet another member came) is retried. Three rebalance timeouts and a session
    cover that: 190 s with the defaults.
    """
    return (3 * config.rebalance_timeout_ms + config.session_timeout_ms) / 1000


class State(enum.Enum):
    ASSIGNED = "assigned"
    WAITING = "waiting"
    STUCK = "stuck"


@dataclass(frozen=True, slots=True)
class Verdict:
    state: State
    waited_s: float  # since the member started waiting (0 when assigned)


class Membership:
    def __init__(self, deadline_s: float, now: float) -> None:
        self.deadline_s = deadline_s
        self._assigned = False
        self._since = now  # waiting since, counted while Kafka answers
        self._rebalances: collections.deque[float] = collections.deque()

    def revoked(self, now: float) -> None:
        """A rebalance began for this member (aiokafka revokes everything first)."""
        if self._assigned:
            self._assigned, self._since = False, now

    def assigned(self, now: float) -> None:
        """An assignment arrived (possibly empty): the join completed."""
        self._assigned = True
        self._rebalances.append(now)
        self._trim(now)

    def check(self, now: float, kafka_ok: bool) -> Verdict:
        if self._assigned:
            return Verdict(State.ASSIGNED, 0.0)
        if not kafka_ok:  # the wait counts from when the brokers answer again
            self._since = now
        waited = now - self._since
        return Verdict(State.STUCK if waited > self.deadline_s else State.WAITING, waited)

    def rebalances_per_minute(self, now: float) -> int:
        """Assignments completed in the last minute: a settled group has none."""
        self._trim(now)
        return len(self._rebalances)

    def _trim(self, now: float) -> None:
        while self._rebalances and self._rebalances[0] <= now - RATE_WINDOW_S:
            self._rebalances.popleft()
