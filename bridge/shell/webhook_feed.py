"""The webhook topic's reader: every replica reads every verified delivery (all partitions,
no consumer group), and the one that tracks the task acts on it.

The replica that received a delivery over HTTP is rarely the one tracking its task, so the
receiver only publishes it (``bridge.webhook_server``) and each replica reads the topic from
``webhooks.pending_ttl_s`` ago. A delivery for a task tracked here goes to the core; one for
a task not tracked here is remembered a while (its record may come later). When a replica
acts on a delivery, it appends a small mark (header ``applied-by``) to the same topic, so the
others forget it, and the replica that received it can tell a delivery no task took.

Two loops. One reads. The other watches, every ``CHECK_INTERVAL_S``: it looks for the
topic's partitions (every ``LOOK_MISSING_S`` until the topic exists, then every
``LOOK_INTERVAL_S``, so a partition count that grows is followed) and says whether the
feed is *live*: every partition of the topic read, reads not failing, and each position at
or past the end offset seen ``LAG_CHECKS`` checks before (a busy replica reads in batches;
a stalled feed is noticed within about 2.5 s). The core hears of every change
(``Core.webhook_feed``): polls wait for deliveries only while the feed is live, since a
delivery cannot reach a replica that does not read it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Mapping
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
from bridge.edges import kafka as kafka_io
from bridge.shell.delivery import Effects

log = structlog.get_logger("wavespeed_bridge.webhooks")

# Liveness is checked this often: a feed that stops reading is noticed within LAG_CHECKS + 1
# checks, so polls deferred for deliveries it would not see are not late by much.
CHECK_INTERVAL_S = 0.5
LAG_CHECKS = 4  # behind by what the topic held this many checks ago (2 s): not live
# The topic's partitions are looked up this often once found, and while it is missing. A
# lookup is one metadata request for every topic, as the health probe's.
LOOK_INTERVAL_S = 5.0
LOOK_MISSING_S = 1.0
# A lookup, a check or a change of partitions taking longer than this has failed.
REQUEST_TIMEOUT_S = 5.0
FETCH_TIMEOUT_MS = 200


def to_read(assigned: frozenset[int], found: frozenset[int] | None) -> tuple[frozenset[int], bool]:
    """The partitions to start reading, and whether from their beginning.

    Partitions that appear in a topic already read are new: everything in them is recent,
    so they are read from the start. The first ones found are read from
    ``webhooks.pending_ttl_s`` ago (the topic may be old). Partitions never go away in Kafka;
    a topic missing from the metadata (``found`` None) adds nothing.
    """
    if not found:
        return frozenset(), False
    return found - assigned, bool(assigned)


def not_live(
    found: frozenset[int] | None,
    assigned: frozenset[int],
    failing: str | None,
    positions: Mapping[int, int],
    ends_before: Mapping[int, int],
) -> str | None:
    """Why the feed is not live, or None when it is.

    Live: the topic was ``found`` and every partition of it is ``assigned`` (read from its
    start offset), reads are not ``failing``, and each partition's position has reached the
    end offset seen one check before (``ends_before``): whatever was in the topic then has
    been read. A partition without such an end offset yet is still being caught up on.
    """
    if not found:
        return "the webhook topic is not in the brokers' metadata"
    unread = found - assigned
    if unread:
        return f"partitions {sorted(unread)} not read yet"
    if failing is not None:
        return f"reads failing ({failing})"
    behind = sorted(
        p for p in assigned if p not in ends_before or positions.get(p, -1) < ends_before[p]
    )
    if behind:
        return f"partitions {behind} not caught up"
    return None


class WebhookFeed:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        *,
        core: Core,
        effects: Effects,
        clock: Clock,
        config: Config,
        replica: str,
        wake_dispatch: Callable[[], None],
        on_partitions: Callable[[int], None],
    ) -> None:
        self._consumer, self._producer = consumer, producer
        self._core, self._effects, self._clock = core, effects, clock
        self._wake = wake_dispatch  # polls moved earlier, or a delivery's poll, are due now
        self._on_partitions = on_partitions
        self._topic = config.webhooks.topic
        self._ttl = config.webhooks.pending_ttl_s
        self.replica = replica
        self._marks: set[asyncio.Task[Any]] = set()
        self._found: frozenset[int] | None = None  # the topic's partitions, as last looked up
        self._assigned: frozenset[int] = frozenset()  # read, each from its start offset
        self._failing: str | None = None  # why the last read failed, until one succeeds
        self.live: bool | None = None  # None until the first verdict

    async def start(self) -> None:
        """One look for the topic and, if it is there, its partitions assigned. A topic not
        found yet is looked for by :meth:`run`: start-up never waits for it."""
        with contextlib.suppress(KafkaError, TimeoutError):
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await self._look()
                await self._follow()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._read())
            loops.create_task(self._watch())

    # --- reading ---------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    await self._follow()
                if not self._assigned:  # the topic is not there yet: the watcher looks
                    await asyncio.sleep(CHECK_INTERVAL_S)
                    continue
                batch = await self._consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS)
            except (KafkaError, TimeoutError) as exc:
                if self._failing is None:
                    log.warning("webhook topic not readable, retrying", error=type(exc).__name__)
                self._failing = type(exc).__name__
                await asyncio.sleep(1.0)
                continue
            self._failing = None
            took = False
            for records in batch.values():
                for record in records:
                    took = self._take(record) or took
            self._effects.apply(self._core.expire_deliveries(self._clock.monotonic()))
            if took:
                self._wake()  # with confirm_by_poll, a delivery's poll is due at once

    async def _follow(self) -> None:
        """Start reading the partitions found and not read yet. Assigning replaces the
        assignment, so the partitions already read keep their positions by a seek."""
        added, from_start = to_read(self._assigned, self._found)
        if not added:
            return
        consumer = self._consumer
        keep = {tp: await consumer.position(tp) for tp in self._tps(self._assigned)}
        consumer.assign(self._tps(self._assigned | added))
        for tp, offset in keep.items():
            consumer.seek(tp, offset)
        new = self._tps(added)
        if from_start:
            await kafka_io.seek_to_beginning(consumer, new)
        else:
            # The end offsets before the lookup by time: where a partition with nothing from
            # the last pending_ttl_s starts, without skipping a record that comes meanwhile.
            ends = await consumer.end_offsets(new)
            since = int((self._clock.time() - self._ttl) * 1000)
            found = await consumer.offsets_for_times(dict.fromkeys(new, since))
            for tp in new:
                at = found.get(tp)
                consumer.seek(tp, at.offset if at is not None else ends[tp])
        self._assigned |= added
        self._on_partitions(len(self._assigned))
        log.info(
            "reading the webhook topic",
            topic=self._topic,
            partitions=sorted(self._assigned),
            added=sorted(added),
            start="beginning" if from_start else f"{self._ttl:g}s ago",
        )

    def _take(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """One record of the topic; whether the core was told of a delivery."""
        headers = {k: v or b"" for k, v in (record.headers or ())}
        task_id = (record.key or b"").decode("utf-8", "replace")
        if APPLIED_BY_HEADER in headers:
            if headers[APPLIED_BY_HEADER].decode("utf-8", "replace") != self.replica:
                self._core.delivery_applied(task_id)
            return False
        parsed = parse_delivery(record.value or b"")
        if isinstance(parsed, BadDelivery):  # the receiver checked it; written by another tool?
            log.warning("unreadable record on the webhook topic", reason=parsed.reason)
            return False
        received = parse_timestamp(headers.get(RECEIVED_AT_HEADER, b"").decode("utf-8", "replace"))
        if received is None:  # not from our receiver: when the broker took it
            received = record.timestamp / 1000.0
        self._effects.apply(
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
        return True

    # --- watching --------------------------------------------------------------------------

    async def _watch(self) -> None:
        looked_at = float("-inf")
        # End offsets of the last few turns: a feed is behind when it has not read what was
        # in the topic LAG_CHECKS turns ago (a busy replica reads in batches, not at once).
        ends_seen: collections.deque[dict[int, int]] = collections.deque(maxlen=LAG_CHECKS)
        while True:
            now = self._clock.monotonic()
            if now - looked_at >= (LOOK_INTERVAL_S if self._found else LOOK_MISSING_S):
                looked_at = now
                with contextlib.suppress(KafkaError, TimeoutError):  # looked for again
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        await self._look()
            positions, ends, error = await self._measure()
            if len(ends_seen) == LAG_CHECKS:
                failing = error or self._failing
                before = ends_seen[0]
                self._report(not_live(self._found, self._assigned, failing, positions, before))
            ends_seen.append(ends)
            await asyncio.sleep(CHECK_INTERVAL_S)

    async def _look(self) -> None:
        """The topic's partitions, from a metadata request for every topic: one naming the
        topic would create it, with the brokers' default partition count, on brokers that
        create topics on demand."""
        metadata = await self._producer.client.fetch_all_metadata()
        partitions = metadata.partitions_for_topic(self._topic)
        self._found = frozenset(partitions) if partitions else None

    async def _measure(self) -> tuple[dict[int, int], dict[int, int], str | None]:
        """The positions and end offsets of the partitions read, or why they are unknown.
        Positions first: a record that comes between the two is checked at the next turn."""
        tps = self._tps(self._assigned)
        if not tps:
            return {}, {}, None
        consumer = self._consumer
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                positions = {tp.partition: await consumer.position(tp) for tp in tps}
                ends = await consumer.end_offsets(tps)
        except (KafkaError, TimeoutError) as exc:
            return {}, {}, f"end offsets unknown: {type(exc).__name__}"
        return positions, {tp.partition: offset for tp, offset in ends.items()}, None

    def _report(self, why: str | None) -> None:
        live = why is None
        if live == self.live:
            return
        self.live = live
        self._effects.apply(self._core.webhook_feed(live, self._clock.monotonic(), why or ""))
        self._wake()

    def _tps(self, partitions: frozenset[int]) -> list[TopicPartition]:
        return [TopicPartition(self._topic, p) for p in sorted(partitions)]

    # --- marks -----------------------------------------------------------------------------

    def note(self, effect: Effect) -> None:
        """After telemetry: a delivery acted on here is marked on the topic."""
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
