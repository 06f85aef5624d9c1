"""The consume loop: input records from Kafka into the core, with back-pressure.

``getmany`` runs every 200 ms whatever happens, which keeps this member inside
``max.poll.interval.ms`` however long tasks take; at ``polling.max_in_flight`` open records
(with tenants: and ``tenants.max_held`` held ones) the partitions are paused instead of
buffering. Which records are taken is the core's
decision (``bridge.core.partitions``: a partition leaving, fenced or not started yet takes
none); this loop only fetches, seeks where the core says, and isolates a record the client
cannot decode so that it is dead-lettered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from bridge.config import Config
from bridge.core.book import Core, Partition
from bridge.core.clock import Clock
from bridge.edges import kafka as kafka_io
from bridge.edges.metrics import Metrics
from bridge.shell.delivery import DeliveryMode, Effects

log = structlog.get_logger("wavespeed_bridge")


class Intake:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        core: Core,
        effects: Effects,
        mode: DeliveryMode,
        config: Config,
        clock: Clock,
        metrics: Metrics,
        wake_dispatch: Callable[[], None],
    ) -> None:
        self._consumer, self._core, self._effects = consumer, core, effects
        self._mode = mode
        self._config, self._clock, self._metrics = config, clock, metrics
        self._wake_dispatch = wake_dispatch
        self.paused = False  # at the in-flight cap: every partition waits
        self._paused: set[Partition] = set()  # partitions paused now (cap or full offset map)
        self.running = True  # a cancel that asyncio.wait_for swallows must still end the loop
        self._restarts: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        consumer = self._consumer
        batch_cap = self._config.kafka.fetch_max_records
        while self.running:
            room = self._core.intake_room()
            self._set_paused(room <= 0)
            self._update_pauses()
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
            for messages in batch.values():
                for msg in messages:
                    self._take(msg)
            self._effects.intake_batch_done()
            if batch:
                self._wake_dispatch()
                # getmany does not wait while records are buffered: without a turn here, a
                # backlog is taken in one stretch (~13 ms per batch), delaying every timer.
                await asyncio.sleep(0)

    def _take(self, msg: ConsumerRecord[bytes, bytes]) -> None:
        self._effects.apply(self._core.on_record(kafka_io.to_record(msg), self._clock.read()))

    async def _skip_undecodable(self, limit: int) -> None:
        """A record the client cannot decode (a codec it lacks, a corrupt batch, a header
        name that is not UTF-8) fails getmany(), and aiokafka may already have moved past
        good records fetched with it. Rewind every partition to the record after the last
        one taken, then read each one record at a time: a record that fails is
        dead-lettered by its offset and skipped, the rest are handled as usual."""
        consumer, core = self._consumer, self._core
        for tp in sorted(consumer.assignment()):
            offset = core.next_offset((tp.topic, tp.partition))
            if offset is not None:
                consumer.seek(tp, offset)
        for tp in sorted(consumer.assignment()):
            part = (tp.topic, tp.partition)
            for _ in range(limit):
                try:
                    got = await consumer.getmany(tp, timeout_ms=100, max_records=1)
                except Exception as exc:
                    offset = core.next_offset(part)
                    if not kafka_io.undecodable(exc) or offset is None:
                        break
                    why = kafka_io.describe_error(exc)
                    self._effects.apply(core.on_undecodable(*part, offset, why))
                    consumer.seek(tp, offset + 1)
                    continue
                if not got:
                    break
                for messages in got.values():
                    for msg in messages:
                        self._take(msg)
                self._effects.intake_batch_done()
        self._wake_dispatch()

    def _set_paused(self, pause: bool) -> None:
        if pause == self.paused:
            return
        if pause:
            log.info("in-flight cap reached, fetching paused", in_flight=self._core.open_records)
        else:
            log.info("fetching resumed", in_flight=self._core.open_records)
        self.paused = pause
        self._metrics.consumer_paused.set(1 if pause else 0)

    def _update_pauses(self) -> None:
        """Pause every partition at the in-flight cap, and those whose offset map is nearly
        full; resume the rest."""
        assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        full = self._core.held_partitions() & assigned
        want = assigned if self.paused else full
        if want == self._paused:
            return
        if full - self._paused:
            log.warning("offset map nearly full, partition paused", partitions=sorted(full))
        stop, go = want - self._paused, self._paused - want
        if stop:
            self._consumer.pause(*(TopicPartition(*p) for p in stop))
        if go:
            self._consumer.resume(*(TopicPartition(*p) for p in go))
        self._paused = want
        self._metrics.partitions_paused_full_map.set(len(full))

    # --- where partitions are fetched from ---------------------------------------------------

    def seek(self, partitions: set[Partition], *, rebalanced: bool = True) -> None:
        """Fetch each started partition from where the core says it starts."""
        for part in partitions:
            offset = self._core.fetch_from(part)
            if offset is not None:
                self._consumer.seek(TopicPartition(*part), offset)
        if rebalanced:
            self._paused = set()  # a new assignment starts with every partition resumed
        self._update_pauses()

    async def restart(self, part: Partition) -> None:
        """Fetch ``part`` again from its committed offset (its transaction was aborted)."""
        starts = await self._mode.start({part})
        self._effects.apply(self._core.assign(starts, complete=False))
        self.seek({part}, rebalanced=False)

    def fenced(self, part: Partition, epoch: int) -> None:
        """Another member initialised ``part``'s transactional id (the core takes no more
        of its records). Normally this member is out of date and learns of the rebalance
        at its next heartbeat. If it still holds the partition, still fenced in the same
        epoch, after two session timeouts, the fence came from a member that has rejoined
        since: the partition starts again here from its committed offset."""
        grace = 2 * self._config.kafka.session_timeout_ms / 1000
        asyncio.get_running_loop().call_later(grace, self._recheck, part, epoch)

    def _recheck(self, part: Partition, epoch: int) -> None:
        if not self.running or not self._core.fenced(part, epoch):
            return
        if TopicPartition(*part) not in self._consumer.assignment():
            return
        log.warning("fenced partition still assigned here: starting it again", partition=part[1])
        if not self._core.restart(part, epoch):
            return
        task = asyncio.create_task(self.restart(part), name=f"restart-{part[1]}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)
