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
(``_unacked``), so the same id may arrive again meanwhile and become a new task. Each input
partition's life here (assigned, revoked, fenced; its epochs, offsets and commits) is
``bridge.core.partitions``; the shell asks the core, and keeps no copy of it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from bridge.config import Config
from bridge.core import events as ev
from bridge.core import facts, learning, tracecontext
from bridge.core.clock import Instant
from bridge.core.deliveries import DeliveryMemory
from bridge.core.facts import Effect, Publish
from bridge.core.messages import Record, Rejected, TaskRequest, parse_task
from bridge.core.outcomes import TERMINAL, Kind, Outcome, Prediction
from bridge.core.partitions import Partitions, Phase, Planned, Take
from bridge.core.policy import PollPolicy, clamp_to_deadline, overdue, request_limit, retry_delay
from bridge.core.scheduler import FairPools, Scheduler, TokenBucket
from bridge.core.tasks import Shared, State, Task
from bridge.core.tenants import TenantKey, Weights
from bridge.core.webhook_policy import WebhookAware

Partition = tuple[str, int]
# A share of the account's budget saves up at most this many seconds of its rate.
SHARED_BURST_S = 0.2
# How often polls waiting for a slot, the budget or a pause are checked for passed deadlines.
SWEEP_INTERVAL_S = 0.25
SWEEP_CHECKS_PER_S = 4_000  # a backlog of 20,000 polls: walked every 5 s
# Model names shared by the tasks of each (a table of this many, cleared when full).
MAX_SHARED_NAMES = 4096


@dataclass(slots=True)
class _EventOut:
    """A task's event, produced and not yet acknowledged."""

    task: Task
    kind: ev.EventType
    finished: Instant


@dataclass(frozen=True, slots=True)
class Sample:
    """The scheduler's and the policy's state, for the gauges."""

    due: int  # polls due and waiting (a request slot, the budget, a pause)
    budget_wait_s: float  # time polls waited for the budget, in all
    taken: int  # polls the scheduler let out, in all
    budget_rate: float | None  # requests/s of the budget, if there is one
    model_stats: dict[str, tuple[float, float]]  # learned median and p90 per model


@dataclass(frozen=True, slots=True)
class TenantSample:
    in_flight: int
    held: int
    due: int
    waited_s: float  # the longest a due poll of it has waited


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
            # The account's budget starts at the safe share, until the replicas agree.
            rate = a.requests_per_second
            if a.budget_scope == "account":
                rate *= config.cluster.fallback_share
            budget = TokenBucket(rate, self._burst(rate), now)
        self._keep_binary_headers = config.events.binary_headers == "keep"
        self._tenants = TenantKey(config.tenants)
        self._weights = Weights(config.tenants)
        fair = None
        if self._tenants.enabled:
            fair = FairPools(self._tenant_of, self._weights.weight, self._weights.rate_cap)
        self.scheduler: Scheduler[str] = Scheduler(
            priority=self._priority, budget=budget, fair=fair
        )
        # Per tenant: tasks in flight (polling or publishing), and records held back.
        self._load: collections.Counter[str] = collections.Counter()
        self._held: dict[str, collections.deque[Record]] = {}
        self.held_count = 0
        self._active_weight = 0.0  # the weights of tenants with tasks in flight or held
        self._partitions: Partitions[Partition] = Partitions(config.kafka.offset_metadata_max_bytes)
        self._active: dict[str, Task] = {}  # polling or parked, by task id
        self._names: Shared[str] = Shared(MAX_SHARED_NAMES)  # model names
        self._unacked: dict[int, _EventOut | _DeadLetterOut] = {}  # by ticket
        self._states: collections.Counter[State] = collections.Counter()  # tasks per state
        self._tickets = itertools.count()
        self._pause_announced_until = float("-inf")
        self._sweep_at = float("-inf")
        k = config.kafka
        # Exactly-once: a task answers records of one partition (one transaction each).
        self._join_across = config.delivery == "at_least_once"
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
        return self._partitions.in_flight()

    def sample(self, now: float) -> Sample:
        scheduler = self.scheduler
        budget = scheduler.budget
        stats = getattr(self.policy, "model_stats", None)  # only learning policies have it
        return Sample(
            due=scheduler.ready_count(now),
            budget_wait_s=scheduler.budget_wait_s,
            taken=scheduler.taken,
            budget_rate=budget.rate if budget is not None else None,
            model_stats=stats() if stats is not None else {},
        )

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
        take = self._partitions.take(part, rec.offset)
        if take is Take.FINISHED:  # its event went out before (the commit's offset map)
            return [facts.Skipped(rec.partition, rec.offset)]
        if take is not Take.NEW:  # another member's, or fetched again after the start
            return []
        parsed = self._parse(rec)
        if isinstance(parsed, Rejected):
            return self._dead_letter(rec, parsed)
        if not self._tenants.enabled:
            return self._track(rec, parsed, self._tenants.default, at)
        tenant, found = self._tenants.of(rec.key, rec.headers, parsed.tenant)
        unknown: list[Effect] = [] if found else [facts.TenantUnknown(rec.partition, rec.offset)]
        if self._over_share(tenant, parsed.task_id):
            self._hold(tenant, rec)
            return [*unknown, facts.Held(tenant, rec.partition, rec.offset)]
        return [*unknown, *self._track(rec, parsed, tenant, at)]

    def _parse(self, rec: Record) -> TaskRequest | Rejected:
        cfg = self.config
        return parse_task(
            rec.value,
            max_bytes=cfg.kafka.max_message_bytes,
            max_timeout_s=cfg.polling.max_timeout_s,
            tenant_field=self._tenants.field,
        )

    def _track(self, rec: Record, parsed: TaskRequest, tenant: str, at: Instant) -> list[Effect]:
        """Poll what ``rec`` asks for: a new task, a parked one revived, or a duplicate
        joining the task in flight."""
        cfg, part = self.config, (rec.topic, rec.partition)
        origin = (rec.topic, rec.partition, rec.offset)
        now = at.mono
        known = self._active.get(parsed.task_id)
        if known is not None and known.state is State.PARKED:
            # Back after a rebalance: keep its poll history.
            known.origins = (origin,)
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
            known.add_origin(origin)
            return [facts.Joined(known.task_id, rec.partition, rec.offset)]
        headers, dropped = ev.carried_headers(rec.headers, self._keep_binary_headers)
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
            model=self._shared_name(parsed.model),
            created=now - (at.wall - created_wall),
            created_wall=created_wall,
            first_seen=now,
            timeout_s=parsed.timeout_s or cfg.polling.default_timeout_s,
            metadata=parsed.metadata,
            key=rec.key,
            headers=headers,
            origin=origin,
            tenant=tenant,
            trace=tracecontext.from_headers(rec.headers),
        )
        self._active[task.task_id] = task
        self._count(task.tenant, State.POLLING, +1)
        self.scheduler.schedule(task.task_id, self.policy.first_poll(task, now))
        out: list[Effect] = [facts.Consumed(task, rec.partition, rec.offset)]
        if dropped:
            out.append(facts.HeadersDropped(rec.partition, rec.offset, dropped))
        return [*out, *self._pending_delivery(task, at)]

    def on_undecodable(self, topic: str, partition: int, offset: int, why: str) -> list[Effect]:
        """A record the Kafka client could not decode: dead-lettered by its offset alone."""
        take = self._partitions.take((topic, partition), offset)
        if take is Take.FINISHED:
            return [facts.Skipped(partition, offset)]
        if take is not Take.NEW:
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
            Publish(
                ticket,
                record,
                lambda: build(None, None, 0),
                (rec.topic, rec.partition),
                tracecontext.from_headers(rec.headers),  # dead letters keep the input's
            ),
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

    # --- what is learned, shared with the other replicas (core.learning) -----------------

    def learned_since(self, replica: str, at: float) -> list[learning.Learned]:
        """What the policy learned since the last call, as records for the state topic."""
        policy = learning.learner(self.policy)
        return learning.to_publish(policy, replica, at) if policy is not None else []

    def learn_from(self, learned: learning.Learned) -> bool:
        """Another replica's (or a past run's) record: taken where it knows more."""
        policy = learning.learner(self.policy)
        return policy is not None and policy.learn_from(learned.model, learned.data)

    # --- the budget, shared with the other replicas ---------------------------------------

    def set_budget_rate(self, rate: float, now: float) -> None:
        """This replica's share of the account's budget moved (``bridge.core.budget``)."""
        budget = self.scheduler.budget
        if budget is not None and rate > 0 and abs(rate - budget.rate) > 1e-9:
            budget.set_rate(rate, self._burst(rate), now)

    def _burst(self, rate: float) -> float:
        a = self.config.api
        if a.budget_burst:  # configured for the whole budget: this share's part of it
            return max(1.0, a.budget_burst * rate / a.requests_per_second)
        if a.budget_scope == "account":
            # A fifth of a second: shares add up to the limit in any one-second window.
            return max(1.0, round(rate * SHARED_BURST_S))
        return max(1.0, round(rate))

    def pause_from_peer(self, until_wall: float, reason: str, by: str, at: Instant) -> list[Effect]:
        """Another replica of the account saw a 429 (or a Retry-After): every poll here waits
        too, until ``until_wall``."""
        seconds = until_wall - at.wall
        if seconds <= 0:
            return []
        until = at.mono + seconds
        added = max(0.0, until - max(self.scheduler.paused_until, at.mono))
        if added:
            self.scheduler.pause_until(until)
        return [facts.PausedByPeer(reason, seconds, added, by)]

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
            waiting = self.scheduler.waiting()
            # A long backlog is walked less often: at most SWEEP_CHECKS_PER_S tasks a second,
            # so a deadline is seen late by up to len(waiting) / SWEEP_CHECKS_PER_S seconds.
            self._sweep_at = now + max(SWEEP_INTERVAL_S, len(waiting) / SWEEP_CHECKS_PER_S)
            for task_id in waiting:
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
        origins = task.origins  # derived on each read (core.tasks): read once
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
            origins=list(origins),
            trace=task.trace,
            dataschema=cfg.events.dataschema or ev.DEFAULT_DATASCHEMA,
            retention_s=cfg.events.output_retention_s,
        )
        topic, mode = self._topics[kind], cfg.events.mode
        ticket = next(self._tickets)
        self._unacked[ticket] = _EventOut(task, kind, at)
        record = ev.event_record(topic, event, task.headers, mode)
        reduced = _reduced(event, topic, mode)
        origin = (origins[0][0], origins[0][1]) if origins else None
        published = Publish(ticket, record, reduced, origin, task.trace, task.model)
        return [facts.Finished(task, kind, reason), published]

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

    def webhook_feed(self, live: bool, now: float, why: str = "") -> list[Effect]:
        """The webhook feed's verdict changed: whether it is live (reads every partition of
        the webhook topic, caught up), else ``why`` not. Polls wait for deliveries only while
        it is: when it stops, every task whose next poll the policy set is put back on the
        wrapped policy's schedule at once (a deferred one polls now if its normal poll has
        passed); tasks waiting out a backoff or a delivery's confirming poll keep their time.
        When it is live again (caught up: every delivery sent meanwhile has been read), those
        tasks wait for their deliveries again: a feed that starts behind (a restart reads
        the last ``pending_ttl_s`` of the topic) costs no polls once it has caught up."""
        hooks = self._webhooks
        if hooks is None:
            return []
        was, hooks.live = hooks.live, live
        if was == live:
            return [facts.WebhookFeed(live, why, 0)]
        due = set(self.scheduler.waiting())  # due already: polled on the old schedule
        moved = 0
        for task in self._active.values():
            if (
                task.state is State.POLLING
                and task.task_id in self.scheduler
                and task.task_id not in due
                and task.failures == 0
                and task.delivered_wall is None
            ):
                if live:
                    last = task.last_poll
                    at = (
                        self.policy.first_poll(task, now)
                        if last is None
                        else self.policy.next_poll(task, last)
                    )
                    self.scheduler.schedule(task.task_id, max(now, at))
                else:
                    self.scheduler.schedule(task.task_id, hooks.base_poll(task, now))
                moved += 1
        return [facts.WebhookFeed(live, why, moved)]

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
        """The broker has the record (or it was given up): its input offsets are done, and
        a tenant whose records were held may have room again."""
        out = self._unacked.pop(ticket, None)
        if out is None:
            return []
        if isinstance(out, _DeadLetterOut):
            self._partitions.done(out.partition, out.offset)
            return [facts.DeadLetterDelivered(out.reason)]
        self._count(out.task.tenant, State.PUBLISHING, -1)
        for topic, partition, offset in out.task.origins:
            self._partitions.done((topic, partition), offset)
        delivered: list[Effect] = [facts.Delivered(out.task, out.kind, out.finished, at)]
        if self._held:
            delivered += self.release_held(at)
        return delivered

    # --- partitions: assigned, revoked, fenced -------------------------------------------

    def starting(self, partitions: set[Partition]) -> None:
        """Assigned: where they start is being read; records fetched meanwhile are only
        noted (aiokafka fetches as soon as it assigns, before the listener decides)."""
        self._partitions.starting(partitions)

    def assign(
        self, starts: dict[Partition, tuple[int | None, str]], *, complete: bool = True
    ) -> list[Effect]:
        """Start each partition at the group's committed offset with its offset map (the
        finished offsets above it, from the commit's metadata), merged with what finished
        here if the partition is coming back. For a ``complete`` assignment, parked tasks
        of partitions that went elsewhere belong to their new owner now."""
        known = 0
        for part, (committed, metadata) in starts.items():
            known += self._partitions.start(part, committed, metadata)
        if not complete:  # one partition started again (an aborted transaction)
            return []
        partitions = set(starts)
        self._partitions.keep_released(partitions)
        handed_over = 0
        for task_id, task in list(self._active.items()):
            if task.state is State.PARKED and not task.partitions() & partitions:
                del self._active[task_id]
                self._count(task.tenant, State.PARKED, -1)
                handed_over += 1
        kept = self._states[State.PARKED]
        numbers = sorted(p for _, p in partitions)
        return [facts.Assigned(numbers, kept, handed_over, known)]

    def revoke(self, partitions: set[Partition]) -> None:
        """Leaving this member: their records are the next owner's from now on, and their
        tasks are parked. If the same partitions come back (the usual case in an eager
        rebalance), the re-fetched records revive them with their poll history."""
        self._partitions.revoking(partitions)
        self._park(partitions)
        self._drop_held(partitions)

    def release(self, partitions: set[Partition], why: str) -> list[Effect]:
        """Set ``partitions`` aside (after their last commit), counting the records the next
        owner will publish again: finished above the commit but not in its offset map, or
        not acknowledged yet."""
        unacked = sum(
            1
            for d in self._unacked.values()
            if isinstance(d, _EventOut)
            for t, p, _ in d.task.origins
            if (t, p) in partitions
        )
        again = self._partitions.release(partitions)
        parked = self._states[State.PARKED]
        numbers = sorted(p for _, p in partitions)
        return [facts.Released(numbers, why, parked, again + unacked)]

    def fence(self, part: Partition, epoch: int) -> bool:
        """Another member initialised ``part``'s transactional id during ``epoch``: what is
        not committed is forgotten and its records are no longer taken here (the group's
        next assignment says where it goes). False if that assignment is gone already."""
        if not self._partitions.fence(part, epoch):
            return False
        self._forget_uncommitted(part)
        return True

    def restart(self, part: Partition, epoch: int) -> bool:
        """``part``'s transaction of ``epoch`` failed: what is not committed is forgotten and
        the partition starts again from its commit, in a new epoch (its records come back
        and revive the tasks). False if that assignment is gone already."""
        if not self._partitions.restart(part, epoch):
            return False
        self._forget_uncommitted(part)
        return True

    def epoch(self, part: Partition) -> int | None:
        return self._partitions.epoch(part)

    def fenced(self, part: Partition, epoch: int) -> bool:
        """Still fenced since ``epoch``: no rebalance and no restart came meanwhile."""
        return self._partitions.phase(part) is Phase.FENCED and self.epoch(part) == epoch

    def active_partitions(self) -> dict[Partition, int]:
        """The partitions whose records are taken here, with their epochs."""
        return self._partitions.active()

    def fetch_from(self, part: Partition) -> int | None:
        """Where to fetch ``part`` from once started (None: aiokafka's own reset)."""
        return self._partitions.fetch_from(part)

    def next_offset(self, part: Partition) -> int | None:
        """The record after the last one taken: where to read again after a bad batch."""
        return self._partitions.next_offset(part)

    def held_partitions(self) -> set[Partition]:
        """Partitions to pause: their offset map fills 75% of the broker's limit."""
        return self._partitions.held()

    # --- commits -------------------------------------------------------------------------

    def commit_plan(self, only: set[Partition] | None = None) -> dict[Partition, Planned]:
        """What to commit now: each active partition whose position or map changed."""
        return self._partitions.plan(only)

    def committed(self, plan: dict[Partition, Planned]) -> None:
        """The broker stored ``plan`` (a plan of an older epoch changes nothing)."""
        self._partitions.committed(plan)

    def metadata_refused(self) -> int:
        """The broker refused an offset map as too large: returns the smaller limit."""
        return self._partitions.metadata_refused()

    def metadata_dropped(self) -> None:
        """The broker drops commit metadata: commit positions alone from now on."""
        self._partitions.metadata_dropped()

    def map_sizes(self) -> dict[Partition, int]:
        return self._partitions.map_sizes()

    def committed_position(self, part: Partition) -> int | None:
        return self._partitions.committed_position(part)

    def transaction_plan(self, part: Partition, tickets: list[int]) -> Planned | None:
        """The commit for ``part`` in a transaction that carries ``tickets``: as if their
        records were acknowledged, without changing anything."""
        finished: list[int] = []
        for ticket in tickets:
            out = self._unacked.get(ticket)
            if isinstance(out, _DeadLetterOut):
                finished.append(out.offset)
            elif out is not None:
                finished += [o for t, p, o in out.task.origins if (t, p) == part]
        return self._partitions.plan_with(part, finished)

    def transaction_committed(
        self, tickets: list[int], plan: dict[Partition, Planned], at: Instant
    ) -> list[Effect]:
        """The broker committed a transaction: its records are acknowledged, and its offset
        committed unless its partition's epoch moved on meanwhile."""
        out: list[Effect] = []
        for ticket in tickets:
            out += self.acknowledged(ticket, at)
        self._partitions.committed(plan)
        return out

    # --- tenants: records held while a tenant is over its share (core.tenants) ----------

    def _over_share(self, tenant: str, task_id: str) -> bool:
        """Whether ``tenant``'s next record waits: it has records waiting already (they go
        first), or as many tasks in flight as its share of polling.max_in_flight. A record
        for a task being polled joins it instead."""
        if self._held.get(tenant):
            return True
        known = self._active.get(task_id)
        if known is not None and known.state is State.POLLING:
            return False
        share = self._weights.in_flight_share(
            tenant, self.config.polling.max_in_flight, self._weight_with(tenant)
        )
        return self._load[tenant] >= share

    def _weight_with(self, tenant: str) -> float:
        """The active tenants' weights summed, ``tenant`` counted whether it is active yet."""
        active = self._load.get(tenant, 0) > 0 or bool(self._held.get(tenant))
        return self._active_weight + (0.0 if active else self._weights.weight(tenant))

    def _hold(self, tenant: str, rec: Record) -> None:
        held = self._held.get(tenant)
        if held is None:
            held = self._held[tenant] = collections.deque()
            if self._load[tenant] == 0:
                self._active_weight += self._weights.weight(tenant)
        elif rec.key is not None and rec.key == held[0].key and rec.key is not held[0].key:
            # A flood's records mostly share one key (often the tenant): keep one copy.
            rec = dataclasses.replace(rec, key=held[0].key)
        held.append(rec)
        self.held_count += 1

    def release_held(self, at: Instant) -> list[Effect]:
        """Records of tenants under their share again (tasks finished, or another tenant
        went quiet) become tasks, oldest first."""
        out: list[Effect] = []
        cap = self.config.polling.max_in_flight
        for tenant in list(self._held):
            held = self._held[tenant]
            share = self._weights.in_flight_share(tenant, cap, self._weight_with(tenant))
            while held and self._load[tenant] < share:
                rec = held.popleft()
                self.held_count -= 1
                parsed = self._parse(rec)  # valid when held: parsed again, not kept
                if not held:
                    del self._held[tenant]
                    if self._load[tenant] == 0:
                        self._active_weight -= self._weights.weight(tenant)
                if isinstance(parsed, TaskRequest):
                    out += self._track(rec, parsed, tenant, at)
        return out

    def _drop_held(self, partitions: set[Partition]) -> None:
        """Held records of partitions that left: the next owner fetches them again."""
        for tenant in list(self._held):
            held = self._held[tenant]
            keep = collections.deque(r for r in held if (r.topic, r.partition) not in partitions)
            self.held_count -= len(held) - len(keep)
            if keep:
                self._held[tenant] = keep
                continue
            del self._held[tenant]
            if self._load[tenant] == 0:
                self._active_weight -= self._weights.weight(tenant)

    def tenants_sample(self, now: float) -> dict[str, TenantSample]:
        """Per tenant: tasks in flight, records held, polls due and the longest a due poll
        has waited (s). Empty without tenants."""
        fair = self.scheduler.fair
        if fair is None:
            return {}
        due = fair.queued()
        oldest = fair.oldest_due(self.scheduler.waiting_set())
        names = set(self._load) | set(self._held) | set(due)
        return {
            t: TenantSample(
                self._load.get(t, 0),
                len(self._held.get(t, ())),
                due.get(t, 0),
                max(0.0, now - oldest[t]) if t in oldest else 0.0,
            )
            for t in names
        }

    @property
    def tenants_enabled(self) -> bool:
        return self._tenants.enabled

    def intake_room(self) -> int:
        """How many more input records may be fetched: the in-flight cap, and with tenants
        the held records' bound too."""
        room = self.config.polling.max_in_flight - self.open_records
        if self._tenants.enabled:
            room += self.config.tenants.max_held
        return room

    # --- internals -----------------------------------------------------------------------

    def _park(self, partitions: set[Partition]) -> None:
        """Stop polling the tasks of ``partitions``; keep them for a comeback."""
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

    def _forget_uncommitted(self, part: Partition) -> None:
        """Forget everything not committed for ``part``: its tasks are parked and its
        unacknowledged events dropped; revived when its records are fetched again."""
        self._park({part})
        self._drop_held({part})
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
                self._count(out.task.tenant, State.PUBLISHING, -1)
            else:  # polled again when its record returns
                self._move(out.task, State.PARKED)
                self._active[out.task.task_id] = out.task

    def _learn(self, task: Task, prediction: Prediction | None, at: Instant) -> None:
        """What an answer about the task tells: its creation time, model, result so far
        (in that order: the task keeps only what the first two do not say already)."""
        if prediction is None:
            return
        if prediction.created_at is not None:
            task.learn_created(at.mono - (at.wall - prediction.created_at), prediction.created_at)
        if task.model is None and prediction.model:
            task.model = self._shared_name(prediction.model)
        task.prediction = prediction

    def _shared_name(self, name: str | None) -> str | None:
        """One copy of a model's name for all its tasks, not one per input record."""
        return None if name is None else self._names(name)

    def _move(self, task: Task, state: State) -> None:
        """Change a task's state, keeping the counts per state (in_flight, parked) exact."""
        self._count(task.tenant, task.state, -1)
        self._count(task.tenant, state, +1)
        task.state = state

    def _count(self, tenant: str, state: State, delta: int) -> None:
        """The counts per state, and each tenant's tasks in flight (polling, publishing)."""
        self._states[state] += delta
        if state is not State.PARKED and self._tenants.enabled:
            before = self._load[tenant]
            self._load[tenant] = before + delta
            if not self._held.get(tenant) and (before == 0) != (before + delta == 0):
                self._active_weight += self._weights.weight(tenant) * (1 if before == 0 else -1)
                if before + delta == 0:
                    del self._load[tenant]

    def _tenant_of(self, task_id: str) -> str:
        task = self._active.get(task_id)
        return task.tenant if task is not None else self._tenants.default

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
