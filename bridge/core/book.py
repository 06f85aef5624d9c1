"""The pure core: the task book and every decision the daemon makes.

A record arrives (accept, dead-letter, join a duplicate in flight, revive a parked task), a
poll's outcome arrives (finish, poll again, back off, pause everything), a deadline passes,
the broker acknowledges an event, partitions are revoked or assigned. Each method takes
the time as an argument and returns what to do: :class:`Publish` effects for the outbox,
and facts (:mod:`bridge.facts`) that the shell's telemetry turns into logs and metrics.
No I/O, no logging, no clock of its own: tests drive it with a ``ManualClock`` and the
polling benchmark at thousands of times real time.

The book: a task being polled or parked is found by its id (``_active``); once its event
is built it is found by the ticket of that event until the broker acknowledges it
(``_unacked``), so the same id may arrive again meanwhile and become a new task. Offsets
(``bridge.offsets``) know which input records are open and what may be committed.
"""

from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from bridge.config import Config
from bridge.core import events as ev
from bridge.core import facts, offset_map
from bridge.core.clock import Instant
from bridge.core.commit_plan import CommitPlanner
from bridge.core.deliveries import DeliveryMemory
from bridge.core.facts import Effect, Publish
from bridge.core.messages import Record, Rejected, parse_task
from bridge.core.offsets import OffsetTracker
from bridge.core.outcomes import TERMINAL, Kind, Outcome, Prediction
from bridge.core.policy import PollPolicy, clamp_to_deadline, overdue, request_limit, retry_delay
from bridge.core.scheduler import Scheduler, TokenBucket
from bridge.core.tasks import State, Task
from bridge.core.webhook_policy import WebhookAware

Partition = tuple[str, int]
# How often polls waiting for a slot, the budget or a pause are checked for passed deadlines.
SWEEP_INTERVAL_S = 0.25


@dataclass(slots=True)
class _EventOut:
    """A task's event, produced and not yet acknowledged."""

    task: Task
    kind: ev.EventType
    finished: Instant


@dataclass(slots=True)
class _DeadLetterOut:
    partition: Partition
    offset: int
    reason: str


class Core:
    def __init__(
        self, config: Config, *, policy: PollPolicy, rng: random.Random, now: float
    ) -> None:
        self.config = config
        self.policy = policy
        self._rng = rng
        a = config.api
        budget = None
        if a.requests_per_second > 0:
            burst = a.budget_burst or max(1, round(a.requests_per_second))
            budget = TokenBucket(a.requests_per_second, burst, now)
        self.scheduler: Scheduler[str] = Scheduler(priority=self._priority, budget=budget)
        self.offsets: OffsetTracker[Partition] = OffsetTracker()
        self._active: dict[str, Task] = {}  # polling or parked, by task id
        self._unacked: dict[int, _EventOut | _DeadLetterOut] = {}  # by ticket
        self._states: collections.Counter[State] = collections.Counter()  # tasks per state
        self._tickets = itertools.count()
        self._pause_announced_until = float("-inf")
        self._sweep_at = float("-inf")
        k = config.kafka
        # Exactly-once: a task answers records of one partition (one transaction each).
        self._join_across = config.delivery == "at_least_once"
        self.commits: CommitPlanner[Partition] = CommitPlanner(
            self.offsets, k.offset_metadata_max_bytes
        )
        self._webhooks = policy if isinstance(policy, WebhookAware) else None
        w = config.webhooks
        self.deliveries = DeliveryMemory(w.pending_max, w.pending_ttl_s)
        self._topics: dict[ev.EventType, str] = {
            "completed": k.completed_topic,
            "failed": k.failed_topic,
            "timeout": k.timeout_topic or k.failed_topic,
        }

    # --- views ---------------------------------------------------------------------------

    @property
    def open_records(self) -> int:
        """Input records consumed and not yet answered by an acknowledged record."""
        return self.offsets.in_flight()

    def polling(self) -> dict[str, Task]:
        return {i: t for i, t in self._active.items() if t.state is State.POLLING}

    def parked(self) -> dict[str, Task]:
        return {i: t for i, t in self._active.items() if t.state is State.PARKED}

    def publishing(self) -> dict[str, Task]:
        return {d.task.task_id: d.task for d in self._unacked.values() if isinstance(d, _EventOut)}

    @property
    def in_flight(self) -> int:
        """Tasks being polled or waiting for their event's acknowledgement."""
        return self._states[State.POLLING] + self._states[State.PUBLISHING]

    # --- a record arrives ----------------------------------------------------------------

    def on_record(self, rec: Record, at: Instant) -> list[Effect]:
        part = (rec.topic, rec.partition)
        try:
            finished = self.offsets.add(part, rec.offset)
        except ValueError:
            return []  # re-delivered below the tracked position (seek after rebalance)
        if finished:  # its event went out before (the commit's offset map says so)
            return [facts.Skipped(rec.partition, rec.offset)]
        cfg = self.config
        parsed = parse_task(
            rec.value,
            max_bytes=cfg.kafka.max_message_bytes,
            max_timeout_s=cfg.polling.max_timeout_s,
        )
        if isinstance(parsed, Rejected):
            return self._dead_letter(rec, parsed)
        origin = (rec.topic, rec.partition, rec.offset)
        now = at.mono
        known = self._active.get(parsed.task_id)
        if known is not None and known.state is State.PARKED:
            # Back after a rebalance: keep its poll history.
            known.origins = [origin]
            self._move(known, State.POLLING)
            resume = (
                self.policy.first_poll(known, now)
                if known.last_poll is None
                else self.policy.next_poll(known, known.last_poll)
            )
            self.scheduler.schedule(known.task_id, max(now, resume))
            return [facts.Revived(known), *self._pending_delivery(known, at)]
        if known is not None and (self._join_across or part in known.partitions()):
            # Only a task still being polled can take it: an event built cannot list it.
            known.origins.append(origin)
            return [facts.Joined(known.task_id, rec.partition, rec.offset)]
        created_wall = min(
            x
            for x in (
                at.wall,
                parsed.created_at,
                rec.timestamp_ms / 1000.0 if rec.timestamp_ms else None,
            )
            if x is not None
        )
        task = Task(
            task_id=parsed.task_id,
            model=parsed.model,
            created=now - (at.wall - created_wall),
            created_wall=created_wall,
            first_seen=now,
            timeout_s=parsed.timeout_s or cfg.polling.default_timeout_s,
            metadata=parsed.metadata,
            key=rec.key,
            headers=rec.headers,
            origin=origin,
        )
        self._active[task.task_id] = task
        self._states[State.POLLING] += 1
        self.scheduler.schedule(task.task_id, self.policy.first_poll(task, now))
        return [facts.Consumed(task, rec.partition, rec.offset), *self._pending_delivery(task, at)]

    def on_undecodable(self, topic: str, partition: int, offset: int, why: str) -> list[Effect]:
        """A record the Kafka client could not decode: dead-lettered by its offset alone."""
        try:
            if self.offsets.add((topic, partition), offset):
                return [facts.Skipped(partition, offset)]
        except ValueError:
            return []
        detail = f"the Kafka client cannot decode this record ({why});"
        detail += " key, value and headers are not available"
        record = Record(topic, partition, offset, None, None, (), None)
        return self._dead_letter(record, Rejected("undecodable", detail))

    def _dead_letter(self, rec: Record, why: Rejected) -> list[Effect]:
        dlq = self.config.kafka.dead_letter_topic

        def build(key: bytes | None, value: bytes | None, limit: int) -> ev.OutputRecord:
            return ev.dead_letter_record(
                topic=dlq,
                source_topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                key=key,
                value=value,
                headers=rec.headers if limit else (),
                reason=why.reason,
                detail=why.detail,
                max_value_bytes=limit,
            )

        ticket = next(self._tickets)
        self._unacked[ticket] = _DeadLetterOut((rec.topic, rec.partition), rec.offset, why.reason)
        record = build(rec.key, rec.value, self.config.kafka.max_message_bytes)
        return [
            facts.DeadLettered(rec.partition, rec.offset, why.reason, why.detail),
            # Too large to publish: only the dlq.* headers.
            Publish(ticket, record, lambda: build(None, None, 0), (rec.topic, rec.partition)),
        ]

    # --- polls ---------------------------------------------------------------------------

    def take_due(self, now: float, limit: int) -> list[tuple[Task, float]]:
        """Up to ``limit`` tasks to poll now, best first, with the time each was due."""
        out = []
        for task_id, due in self.scheduler.take_due(now, limit):
            task = self._active.get(task_id)
            if task is not None and task.state is State.POLLING:
                out.append((task, due))
        return out

    def request_limit(self, task: Task, now: float) -> float | None:
        return request_limit(task, now)

    def next_wakeup(self, now: float) -> float | None:
        return self.scheduler.next_wakeup(now)

    def on_outcome(self, task: Task, outcome: Outcome, at: Instant) -> list[Effect]:
        """What the answer to one poll means for its task."""
        if self._active.get(task.task_id) is not task or task.state is not State.POLLING:
            return []  # revoked or finished meanwhile
        now = at.mono
        task.polls += 1
        task.last_poll = now
        kind = outcome.kind
        self._learn(task, outcome.prediction, at)
        if kind in TERMINAL:
            task.failures = 0
            if kind is not Kind.NOT_FOUND:
                self.policy.observe(task, now)
            event_kind: ev.EventType = "completed" if kind is Kind.COMPLETED else "failed"
            return self._finish(task, event_kind, outcome.reason or None, at)
        if kind is Kind.PENDING:
            task.failures = 0
            task.last_error = outcome.reason or None  # an undocumented status, if any
            task.last_pending_poll = now
            if now >= task.deadline:
                return self._finish(task, "timeout", _timeout_reason(task), at)
            self.scheduler.schedule(task.task_id, self.policy.next_poll(task, now))
            return []
        # Not an answer about the task: the API, the key or the network is at fault.
        task.failures += 1
        task.last_error = outcome.reason
        p = self.config.polling
        retry_at = now + retry_delay(task.failures, p.backoff_base_s, p.backoff_max_s, self._rng)
        out: list[Effect] = []
        if kind is Kind.AUTH:
            out += self._pause_all(now, self.config.api.auth_error_pause_s, "auth", outcome)
        elif kind is Kind.RATE_LIMITED:
            wait = outcome.retry_after_s or retry_at - now
            out += self._pause_all(now, wait, "rate_limited", outcome)
        elif outcome.retry_after_s:
            out += self._pause_all(now, outcome.retry_after_s, "retry_after", outcome)
        retry_at = max(retry_at, self.scheduler.paused_until)
        if now >= task.deadline:
            return out + self._finish(task, "timeout", _timeout_reason(task), at)
        self.scheduler.schedule(task.task_id, clamp_to_deadline(task, retry_at, now))
        return out

    def _pause_all(self, now: float, seconds: float, reason: str, outcome: Outcome) -> list[Effect]:
        until = now + seconds
        before = max(self.scheduler.paused_until, now)
        added = max(0.0, until - before)
        if added:
            self.scheduler.pause_until(until)
        announce = now >= self._pause_announced_until  # loud once per pause, not per task
        if announce:
            self._pause_announced_until = until
        return [facts.Paused(reason, seconds, added, outcome, announce)]

    def expire_overdue(self, at: Instant) -> tuple[list[Effect], bool]:
        """Time out the tasks whose deadline passed while their poll waits for a request
        slot, the budget or the end of a pause: the deadline does not wait for the API.

        Also says whether polls are waiting (or may fall due in a pause): the dispatch loop
        then wakes every ``SWEEP_INTERVAL_S``. Walks the waiting ones at most that often.
        """
        now = at.mono
        if self.scheduler.ready_count(now) == 0:
            return [], now < self.scheduler.paused_until
        out: list[Effect] = []
        if now >= self._sweep_at:
            self._sweep_at = now + SWEEP_INTERVAL_S
            for task_id in self.scheduler.waiting():
                task = self._active.get(task_id)
                if task is not None and task.state is State.POLLING and overdue(task, now):
                    out += self._finish(task, "timeout", _timeout_reason(task), at)
        return out, True

    def _finish(
        self, task: Task, kind: ev.EventType, reason: str | None, at: Instant
    ) -> list[Effect]:
        cfg = self.config
        self.scheduler.cancel(task.task_id)
        del self._active[task.task_id]
        self._move(task, State.PUBLISHING)
        if self._webhooks is not None and kind != "timeout":
            self._webhooks.finished(task, task.delivered_wall)
        event = ev.build_event(
            kind=kind,
            task_id=task.task_id,
            model=task.model,
            prediction=task.prediction,
            reason=reason,
            created_at=task.created_wall,
            observed_at=at.wall,
            polls=task.polls,
            metadata=task.metadata,
            source=cfg.events.source,
            input_key=task.key,
            origins=list(task.origins),
        )
        topic, mode = self._topics[kind], cfg.events.mode
        ticket = next(self._tickets)
        self._unacked[ticket] = _EventOut(task, kind, at)
        record = ev.event_record(topic, event, task.headers, mode)
        reduced = _reduced(event, topic, mode)
        origin = (task.origins[0][0], task.origins[0][1]) if task.origins else None
        return [facts.Finished(task, kind, reason), Publish(ticket, record, reduced, origin)]

    # --- webhook deliveries ----------------------------------------------------------------

    def on_delivery(
        self,
        task_id: str,
        outcome: Outcome,
        *,
        webhook_id: str,
        received: float,
        mine: bool,
        at: Instant,
    ) -> list[Effect]:
        """A verified delivery from the webhook topic (every replica reads them all):
        ``received`` is when a replica's receiver took it (unix seconds), ``mine`` whether
        that was this replica. The task's owner acts on it; a replica that does not track
        the task remembers it a while, in case the task's record comes later."""
        if outcome.kind not in TERMINAL:
            return []  # not an outcome: polling decides
        task = self._active.get(task_id)
        if task is not None and task.state is State.POLLING:
            return self._apply_delivery(task, outcome, webhook_id, received, at)
        if self._webhooks is not None and self._webhooks.late(task_id, received):
            return [facts.DeliveryLate(task_id, webhook_id)]
        pushed = self.deliveries.remember(task_id, outcome, webhook_id, received, mine, at.mono)
        return [facts.DeliveryExpired(t, r.webhook_id, r.mine) for t, r in pushed]

    def delivery_applied(self, task_id: str) -> None:
        """Another replica acted on a delivery for ``task_id``: forget it here."""
        self.deliveries.take(task_id)

    def expire_deliveries(self, now: float) -> list[Effect]:
        """Deliveries remembered longer than ``webhooks.pending_ttl_s``: no task came."""
        expired = self.deliveries.expire(now)
        return [facts.DeliveryExpired(t, r.webhook_id, r.mine) for t, r in expired]

    def _pending_delivery(self, task: Task, at: Instant) -> list[Effect]:
        known = self.deliveries.take(task.task_id)
        if known is None:
            return []
        return self._apply_delivery(task, known.outcome, known.webhook_id, known.received, at)

    def _apply_delivery(
        self, task: Task, outcome: Outcome, webhook_id: str, received: float, at: Instant
    ) -> list[Effect]:
        task.delivered_wall = received
        spared = self._webhooks.polls_without(task, at.mono) if self._webhooks else 0
        if self.config.webhooks.confirm_by_poll:  # one poll, now, says what happened
            self.scheduler.schedule(task.task_id, at.mono)
            return [facts.DeliveryApplied(task, webhook_id, True, max(0, spared - 1))]
        self._learn(task, outcome.prediction, at)
        self.policy.observe(task, at.mono)
        kind: ev.EventType = "completed" if outcome.kind is Kind.COMPLETED else "failed"
        applied = facts.DeliveryApplied(task, webhook_id, False, spared)
        return [applied, *self._finish(task, kind, outcome.reason or None, at)]

    # --- the broker acknowledges ---------------------------------------------------------

    def acknowledged(self, ticket: int, at: Instant) -> list[Effect]:
        """The broker has the record (or it was given up): its input offsets are done."""
        out = self._unacked.pop(ticket, None)
        if out is None:
            return []
        if isinstance(out, _DeadLetterOut):
            self.offsets.done(out.partition, out.offset)
            return [facts.DeadLetterDelivered(out.reason)]
        self._states[State.PUBLISHING] -= 1
        for topic, partition, offset in out.task.origins:
            self.offsets.done((topic, partition), offset)
        return [facts.Delivered(out.task, out.kind, out.finished, at)]

    # --- rebalances ----------------------------------------------------------------------

    def park(self, partitions: set[Partition]) -> None:
        """Stop polling the tasks of revoked ``partitions``; keep them for a comeback.

        If the same partitions come back (the usual case in an eager rebalance), the
        re-fetched records revive them with their poll history instead of starting over.
        """
        for task in list(self._active.values()):
            if task.state is not State.POLLING:
                continue
            keep = [o for o in task.origins if (o[0], o[1]) not in partitions]
            if len(keep) == len(task.origins):
                continue
            if keep:
                task.origins = keep
                continue
            self.scheduler.cancel(task.task_id)
            self._move(task, State.PARKED)

    def release(self, partitions: set[Partition], why: str) -> list[Effect]:
        """Set ``partitions`` aside (after their last commit), counting the records the next
        owner will publish again: finished above the commit but not in its offset map, or
        not acknowledged yet."""
        ahead = 0
        for part in partitions:
            ahead += len(self.offsets.finished_above(part) - self.commits.committed_map(part))
        unacked = sum(
            1
            for d in self._unacked.values()
            if isinstance(d, _EventOut)
            for t, p, _ in d.task.origins
            if (t, p) in partitions
        )
        for part in partitions:
            self.offsets.release(part)
            self.commits.forget(part)
        parked = self._states[State.PARKED]
        numbers = sorted(p for _, p in partitions)
        return [facts.Released(numbers, why, parked, ahead + unacked)]

    def assign(
        self, starts: dict[Partition, tuple[int | None, str]], *, complete: bool = True
    ) -> list[Effect]:
        """Start each partition at the group's committed offset with its offset map (the
        finished offsets above it, from the commit's metadata), merged with what finished
        here if the partition is coming back. For a ``complete`` assignment, parked tasks
        of partitions that went elsewhere belong to their new owner now."""
        partitions = set(starts)
        known = 0
        for part, (committed, metadata) in starts.items():
            finished = offset_map.decode(metadata, committed) if committed is not None else ()
            known += self.offsets.start(part, committed, finished)
            if committed is not None:
                self.offsets.mark_committed({part: committed}, {part: metadata})
        if not complete:  # one partition started again (an aborted transaction)
            return []
        self.offsets.forget_released(partitions)
        handed_over = 0
        for task_id, task in list(self._active.items()):
            if task.state is State.PARKED and not task.partitions() & partitions:
                del self._active[task_id]
                self._states[State.PARKED] -= 1
                handed_over += 1
        kept = self._states[State.PARKED]
        numbers = sorted(p for _, p in partitions)
        return [facts.Assigned(numbers, kept, handed_over, known)]

    def reset(self, part: Partition) -> None:
        """Forget everything not committed for ``part`` (its transaction was aborted): its
        tasks are parked and its unacknowledged events dropped; the records are fetched
        again from the committed offset and revive the tasks."""
        self.park({part})
        for ticket, out in list(self._unacked.items()):
            if isinstance(out, _DeadLetterOut):
                where: Partition | None = out.partition
            else:
                origins = out.task.origins
                where = (origins[0][0], origins[0][1]) if origins else None
            if where != part:
                continue
            del self._unacked[ticket]
            if not isinstance(out, _EventOut):
                continue
            if out.task.task_id in self._active:  # the same id is tracked again already
                self._states[State.PUBLISHING] -= 1
            else:  # polled again when its record returns
                self._move(out.task, State.PARKED)
                self._active[out.task.task_id] = out.task
        self.offsets.drop(part)
        self.commits.forget(part)

    # --- commits -------------------------------------------------------------------------

    def transaction_plan(self, part: Partition, tickets: list[int]) -> tuple[int, str] | None:
        """The offset to commit for ``part`` in a transaction that carries ``tickets``: as
        if their records were acknowledged, without changing anything."""
        finished: list[int] = []
        for ticket in tickets:
            out = self._unacked.get(ticket)
            if isinstance(out, _DeadLetterOut):
                finished.append(out.offset)
            elif out is not None:
                finished += [o for t, p, o in out.task.origins if (t, p) == part]
        return self.commits.plan_with(part, finished)

    # --- internals -----------------------------------------------------------------------

    @staticmethod
    def _learn(task: Task, prediction: Prediction | None, at: Instant) -> None:
        """What an answer about the task tells: its result so far, creation time, model."""
        if prediction is None:
            return
        task.prediction = prediction
        if prediction.created_at is not None:
            task.learn_created(at.mono - (at.wall - prediction.created_at), prediction.created_at)
        if task.model is None and prediction.model:
            task.model = prediction.model

    def _move(self, task: Task, state: State) -> None:
        """Change a task's state, keeping the counts per state (in_flight, parked) exact."""
        self._states[task.state] -= 1
        self._states[state] += 1
        task.state = state

    def _priority(self, task_id: str, due: float) -> float:
        task = self._active.get(task_id)
        return self.policy.priority(task, due) if task is not None else -due


def _timeout_reason(task: Task) -> str:
    reason = f"deadline of {task.timeout_s:g}s passed"
    if task.last_error:
        return reason + f"; last poll: {task.last_error}"
    status = task.prediction.status if task.prediction is not None else None
    return reason + f"; last status: {status or 'none seen'}"


def _reduced(
    event: dict[str, object], topic: str, mode: ev.EventMode
) -> Callable[[], ev.OutputRecord]:
    """The same event without what came from the input, for when it is too large to send."""

    def build() -> ev.OutputRecord:
        data = dict(event["data"])  # type: ignore[call-overload]
        data["metadata"] = None
        data["input"] = {**data["input"], "key": None}
        return ev.event_record(topic, {**event, "data": data}, (), mode)

    return build
