"""What the core returns: effects to carry out and facts to report. Plain data.

:class:`Publish` is the one effect (the outbox produces the record and reports the broker's
acknowledgement back to the core by ticket). Every other value is a fact: something that
happened, which ``bridge.telemetry`` turns into log lines and metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.core.clock import Instant
from bridge.core.events import EventType, OutputRecord
from bridge.core.outcomes import Outcome
from bridge.core.tasks import Task
from bridge.core.tracecontext import Trace
from bridge.core.value import value


@value
class Publish:
    """Produce ``record``; ``reduced`` builds a smaller one if it can never be sent."""

    ticket: int
    record: OutputRecord
    reduced: Callable[[], OutputRecord] | None = None
    partition: tuple[str, int] | None = None  # the input partition it answers
    trace: Trace | None = None  # the trace context of the task (or input) it answers
    model: str | None = None
    settle: Callable[[bool], None] | None = None  # set by the shell: ends the send's span


@value
class Consumed:
    task: Task
    partition: int
    offset: int


@value
class Joined:
    """An input record for a task id already being polled: one poll, one event for both."""

    task_id: str
    partition: int
    offset: int


@value
class Revived:
    """A parked task whose record came back after a rebalance: polled on, history kept."""

    task: Task


@value
class Held:
    """A record of a tenant over its share of the in-flight slots: kept, not polled yet."""

    tenant: str
    partition: int
    offset: int


@value
class HeadersDropped:
    """Input headers not carried to the event: values that are not UTF-8 text."""

    partition: int
    offset: int
    count: int


@value
class TenantUnknown:
    """A record whose tenant key is missing or unreadable: it is the default tenant's."""

    partition: int
    offset: int


@value
class Skipped:
    """A record fetched again whose event went out before: the offset map said so."""

    partition: int
    offset: int


@value
class DeadLettered:
    partition: int
    offset: int
    reason: str
    detail: str


@value
class DeadLetterDelivered:
    reason: str


@value
class Finished:
    """A task reached its outcome; its event is being produced."""

    task: Task
    kind: EventType
    reason: str | None


@value
class Delivered:
    """The broker acknowledged a task's event (or it was given up): the task is done."""

    task: Task
    kind: EventType
    finished: Instant
    at: Instant


@value
class Paused:
    """Every poll waits: a 429, a 401/403 or a Retry-After. ``announce``: the first of a pause."""

    reason: str
    seconds: float
    added_s: float  # how much this extended the pause
    outcome: Outcome
    announce: bool


@value
class PausedByPeer:
    """Every poll waits: another replica of the account saw a 429 or a Retry-After."""

    reason: str
    seconds: float
    added_s: float
    by: str


@value
class Released:
    """Partitions left this member (``why``: revoked or shutdown) after their last commit."""

    partitions: list[int]
    why: str
    parked: int
    duplicate_risk: int  # records the next owner will publish again


@value
class Assigned:
    partitions: list[int]
    kept_parked: int
    handed_over: int  # parked tasks whose partitions went to another member
    known_finished: int = 0  # offsets the offset maps (or an earlier stay) say are done


@value
class DeliveryApplied:
    """This replica acted on a webhook delivery for a task it tracks: finished it, or
    (``confirm``) polled it at once. ``spared``: polls the schedule would have sent."""

    task: Task
    webhook_id: str
    confirm: bool
    spared: int


@value
class DeliveryLate:
    """A delivery for a task a poll had already finished."""

    task_id: str
    webhook_id: str


@value
class DeliveryExpired:
    """A remembered delivery whose task never came here; ``mine``: this replica received it."""

    task_id: str
    webhook_id: str
    mine: bool


@value
class WebhookFeed:
    """This replica's webhook feed became live (reads every partition of the webhook topic,
    caught up) or stopped being so (``why``). While it is not, polls are not deferred:
    ``rescheduled`` tasks whose poll waited for a delivery were moved to the wrapped
    policy's schedule; on becoming live, ``rescheduled`` tasks wait for deliveries again."""

    live: bool
    why: str
    rescheduled: int


Fact = (
    Consumed
    | Joined
    | Revived
    | Held
    | TenantUnknown
    | HeadersDropped
    | Skipped
    | DeadLettered
    | DeadLetterDelivered
    | Finished
    | Delivered
    | Paused
    | PausedByPeer
    | Released
    | Assigned
    | DeliveryApplied
    | DeliveryLate
    | DeliveryExpired
    | WebhookFeed
)
Effect = Publish | Fact
