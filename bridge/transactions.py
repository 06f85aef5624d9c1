"""Exactly-once delivery: each commit interval, one Kafka transaction per input partition
carries the events finished for it and its input offset (with the offset map).

Transactional ids are ``<prefix>-<input topic>-<partition>`` (prefix: ``kafka.
transactional_id_prefix``, else the group id), one producer per assigned partition. Kafka
keeps one live producer epoch per transactional id: the member that gets a partition
initialises its id, which aborts whatever the previous owner left open and fences that
owner, so a replica frozen past its session and resumed (a zombie) gets every later
transaction refused. aiokafka's ``send_offsets_to_transaction`` carries no group
generation (KIP-447), so a single id per process could not fence; one id per partition
needs nothing from the client but the protocol's oldest transactional guarantee.

A transaction that fails is aborted and the partition starts again from its committed
offset: its tasks are parked and revived when their records come back, and their events
go out in a later transaction. Subscribers reading with ``isolation.level=read_committed``
see each event once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from bridge import kafka as kafka_io
from bridge.clock import Clock
from bridge.config import Config
from bridge.core import Core, Partition
from bridge.facts import Effect, Publish
from bridge.telemetry import Telemetry

log = structlog.get_logger("wavespeed_bridge.transactions")

TRANSACTION_TIMEOUT_S = 10.0


def transactional_id(config: Config, part: Partition) -> str:
    prefix = config.kafka.transactional_id_prefix or config.kafka.group_id
    return f"{prefix}-{part[0]}-{part[1]}"


class TransactionalOutbox:
    """The outbox of ``delivery: exactly_once``: records wait for their partition's next
    transaction; the broker's commit of it is their acknowledgement."""

    def __init__(
        self,
        *,
        core: Core,
        telemetry: Telemetry,
        clock: Clock,
        config: Config,
        restart: Callable[[Partition], Awaitable[None]],
        make_producer: Callable[[str], AIOKafkaProducer] | None = None,
    ) -> None:
        self._core, self._telemetry, self._clock = core, telemetry, clock
        self._config = config
        self._restart = restart  # fetch the partition again from its committed offset
        self._make_producer = make_producer or (
            lambda tid: kafka_io.make_producer(config.kafka, transactional_id=tid)
        )
        self._producers: dict[Partition, AIOKafkaProducer] = {}
        self._pending: dict[Partition, list[Publish]] = {}
        self._busy: dict[Partition, asyncio.Task[None]] = {}  # a transaction under way
        self._missing: frozenset[str] = frozenset()  # topics the brokers do not list

    # --- effects -------------------------------------------------------------------------

    def apply(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Publish):
                assert effect.partition is not None, "exactly-once records name a partition"
                self._pending.setdefault(effect.partition, []).append(effect)
                self._count_pending()
            else:
                self._telemetry.observe((effect,))

    def _count_pending(self) -> None:
        pending = sum(len(p) for p in self._pending.values())
        self._telemetry.metrics.events_pending.set(pending)

    def hold_topics(self, missing: frozenset[str]) -> None:
        """A partition with records for a missing topic waits (a send would only time out)."""
        self._missing = missing

    async def settled(self, timeout: float) -> None:
        """Nothing to wait for: records become visible with their transaction."""

    # --- producers, one per assigned partition -------------------------------------------

    async def open(self, partitions: set[Partition]) -> None:
        """Initialise the transactional id of each new partition: it fences the previous
        owner and aborts what it left open, before this member reads the committed offset."""
        new = [p for p in partitions if p not in self._producers]
        await asyncio.gather(*(self._open(p) for p in new))

    async def _open(self, part: Partition) -> None:
        producer = self._make_producer(transactional_id(self._config, part))
        try:
            await asyncio.wait_for(producer.start(), TRANSACTION_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            log.warning("transactional producer not started", partition=part[1], error=repr(exc))
            with contextlib.suppress(Exception):
                await producer.stop()
            return  # tried again before the next transaction
        self._producers[part] = producer

    async def close(self, partitions: set[Partition]) -> None:
        """After the partitions' last transaction: stop their producers."""
        running = [self._busy[p] for p in partitions if p in self._busy]
        if running:
            await asyncio.wait(running, timeout=TRANSACTION_TIMEOUT_S)
        for part in partitions:
            self._pending.pop(part, None)
            producer = self._producers.pop(part, None)
            if producer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5.0)

    # --- transactions --------------------------------------------------------------------

    async def commit(self, *, only: set[Partition] | None = None, timeout: float = 10.0) -> None:
        """One transaction per partition with records or progress to commit, each in its own
        task: a transaction is never cancelled half way (a caller's timeout only stops
        the waiting), and a partition has one transaction at a time."""
        parts = set(self._core.offsets.partitions()) | set(self._pending)
        if only is not None:
            parts &= only
        missing = {p for p in parts if p not in self._producers}
        if missing:
            await self.open(missing)
        for part in sorted(parts):
            if part in self._producers and part not in self._busy:
                task = asyncio.create_task(self._transact(part), name=f"txn-{part[1]}")
                self._busy[part] = task
                task.add_done_callback(functools.partial(self._done, part))
        running = [self._busy[p] for p in parts if p in self._busy]
        if running:
            await asyncio.wait(running, timeout=timeout)

    def _done(self, part: Partition, task: asyncio.Task[None]) -> None:
        self._busy.pop(part, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("transaction failed", partition=part[1], exc_info=task.exception())

    async def _transact(self, part: Partition) -> None:
        core, producer = self._core, self._producers[part]
        if any(p.record.topic in self._missing for p in self._pending.get(part, ())):
            return
        pending = self._pending.pop(part, [])
        self._count_pending()
        plan = core.transaction_plan(part, [p.ticket for p in pending])
        if not pending and plan is None:
            return
        metrics = self._telemetry.metrics
        try:
            await producer.begin_transaction()
            sent = [await self._send(producer, p) for p in pending]
            if plan is not None:
                offsets = {TopicPartition(*part): OffsetAndMetadata(*plan)}
                await producer.send_offsets_to_transaction(offsets, self._config.kafka.group_id)
            await producer.commit_transaction()
            await asyncio.gather(*(f for f in sent if f is not None))
        except ProducerFenced:
            # Another member initialised this partition's id: it owns the partition now.
            metrics.transactions.labels("fenced").inc()
            log.warning("transactional id fenced: the partition has a new owner", partition=part[1])
            core.reset(part)
            self._drop(part)
            return
        except (KafkaError, TimeoutError) as exc:
            metrics.transactions.labels("aborted").inc()
            log.warning(
                "transaction aborted, the partition restarts", partition=part[1], error=repr(exc)
            )
            await self._abort(part, producer)
            core.reset(part)
            await self._restart(part)
            return
        metrics.transactions.labels("committed").inc()
        at = self._clock.read()
        for p in pending:
            self._telemetry.observe(core.acknowledged(p.ticket, at))
        if plan is not None:
            core.offsets.mark_committed({part: plan[0]}, {part: plan[1]})
        metrics.commits.inc()

    def cancel(self) -> None:
        self._pending.clear()
        for task in list(self._busy.values()):
            task.cancel()

    async def _send(self, producer: AIOKafkaProducer, p: Publish) -> asyncio.Future[Any] | None:
        """Queue one record in the transaction; a record that can never be sent is replaced
        by its reduced form, else given up (its input offset moves on, as at least once)."""
        for record in (p.record, p.reduced() if p.reduced is not None else None):
            if record is None:
                break
            try:
                future: asyncio.Future[Any] = await producer.send(
                    record.topic, value=record.value, key=record.key, headers=record.headers
                )
                return future
            except MessageSizeTooLargeError:
                log.error("record cannot be published", topic=record.topic, error="too large")
        return None

    async def _abort(self, part: Partition, producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.abort_transaction(), TRANSACTION_TIMEOUT_S)
        except Exception:  # the producer is unusable: a new one aborts on the broker side
            self._drop(part)

    def _drop(self, part: Partition) -> None:
        """Forget a producer that cannot go on; stopped in the background."""
        producer = self._producers.pop(part, None)
        if producer is not None:
            stopping = asyncio.ensure_future(producer.stop())
            stopping.add_done_callback(lambda f: f.cancelled() or f.exception())
