"""The delivery mode: how events and input offsets reach Kafka, as one interface.

Two implementations, as the Kafka Parallel Consumer has one ``OffsetCommitter`` with a
consumer-commit and a transactional implementation:

- :class:`bridge.shell.at_least_once.AtLeastOnce`: one idempotent producer publishes every
  event; the group's offsets are committed on their own, once what they answer is
  acknowledged;
- :class:`bridge.shell.exactly_once.ExactlyOnce`: one transactional producer per input
  partition; events and the partition's offset are committed in one transaction.

The rest of the shell calls the interface and never asks which mode runs. :class:`Effects`
is the one place that routes what the core returns: a ``Publish`` to the mode, every fact
to telemetry and to the listeners (the webhook feed's marks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from bridge.config import KafkaConfig
from bridge.core.book import Partition
from bridge.core.facts import Effect, Fact, Publish
from bridge.edges import kafka as kafka_io
from bridge.shell.bounded import bounded
from bridge.shell.telemetry import Telemetry

log = structlog.get_logger("wavespeed_bridge")

Start = tuple[int | None, str]  # (offset to start at, the offset map committed with it)


class DeliveryMode(Protocol):
    async def start(self, partitions: set[Partition]) -> dict[Partition, Start]:
        """Make ``partitions`` this member's and say where each starts: its committed
        offset and map (exactly once first fences the partitions' previous owner)."""
        ...

    def publish(self, p: Publish) -> None:
        """Send ``p``'s record; the core hears of its acknowledgement by ticket, and
        ``p.settle`` (when set) whether it was delivered."""
        ...

    async def commit(self) -> None:
        """The periodic commit: what is finished becomes the group's committed offsets."""
        ...

    async def hand_over(self, partitions: set[Partition], timeout: float) -> None:
        """``partitions`` leave this member (a revocation, the shutdown): publish and
        commit what is finished of them within ``timeout``, then let them go."""
        ...

    def hold_topics(self, missing: frozenset[str]) -> None:
        """Records for ``missing`` topics wait until they exist (a send would block)."""
        ...

    def close(self) -> None:
        """Stop what runs in the background (the end of the process)."""
        ...


class Effects:
    """Carries out what the core returns: the one place that routes it."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
        self._tracing = telemetry.tracing
        self.mode: DeliveryMode | None = None  # set once built (it reports through here)
        self.listeners: list[Callable[[Fact], None]] = []  # facts, after telemetry

    def apply(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Publish):
                assert self.mode is not None, "a record to publish before the mode exists"
                if self._tracing.enabled:  # the send's span, its context in the record
                    effect = self._tracing.publish(effect)
                self.mode.publish(effect)
                continue
            self._telemetry.observe((effect,))
            for listener in self.listeners:
                listener(effect)

    def intake_batch_done(self) -> None:
        """A fetch's records are all applied: what telemetry gathers per fetch is said."""
        self._telemetry.intake_batch_done()


async def read_starts(
    consumer: AIOKafkaConsumer, partitions: set[Partition], config: KafkaConfig
) -> dict[Partition, Start]:
    """Where each partition starts: the committed offset and its metadata, else the
    beginning or the end (``auto_offset_reset``); unknown (None) if the broker does not
    answer in time, and aiokafka's own reset applies."""
    if not partitions:
        return {}
    tps = {TopicPartition(*p) for p in partitions}
    unknown: dict[Partition, Start] = {p: (None, "") for p in partitions}
    try:
        starts = await bounded(
            kafka_io.committed_offsets(consumer, tps),
            kafka_io.OFFSETS_TIMEOUT_S,
            f"the committed offsets of {len(tps)} partitions",
        )
        missing = [tp for tp in tps if tp not in starts]
        if missing:
            earliest = config.auto_offset_reset == "earliest"
            reset = consumer.beginning_offsets if earliest else consumer.end_offsets
            found = await bounded(
                reset(missing),
                kafka_io.OFFSETS_TIMEOUT_S,
                f"the {'beginning' if earliest else 'end'} offsets of {len(missing)}"
                " partitions without a commit",
            )
            starts |= {tp: (offset, "") for tp, offset in found.items()}
    except TimeoutError:  # said by bounded()
        return unknown
    except KafkaError as exc:
        log.warning("start offsets unknown", error=type(exc).__name__)
        return unknown
    return {(tp.topic, tp.partition): start for tp, start in starts.items()}
