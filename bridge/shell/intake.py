"""The consume loop: input records from Kafka into the core, with back-pressure.

``getmany`` runs every 200 ms whatever happens, which keeps this member inside
``max.poll.interval.ms`` however long tasks take; at ``polling.max_in_flight`` open records
the partitions are paused instead of buffering. Where each partition starts is decided
here on assignment, and a record the client cannot decode is isolated and dead-lettered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from bridge.config import Config
from bridge.core.book import Core, Partition
from bridge.core.clock import Clock
from bridge.edges import kafka as kafka_io
from bridge.edges.metrics import Metrics
from bridge.shell.bounded import bounded
from bridge.shell.outbox import AnyOutbox

log = structlog.get_logger("wavespeed_bridge")

Start = tuple[int | None, str]  # (offset to start at, the offset map committed with it)


class Intake:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        core: Core,
        outbox: AnyOutbox,
        config: Config,
        clock: Clock,
        metrics: Metrics,
        wake_dispatch: Callable[[], None],
    ) -> None:
        self._consumer, self._core, self._outbox = consumer, core, outbox
        self._config, self._clock, self._metrics = config, clock, metrics
        self._wake_dispatch = wake_dispatch
        self.paused = False  # at the in-flight cap: every partition waits
        self._paused: set[Partition] = set()  # partitions paused now (cap or full offset map)
        self.running = True  # a cancel that asyncio.wait_for swallows must still end the loop
        # Per assigned partition, the offset after the last record handed over (or the start).
        self._next_offset: dict[Partition, int] = {}
        self._started: set[Partition] = set()  # partitions whose start the listener decided
        self._early: dict[Partition, int] = {}  # lowest offset fetched before that
        self.epoch = 0  # one more at every revocation and assignment
        self._rechecks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        consumer = self._consumer
        cap = self._config.polling.max_in_flight
        batch_cap = self._config.kafka.fetch_max_records
        while self.running:
            room = cap - self._core.open_records
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
            if batch:
                self._wake_dispatch()

    def _take(self, msg: ConsumerRecord[bytes, bytes]) -> None:
        part = (msg.topic, msg.partition)
        if part not in self._started:
            # aiokafka fetches as soon as partitions are assigned, while the rebalance
            # listener still reads where they start: fetched again after the seek.
            self._early[part] = min(self._early.get(part, msg.offset), msg.offset)
            return
        rec = kafka_io.to_record(msg)
        self._next_offset[part] = rec.offset + 1
        self._outbox.apply(self._core.on_record(rec, self._clock.read()))

    async def _skip_undecodable(self, limit: int) -> None:
        """A record the client cannot decode (a codec it lacks, a corrupt batch, a header
        name that is not UTF-8) fails getmany(), and aiokafka may already have moved past
        good records fetched with it. Rewind every partition to the record after the last
        one handed over, then read each one record at a time: a record that fails is
        dead-lettered by its offset and skipped, the rest are handled as usual."""
        consumer = self._consumer
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
                    self._next_offset[part] = offset + 1
                    why = kafka_io.describe_error(exc)
                    self._outbox.apply(self._core.on_undecodable(*part, offset, why))
                    consumer.seek(tp, offset + 1)
                    continue
                if not got:
                    break
                for messages in got.values():
                    for msg in messages:
                        self._take(msg)
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
        full = self._core.commits.full_partitions() & assigned
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

    # --- assignment ------------------------------------------------------------------------

    async def start_offsets(self, assigned: set[TopicPartition]) -> dict[Partition, Start]:
        """Where each partition starts, decided here: the committed offset and its metadata,
        else the beginning or the end (``auto_offset_reset``)."""
        consumer = self._consumer
        for tp in assigned:
            self._next_offset.pop((tp.topic, tp.partition), None)
            self._started.discard((tp.topic, tp.partition))
        if not assigned:
            return {}
        try:
            starts = await bounded(
                kafka_io.committed_offsets(consumer, assigned),
                kafka_io.OFFSETS_TIMEOUT_S,
                f"the committed offsets of {len(assigned)} partitions",
            )
            missing = [tp for tp in assigned if tp not in starts]
            if missing:
                earliest = self._config.kafka.auto_offset_reset == "earliest"
                reset = consumer.beginning_offsets if earliest else consumer.end_offsets
                found = await bounded(
                    reset(missing),
                    kafka_io.OFFSETS_TIMEOUT_S,
                    f"the {'beginning' if earliest else 'end'} offsets of {len(missing)}"
                    " partitions without a commit",
                )
                starts |= {tp: (offset, "") for tp, offset in found.items()}
        except TimeoutError:  # said by bounded(); aiokafka's own reset applies then
            return {(tp.topic, tp.partition): (None, "") for tp in assigned}
        except KafkaError as exc:
            log.warning("start offsets unknown", error=type(exc).__name__)
            return {(tp.topic, tp.partition): (None, "") for tp in assigned}
        return {(tp.topic, tp.partition): start for tp, start in starts.items()}

    def seek(self, starts: dict[Partition, Start], *, rebalanced: bool = True) -> None:
        """Fetch each partition from its start (and hand its records to the core)."""
        for part, (offset, _) in starts.items():
            early = self._early.pop(part, None)
            if offset is None:  # unknown: go back to what was fetched early, if anything
                offset = early
            if offset is not None:
                self._consumer.seek(TopicPartition(*part), offset)
                self._next_offset[part] = offset
            self._started.add(part)
        if rebalanced:
            self.rebalancing()
            self._paused = set()  # a new assignment starts with every partition resumed
        self._update_pauses()

    async def restart(self, part: Partition) -> None:
        """Fetch ``part`` again from its committed offset (its transaction was aborted)."""
        starts = await self.start_offsets({TopicPartition(*part)})
        self._outbox.apply(self._core.assign(starts, complete=False))
        self.seek(starts, rebalanced=False)

    def rebalancing(self) -> None:
        """A revocation or an assignment: work begun for the old assignment is stale."""
        self.epoch += 1

    def fenced(self, part: Partition) -> None:
        """Another member initialised ``part``'s transactional id: stop taking its records.

        Normally this member is out of date and learns of the rebalance at its next
        heartbeat. If it still holds the partition, with no rebalance, after two session
        timeouts, the fence came from a member that has rejoined since: the partition
        starts again here from its committed offset.
        """
        self.forget({part})
        epoch = self.epoch
        grace = 2 * self._config.kafka.session_timeout_ms / 1000
        asyncio.get_running_loop().call_later(grace, self._recheck, part, epoch)

    def _recheck(self, part: Partition, epoch: int) -> None:
        if not self.running or epoch != self.epoch or part in self._started:
            return
        if TopicPartition(*part) not in self._consumer.assignment():
            return
        log.warning("fenced partition still assigned here: starting it again", partition=part[1])
        task = asyncio.create_task(self.restart(part), name=f"restart-{part[1]}")
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    def forget(self, partitions: set[Partition]) -> None:
        for part in partitions:
            self._next_offset.pop(part, None)
            self._started.discard(part)
            self._early.pop(part, None)
