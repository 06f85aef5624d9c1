"""The state of one tracked prediction: plain data for the core, the policy and the scheduler."""

from __future__ import annotations

import enum
from typing import Any

from bridge.core.messages import Headers
from bridge.core.outcomes import Prediction
from bridge.core.tracecontext import Trace

Origin = tuple[str, int, int]  # (topic, partition, offset) of an input record


class State(enum.Enum):
    POLLING = "polling"  # in the scheduler: polled until terminal or past its deadline
    PARKED = "parked"  # its partition was revoked; revived if the records come back
    PUBLISHING = "publishing"  # terminal: its event is out, waiting for the broker's ack


class Task:
    """One prediction being polled. Times are the clock's monotonic seconds unless named ``_wall``.

    ``__slots__`` keeps a tracked task near a few hundred bytes: the bridge holds up to
    ``polling.max_in_flight`` of them.
    """

    __slots__ = (
        "created",
        "created_wall",
        "deadline",
        "delivered_wall",
        "failures",
        "first_seen",
        "headers",
        "key",
        "last_error",
        "last_pending_poll",
        "last_poll",
        "metadata",
        "model",
        "origins",
        "polls",
        "prediction",
        "state",
        "task_id",
        "tenant",
        "timeout_s",
        "trace",
    )

    def __init__(
        self,
        *,
        task_id: str,
        model: str | None,
        created: float,
        created_wall: float,
        first_seen: float,
        timeout_s: float,
        metadata: dict[str, Any] | None = None,
        key: bytes | None = None,
        headers: Headers = (),
        origin: Origin | None = None,
        tenant: str = "default",
        trace: Trace | None = None,
    ) -> None:
        self.task_id = task_id
        # The W3C context the task came with (core.tracecontext), or its first span's.
        self.trace = trace
        self.tenant = tenant  # whose task (tenants.key); one tenant without tenants
        self.model = model
        self.created = created  # best estimate of when the API created the task
        self.created_wall = created_wall
        self.first_seen = first_seen  # when the bridge consumed it
        self.timeout_s = timeout_s
        self.deadline = max(created + timeout_s, first_seen)
        self.metadata = metadata
        self.key = key
        self.headers = headers
        # (topic, partition, offset) of every input record waiting on this task's event.
        self.origins: list[Origin] = [origin] if origin is not None else []
        self.state = State.POLLING
        self.polls = 0
        self.failures = 0  # consecutive transient failures
        self.last_poll: float | None = None
        self.last_pending_poll: float | None = None  # last poll that saw a non-terminal status
        self.last_error: str | None = None
        self.prediction: Prediction | None = None  # the last one the API returned
        self.delivered_wall: float | None = None  # when a webhook delivery for it arrived

    def learn_created(self, created: float, created_wall: float) -> None:
        """Adopt the API's ``created_at``: it can only move the creation time earlier."""
        if created < self.created:
            self.created = created
            self.created_wall = created_wall
            self.deadline = max(created + self.timeout_s, self.first_seen)

    def partitions(self) -> set[tuple[str, int]]:
        return {(t, p) for t, p, _ in self.origins}
