"""Is Kafka usable? The broker probe behind ``/readyz``, failure diagnosis, missing topics.

A failed connection is diagnosed once per cause (auth, tls, network, broker) and counted
every time; a configured topic the brokers do not list holds the events meant for it.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from bridge.config import KafkaConfig
from bridge.edges import kafka as kafka_io
from bridge.edges.metrics import Metrics
from bridge.shell.bounded import bounded, startup_limit_s

log = structlog.get_logger("wavespeed_bridge")


class KafkaHealth:
    def __init__(
        self, config: KafkaConfig, metrics: Metrics, extra_topics: frozenset[str] = frozenset()
    ) -> None:
        self._config, self._metrics = config, metrics
        self._extra = extra_topics  # the webhook topic, when webhooks are on
        self.ok = False
        self.problem: tuple[str, str] | None = None  # (kind, why) while unreachable
        self.missing_topics: frozenset[str] = frozenset()

    async def connect(self, stop: asyncio.Event) -> kafka_io.Clients | None:
        """Start a consumer and a producer, retrying with backoff while the brokers are
        unreachable (they may start later); None if stopped first."""
        delay = 0.5
        while not stop.is_set():
            consumer = kafka_io.make_consumer(self._config)
            producer = kafka_io.make_producer(self._config)
            limit = startup_limit_s(self._config)
            try:
                await bounded(producer.start(), limit, "the producer to connect")
                await bounded(consumer.start(), limit, "the consumer to connect")
                self.reachable()
                return consumer, producer
            except (KafkaError, TimeoutError) as exc:
                await self.failed(exc, retry_in_s=delay)
                for client in (producer, consumer):
                    with contextlib.suppress(Exception):
                        await client.stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)
        return None

    def reachable(self) -> None:
        self.ok, self.problem = True, None
        self._metrics.kafka_up.set(1)

    async def failed(self, exc: BaseException, retry_in_s: float | None = None) -> None:
        """Find out why the brokers cannot be reached; say it once, count every time."""
        kind, why = await kafka_io.diagnose(self._config)
        if kind == "broker" and self._config.enable_idempotence:
            why += (
                f" ({type(exc).__name__}); a broker without the idempotent producer"
                " (InitProducerId) needs kafka.enable_idempotence: false"
            )
        self._metrics.kafka_errors.labels(kind).inc()
        self._metrics.kafka_up.set(0)
        if (kind, why) != self.problem:
            log.error(
                "kafka connection failed",
                kind=kind,
                reason=why,
                error=type(exc).__name__,
                retry_in_s=retry_in_s,
            )
        self.ok, self.problem = False, (kind, why)

    def reason(self) -> str | None:
        """Why Kafka is not usable now, or None."""
        if self.problem is not None:
            return f"kafka: {self.problem[1]}"
        if not self.ok:
            return "kafka unreachable"
        if self.missing_topics:
            return f"missing topics: {', '.join(sorted(self.missing_topics))}"
        return None

    async def probe(self, producer: AIOKafkaProducer) -> frozenset[str]:
        """One metadata request: reachability and the configured topics that are missing."""
        interval = self._config.health_check_interval_s
        # A probe may take longer than the interval right after the broker comes back.
        timeout = max(interval, min(10.0, self._config.request_timeout_ms / 1000))
        try:
            metadata = await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout)
        except (KafkaError, TimeoutError, OSError) as exc:
            if self.ok:
                log.warning("kafka unreachable")
                await self.failed(exc)
            return self.missing_topics
        if not self.ok:
            log.warning("kafka reachable")
        self.reachable()
        self._check_topics(set(metadata.topics()))
        return self.missing_topics

    def _check_topics(self, present: set[str]) -> None:
        k = self._config
        wanted = {k.input_topic, k.completed_topic, k.failed_topic, k.dead_letter_topic}
        wanted |= self._extra
        if k.timeout_topic:
            wanted.add(k.timeout_topic)
        missing = frozenset(wanted - present)
        if missing - self.missing_topics:
            log.error(
                "topics missing: events for them are held until they exist",
                topics=sorted(missing - self.missing_topics),
            )
        if self.missing_topics - missing:
            log.warning("topics present again", topics=sorted(self.missing_topics - missing))
        self.missing_topics = missing
        self._metrics.topics_missing.set(len(missing))
