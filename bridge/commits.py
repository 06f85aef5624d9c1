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
from aiokafka.errors import KafkaError

from bridge.clock import Clock
from bridge.core import Core, Partition
from bridge.telemetry import Telemetry

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
    ) -> None:
        self._consumer, self._core, self._telemetry = consumer, core, telemetry
        self._clock, self._interval = clock, interval_s
        self.last_tick = time.monotonic()  # the liveness probe reads it
        self.running = True  # a cancel that asyncio.wait_for swallows must still end the loop

    async def commit(self, *, only: set[Partition] | None = None, timeout: float = 10.0) -> None:
        offsets = self._core.offsets
        positions = offsets.to_commit(only)
        if not positions:
            return
        request = {TopicPartition(*part): pos for part, pos in positions.items()}
        try:
            await asyncio.wait_for(self._consumer.commit(request), timeout)
        except (KafkaError, TimeoutError) as exc:
            self._telemetry.metrics.commit_failures.inc()
            log.warning("commit failed, will retry", error=type(exc).__name__)
            return
        offsets.mark_committed(positions)
        self._telemetry.metrics.commits.inc()

    async def run(self) -> None:
        while self.running:
            await asyncio.sleep(self._interval)
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
