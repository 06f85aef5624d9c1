"""Exactly once: per input partition, its events and its input offset (with the offset map)
in one Kafka transaction, committed every commit interval.

Transactional ids are ``<prefix>-<input topic>-<partition>`` (prefix: ``kafka.
transactional_id_prefix``, else the group id), one producer per assigned partition. Kafka
keeps one live producer epoch per transactional id: the member that gets a partition
initialises its id, which aborts whatever the previous owner left open and fences that
owner, so a replica frozen past its session and resumed (a zombie) gets every later
transaction refused. aiokafka's ``send_offsets_to_transaction`` carries no group
generation (KIP-447), so a single id per process could not fence; one id per partition
needs nothing of the client but the protocol's oldest transactional guarantee.

Each partition is a :class:`_Lane`, opened in one of the partition's epochs
(``bridge.core.partitions``): events are sent into its open transaction as soon as they
are built (the producer batches them meanwhile). The transaction closes when its oldest
event is due (``bridge.core.cadence``: the commit interval, less what its recent commits
took), so an event is visible within about one commit interval however busy the process;
events built while it commits go into the next one. The group joins each transaction
when it begins (its offset as committed), so the commit itself is two round trips, the
offset and the end, handed to the producer together. The periodic commit commits what
has only offsets to commit. A transaction that fails is aborted and the partition starts
again from its committed offset (a new epoch): its tasks are parked and revived when
their records come back, and their events go out in a later transaction. A fenced lane's
partition is left to its new owner. The core drops what a lane reports for an epoch gone
by.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import IllegalOperation, KafkaError, MessageSizeTooLargeError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from bridge.config import Config
from bridge.core.book import Core, Partition
from bridge.core.cadence import TransactionCadence
from bridge.core.clock import Clock
from bridge.core.events import OutputRecord
from bridge.core.facts import Publish
from bridge.core.partitions import Planned
from bridge.edges import kafka as kafka_io
from bridge.edges.metrics import Metrics
from bridge.shell.bounded import bounded
from bridge.shell.delivery import Effects, Start, read_starts

log = structlog.get_logger("wavespeed_bridge.transactions")

TRANSACTION_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def transactional_id(config: Config, part: Partition) -> str:
    prefix = config.kafka.transactional_id_prefix or config.kafka.group_id
    return f"{prefix}-{part[0]}-{part[1]}"


class _Failed(Exception):
    """The lane's transaction cannot commit: abort it."""


def _fenced(exc: BaseException) -> bool:
    """Fenced, whether at the commit or earlier, when a record was sent into it."""
    return isinstance(exc, ProducerFenced) or isinstance(exc.__cause__, ProducerFenced)


Queued = tuple[Publish, float]  # an event and when it was published (monotonic)


class _Lane:
    """One input partition's producer and its open transaction, for one of its epochs."""

    def __init__(
        self, part: Partition, epoch: int, producer: AIOKafkaProducer, interval_s: float
    ) -> None:
        self.part, self.epoch, self.producer = part, epoch, producer
        self.queue: collections.deque[Queued] = collections.deque()  # not sent yet
        self.sent: list[tuple[Publish, asyncio.Future[Any] | None]] = []  # in the transaction
        self.open = False  # a transaction is begun
        self.failure: BaseException | None = None  # a send into it failed
        self.lock = asyncio.Lock()  # sending and committing take turns
        self.wake = asyncio.Event()
        self.feeder: asyncio.Task[None] | None = None
        self.cadence = TransactionCadence(interval_s)
        self.oldest: float | None = None  # the oldest event not in a closing transaction
        self.timer: asyncio.TimerHandle | None = None  # closes the transaction when due
        self.idle_until = 0.0  # a commit found nothing to send: the next one not before
        # The group's offset for the partition as read at the start (without one: where it
        # starts) or committed here: what the group joins each transaction with. None: not
        # known for sure.
        self.committed: tuple[int, str] | None = None
        self.joining: asyncio.Future[None] | None = None  # the group joining the transaction


class ExactlyOnce:
    """The delivery mode ``exactly_once``: see the module's docstring."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        core: Core,
        effects: Effects,
        clock: Clock,
        config: Config,
        metrics: Metrics,
        restart: Callable[[Partition], Awaitable[None]],
        fenced: Callable[[Partition, int], None] = lambda part, epoch: None,
        make_producer: Callable[[str], AIOKafkaProducer] | None = None,
    ) -> None:
        self._consumer = consumer
        self._core, self._effects, self._clock = core, effects, clock
        self._config, self._metrics = config, metrics
        metrics.events_pending.set_function(self._pending)
        self._restart = restart  # fetch the partition again from its committed offset
        self._fenced = fenced  # another member has the partition: watch for its return
        self._make_producer = make_producer or (
            lambda tid: kafka_io.make_producer(config.kafka, transactional_id=tid)
        )
        self._lanes: dict[Partition, _Lane] = {}
        self._waiting: dict[Partition, list[Queued]] = {}  # for a partition without a lane
        self._busy: dict[Partition, asyncio.Task[None]] = {}  # a commit under way
        self._missing: frozenset[str] = frozenset()  # topics the brokers do not list

    # --- the delivery mode -----------------------------------------------------------------

    async def start(self, partitions: set[Partition]) -> dict[Partition, Start]:
        """Initialise each new partition's transactional id first: it fences the previous
        owner and aborts what it left open, before the committed offset is read."""
        await self._open(partitions)
        starts = await read_starts(self._consumer, partitions, self._config.kafka)
        for part, (offset, metadata) in starts.items():
            lane = self._lanes.get(part)
            if lane is not None:  # its id initialised first: nobody else commits it now
                lane.committed = (offset, metadata) if offset is not None else None
        return starts

    def publish(self, p: Publish) -> None:
        assert p.partition is not None, "exactly-once records name their input partition"
        now = self._clock.monotonic()
        lane = self._lanes.get(p.partition)
        if lane is None:
            self._waiting.setdefault(p.partition, []).append((p, now))
        else:
            lane.queue.append((p, now))
            if lane.oldest is None:
                lane.oldest = now
                self._schedule(lane)
            lane.wake.set()

    async def commit(self, only: set[Partition] | None = None) -> None:
        """Commit each partition's transaction (its offset added), each in its own task: a
        commit is never cancelled half way (a caller's time limit only stops the waiting).
        The periodic commit (``only`` None) leaves a transaction with events to its own
        deadline, unless it is overdue. Only a partition active here has its id initialised
        (a lane that could not start is tried again): initialising another's would fence
        its owner."""
        active = self._core.active_partitions()
        parts = set(active) | set(self._lanes) | set(self._waiting)
        if only is not None:
            parts &= only
        await self._open({p for p in parts if p in active})
        now = self._clock.monotonic()
        for part in sorted(parts):
            lane = self._lanes.get(part)
            if lane is None:
                continue
            if only is None and lane.oldest is not None and lane.cadence.due(lane.oldest) > now:
                continue
            self._start_commit(lane, now)
        running = [self._busy[p] for p in parts if p in self._busy]
        if running:
            await asyncio.wait(running, timeout=TRANSACTION_TIMEOUT_S)

    async def hand_over(self, partitions: set[Partition], timeout: float) -> None:
        """The partitions' last transactions, then their producers are stopped."""
        with contextlib.suppress(TimeoutError):  # what is uncommitted is the next owner's
            await bounded(
                self._commit_all(partitions),
                timeout,
                "the last transactions of partitions leaving this member",
            )
        running = [self._busy[p] for p in partitions if p in self._busy]
        if running:  # a commit under way plans its offsets from the partition's state
            _, late = await asyncio.wait(running, timeout=TRANSACTION_TIMEOUT_S)
            if late:
                log.warning(
                    "gave up waiting",
                    waited_for=f"{len(late)} transactions of leaving partitions to commit",
                    limit_s=TRANSACTION_TIMEOUT_S,
                )
        lanes = [lane for p in partitions if (lane := self._lanes.pop(p, None)) is not None]
        for part in partitions:
            self._waiting.pop(part, None)
        await asyncio.gather(*(self._stop(lane) for lane in lanes))

    async def _commit_all(self, partitions: set[Partition]) -> None:
        """Commit what is finished of ``partitions``: a commit under way (a transaction
        closed by its deadline) leaves what was built meanwhile to one more."""
        busy = partitions & set(self._busy)
        await self.commit(only=partitions)
        if busy:
            await self.commit(only=busy)

    def hold_topics(self, missing: frozenset[str]) -> None:
        self._missing = missing
        if not missing:
            for lane in self._lanes.values():
                lane.wake.set()

    def close(self) -> None:
        for task in list(self._busy.values()):
            task.cancel()
        for lane in self._lanes.values():
            self._stop_timer(lane)
            if lane.feeder is not None:
                lane.feeder.cancel()

    # --- lanes ---------------------------------------------------------------------------

    async def _open(self, partitions: set[Partition]) -> None:
        await asyncio.gather(*(self._open_one(p) for p in partitions if p not in self._lanes))

    async def _open_one(self, part: Partition) -> None:
        epoch = self._core.epoch(part)
        if epoch is None:
            return  # not this member's (any more)
        producer = self._make_producer(transactional_id(self._config, part))
        try:
            await bounded(producer.start(), TRANSACTION_TIMEOUT_S, f"the producer of {part}")
        except (KafkaError, TimeoutError) as exc:
            if isinstance(exc, KafkaError):
                log.warning(
                    "transactional producer not started", partition=part[1], error=repr(exc)
                )
            await self._stop_producer(producer)
            return  # tried again at the next commit
        if self._core.epoch(part) != epoch or part in self._lanes:
            await self._stop_producer(producer)  # the partition moved on meanwhile
            return
        lane = self._lanes[part] = _Lane(
            part, epoch, producer, self._config.kafka.commit_interval_s
        )
        lane.queue.extend(self._waiting.pop(part, ()))
        if lane.queue:
            lane.oldest = lane.queue[0][1]
            self._schedule(lane)
        lane.feeder = asyncio.create_task(self._feed(lane), name=f"txn-feed-{part[1]}")
        lane.wake.set()

    def _drop(self, lane: _Lane) -> None:
        """Forget a lane whose producer cannot go on; stopped in the background."""
        if self._lanes.get(lane.part) is lane:
            del self._lanes[lane.part]
        self._stop_timer(lane)
        if lane.feeder is not None:
            lane.feeder.cancel()
        stopping = asyncio.ensure_future(lane.producer.stop())
        stopping.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _stop(self, lane: _Lane) -> None:
        self._stop_timer(lane)
        if lane.feeder is not None:
            lane.feeder.cancel()
        await self._stop_producer(lane.producer)

    @staticmethod
    async def _stop_producer(producer: AIOKafkaProducer) -> None:
        # Best effort: whatever a producer that did not stop left open, the broker aborts
        # when the next owner initialises the id.
        with contextlib.suppress(Exception):
            await bounded(producer.stop(), STOP_TIMEOUT_S, "a transactional producer to stop")

    def _pending(self) -> int:
        """Events not yet committed (``events_pending``, read at scrape time: summing every
        lane on each publish cost ~3 µs a task)."""
        return sum(len(w) for w in self._waiting.values()) + sum(
            len(lane.queue) + len(lane.sent) for lane in self._lanes.values()
        )

    # --- sending into the open transaction ------------------------------------------------

    async def _feed(self, lane: _Lane) -> None:
        while True:
            await lane.wake.wait()
            lane.wake.clear()
            async with lane.lock:
                await self._send_queued(lane)

    async def _send_queued(self, lane: _Lane) -> None:
        while lane.queue and lane.failure is None:
            if lane.queue[0][0].record.topic in self._missing:
                return
            try:
                if not lane.open:
                    await lane.producer.begin_transaction()
                    lane.open = True
                    self._join(lane)
                p, _ = lane.queue.popleft()
                lane.sent.append((p, await self._send(lane.producer, p)))
            except Exception as exc:  # the commit aborts and restarts the partition
                lane.failure = exc
                return

    async def _send(self, producer: AIOKafkaProducer, p: Publish) -> asyncio.Future[Any] | None:
        """Queue one record in the transaction; a record that can never be sent is replaced
        by its reduced form, else given up (its input offset moves on, as at least once)."""
        record: OutputRecord | None = p.record
        while record is not None:
            try:
                future: asyncio.Future[Any] = await producer.send(
                    record.topic, value=record.value, key=record.key, headers=record.headers
                )
                return future
            except MessageSizeTooLargeError:
                log.error("record cannot be published", topic=record.topic, error="too large")
            # Built only now: encoding the reduced event for every record cost ~5 µs a task.
            record = p.reduced() if record is p.record and p.reduced is not None else None
        return None

    # --- committing ----------------------------------------------------------------------

    def _schedule(self, lane: _Lane) -> None:
        """Close the lane's transaction when its oldest event is due (a commit under way
        schedules the next one when it ends)."""
        self._stop_timer(lane)
        if lane.oldest is None or lane.part in self._busy or self._lanes.get(lane.part) is not lane:
            return
        due = max(lane.cadence.due(lane.oldest), lane.idle_until)
        delay = max(0.0, due - self._clock.monotonic())
        lane.timer = asyncio.get_running_loop().call_later(delay, self._close, lane, due)

    @staticmethod
    def _stop_timer(lane: _Lane) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None

    def _close(self, lane: _Lane, due: float) -> None:
        lane.timer = None
        if self._lanes.get(lane.part) is lane:
            self._start_commit(lane, due)

    def _start_commit(self, lane: _Lane, due: float) -> None:
        """Commit the lane's transaction in a task of its own; ``due``: when it should have
        started, which the commit's measured duration counts from."""
        part = lane.part
        if part in self._busy:
            return
        self._stop_timer(lane)
        task = asyncio.create_task(self._commit(lane, due), name=f"txn-{part[1]}")
        self._busy[part] = task
        task.add_done_callback(functools.partial(self._done, lane))

    def _done(self, lane: _Lane, task: asyncio.Task[None]) -> None:
        if self._busy.get(lane.part) is task:
            del self._busy[lane.part]
        if not task.cancelled() and task.exception() is not None:
            log.error("transaction failed", partition=lane.part[1], exc_info=task.exception())
        if not task.cancelled():
            self._schedule(lane)  # the events built while it committed

    def _join(self, lane: _Lane) -> None:
        """The group joins the transaction just begun, with the offset it has committed:
        its commit then sends the new offset alone (one round trip less, each one several
        turns of a busy event loop). Committing the same offset again changes nothing."""
        if lane.committed is None:
            return
        offsets = {TopicPartition(*lane.part): OffsetAndMetadata(*lane.committed)}
        joining = asyncio.ensure_future(
            lane.producer.send_offsets_to_transaction(offsets, self._config.kafka.group_id)
        )
        joining.add_done_callback(_retrieve)  # raised at the commit, or moot after an abort
        lane.joining = joining

    async def _commit(self, lane: _Lane, due: float) -> None:
        core, part, metrics = self._core, lane.part, self._metrics
        async with lane.lock:
            await self._send_queued(lane)
            # The transaction closes: what is built from now on waits for the next one.
            lane.oldest = lane.queue[0][1] if lane.queue else None
            tickets = [p.ticket for p, _ in lane.sent]
            plan = core.transaction_plan(part, tickets)
            if not lane.sent and plan is None and lane.failure is None:
                if lane.queue:  # its events wait for a topic: not again at once
                    lane.idle_until = self._clock.monotonic() + lane.cadence.interval
                return
            sent, lane.sent = lane.sent, []
            joining, lane.joining = lane.joining, None
            try:
                if lane.failure is not None:
                    raise _Failed from lane.failure
                if not lane.open:
                    await lane.producer.begin_transaction()
                    lane.open = True
                async with asyncio.timeout(TRANSACTION_TIMEOUT_S):  # no task (wait_for): no turn
                    if joining is not None:
                        await joining
                    await self._end(lane, plan)
                at = self._clock.read()
                _check(sent)
            # IllegalOperation: the producer left the transaction after an error of its own.
            except (KafkaError, TimeoutError, IllegalOperation, _Failed) as exc:
                lane.committed = None  # read again when the partition restarts
                _settle(sent, False)
                await self._failed(lane, exc)
                return
            finally:
                lane.open = False
        lane.cadence.committed(due, at.mono)
        if plan is not None:
            lane.committed = (plan.position, plan.metadata)
        metrics.transactions.labels("committed").inc()
        _settle(sent, True)
        planned = {part: plan} if plan is not None else {}
        self._effects.apply(core.transaction_committed(tickets, planned, at))
        metrics.commits.inc()

    async def _end(self, lane: _Lane, plan: Planned | None) -> None:
        """Commit the open transaction with ``plan``'s offset. The offset and the end go to
        the producer together: its sender commits a transaction's pending offsets before
        it ends it, and ends it only if they were committed, so the end waits for no turn
        of this coroutine in between."""
        producer = lane.producer
        sending: asyncio.Future[None] | None = None
        if plan is not None:
            offsets = {TopicPartition(*lane.part): OffsetAndMetadata(plan.position, plan.metadata)}
            handing = producer.send_offsets_to_transaction(offsets, self._config.kafka.group_id)
            sending = asyncio.ensure_future(handing)
            sending.add_done_callback(_retrieve)  # raised below, unless the commit fails first
            await asyncio.sleep(0)  # its first step hands the offset to the producer
            if sending.done() or inspect.getcoroutinestate(handing) == inspect.CORO_CREATED:
                await sending  # refused (or not handed over yet): nothing ends without it
        await producer.commit_transaction()
        if sending is not None:
            await sending  # done by now: the end came after it

    async def _failed(self, lane: _Lane, exc: BaseException) -> None:
        part, metrics = lane.part, self._metrics
        if _fenced(exc):
            # Another member initialised this partition's id: it owns the partition now.
            # Its records are no longer taken here (taken after the fence, they would open
            # the id again, fence the owner and commit past what this transaction held).
            metrics.transactions.labels("fenced").inc()
            log.warning("transactional id fenced: the partition has a new owner", partition=part[1])
            self._drop(lane)
            if self._core.fence(part, lane.epoch):
                self._fenced(part, lane.epoch)
            return
        metrics.transactions.labels("aborted").inc()
        cause = exc.__cause__ if isinstance(exc, _Failed) else exc
        log.warning(
            "transaction aborted, the partition restarts", partition=part[1], error=repr(cause)
        )
        await self._abort(lane)
        if self._core.restart(part, lane.epoch):  # else the partition left here meanwhile
            if self._lanes.get(part) is lane:
                lane.epoch = self._core.epoch(part) or lane.epoch  # the lane serves the new one
            await self._restart(part)

    async def _abort(self, lane: _Lane) -> None:
        lane.queue.clear()
        lane.oldest = None
        lane.failure = None
        try:
            if lane.open:
                await asyncio.wait_for(lane.producer.abort_transaction(), TRANSACTION_TIMEOUT_S)
        except Exception:  # the producer is unusable: a new one aborts on the broker side
            self._drop(lane)


def _check(sent: list[tuple[Publish, asyncio.Future[Any] | None]]) -> None:
    """Raise what a record's send failed with. Each is done once its transaction
    committed (the producer flushes them first), so this waits for no turn of the loop."""
    for _, f in sent:
        if f is not None and f.done() and not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]


def _retrieve(f: asyncio.Future[None]) -> None:
    if not f.cancelled():
        f.exception()


def _settle(sent: list[tuple[Publish, asyncio.Future[Any] | None]], delivered: bool) -> None:
    for p, _ in sent:
        if p.settle is not None:
            p.settle(delivered)
