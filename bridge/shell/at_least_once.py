"""At least once: one idempotent producer publishes every event (``acks=all``), and the
group's offsets are committed on their own, each only once what it answers is acknowledged.

:class:`Publisher` feeds the producer in order from one coroutine and retries with backoff;
:class:`AtLeastOnce` is the delivery mode (``bridge.shell.delivery``) built on it: the
commit is one past the longest finished prefix of each partition, with the offsets finished
above it as the commit's metadata (the offset map), so whoever takes the partition next
skips them. A broker that drops commit metadata (Tansu) is detected at the first commit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, OffsetMetadataTooLargeError
from aiokafka.structs import OffsetAndMetadata

from bridge.config import Config
from bridge.core.book import Core, Partition
from bridge.core.clock import Clock
from bridge.core.events import OutputRecord
from bridge.core.facts import Publish
from bridge.core.partitions import Planned
from bridge.edges import kafka as kafka_io
from bridge.edges.metrics import Metrics
from bridge.shell.bounded import bounded
from bridge.shell.delivery import Effects, Start, read_starts

log = structlog.get_logger("wavespeed_bridge")

RETRY_LOG_INTERVAL_S = 5.0
COMMIT_TIMEOUT_S = 10.0
HAND_OVER_COMMIT_S = 5.0  # of a hand-over's time, what the last commit may take


@dataclass(slots=True)
class _Delivery:
    record: OutputRecord
    on_ack: Callable[[], None]
    reduced: Callable[[], OutputRecord] | None
    seq: int
    attempt: int = 0


class Publisher:
    """Produces records until the broker acknowledges each (acks=all), then calls ``on_ack``.

    One coroutine feeds the producer in order and acknowledgements arrive as callbacks:
    a task per record waiting on its batch costs a timer and a wake-up each, which
    dominated the profile at a thousand events per second. Retriable errors retry with
    backoff for ever (the in-flight cap bounds what waits); a record that can never be
    sent is replaced once by its ``reduced`` form, else given up so its offset moves on.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        retry_delay: Callable[[int], float],
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._producer = producer
        self._retry_delay = retry_delay
        self._on_error = on_error
        self._queue: collections.deque[_Delivery] = collections.deque()
        self._wake = asyncio.Event()
        # Topics the brokers do not list: their records wait here, the others go on.
        self._missing: frozenset[str] = frozenset()
        self._held: list[_Delivery] = []
        # Published and not yet acknowledged or given up, oldest first, by sequence number:
        # what hand-over waits for, without a future per record.
        self._open: dict[int, _Delivery] = {}
        self._seq = 0
        self._progress: asyncio.Event | None = None  # set at a settle while someone waits
        # Retry warnings are summarised: an outage fails every pending record, repeatedly.
        self._retries_unlogged = 0
        self._retry_logged_at = float("-inf")

    def publish(
        self,
        record: OutputRecord,
        on_ack: Callable[[], None],
        reduced: Callable[[], OutputRecord] | None = None,
    ) -> None:
        """Queue ``record``; ``on_ack`` is called once it is acknowledged (or given up)."""
        self._seq += 1
        d = self._open[self._seq] = _Delivery(record, on_ack, reduced, self._seq)
        self._enqueue(d)

    @property
    def pending(self) -> int:
        return len(self._open)

    def settled(self) -> Coroutine[Any, Any, None]:
        """Done once every record published before the call is acknowledged or given up."""
        return self._settled_upto(self._seq)

    async def _settled_upto(self, upto: int) -> None:
        while (oldest := next(iter(self._open), None)) is not None and oldest <= upto:
            progress = self._progress = self._progress or asyncio.Event()
            await progress.wait()

    def hold_topics(self, missing: frozenset[str]) -> None:
        """Hold records for ``missing`` topics (a send would block the queue on metadata)."""
        self._missing = missing
        held, self._held = self._held, []
        for d in held:
            self._enqueue(d)

    def _enqueue(self, delivery: _Delivery) -> None:
        self._queue.append(delivery)
        self._wake.set()

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            d = queue.popleft()
            r = d.record
            if r.topic in self._missing:
                self._held.append(d)
                continue
            try:
                # Waits only while the producer's buffer is full: back-pressure.
                future = await self._producer.send(
                    r.topic, value=r.value, key=r.key, headers=r.headers
                )
            except Exception as exc:  # every failure has a defined path below
                self._failed(d, exc)
                continue
            future.add_done_callback(lambda f, d=d: self._sent(d, f))

    def _sent(self, d: _Delivery, future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self._failed(d, exc)
            return
        self._settle(d)

    def _failed(self, d: _Delivery, exc: BaseException) -> None:
        self._on_error()
        if isinstance(exc, KafkaError) and not isinstance(exc, MessageSizeTooLargeError):
            d.attempt += 1
            loop = asyncio.get_running_loop()
            self._retries_unlogged += 1
            if loop.time() - self._retry_logged_at >= RETRY_LOG_INTERVAL_S:
                log.warning(
                    "publish failed, retrying",
                    topic=d.record.topic,
                    attempt=d.attempt,
                    error=type(exc).__name__,
                    failures_since_last_warning=self._retries_unlogged,
                )
                self._retry_logged_at, self._retries_unlogged = loop.time(), 0
            loop.call_later(self._retry_delay(d.attempt), self._enqueue, d)
            return
        # Never going to fit (or not a record the client accepts): shrink once, else drop.
        log.error(
            "record cannot be published",
            topic=d.record.topic,
            error=type(exc).__name__,
            reduced=d.reduced is not None,
        )
        if d.reduced is not None:
            d.record, d.reduced = d.reduced(), None
            self._enqueue(d)
            return
        self._settle(d)

    def _settle(self, d: _Delivery) -> None:
        del self._open[d.seq]
        if self._progress is not None:
            self._progress.set()
            self._progress = None
        # Given up counts as done too: the offset moves on rather than block the partition.
        d.on_ack()


class AtLeastOnce:
    """The delivery mode ``at_least_once``: see the module's docstring."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        publisher: Publisher,
        *,
        core: Core,
        effects: Effects,
        clock: Clock,
        config: Config,
        metrics: Metrics,
    ) -> None:
        self._consumer, self._publisher = consumer, publisher
        self._core, self._effects, self._clock = core, effects, clock
        self._config, self._metrics = config, metrics
        self._metadata_checked = False
        self._publishing = asyncio.create_task(publisher.run(), name="publish")

    async def start(self, partitions: set[Partition]) -> dict[Partition, Start]:
        return await read_starts(self._consumer, partitions, self._config.kafka)

    def publish(self, p: Publish) -> None:
        def on_ack() -> None:
            if p.settle is not None:
                p.settle(True)
            self._effects.apply(self._core.acknowledged(p.ticket, self._clock.read()))

        self._publisher.publish(p.record, on_ack, p.reduced)

    async def commit(self, only: set[Partition] | None = None) -> None:
        """Each partition's position with its offset map as metadata."""
        core = self._core
        plan = core.commit_plan(only)
        if not plan:
            return
        request = {
            TopicPartition(*part): OffsetAndMetadata(p.position, p.metadata)
            for part, p in plan.items()
        }
        try:
            await asyncio.wait_for(self._consumer.commit(request), COMMIT_TIMEOUT_S)
        except OffsetMetadataTooLargeError:
            log.error(
                "the broker refused the offset map as too large: lower"
                " kafka.offset_metadata_max_bytes to its offset.metadata.max.bytes",
                now_using=core.metadata_refused(),
            )
            return
        except (KafkaError, TimeoutError) as exc:
            self._metrics.commit_failures.inc()
            log.warning("commit failed, will retry", error=type(exc).__name__)
            return
        core.committed(plan)
        self._metrics.commits.inc()
        if not self._metadata_checked:
            await self._check_metadata(plan)

    async def _check_metadata(self, plan: dict[Partition, Planned]) -> None:
        """Read one commit back, once: a broker that drops metadata (Tansu) turns the
        offset maps off, said once, and the bridge commits as it did without them."""
        part = next((p for p, planned in plan.items() if planned.metadata), None)
        if part is None:
            return
        try:
            back = await bounded(
                kafka_io.committed_offsets(self._consumer, {TopicPartition(*part)}),
                kafka_io.OFFSETS_TIMEOUT_S,
                "a commit read back",
            )
        except (KafkaError, TimeoutError):
            return  # asked again after the next commit
        self._metadata_checked = True
        stored = back.get(TopicPartition(*part), (None, ""))[1]
        if stored == plan[part].metadata:
            return
        self._core.metadata_dropped()
        self._metrics.commit_metadata_supported.set(0)
        log.warning(
            "the broker drops commit metadata: offset maps are off, records finished out of"
            " order above a commit are processed again after a restart or rebalance"
        )

    async def hand_over(self, partitions: set[Partition], timeout: float) -> None:
        """Events under way get what ``timeout`` leaves after the commit's share to be
        acknowledged (each one saves a duplicate); then the finished prefix of
        ``partitions`` is committed."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        settle = timeout - min(HAND_OVER_COMMIT_S, timeout / 2)
        if self._publisher.pending and settle > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publisher.settled(), settle)
        with contextlib.suppress(TimeoutError):  # the next owner repeats what is uncommitted
            await bounded(
                self.commit(only=partitions),
                max(0.0, end - loop.time()),
                "the last commit of partitions leaving this member",
            )

    def hold_topics(self, missing: frozenset[str]) -> None:
        self._publisher.hold_topics(missing)

    def close(self) -> None:
        self._publishing.cancel()
