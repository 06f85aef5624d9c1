"""The daemon: the imperative shell that wires Kafka, the result API and the pure core together.

Flow: consume → parse (``messages``) → track (``tasks``) → schedule (``policy`` +
``scheduler``) → poll (``api``) → build event (``events``) → produce and await the ack →
mark the input offset done (``offsets``) → commit the finished prefix periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from bridge import __version__
from bridge import events as ev
from bridge import kafka as kafka_io
from bridge.api import TERMINAL, ApiClient, Kind, Outcome, status_class
from bridge.clock import Clock, SystemClock
from bridge.config import Config
from bridge.messages import Headers, Record, Rejected, parse_task
from bridge.metrics import Metrics
from bridge.offsets import OffsetTracker
from bridge.policy import (
    FixedInterval,
    PollPolicy,
    clamp_to_deadline,
    overdue,
    request_limit,
    retry_delay,
)
from bridge.scheduler import Scheduler, TokenBucket
from bridge.server import HealthServer
from bridge.tasks import Task

log = structlog.get_logger("wavespeed_bridge")

Partition = tuple[str, int]
# How often waiting polls are checked for passed deadlines (Bridge._expire_overdue).
SWEEP_INTERVAL_S = 0.25


def make_policy(config: Config, rng: random.Random | None = None) -> PollPolicy:
    p = config.polling
    if p.policy == "adaptive":
        from bridge.adaptive import AdaptivePolicy

        return AdaptivePolicy.from_config(p, rng=rng)
    return FixedInterval(p.interval_s, jitter=p.jitter, rng=rng)


class Bridge:
    """One bridge process. ``await bridge.run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        config: Config,
        *,
        api_key: str | None,
        clock: Clock | None = None,
        policy: PollPolicy | None = None,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.policy = policy or make_policy(config, self.rng)
        self.metrics = metrics or Metrics(
            max_model_labels=config.polling.max_model_labels, version=__version__
        )
        a = config.api
        self.api = ApiClient(
            base_url=a.base_url,
            result_path=a.result_path,
            api_key=api_key,
            connect_timeout_s=a.connect_timeout_s,
            read_timeout_s=a.read_timeout_s,
            total_timeout_s=a.total_timeout_s,
            max_connections=a.max_concurrent_requests,
            max_response_bytes=a.max_response_bytes,
            verify_tls=a.verify_tls,
            transport=a.transport,
            user_agent=f"{a.user_agent}/{__version__}",
        )
        budget = None
        if a.requests_per_second > 0:
            burst = a.budget_burst or max(1, round(a.requests_per_second))
            budget = TokenBucket(a.requests_per_second, burst, self.clock.monotonic())
        self.scheduler: Scheduler[str] = Scheduler(priority=self._priority, budget=budget)
        self.offsets: OffsetTracker[Partition] = OffsetTracker()
        self.tasks: dict[str, Task] = {}  # being polled
        self.publishing: dict[str, Task] = {}  # terminal, event not yet acknowledged
        self.parked: dict[str, Task] = {}  # from revoked partitions, until reassignment
        self._deliveries: set[asyncio.Future[None]] = set()  # events not yet acknowledged
        self._publisher: kafka_io.Publisher | None = None
        self._publishing_loop: asyncio.Task[None] | None = None
        self._polls: set[asyncio.Task[None]] = set()
        self._requests = 0
        self._committed: dict[Partition, int] = {}
        # Per assigned partition, the offset after the last record handed over (or the start).
        self._next_offset: dict[Partition, int] = {}
        self._paused = False
        self._stopping = False
        self._started = False
        self._assigned_once = False
        self._kafka_ok = False
        self._kafka_problem: tuple[str, str] | None = None  # (kind, why) while unreachable
        self._missing_topics: frozenset[str] = frozenset()
        self._waiter: asyncio.Future[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._pause_logged_until = 0.0
        self._sweep_at = 0.0
        self.server = HealthServer(
            host=config.server.host,
            port=config.server.port,
            registry=self.metrics.registry,
            ready=self.readiness,
            alive=self.liveness,
        )
        self._last_loop_tick = time.monotonic()
        self._budget_wait_seen = 0.0
        self._taken_seen = 0  # scheduler.taken at the last gauge update
        self._gauges_at = self.clock.monotonic()

    # --- health -------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        if self._kafka_problem is not None:
            return False, f"kafka: {self._kafka_problem[1]}"
        if not self._started:
            return False, "starting"
        if not self._kafka_ok:
            return False, "kafka unreachable"
        if self._missing_topics:
            return False, f"missing topics: {', '.join(sorted(self._missing_topics))}"
        if not self._assigned_once:
            return False, "waiting for group assignment"
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        # The event loop is alive if the commit loop ticked recently.
        stale = time.monotonic() - self._last_loop_tick
        limit = max(30.0, 10 * self.config.kafka.commit_interval_s)
        return (stale < limit, f"loop tick {stale:.1f}s ago")

    @property
    def open_records(self) -> int:
        return self.offsets.in_flight()

    # --- run -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        await self.server.start()
        self._consumer = kafka_io.make_consumer(cfg.kafka)
        self._producer = kafka_io.make_producer(cfg.kafka)
        log.info(
            "starting",
            version=__version__,
            input_topic=cfg.kafka.input_topic,
            group_id=cfg.kafka.group_id,
            api=cfg.api.base_url,
            policy=cfg.polling.policy,
            metrics=f"http://{cfg.server.host}:{self.server.port}/metrics",
        )
        try:
            await self._start_kafka(stop)
            if stop.is_set():
                return
            self._started = True
            assert self._producer is not None
            m = self.metrics
            self._publisher = kafka_io.Publisher(
                self._producer,
                retry_delay=lambda attempt: retry_delay(attempt, 0.5, 10.0, self.rng),
                on_error=m.publish_failures.inc,
                on_pending=m.events_pending.set,
            )
            # Outlives the other loops: finished events still go out during shutdown.
            self._publishing_loop = asyncio.create_task(self._publisher.run(), name="publish")
            loops = [
                asyncio.create_task(self._consume_loop(), name="consume"),
                asyncio.create_task(self._dispatch_loop(), name="dispatch"),
                asyncio.create_task(self._commit_loop(), name="commit"),
                asyncio.create_task(self._health_loop(), name="health"),
            ]
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopper, *loops], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    log.error("loop failed", loop=t.get_name(), exc_info=t.exception())
            await self._shutdown(loops, stopper)
        finally:
            await self._close()

    async def _start_kafka(self, stop: asyncio.Event) -> None:
        """Start the clients, retrying while the broker is unreachable (it may start later)."""
        assert self._consumer is not None and self._producer is not None
        delay = 0.5
        while not stop.is_set():
            try:
                await self._producer.start()
                listener = kafka_io.RebalanceListener(self._on_revoked, self._on_assigned)
                await self._consumer.start()
                self._consumer.subscribe([self.config.kafka.input_topic], listener=listener)
                self._kafka_ok = True
                self._kafka_problem = None
                self.metrics.kafka_up.set(1)
                return
            except KafkaError as exc:
                await self._kafka_failed(exc, retry_in_s=delay)
                with contextlib.suppress(Exception):
                    await self._producer.stop()
                with contextlib.suppress(Exception):
                    await self._consumer.stop()
                self._consumer = kafka_io.make_consumer(self.config.kafka)
                self._producer = kafka_io.make_producer(self.config.kafka)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def _kafka_failed(self, exc: BaseException, retry_in_s: float | None = None) -> None:
        """Find out why the brokers cannot be reached; say it once, count every time."""
        kind, why = await kafka_io.diagnose(self.config.kafka)
        if kind == "broker" and self.config.kafka.enable_idempotence:
            why += (
                f" ({type(exc).__name__}); a broker without the idempotent producer"
                " (InitProducerId) needs kafka.enable_idempotence: false"
            )
        self.metrics.kafka_errors.labels(kind).inc()
        self.metrics.kafka_up.set(0)
        if (kind, why) != self._kafka_problem:
            log.error(
                "kafka connection failed",
                kind=kind,
                reason=why,
                error=type(exc).__name__,
                retry_in_s=retry_in_s,
            )
        self._kafka_problem = (kind, why)

    async def _shutdown(self, loops: list[asyncio.Task[None]], stopper: asyncio.Task[Any]) -> None:
        """Stop fetching and polling; publish and commit what is finished, within the grace."""
        self._stopping = True
        self.metrics.ready.set(0)
        grace_end = time.monotonic() + self.config.shutdown_grace_s
        log.info("stopping", in_flight=len(self.tasks), publishing=len(self.publishing))
        self._wake()
        for t in [*loops, stopper]:
            t.cancel()
        await asyncio.gather(*loops, stopper, return_exceptions=True)
        # Polls under way may still turn into events: let them land, then deliver.
        for pending in (self._polls, self._deliveries):
            remaining = grace_end - time.monotonic() - 1.0
            if pending and remaining > 0:
                await asyncio.wait(list(pending), timeout=remaining)
        await self._commit(timeout=max(0.5, min(5.0, grace_end - time.monotonic())))
        self._duplicate_risk(set(self.offsets.partitions()))
        unfinished = len(self.tasks) + len(self.publishing)
        log.info(
            "stopped",
            unfinished=unfinished,
            note="unfinished tasks stay uncommitted and are polled again after restart",
        )

    async def _close(self) -> None:
        for t in [*self._polls, *self._deliveries]:
            t.cancel()
        if self._publishing_loop is not None:
            self._publishing_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publishing_loop
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), 5.0)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 5.0)
        await self.api.aclose()
        await self.server.stop()

    # --- consuming -----------------------------------------------------------------------

    async def _consume_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        cap = self.config.polling.max_in_flight
        batch_cap = self.config.kafka.fetch_max_records
        while not self._stopping:
            room = cap - self.open_records
            self._set_paused(room <= 0)
            # getmany is called even while paused: it keeps this member inside
            # max.poll.interval.ms however long tasks take.
            try:
                batch = await consumer.getmany(
                    timeout_ms=200, max_records=max(1, min(batch_cap, room))
                )
            except Exception as exc:  # a record it cannot decode, or the fetch itself failed
                if not kafka_io.undecodable(exc):
                    log.warning("fetch failed, retrying", error=type(exc).__name__)
                    await asyncio.sleep(1.0)
                    continue
                await self._skip_undecodable(batch_cap)
                continue
            for _tp, messages in batch.items():
                for msg in messages:
                    self._on_record(kafka_io.to_record(msg))

    async def _skip_undecodable(self, limit: int) -> None:
        """A record the client cannot decode (a codec it lacks, a corrupt batch, a header
        name that is not UTF-8) fails getmany(), and aiokafka may already have moved past
        good records fetched with it. Rewind every partition to the record after the last
        one handed over, then read each one record at a time: a record that fails is
        dead-lettered by its offset and skipped, the rest are handled as usual."""
        consumer = self._consumer
        assert consumer is not None
        for tp in sorted(consumer.assignment()):
            part = (tp.topic, tp.partition)
            if part in self._next_offset:
                consumer.seek(tp, self._next_offset[part])
        for tp in sorted(consumer.assignment()):
            part = (tp.topic, tp.partition)
            for _ in range(limit):
                try:
                    got = await consumer.getmany(tp, timeout_ms=100, max_records=1)
                except Exception as exc:
                    if not kafka_io.undecodable(exc) or part not in self._next_offset:
                        break
                    offset = self._next_offset[part]
                    self._on_undecodable(tp.topic, tp.partition, offset, exc)
                    consumer.seek(tp, offset + 1)
                    continue
                if not got:
                    break
                for messages in got.values():
                    for msg in messages:
                        self._on_record(kafka_io.to_record(msg))

    def _on_undecodable(self, topic: str, partition: int, offset: int, exc: Exception) -> None:
        self._next_offset[(topic, partition)] = offset + 1
        try:
            self.offsets.add((topic, partition), offset)
        except ValueError:
            return
        self._dead_letter(
            Record(topic, partition, offset, None, None, (), None),
            Rejected(
                "undecodable",
                f"the Kafka client cannot decode this record ({kafka_io.describe_error(exc)});"
                " key, value and headers are not available",
            ),
        )

    def _set_paused(self, pause: bool) -> None:
        consumer = self._consumer
        if consumer is None or pause == self._paused:
            return
        parts = consumer.assignment()
        if pause:
            consumer.pause(*parts)
            log.info("in-flight cap reached, fetching paused", in_flight=self.open_records)
        else:
            consumer.resume(*parts)
            log.info("fetching resumed", in_flight=self.open_records)
        self._paused = pause
        self.metrics.consumer_paused.set(1 if pause else 0)

    def _on_record(self, rec: Record) -> None:
        part = (rec.topic, rec.partition)
        self._next_offset[part] = rec.offset + 1
        try:
            self.offsets.add(part, rec.offset)
        except ValueError:
            return  # re-delivered below the tracked position (seek after rebalance)
        cfg = self.config
        parsed = parse_task(
            rec.value,
            max_bytes=cfg.kafka.max_message_bytes,
            max_timeout_s=cfg.polling.max_timeout_s,
        )
        if isinstance(parsed, Rejected):
            self._dead_letter(rec, parsed)
            return
        origin = (rec.topic, rec.partition, rec.offset)
        now = self.clock.monotonic()
        parked = self.parked.pop(parsed.task_id, None)
        if parked is not None:  # back after a rebalance: keep its poll history
            parked.origins = [origin]
            self.tasks[parked.task_id] = parked
            resume = (
                self.policy.first_poll(parked, now)
                if parked.last_poll is None
                else self.policy.next_poll(parked, parked.last_poll)
            )
            self.scheduler.schedule(parked.task_id, max(now, resume))
            self._wake()
            return
        # Only a task still being polled can take it: an event already built cannot list it.
        existing = self.tasks.get(parsed.task_id)
        if existing is not None:
            existing.origins.append(origin)
            self.metrics.duplicates.inc()
            log.info(
                "duplicate task id joined the one in flight",
                task_id=parsed.task_id,
                partition=rec.partition,
                offset=rec.offset,
            )
            return
        wall = self.clock.time()
        created_wall = min(
            x
            for x in (
                wall,
                parsed.created_at,
                rec.timestamp_ms / 1000.0 if rec.timestamp_ms else None,
            )
            if x is not None
        )
        task = Task(
            task_id=parsed.task_id,
            model=parsed.model,
            created=now - (wall - created_wall),
            created_wall=created_wall,
            first_seen=now,
            timeout_s=parsed.timeout_s or cfg.polling.default_timeout_s,
            metadata=parsed.metadata,
            key=rec.key,
            headers=rec.headers,
            origin=origin,
        )
        self.tasks[task.task_id] = task
        self.metrics.consumed.labels(self.metrics.model_label(task.model)).inc()
        self.metrics.in_flight.set(len(self.tasks) + len(self.publishing))
        self.scheduler.schedule(task.task_id, self.policy.first_poll(task, now))
        self._wake()
        log.info(
            "task consumed",
            task_id=task.task_id,
            model=task.model,
            partition=rec.partition,
            offset=rec.offset,
        )

    def _dead_letter(self, rec: Record, why: Rejected) -> None:
        def build(
            key: bytes | None, value: bytes | None, headers: Headers, limit: int
        ) -> ev.OutputRecord:
            return ev.dead_letter_record(
                topic=self.config.kafka.dead_letter_topic,
                source_topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                key=key,
                value=value,
                headers=headers,
                reason=why.reason,
                detail=why.detail,
                max_value_bytes=limit,
            )

        record = build(rec.key, rec.value, rec.headers, self.config.kafka.max_message_bytes)
        log.warning(
            "message dead-lettered",
            reason=why.reason,
            detail=why.detail,
            partition=rec.partition,
            offset=rec.offset,
        )

        def on_ack() -> None:
            self.offsets.done((rec.topic, rec.partition), rec.offset)
            self.metrics.dead_letters.labels(why.reason).inc()
            self.metrics.published.labels("dead_letter").inc()

        def reduced() -> ev.OutputRecord:  # too large to publish: only the dlq.* headers
            return build(None, None, (), 0)

        self._deliver(record, on_ack, reduced)

    # --- rebalancing ----------------------------------------------------------------------

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned_once = True
        self.metrics.rebalances.inc()
        self.metrics.assigned_partitions.set(len(assigned))
        mine = {(tp.topic, tp.partition) for tp in assigned}
        for part in mine:
            self.offsets.drop(part)  # start clean from the committed position
            self._committed.pop(part, None)
            self._next_offset.pop(part, None)
        # Parked tasks of partitions that went elsewhere belong to their new owner now.
        handed_over = 0
        for task_id, task in list(self.parked.items()):
            if not any((t, p) in mine for t, p, _ in task.origins):
                del self.parked[task_id]
                handed_over += 1
        self.metrics.revoked_in_flight.inc(handed_over)
        await self._seek_to_start(assigned)
        if self._paused and self._consumer is not None:
            self._consumer.pause(*assigned)
        log.info(
            "partitions assigned",
            partitions=sorted(tp.partition for tp in assigned),
            kept_parked=len(self.parked),
            handed_over=handed_over,
        )

    async def _seek_to_start(self, assigned: set[TopicPartition]) -> None:
        """Start each partition where the bridge decides, and remember it: the committed
        offset, else the beginning or the end (``auto_offset_reset``)."""
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        try:
            committed = await kafka_io.committed_offsets(consumer, assigned)
            missing = [tp for tp in assigned if tp not in committed]
            if missing:
                reset = (
                    consumer.beginning_offsets
                    if self.config.kafka.auto_offset_reset == "earliest"
                    else consumer.end_offsets
                )
                committed |= await reset(missing)
        except (KafkaError, TimeoutError) as exc:  # fetching goes on from aiokafka's own reset
            log.warning("start offsets unknown", error=type(exc).__name__)
            return
        for tp, offset in committed.items():
            consumer.seek(tp, offset)
            self._next_offset[(tp.topic, tp.partition)] = offset

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop polling the revoked partitions' tasks; commit what finished before they go.

        Their tasks are parked, not forgotten: if the same partitions come back (the usual
        case in an eager rebalance), the re-fetched records revive them with their poll
        history instead of starting over.
        """
        gone = {(tp.topic, tp.partition) for tp in revoked}
        if not gone:
            return
        for task in list(self.tasks.values()):
            keep = [o for o in task.origins if (o[0], o[1]) not in gone]
            if len(keep) == len(task.origins):
                continue
            if keep:
                task.origins = keep
                continue
            self.scheduler.cancel(task.task_id)
            del self.tasks[task.task_id]
            self.parked[task.task_id] = task
        # Events already being produced are worth waiting for: it avoids a duplicate.
        if self._deliveries:
            await asyncio.wait(list(self._deliveries), timeout=5.0)
        await self._commit(only=gone, timeout=5.0)
        unacked = self._duplicate_risk(gone)
        for part in gone:
            self.offsets.drop(part)
            self._committed.pop(part, None)
            self._next_offset.pop(part, None)
        self.metrics.in_flight.set(len(self.tasks) + len(self.publishing))
        log.info(
            "partitions revoked",
            partitions=sorted(p for _, p in gone),
            parked=len(self.parked),
            duplicate_risk=unacked,
        )

    def _duplicate_risk(self, parts: set[Partition]) -> int:
        """Count, once, the records of ``parts`` the next owner will publish again.

        Called after the last commit: finished records behind an unfinished one (out of
        order) and tasks whose event is not acknowledged yet.
        """
        ahead = sum(self.offsets.done_ahead(part) for part in parts)
        unacked = sum(
            1 for task in self.publishing.values() for t, p, _ in task.origins if (t, p) in parts
        )
        self.metrics.rebalance_duplicates.inc(ahead + unacked)
        return ahead + unacked

    # --- polling -------------------------------------------------------------------------

    def _priority(self, task_id: str, due: float) -> float:
        task = self.tasks.get(task_id)
        return self.policy.priority(task, due) if task is not None else -due

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = None
        if timeout is not None:
            handle = loop.call_later(max(0.0, timeout), self._wake)
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            self._waiter = None

    async def _dispatch_loop(self) -> None:
        limit = self.config.api.max_concurrent_requests
        scheduler = self.scheduler
        lateness = self.metrics.poll_lateness
        while not self._stopping:
            now = self.clock.monotonic()
            free = limit - self._requests
            for task_id, due in scheduler.take_due(now, free):
                task = self.tasks.get(task_id)
                if task is None:
                    continue
                self._requests += 1
                lateness.observe(max(0.0, now - due))
                poll = asyncio.create_task(self._poll(task))
                self._polls.add(poll)
                poll.add_done_callback(self._polls.discard)
            waiting = self._expire_overdue(now)
            sweep = SWEEP_INTERVAL_S if waiting else None
            if self._requests >= limit:
                await self._sleep(sweep)  # a finishing request wakes us
                continue
            at = scheduler.next_wakeup(self.clock.monotonic())
            if at is not None and sweep is not None:
                at = min(at, self.clock.monotonic() + sweep)
            await self._sleep(None if at is None else at - self.clock.monotonic())

    def _expire_overdue(self, now: float) -> bool:
        """Time out the tasks whose deadline passed while their poll waits for a request
        slot, the budget or the end of a pause: the deadline does not wait for the API.
        True while polls are waiting or may fall due in a pause (the dispatch loop then wakes
        every SWEEP_INTERVAL_S); walks the waiting ones at most that often."""
        if self.scheduler.ready_count(now) == 0:
            return now < self.scheduler.paused_until
        if now >= self._sweep_at:
            self._sweep_at = now + SWEEP_INTERVAL_S
            for task_id in self.scheduler.waiting():
                task = self.tasks.get(task_id)
                if task is not None and overdue(task, now):
                    self._finish(task, "timeout", self._timeout_reason(task), now)
        return True

    async def _poll(self, task: Task) -> None:
        m = self.metrics
        started = self.clock.monotonic()
        m.requests_in_flight.inc()
        try:
            limit = request_limit(task, started)
            outcome = await self.api.fetch(task.task_id, self.clock.time(), limit)
        finally:
            self._requests -= 1
            m.requests_in_flight.dec()
            self._wake()
        now = self.clock.monotonic()
        m.api_request_duration.observe(now - started)
        m.api_responses.labels(status_class(outcome.status_code)).inc()
        if self.tasks.get(task.task_id) is not task:
            return  # revoked or finished meanwhile
        task.polls += 1
        task.last_poll = now
        self._handle(task, outcome, now)

    def _handle(self, task: Task, outcome: Outcome, now: float) -> None:
        m = self.metrics
        kind = outcome.kind
        m.api_up.set(0 if kind in (Kind.TRANSIENT, Kind.AUTH) else 1)
        prediction = outcome.prediction
        if prediction is not None:
            task.prediction = prediction
            if prediction.created_at is not None:
                wall = self.clock.time()
                task.learn_created(now - (wall - prediction.created_at), prediction.created_at)
            if task.model is None and prediction.model:
                task.model = prediction.model
        if kind in TERMINAL:
            task.failures = 0
            if kind is not Kind.NOT_FOUND:
                self.policy.observe(task, now)
            event_kind: ev.EventType = "completed" if kind is Kind.COMPLETED else "failed"
            self._finish(task, event_kind, outcome.reason or None, now)
            return
        if kind is Kind.PENDING:
            task.failures = 0
            task.last_error = None
            task.last_pending_poll = now
            if outcome.reason:  # undocumented status
                m.api_errors.labels("unknown_status").inc()
                task.last_error = outcome.reason
            if now >= task.deadline:
                self._finish(task, "timeout", self._timeout_reason(task), now)
                return
            self.scheduler.schedule(task.task_id, self.policy.next_poll(task, now))
            return
        # Not an answer about the task: the API, the key or the network is at fault.
        task.failures += 1
        task.last_error = outcome.reason
        retry_at = now + retry_delay(
            task.failures,
            self.config.polling.backoff_base_s,
            self.config.polling.backoff_max_s,
            self.rng,
        )
        if kind is Kind.AUTH:
            m.auth_errors.inc()
            m.api_errors.labels("auth").inc()
            self._pause_all(now, self.config.api.auth_error_pause_s, "auth", outcome)
        elif kind is Kind.RATE_LIMITED:
            m.rate_limited.inc()
            m.api_errors.labels("rate_limited").inc()
            self._pause_all(now, outcome.retry_after_s or retry_at - now, "rate_limited", outcome)
        else:
            m.api_errors.labels(_error_kind(outcome)).inc()
            if outcome.retry_after_s:
                self._pause_all(now, outcome.retry_after_s, "retry_after", outcome)
        retry_at = max(retry_at, self.scheduler.paused_until)
        if now >= task.deadline:
            self._finish(task, "timeout", self._timeout_reason(task), now)
            return
        self.scheduler.schedule(task.task_id, clamp_to_deadline(task, retry_at, now))

    def _pause_all(self, now: float, seconds: float, reason: str, outcome: Outcome) -> None:
        until = now + seconds
        before = max(self.scheduler.paused_until, now)
        if until > before:
            self.metrics.paused_seconds.labels(reason).inc(until - before)
            self.scheduler.pause_until(until)
        if now >= self._pause_logged_until:  # loud, but once per pause, not per task
            self._pause_logged_until = until
            logger = log.error if reason == "auth" else log.warning
            logger(
                "polling paused for every task",
                reason=outcome.reason,
                status=outcome.status_code,
                pause_s=round(seconds, 3),
            )

    @staticmethod
    def _timeout_reason(task: Task) -> str:
        reason = f"deadline of {task.timeout_s:g}s passed"
        if task.last_error:
            reason += f"; last poll: {task.last_error}"
        else:
            status = getattr(task.prediction, "status", None)
            reason += f"; last status: {status or 'none seen'}"
        return reason

    # --- finishing and delivery ----------------------------------------------------------

    def _finish(self, task: Task, kind: ev.EventType, reason: str | None, now: float) -> None:
        cfg = self.config
        self.scheduler.cancel(task.task_id)
        del self.tasks[task.task_id]
        self.publishing[task.task_id] = task
        observed = self.clock.time()
        event = ev.build_event(
            kind=kind,
            task_id=task.task_id,
            model=task.model,
            prediction=task.prediction,
            reason=reason,
            created_at=task.created_wall,
            observed_at=observed,
            polls=task.polls,
            metadata=task.metadata,
            source=cfg.events.source,
            input_key=task.key,
            origins=list(task.origins),
        )
        topic = {
            "completed": cfg.kafka.completed_topic,
            "failed": cfg.kafka.failed_topic,
            "timeout": cfg.kafka.timeout_topic or cfg.kafka.failed_topic,
        }[kind]
        mode = cfg.events.mode
        record = ev.event_record(topic, event, task.headers, mode)

        def reduced() -> ev.OutputRecord:
            # Too large for the producer: the same event without what came from the input.
            data = {
                **event["data"],
                "metadata": None,
                "input": {**event["data"]["input"], "key": None},
            }
            return ev.event_record(topic, {**event, "data": data}, (), mode)

        log.info(
            "task finished",
            task_id=task.task_id,
            model=task.model,
            outcome=kind,
            polls=task.polls,
            reason=reason,
            partition=task.origins[0][1] if task.origins else None,
            offset=task.origins[0][2] if task.origins else None,
        )
        model = self.metrics.model_label(task.model)
        finished_mono = now

        def on_ack() -> None:
            m = self.metrics
            if self.publishing.get(task.task_id) is task:
                del self.publishing[task.task_id]
            for topic_, partition, offset in task.origins:
                self.offsets.done((topic_, partition), offset)
            m.finished.labels(model, kind).inc()
            m.published.labels(kind).inc()
            m.polls_per_task.labels(model).observe(task.polls)
            m.end_to_end.labels(model, kind).observe(
                max(0.0, self.clock.time() - task.created_wall)
            )
            m.publish_latency.observe(max(0.0, self.clock.monotonic() - finished_mono))
            m.in_flight.set(len(self.tasks) + len(self.publishing))
            p = task.prediction
            if kind == "completed" and p is not None and p.inference_ms is not None:
                m.inference.labels(model).observe(p.inference_ms / 1000.0)
            if kind != "timeout" and task.last_pending_poll is not None:
                m.detection_delay.labels(model).observe(now - task.last_pending_poll)

        self._deliver(record, on_ack, reduced)

    def _deliver(
        self,
        record: ev.OutputRecord,
        on_ack: Callable[[], None],
        reduced: Callable[[], ev.OutputRecord] | None = None,
    ) -> None:
        assert self._publisher is not None
        done = self._publisher.publish(record, on_ack, reduced)
        self._deliveries.add(done)
        done.add_done_callback(self._deliveries.discard)

    # --- committing and health -------------------------------------------------------------

    async def _commit(self, *, only: set[Partition] | None = None, timeout: float = 10.0) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for part, pos in self.offsets.positions():
            if (only is None or part in only) and pos > self._committed.get(part, -1):
                offsets[TopicPartition(*part)] = pos
        if not offsets:
            return
        try:
            await asyncio.wait_for(consumer.commit(offsets), timeout)
        except (KafkaError, TimeoutError) as exc:
            self.metrics.commit_failures.inc()
            log.warning("commit failed, will retry", error=type(exc).__name__)
            return
        for tp, pos in offsets.items():
            self._committed[(tp.topic, tp.partition)] = pos
        self.metrics.commits.inc()

    async def _commit_loop(self) -> None:
        interval = self.config.kafka.commit_interval_s
        while not self._stopping:
            await asyncio.sleep(interval)
            self._last_loop_tick = time.monotonic()
            await self._commit()
            self._update_gauges()

    def _update_gauges(self) -> None:
        m, consumer = self.metrics, self._consumer
        m.in_flight.set(len(self.tasks) + len(self.publishing))
        m.due.set(self.scheduler.ready_count(self.clock.monotonic()))
        m.budget_wait.inc(max(0.0, self.scheduler.budget_wait_s - self._budget_wait_seen))
        self._budget_wait_seen = self.scheduler.budget_wait_s
        now = self.clock.monotonic()
        budget = self.scheduler.budget
        if budget is not None and now > self._gauges_at:
            allowed = budget.rate * (now - self._gauges_at)
            spent = self.scheduler.taken - self._taken_seen
            m.budget_utilization.set(min(1.0, spent / allowed))
        self._gauges_at, self._taken_seen = now, self.scheduler.taken
        stats = getattr(self.policy, "model_stats", None)  # only learning policies have it
        if stats is not None:
            for model, (median, p90) in stats().items():
                label = m.model_label(model)
                m.model_completion.labels(label, "50").set(median)
                m.model_completion.labels(label, "90").set(p90)
        if consumer is None:
            return
        lag = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            committed = self._committed.get((tp.topic, tp.partition))
            if committed is None:
                committed = self.offsets.committable((tp.topic, tp.partition)) or 0
            lag += max(0, high - committed)
        m.consumer_lag.set(lag)

    async def _health_loop(self) -> None:
        assert self._producer is not None
        interval = self.config.kafka.health_check_interval_s
        # A probe may take longer than the interval right after the broker comes back.
        probe_timeout = max(interval, min(10.0, self.config.kafka.request_timeout_ms / 1000))
        while not self._stopping:
            try:
                metadata = await asyncio.wait_for(
                    self._producer.client.fetch_all_metadata(), probe_timeout
                )
            except (KafkaError, TimeoutError, OSError) as exc:
                metadata = None
                if self._kafka_ok:
                    await self._kafka_failed(exc)
            ok = metadata is not None
            if ok != self._kafka_ok:
                log.warning("kafka reachable" if ok else "kafka unreachable")
            self._kafka_ok = ok
            if metadata is not None:
                self._kafka_problem = None
                self._check_topics(set(metadata.topics()))
            self.metrics.kafka_up.set(1 if ok else 0)
            self.metrics.ready.set(1 if self.readiness()[0] else 0)
            await asyncio.sleep(interval)

    def _check_topics(self, present: set[str]) -> None:
        """Events for a topic the brokers do not list are held (not lost), and said once."""
        k = self.config.kafka
        wanted = {k.input_topic, k.completed_topic, k.failed_topic, k.dead_letter_topic}
        if k.timeout_topic:
            wanted.add(k.timeout_topic)
        missing = frozenset(wanted - present)
        if missing == self._missing_topics:
            return
        if missing - self._missing_topics:
            log.error(
                "topics missing: events for them are held until they exist",
                topics=sorted(missing - self._missing_topics),
            )
        if self._missing_topics - missing:
            log.warning("topics present again", topics=sorted(self._missing_topics - missing))
        self._missing_topics = missing
        self.metrics.topics_missing.set(len(missing))
        if self._publisher is not None:
            self._publisher.hold_topics(missing - {k.input_topic})


def _error_kind(outcome: Outcome) -> str:
    reason = outcome.reason
    if outcome.status_code is not None and outcome.status_code >= 500:
        return "server_error"
    if reason.startswith("timeout"):
        return "timeout"
    if reason.startswith(("network", "client")):
        return "network"
    if "redirect" in reason:
        return "redirect"
    if "larger than" in reason:
        return "oversize_body"
    return "bad_response"
