"""The webhook topic's reader: every replica reads every verified delivery (all partitions,
no consumer group), and the one that tracks the task acts on it.

The replica that received a delivery over HTTP is rarely the one tracking its task, so the
receiver only publishes it (``bridge.webhook_server``) and each replica reads the topic from
``webhooks.pending_ttl_s`` ago. A delivery for a task tracked here goes to the core; one for
a task not tracked here is remembered a while (its record may come later). When a replica
acts on a delivery, it appends a small mark (header ``applied-by``) to the same topic, so the
others forget it, and the replica that received it can tell a delivery no task took.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from bridge.config import Config
from bridge.core import facts
from bridge.core.book import Core
from bridge.core.clock import Clock
from bridge.core.facts import Effect
from bridge.core.messages import parse_timestamp
from bridge.core.webhook_signature import (
    APPLIED_BY_HEADER,
    ID_HEADER,
    RECEIVED_AT_HEADER,
    RECEIVED_BY_HEADER,
    BadDelivery,
    parse_delivery,
)
from bridge.shell.outbox import AnyOutbox

log = structlog.get_logger("wavespeed_bridge.webhooks")


class WebhookFeed:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        *,
        core: Core,
        outbox: AnyOutbox,
        clock: Clock,
        config: Config,
        replica: str,
    ) -> None:
        self._consumer, self._producer = consumer, producer
        self._core, self._outbox, self._clock = core, outbox, clock
        self._topic = config.webhooks.topic
        self._ttl = config.webhooks.pending_ttl_s
        self.replica = replica
        self._marks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Assign every partition of the topic, from ``pending_ttl_s`` ago."""
        consumer = self._consumer
        partitions: set[int] | None = None
        for _ in range(50):
            partitions = consumer.partitions_for_topic(self._topic)
            if partitions:
                break
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        tps = [TopicPartition(self._topic, p) for p in sorted(partitions or {0})]
        consumer.assign(tps)
        since = int((self._clock.time() - self._ttl) * 1000)
        found = await consumer.offsets_for_times({tp: since for tp in tps})
        for tp in tps:
            at = found.get(tp)
            if at is not None:
                consumer.seek(tp, at.offset)
            else:
                await consumer.seek_to_end(tp)

    async def run(self) -> None:
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=200)
            except KafkaError as exc:
                log.warning("webhook topic not readable, retrying", error=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for records in batch.values():
                for record in records:
                    self._take(record)
            self._outbox.apply(self._core.expire_deliveries(self._clock.monotonic()))

    def _take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        headers = {k: v or b"" for k, v in (record.headers or ())}
        task_id = (record.key or b"").decode("utf-8", "replace")
        if APPLIED_BY_HEADER in headers:
            if headers[APPLIED_BY_HEADER].decode("utf-8", "replace") != self.replica:
                self._core.delivery_applied(task_id)
            return
        parsed = parse_delivery(record.value or b"")
        if isinstance(parsed, BadDelivery):  # the receiver checked it; written by another tool?
            log.warning("unreadable record on the webhook topic", reason=parsed.reason)
            return
        received = parse_timestamp(headers.get(RECEIVED_AT_HEADER, b"").decode("utf-8", "replace"))
        if received is None:  # not from our receiver: when the broker took it
            received = record.timestamp / 1000.0
        self._outbox.apply(
            self._core.on_delivery(
                parsed.task_id,
                parsed.outcome,
                webhook_id=headers.get(ID_HEADER, b"").decode("utf-8", "replace"),
                received=received,
                mine=headers.get(RECEIVED_BY_HEADER, b"").decode("utf-8", "replace")
                == self.replica,
                at=self._clock.read(),
            )
        )

    def note(self, effect: Effect) -> None:
        """After the outbox: a delivery acted on here is marked on the topic."""
        if isinstance(effect, facts.DeliveryApplied):
            mark = asyncio.ensure_future(self._mark(effect.task.task_id, effect.webhook_id))
            self._marks.add(mark)
            mark.add_done_callback(self._marks.discard)

    async def _mark(self, task_id: str, webhook_id: str) -> None:
        headers = [(APPLIED_BY_HEADER, self.replica.encode()), (ID_HEADER, webhook_id.encode())]
        with contextlib.suppress(Exception):  # advisory: a lost mark only costs a count
            await self._producer.send(self._topic, key=task_id.encode(), value=b"", headers=headers)

    async def close(self) -> None:
        for mark in list(self._marks):
            mark.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._consumer.stop(), 5.0)
