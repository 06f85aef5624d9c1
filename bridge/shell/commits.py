"""The commit loop: per partition, one past the longest finished prefix, every interval.

Only records whose event (or dead-letter record) the broker acknowledged count as
finished, so a committed offset never runs ahead of its output. The loop also samples the
gauges and ticks the liveness clock.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetMetadataTooLargeError
from aiokafka.structs import OffsetAndMetadata

from bridge.core.book import Core, Partition
from bridge.core.clock import Clock
from bridge.edges import kafka as kafka_io
from bridge.shell.bounded import bounded
from bridge.shell.telemetry import Telemetry
from bridge.shell.transactions import TransactionalOutbox

log = structlog.get_logger("wavespeed_bridge")


class Committer:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        core: Core,
        telemetry: Telemetry,
        clock: Clock,
        interval_s: float,
        transactions: TransactionalOutbox | None = None,
    ) -> None:
        self._consumer, self._core, self._telemetry = consumer, core, telemetry
        self._clock, self._interval = clock, interval_s
        self.last_tick = time.monotonic()  # the liveness probe reads it
        self.running = True  # a cancel that asyncio.wait_for swallows must still end the loop
        self._metadata_checked = False
        self._transactions = transactions  # exactly once: offsets go in the transactions

    async def commit(self, *, only: set[Partition] | None = None, timeout: float = 10.0) -> None:
        """Commit each partition's position with its offset map as metadata."""
        if self._transactions is not None:
            await self._transactions.commit(only=only, timeout=timeout)
            return
        core = self._core
        plan = core.commits.plan(only)
        if not plan:
            return
        request = {
            TopicPartition(*part): OffsetAndMetadata(position, metadata)
            for part, (position, metadata) in plan.items()
        }
        try:
            await asyncio.wait_for(self._consumer.commit(request), timeout)
        except OffsetMetadataTooLargeError:
            core.commits.shrink_limit()
            log.error(
                "the broker refused the offset map as too large: lower"
                " kafka.offset_metadata_max_bytes to its offset.metadata.max.bytes",
                now_using=core.commits.limit,
            )
            return
        except (KafkaError, TimeoutError) as exc:
            self._telemetry.metrics.commit_failures.inc()
            log.warning("commit failed, will retry", error=type(exc).__name__)
            return
        core.offsets.mark_committed(
            {part: pos for part, (pos, _) in plan.items()},
            {part: meta for part, (_, meta) in plan.items()},
        )
        self._telemetry.metrics.commits.inc()
        if not self._metadata_checked:
            await self._check_metadata(plan)

    async def _check_metadata(self, plan: dict[Partition, tuple[int, str]]) -> None:
        """Read one commit back, once: a broker that drops metadata (Tansu) turns the
        offset maps off, said once, and the bridge commits as it did without them."""
        part = next((p for p, (_, meta) in plan.items() if meta), None)
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
        if stored == plan[part][1]:
            return
        self._core.commits.unsupported()
        self._telemetry.metrics.commit_metadata_supported.set(0)
        log.warning(
            "the broker drops commit metadata: offset maps are off, records finished out of"
            " order above a commit are processed again after a restart or rebalance"
        )

    async def run(self) -> None:
        # A fixed cadence, not an interval after each commit: exactly once acknowledges at
        # the commit, so a slow one must not push the next one later.
        next_at = time.monotonic() + self._interval
        while self.running:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + self._interval, time.monotonic())
            self.last_tick = time.monotonic()
            await self.commit()
            self._telemetry.gauges(self._clock.monotonic(), self._lag())

    def _lag(self) -> int:
        """Records not yet committed, up to each partition's high watermark."""
        offsets, lag = self._core.offsets, 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            part = (tp.topic, tp.partition)
            committed = offsets.committed(part)
            if committed is None:
                committed = offsets.committable(part) or 0
            lag += max(0, high - committed)
        return lag
