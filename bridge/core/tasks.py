"""The state of one tracked prediction: plain data for the core, the policy and the scheduler."""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from bridge.core.events import rfc3339
from bridge.core.messages import Headers
from bridge.core.outcomes import Prediction
from bridge.core.tracecontext import Trace

Origin = tuple[str, int, int]  # (topic, partition, offset) of an input record
T = TypeVar("T", bound=Hashable)


class State(enum.Enum):
    POLLING = "polling"  # in the scheduler: polled until terminal or past its deadline
    PARKED = "parked"  # its partition was revoked; revived if the records come back
    PUBLISHING = "publishing"  # terminal: its event is out, waiting for the broker's ack

    # Members are singletons: identity is their hash, in C (Enum's hashes the name in
    # Python, and the core counts tasks per state several times a task).
    __hash__ = object.__hash__


class Shared(Generic[T]):
    """One copy of equal values for all who hold one (a partition's name, a model's, an
    answer's shape): a bounded table, cleared when full (the holders keep theirs), so a
    flood of distinct values cannot grow it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._table: dict[T, T] = {}

    def __call__(self, value: T) -> T:
        shared = self._table.get(value)
        if shared is None:
            if len(self._table) >= self._limit:
                self._table.clear()
            shared = self._table[value] = value
        return shared


@dataclass(frozen=True, slots=True)
class _Shape:
    """What is left of a prediction once the task's own fields are set apart (its id, model
    and creation time are the task's): the same for most answers (a pending one, usually),
    so one instance serves every task with an answer of that shape."""

    status: str | None
    error: str | None
    inference_ms: int | None
    has_id: bool
    has_model: bool
    nsfw: bool
    created: bool
    raw_derived: bool  # created_at as the API wrote it is rfc3339's


_SHAPES: Shared[_Shape] = Shared(256)
# Input partitions as (topic, partition), one tuple each for all their tasks.
_PARTS: Shared[tuple[str, int]] = Shared(4096)


class Task:
    """One prediction being polled. Times are the clock's monotonic seconds unless named ``_wall``.

    ``__slots__`` keeps a tracked task near a few hundred bytes: the bridge holds up to
    ``polling.max_in_flight`` of them (``bench/task_memory.py`` counts them). For that,
    what can be derived is: ``deadline``, a key that is the task id, a single origin, and
    the parts of the last answer that are the task's own or shared (``prediction``).
    """

    _key: bytes | bool | None  # True: the task id, encoded

    __slots__ = (
        "_created_raw",
        "_key",
        "_origins",
        "_part",
        "_prediction",
        "created",
        "created_wall",
        "delivered_wall",
        "failures",
        "first_seen",
        "headers",
        "last_error",
        "last_pending_poll",
        "last_poll",
        "metadata",
        "model",
        "polls",
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
        self.metadata = metadata
        self.key = key
        self.headers = headers
        # (topic, partition, offset) of every input record waiting on this task's event,
        # see ``origins``: one is its partition (shared) and offset, several a tuple.
        self._part: tuple[str, int] | None = None
        self._origins: int | tuple[Origin, ...] = ()
        if origin is not None:
            self.origins = (origin,)
        self.state = State.POLLING
        self.polls = 0
        self.failures = 0  # consecutive transient failures
        self.last_poll: float | None = None
        self.last_pending_poll: float | None = None  # last poll that saw a non-terminal status
        self.last_error: str | None = None
        self._prediction: Prediction | _Shape | None = None  # see ``prediction``
        self._created_raw: str | None = None
        self.delivered_wall: float | None = None  # when a webhook delivery for it arrived

    @property
    def deadline(self) -> float:
        # Derived, not kept (a float each): max(created + timeout_s, first_seen), inlined.
        at = self.created + self.timeout_s
        return at if at >= self.first_seen else self.first_seen

    def learn_created(self, created: float, created_wall: float) -> None:
        """Adopt the API's ``created_at``: it can only move the creation time earlier."""
        if created < self.created:
            if isinstance(self._prediction, _Shape) and self._prediction.created:
                self._prediction = self.prediction  # it reads created_wall: fixed first
            self.created = created
            self.created_wall = created_wall

    @property
    def key(self) -> bytes | None:
        key = self._key
        return self.task_id.encode() if isinstance(key, bool) else key

    @key.setter
    def key(self, key: bytes | None) -> None:
        # Usually the task id itself: kept as a flag rather than a second copy.
        self._key = True if key is not None and key == self.task_id.encode() else key

    @property
    def origins(self) -> tuple[Origin, ...]:
        part, origins = self._part, self._origins
        if part is not None:
            return ((part[0], part[1], cast(int, origins)),)
        return cast(tuple[Origin, ...], origins)

    @origins.setter
    def origins(self, origins: Iterable[Origin]) -> None:
        several = tuple(origins)
        if len(several) != 1:
            self._part, self._origins = None, several
            return
        topic, partition, offset = several[0]
        # The offset: the same int object the partition's offset tracking keeps.
        self._part, self._origins = _PARTS((topic, partition)), offset

    def add_origin(self, origin: Origin) -> None:
        self.origins = (*self.origins, origin)

    @property
    def prediction(self) -> Prediction | None:
        """The last prediction the API returned (rebuilt on each read when kept apart)."""
        p = self._prediction
        if not isinstance(p, _Shape):
            return p
        return Prediction(
            id=self.task_id if p.has_id else None,
            model=self.model if p.has_model else None,
            status=p.status,
            outputs=[],
            error=p.error,
            inference_ms=p.inference_ms,
            created_at=self.created_wall if p.created else None,
            created_at_raw=rfc3339(self.created_wall) if p.raw_derived else self._created_raw,
            has_nsfw_contents=[] if p.nsfw else None,
        )

    @prediction.setter
    def prediction(self, p: Prediction | None) -> None:
        """Kept apart: the fields that are the task's own (its id, model and creation time,
        so ``model`` and ``created_wall`` are learned first), the creation time as the API
        wrote it, and a shape shared with every answer alike (a pending one, usually)."""
        self._created_raw = None
        if (
            p is None
            or p.outputs
            or p.has_nsfw_contents
            or p.error  # None or "" only: a long text is not shared
            or (p.id is not None and p.id != self.task_id)
            or (p.model is not None and p.model != self.model)
            or (p.created_at is not None and p.created_at != self.created_wall)
        ):
            self._prediction = p
            return
        raw = p.created_at_raw
        # As the API wrote it, usually what rfc3339 writes: derived then, not kept.
        derived = raw is not None and p.created_at is not None and raw == rfc3339(p.created_at)
        self._prediction = _SHAPES(
            _Shape(
                p.status,
                p.error,
                p.inference_ms,
                p.id is not None,
                p.model is not None,
                p.has_nsfw_contents is not None,
                p.created_at is not None,
                derived,
            )
        )
        self._created_raw = None if derived else raw

    def partitions(self) -> set[tuple[str, int]]:
        if self._part is not None:
            return {self._part}
        return {(t, p) for t, p, _ in self.origins}
