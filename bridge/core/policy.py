"""Poll policies: when to poll a task next. Pure; times are passed in, randomness injected.

The app only talks to the :class:`PollPolicy` protocol, so the fixed-interval policy here
and the adaptive one (``bridge.adaptive``) are interchangeable without touching I/O code.
"""

from __future__ import annotations

import random
from typing import Protocol

from bridge.core.tasks import Task


class PollPolicy(Protocol):
    def first_poll(self, task: Task, now: float) -> float:
        """Absolute time of the first poll of a newly consumed task."""

    def next_poll(self, task: Task, now: float) -> float:
        """Absolute time of the next poll after a poll at ``now`` saw a non-terminal status."""

    def priority(self, task: Task, due: float) -> float:
        """Higher polls first when the request budget binds."""

    def observe(self, task: Task, terminal_poll: float) -> None:
        """A poll at ``terminal_poll`` saw the task finished: learn from it."""


def clamp_to_deadline(task: Task, at: float, now: float) -> float:
    """Never schedule past the deadline: the last poll happens at the deadline itself."""
    return max(now, min(at, task.deadline))


# How far past its deadline a task's timeout event may come, whatever the API does.
DEADLINE_GRACE_S = 0.5


def owed_a_poll(task: Task) -> bool:
    """A task consumed after its deadline (a backlog) that was never polled: it gets one
    real poll, so that a backlog still reports what became of its tasks."""
    return task.polls == 0 and task.created + task.timeout_s <= task.first_seen


def request_limit(task: Task, now: float) -> float | None:
    """How long a poll sent at ``now`` may take: it ends by the deadline plus the grace, so
    a stalled or trickling API cannot hold the timeout event. None (only the client's own
    total limit) for a backlog task's one owed poll."""
    if owed_a_poll(task):
        return None
    return max(0.1, task.deadline + DEADLINE_GRACE_S - now)


def overdue(task: Task, now: float) -> bool:
    """Whether a task whose poll is waiting (for a request slot, the budget or the end of a
    pause) should time out now instead of waiting on."""
    return now >= task.deadline + DEADLINE_GRACE_S and not owed_a_poll(task)


def retry_delay(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter, floored so a retry is never a hot loop."""
    ceiling = min(cap, base * (2 ** min(failures, 30)))
    return max(0.1, rng.uniform(0.0, ceiling))


class FixedInterval:
    """Poll every ``interval`` seconds (± jitter), counting from the task's creation."""

    def __init__(self, interval: float, *, jitter: float = 0.1, rng: random.Random | None = None):
        self.interval = interval
        self.jitter = jitter
        self._rng = rng or random.Random()

    def _step(self) -> float:
        if not self.jitter:
            return self.interval
        return self.interval * (1.0 + self._rng.uniform(-self.jitter, self.jitter))

    def first_poll(self, task: Task, now: float) -> float:
        # A task created long ago (backlog, restart) may be done already: poll it now.
        return clamp_to_deadline(task, task.created + self._step(), now)

    def next_poll(self, task: Task, now: float) -> float:
        return clamp_to_deadline(task, now + self._step(), now)

    def priority(self, task: Task, due: float) -> float:
        return -due  # oldest due first

    def observe(self, task: Task, terminal_poll: float) -> None:
        return None
