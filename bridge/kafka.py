"""The Kafka edge: client options from config, consumer and producer construction, record mapping.

Plain Kafka protocol only (no idempotence or transactions) so the bridge runs unchanged on
Apache Kafka, Redpanda, MSK, Confluent Cloud and the Tansu broker used in tests.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.helpers import create_ssl_context

from bridge.config import KafkaConfig, read_sasl_password
from bridge.events import OutputRecord
from bridge.messages import Record


def client_options(config: KafkaConfig) -> dict[str, Any]:
    """Connection and security settings shared by the consumer and the producer."""
    options: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers,
        "client_id": config.client_id,
        "security_protocol": config.security_protocol,
        "request_timeout_ms": config.request_timeout_ms,
    }
    if config.security_protocol in ("SSL", "SASL_SSL"):
        # Verification is always on; only the CA and hostname check are configurable.
        context = create_ssl_context(cafile=config.ssl_cafile)
        context.check_hostname = config.ssl_check_hostname
        options["ssl_context"] = context
    if config.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = config.sasl_mechanism
        options["sasl_plain_username"] = config.sasl_username
        options["sasl_plain_password"] = read_sasl_password(config)
    return options


def make_consumer(config: KafkaConfig) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **client_options(config),
        group_id=config.group_id,
        enable_auto_commit=False,
        auto_offset_reset=config.auto_offset_reset,
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=config.heartbeat_interval_ms,
        max_poll_interval_ms=config.max_poll_interval_ms,
        max_poll_records=config.fetch_max_records,
        # Only committed offsets matter; isolation keeps aborted records out on real Kafka.
        isolation_level="read_committed",
    )


def make_producer(config: KafkaConfig) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_options(config),
        acks="all",
        enable_idempotence=False,
        linger_ms=config.linger_ms,
        compression_type=config.compression_type,
        max_request_size=max(config.max_message_bytes * 2, 1_048_576),
    )


def to_record(msg: ConsumerRecord[bytes, bytes]) -> Record:
    headers = tuple((k, v if v is not None else b"") for k, v in (msg.headers or ()))
    return Record(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=msg.key,
        value=msg.value,
        headers=headers,
        timestamp_ms=msg.timestamp if msg.timestamp and msg.timestamp > 0 else None,
    )


async def send(producer: AIOKafkaProducer, record: OutputRecord) -> None:
    """Produce ``record`` and wait for the broker's acknowledgement (acks=all)."""
    future = await producer.send(
        record.topic, value=record.value, key=record.key, headers=record.headers
    )
    await future


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoked: Any, on_assigned: Any) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._on_assigned(assigned)
