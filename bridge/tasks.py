"""The state of one tracked prediction: plain data for the policy, the scheduler and the app."""

from __future__ import annotations

from typing import Any

from bridge.messages import Headers


class Task:
    """One prediction being polled. Times are the clock's monotonic seconds unless named ``_wall``.

    ``__slots__`` keeps a tracked task near a few hundred bytes: the bridge holds up to
    ``polling.max_in_flight`` of them.
    """

    __slots__ = (
        "created",
        "created_wall",
        "deadline",
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
        "task_id",
        "timeout_s",
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
        origin: tuple[str, int, int] | None = None,
    ) -> None:
        self.task_id = task_id
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
        self.origins: list[tuple[str, int, int]] = [origin] if origin is not None else []
        self.polls = 0
        self.failures = 0  # consecutive transient failures
        self.last_poll: float | None = None
        self.last_pending_poll: float | None = None  # last poll that saw a non-terminal status
        self.last_error: str | None = None
        self.prediction: Any = None  # the last parsed api.Prediction

    def learn_created(self, created: float, created_wall: float) -> None:
        """Adopt the API's ``created_at``: it can only move the creation time earlier."""
        if created < self.created:
            self.created = created
            self.created_wall = created_wall
            self.deadline = max(created + self.timeout_s, self.first_seen)
