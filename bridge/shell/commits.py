"""The commit loop: the delivery mode commits on a fixed cadence; gauges and liveness ride
along. (Exactly once also closes each transaction when its oldest event is due, on its own
timer: ``bridge.shell.exactly_once``; this cadence commits what has only offsets.)

Only records whose event (or dead-letter record) the broker acknowledged count as
finished, so a committed offset never runs ahead of its output: how the commit is made is
the delivery mode's (``bridge.shell.delivery``). The loop also samples the gauges, the
consumer lag, and ticks the liveness clock.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer

from bridge.core.book import Core
from bridge.core.clock import Clock
from bridge.shell.delivery import DeliveryMode
from bridge.shell.telemetry import Telemetry


class CommitLoop:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        mode: DeliveryMode,
        *,
        core: Core,
        telemetry: Telemetry,
        clock: Clock,
        interval_s: float,
    ) -> None:
        self._consumer, self._mode, self._core = consumer, mode, core
        self._telemetry, self._clock, self._interval = telemetry, clock, interval_s
        self.last_tick = time.monotonic()  # the liveness probe reads it
        self.running = True  # a cancel that asyncio.wait_for swallows must still end the loop

    async def run(self) -> None:
        # A fixed cadence, not an interval after each commit: exactly once acknowledges at
        # the commit, so a slow one must not push the next one later.
        next_at = time.monotonic() + self._interval
        while self.running:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + self._interval, time.monotonic())
            self.last_tick = time.monotonic()
            await self._mode.commit()
            self._telemetry.gauges(self._clock.monotonic(), self._lag())

    def _lag(self) -> int:
        """Records not yet committed, up to each partition's high watermark."""
        lag = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            committed = self._core.committed_position((tp.topic, tp.partition)) or 0
            lag += max(0, high - committed)
        return lag
