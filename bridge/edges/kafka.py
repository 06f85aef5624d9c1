"""The Kafka edge: client options from config, consumer and producer construction, record mapping.

The producer is idempotent unless ``kafka.enable_idempotence`` is false (for brokers
without InitProducerId, such as Tansu); everything else is plain Kafka protocol.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedCodecError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner

from bridge.config import KafkaConfig, read_sasl_password
from bridge.core.messages import Record

_murmur2_c: Callable[[bytes, int], int] | None
try:  # the optional `fast` extra (README "Dependencies")
    from murmurhash2 import murmurhash2 as _murmur2_c
except ImportError:  # tests/test_jsoncodec.py runs the bridge without it
    _murmur2_c = None

# Producer batches up to this size: aiokafka keeps one request in flight per broker, so
# small batches cap events per round trip. Below the brokers' default message.max.bytes
# (1 MiB), which applies to a whole batch.
MAX_BATCH_BYTES = 512 * 1024
# Reading committed, beginning or end offsets (in the rebalance listener, at start-up).
OFFSETS_TIMEOUT_S = 10.0


Clients = tuple[AIOKafkaConsumer, AIOKafkaProducer]

# One assignor, on purpose. aiokafka (0.14 and before) sends one JoinGroup per configured
# assignor in every join, the first naming one protocol, the next two: the second changes
# the member's protocols, the coordinator opens a new generation, the other members' sync
# fails and they rejoin, and members that start together can rebalance without end
# (aiokafka PR #1168, unreleased). Sticky keeps most partitions where they were, with
# their finished state; tests/test_group.py counts the JoinGroups of every join.
ASSIGNORS = (StickyPartitionAssignor,)


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
        # Long enough for the rebalance listener's own bounds (bridge/rebalance.py): a
        # member still revoking when it runs out is dropped from the group and rejoins,
        # which starts another rebalance. aiokafka's default is the session timeout.
        rebalance_timeout_ms=config.rebalance_timeout_ms,
        partition_assignment_strategy=ASSIGNORS,
    )


def make_reader(config: KafkaConfig, group_id: str | None = None) -> AIOKafkaConsumer:
    """A consumer that assigns its partitions itself, for a topic every replica reads whole
    (webhooks); with ``group_id`` it reads that group's offsets (never joining it)."""
    return AIOKafkaConsumer(
        **client_options(config),
        group_id=group_id,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )


async def seek_to_beginning(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]) -> None:
    """Each partition's first offset, set by ``seek``. aiokafka's own ``seek_to_beginning``
    just after ``assign`` can lose to the reset the assignment started (to the latest
    offset, the reader's default): that reset's answer, arriving late, is applied to the
    partition still awaiting a reset, and the reader starts at the end. A ``seek`` cancels
    any reset in flight."""
    if tps:
        for tp, offset in (await consumer.beginning_offsets(list(tps))).items():
            consumer.seek(tp, offset)


async def seek_to_end(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]) -> None:
    """Each partition's end offset, by ``seek`` (see :func:`seek_to_beginning`)."""
    if tps:
        for tp, offset in (await consumer.end_offsets(list(tps))).items():
            consumer.seek(tp, offset)


MURMUR2_SEED = 0x9747B28C  # the Java client's (org.apache.kafka.common.utils.Utils.murmur2)


class KeyPartitioner:
    """aiokafka's default partitioner (the Java client's: murmur2 of the key, a random
    available partition for no key), with murmur2 from the ``murmurhash2`` package where it
    is installed. aiokafka's murmur2 is pure Python, ~5 µs for a 32-byte key, once per
    event; the package's gives the same hash in ~0.2 µs (tests/test_partitioner.py)."""

    def __init__(self) -> None:
        self._default = DefaultPartitioner()
        self.fast = _murmur2_c is not None

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None or _murmur2_c is None:
            return int(self._default(key, all_partitions, available))
        return all_partitions[(_murmur2_c(key, MURMUR2_SEED) & 0x7FFFFFFF) % len(all_partitions)]


def make_producer(config: KafkaConfig, transactional_id: str | None = None) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        partitioner=KeyPartitioner(),
        transactional_id=transactional_id,
        transaction_timeout_ms=config.transaction_timeout_ms,
        **client_options(config),
        acks="all",
        enable_idempotence=config.enable_idempotence,
        linger_ms=config.linger_ms,
        compression_type=config.compression_type,
        max_request_size=max(config.max_message_bytes * 2, 1_048_576),
        max_batch_size=MAX_BATCH_BYTES,
    )


async def diagnose(config: KafkaConfig) -> tuple[str, str]:
    """Why the clients cannot reach the brokers, as (kind, a sentence for the operator).

    aiokafka reports only "Unable to bootstrap"; one direct connection to each bootstrap
    server, with the same security settings, raises the real cause.
    """
    options = client_options(config)
    last = ("network", f"no bootstrap server answered ({config.bootstrap_servers})")
    for server in config.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            conn = await create_conn(
                host.strip("[]"),
                int(port),
                request_timeout_ms=min(config.request_timeout_ms, 10_000),
                ssl_context=options.get("ssl_context"),
                security_protocol=config.security_protocol,
                sasl_mechanism=options.get("sasl_mechanism") or "PLAIN",
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            )
        except SaslAuthenticationFailed:
            return "auth", (
                f"SASL authentication failed ({config.sasl_mechanism} as"
                f" {config.sasl_username!r}): check kafka.sasl_username and the password"
            )
        except ssl.SSLCertVerificationError as exc:
            return "tls", (
                f"the certificate of {server.strip()} is not trusted ({exc.verify_message});"
                " set kafka.ssl_cafile to the CA that signed it"
            )
        except ssl.SSLError as exc:
            return "tls", f"TLS handshake with {server.strip()} failed ({exc.reason})"
        except (OSError, TimeoutError, ValueError, KafkaError) as exc:
            last = ("network", f"cannot connect to {server.strip()} ({describe_error(exc)})")
            continue
        conn.close()
        return "broker", f"{server.strip()} accepts connections but the client failed"
    return last


async def committed_offsets(
    consumer: AIOKafkaConsumer, partitions: set[TopicPartition]
) -> dict[TopicPartition, tuple[int, str]]:
    """The group's committed offsets of ``partitions`` with their metadata, in one request
    (those that have one). Callers bound the wait (``OFFSETS_TIMEOUT_S``)."""
    # aiokafka's public committed() asks once per partition and drops the metadata.
    fetched = await consumer._coordinator.fetch_committed_offsets(partitions)
    return {tp: (meta.offset, meta.metadata or "") for tp, meta in fetched.items()}


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int] | None:
    """The partitions of ``topic`` from fresh metadata; None when the topic does not exist."""
    # The consumer's own view holds only topics it was given; this asks for every topic.
    metadata = await consumer._client.fetch_all_metadata()
    found: set[int] | None = metadata.partitions_for_topic(topic)
    return found


def undecodable(exc: BaseException) -> bool:
    """Whether a fetch failed on the bytes of a record rather than on the broker or network.

    Kafka errors other than a corrupt record or a missing codec are about the fetch (an
    ACL, a lost coordinator) and must never skip records; anything else raised while
    fetching comes from decoding records (codec libraries, UTF-8 header names).
    """
    if isinstance(exc, CorruptRecordException | UnsupportedCodecError):
        return True
    return isinstance(exc, Exception) and not isinstance(exc, KafkaError)


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def to_record(msg: ConsumerRecord[bytes, bytes]) -> Record:
    headers = tuple(msg.headers or ())  # a null value stays None: carried unaltered
    return Record(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=msg.key,
        value=msg.value,
        headers=headers,
        timestamp_ms=msg.timestamp if msg.timestamp and msg.timestamp > 0 else None,
    )
