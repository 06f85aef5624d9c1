"""The replicas of one account, through Kafka alone: the budget's shares and pauses on the
coordination topic, and what they learned on the state topic.

Every ``cluster.report_interval_s`` this loop reports the replica's demand
(``core.budget.Demand``) and reads every replica's reports; ``core.budget.SharedBudget``
turns them into this replica's share, which the core's token bucket takes. A pause the
core starts on a 429 or a ``Retry-After`` is published, and one another replica published
is applied here. The learned state is read whole at start (before partitions are taken),
followed while running, and this replica's is published every ``cluster.state_interval_s``
and at shutdown. Both topics are read by one consumer outside any group; a topic that is
missing is looked for again, and meanwhile the budget keeps to the safe share (said once,
``budget_coordinated`` 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from bridge.config import Config
from bridge.core import budget as shared
from bridge.core import facts, learning
from bridge.core.book import Core
from bridge.core.clock import Clock
from bridge.edges import kafka as kafka_io
from bridge.edges.metrics import Metrics
from bridge.shell.bounded import bounded
from bridge.shell.delivery import Effects

log = structlog.get_logger("wavespeed_bridge.cluster")

LOOK_AGAIN_S = 5.0  # a missing topic is looked for again this often
PAUSE_REASONS = frozenset({"rate_limited", "retry_after"})  # what the account shares


class Cluster:
    def __init__(
        self,
        reader: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        *,
        core: Core,
        effects: Effects,
        clock: Clock,
        config: Config,
        metrics: Metrics,
        replica: str,
    ) -> None:
        self._reader, self._producer = reader, producer
        self._core, self._effects, self._clock = core, effects, clock
        self._metrics, self.replica = metrics, replica
        c, a = config.cluster, config.api
        self._interval = c.report_interval_s
        self._state_interval = c.state_interval_s
        self._coordination, self._state = c.coordination_topic, c.state_topic
        self.budget: shared.SharedBudget | None = None
        if a.requests_per_second > 0 and a.budget_scope == "account":
            self.budget = shared.SharedBudget(
                a.requests_per_second,
                replica,
                fallback_share=c.fallback_share,
                interval_s=c.report_interval_s,
            )
            metrics.budget_share.set(a.requests_per_second * c.fallback_share)
        self._demand = shared.Demand(core.sample(clock.monotonic()).taken, clock.monotonic())
        self._reading: set[str] = set()  # topics whose partitions the reader is assigned
        self._missing_said: set[str] = set()
        self._coordinated_said: bool | None = None
        self._sends: set[asyncio.Future[object]] = set()
        self._published_at = time.monotonic()
        self.running = True

    @property
    def _topics(self) -> list[str]:
        return [t for t in (self._coordination, self._state) if t is not None]

    # --- start: read what was learned before taking partitions -----------------------------

    async def start(self, limit_s: float) -> None:
        """Find the topics, and read the state topic to its end (within ``limit_s``)."""
        if not self._topics:
            return
        await self._find_topics()
        if self._state in self._reading:
            try:
                adopted = await bounded(self._read_state(), limit_s, "the learned state")
            except TimeoutError:
                return  # what is left is read while running
            if adopted:
                log.info("learned state taken from the state topic", models=adopted)

    async def _read_state(self) -> int:
        assert self._state is not None
        parts = [tp for tp in self._reader.assignment() if tp.topic == self._state]
        ends = await self._reader.end_offsets(parts)
        adopted = 0
        while [tp for tp, end in ends.items() if await self._reader.position(tp) < end]:
            batch = await self._reader.getmany(*parts, timeout_ms=200)
            for records in batch.values():
                adopted += sum(self._take_state(r) for r in records)
        return adopted

    async def _find_topics(self) -> None:
        """Assign the partitions of the topics that exist; say once of one that does not."""
        metadata = await self._producer.client.fetch_all_metadata()
        present = metadata.topics()
        new: list[TopicPartition] = []
        for topic in self._topics:
            if topic in self._reading:
                continue
            if topic not in present:
                if topic not in self._missing_said:
                    self._missing_said.add(topic)
                    log.warning(
                        "cluster topic missing: looked for again",
                        topic=topic,
                        effect=(
                            "the budget keeps to cluster.fallback_share"
                            if topic == self._coordination
                            else "this replica learns alone and starts cold"
                        ),
                    )
                continue
            parts = metadata.partitions_for_topic(topic) or set()
            new += [TopicPartition(topic, p) for p in sorted(parts)]
            self._reading.add(topic)
            if topic in self._missing_said:
                log.info("cluster topic found", topic=topic)
        if not new:
            return
        self._reader.assign(sorted({*self._reader.assignment(), *new}))
        for tp in new:
            if tp.topic == self._state:
                await kafka_io.seek_to_beginning(self._reader, [tp])
            else:  # reports of the last few intervals: who is there now
                since = int((self._clock.time() - self._expiry_s()) * 1000)
                found = await self._reader.offsets_for_times({tp: since})
                at = found.get(tp)
                if at is not None:
                    self._reader.seek(tp, at.offset)
                else:
                    await kafka_io.seek_to_end(self._reader, [tp])

    def _expiry_s(self) -> float:
        return shared.EXPIRY_REPORTS * self._interval

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        next_look = time.monotonic() + LOOK_AGAIN_S
        while self.running:
            started = time.monotonic()
            if started >= next_look and len(self._reading) < len(self._topics):
                next_look = started + LOOK_AGAIN_S
                with contextlib.suppress(KafkaError, TimeoutError):
                    await bounded(self._find_topics(), LOOK_AGAIN_S, "the cluster topics")
            self._report()
            batch = {}
            if self._reading:  # a reader with nothing assigned waits for an assignment
                try:
                    batch = await self._reader.getmany(timeout_ms=int(self._interval * 400))
                except KafkaError as exc:
                    log.warning("cluster topics not readable, retrying", error=type(exc).__name__)
            for tp, records in batch.items():
                for record in records:
                    if tp.topic == self._state:
                        self._take_state(record)
                    else:
                        self._take_coordination(record)
            self._apply_share()
            if time.monotonic() - self._published_at >= self._state_interval:
                self.publish_learned()
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    def _report(self) -> None:
        now = self._clock.monotonic()
        sample = self._core.sample(now)
        demand = self._demand.read(sample.taken, sample.due, now)
        self._metrics.budget_demand.set(demand)
        if self.budget is not None and self._coordination in self._reading:
            report = shared.Report(self.replica, self._clock.time(), demand)
            self._send(self._coordination, *shared.encode(report))

    def _apply_share(self) -> None:
        budget = self.budget
        if budget is None:
            return
        now = self._clock.monotonic()
        share = budget.share(now)
        coordinated = budget.coordinated(now)
        self._core.set_budget_rate(share, now)
        m = self._metrics
        m.budget_share.set(share)
        m.budget_replicas.set(len(budget.live(now)))
        m.budget_coordinated.set(1 if coordinated else 0)
        if coordinated != self._coordinated_said:
            if coordinated:
                log.info("budget shared with the other replicas", share=round(share, 3))
            elif self._coordinated_said is not None:  # a missing topic was said already
                log.warning(
                    "budget not coordinated: keeping to the safe share",
                    share=round(share, 3),
                    topic=self._coordination,
                )
            self._coordinated_said = coordinated

    # --- what comes in -------------------------------------------------------------------

    def _take_coordination(self, record: ConsumerRecord[bytes, bytes]) -> None:
        message = shared.decode(record.key, record.value)
        if isinstance(message, shared.Report):
            if self.budget is not None:
                self.budget.heard(message, self._clock.monotonic())
        elif isinstance(message, shared.Pause) and message.by != self.replica:
            self._effects.apply(
                self._core.pause_from_peer(
                    message.until, message.reason, message.by, self._clock.read()
                )
            )

    def _take_state(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        learned = learning.decode(record.key, record.value)
        if learned is None:
            if record.value:  # a tombstone is not a refusal
                self._metrics.state_models.labels("refused").inc()
            return False
        if learned.replica == self.replica or not self._core.learn_from(learned):
            return False
        self._metrics.state_models.labels("adopted").inc()
        return True

    # --- what goes out -------------------------------------------------------------------

    def note(self, fact: facts.Fact) -> None:
        """After telemetry: a pause this replica started is the whole account's."""
        if (
            isinstance(fact, facts.Paused)
            and fact.reason in PAUSE_REASONS
            and fact.added_s > 0
            and self._coordination in self._reading
        ):
            until = self._clock.time() + fact.seconds
            pause = shared.Pause(until, fact.reason, self.replica)
            self._send(self._coordination, *shared.encode(pause))

    def publish_learned(self) -> None:
        self._published_at = time.monotonic()
        if self._state not in self._reading:
            return
        for learned in self._core.learned_since(self.replica, self._clock.time()):
            self._send(self._state, *learning.encode(learned))
            self._metrics.state_models.labels("published").inc()

    def _send(self, topic: str | None, key: bytes, value: bytes) -> None:
        if topic is None:
            return
        sending = asyncio.ensure_future(self._producer.send_and_wait(topic, value, key=key))
        self._sends.add(sending)
        sending.add_done_callback(self._sent)

    def _sent(self, sending: asyncio.Future[object]) -> None:
        self._sends.discard(sending)
        if not sending.cancelled() and sending.exception() is not None:
            # A lost report only makes the others' view of this replica older.
            log.debug("cluster record not sent", error=type(sending.exception()).__name__)

    async def close(self, timeout: float) -> None:
        """Say this replica leaves (its share goes to the others at once) and publish what
        it learned, then stop reading."""
        self.running = False
        if self.budget is not None and self._coordination in self._reading:
            leaving = shared.Report(self.replica, self._clock.time(), 0.0, leaving=True)
            self._send(self._coordination, *shared.encode(leaving))
        self.publish_learned()
        if self._sends:
            await asyncio.wait(list(self._sends), timeout=timeout)
        with contextlib.suppress(Exception):
            await bounded(self._reader.stop(), 5.0, "the cluster topics' reader to stop")
