"""What every local broker offers the tests, benchmarks and the demo: an address, readiness,
topic creation and what the broker can do (idempotence, transactions, commit metadata)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

# Ports handed out below the kernel's ephemeral range: a port picked from that range (bind
# to 0) can be taken by any outgoing connection before the server binds it (seen in CI:
# "address already in use" for a bridge's metrics port among three replicas' clients).
_LOWEST_PORT = 20000
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A local port nobody listens on, outside the ephemeral range and not handed out before
    by this process, so no connection or earlier pick can take it before it is bound."""
    top = max(_LOWEST_PORT + 1000, _ephemeral_low())
    for _ in range(1000):
        port = random.randrange(_LOWEST_PORT, top)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free local port in {_LOWEST_PORT}-{top}")


@dataclass(frozen=True)
class Features:
    """What a broker implements of the protocol beyond plain produce, fetch and groups."""

    idempotence: bool
    transactions: bool
    commit_metadata: bool
    persistent: bool  # the log survives a restart


class Broker(Protocol):
    """A broker (or cluster) the local stack started on loopback."""

    name: str  # e.g. "Apache Kafka 4.4.0"
    features: Features

    @property
    def bootstrap(self) -> str: ...

    def client_options(self) -> dict[str, Any]:
        """Connection settings for a plain aiokafka client (security included)."""
        ...

    async def create_topics(
        self, names: list[str], partitions: int = 1, replication: int | None = None
    ) -> None: ...


@contextlib.contextmanager
def quiet_aiokafka() -> Iterator[None]:
    """ "Unable connect" while a broker boots is expected, not news."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def wait_for_metadata(
    options: dict[str, Any], *, timeout: float, brokers: int = 1, alive: Any = None
) -> None:
    """Until a Metadata request lists ``brokers`` brokers. ``alive()`` False aborts early."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with quiet_aiokafka():
        while True:
            if alive is not None:
                alive()
            admin = AIOKafkaAdminClient(**{**options, "request_timeout_ms": 2000})
            try:
                await admin.start()
                cluster = await admin.describe_cluster()
                if len(cluster["brokers"]) >= brokers:
                    return
            except (KafkaError, OSError, KeyError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    await admin.close()
            if loop.time() > deadline:
                raise TimeoutError(f"broker at {options['bootstrap_servers']} not ready")
            await asyncio.sleep(0.2)


async def create_topics(
    options: dict[str, Any],
    names: list[str],
    partitions: int,
    replication: int,
    replicas: list[int] | None = None,
) -> None:
    """Create topics (existing ones are left alone) and wait until each has its leaders.

    ``replicas``: the nodes of every partition, the first its preferred leader.
    """
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        for name in names:
            if replicas is None:
                topic = NewTopic(name, num_partitions=partitions, replication_factor=replication)
            else:
                assignment = {p: replicas for p in range(partitions)}
                topic = NewTopic(name, -1, -1, replica_assignments=assignment)
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([topic])
        for _ in range(100):
            described = await admin.describe_topics(names)
            if all(_has_leaders(t, partitions) for t in described):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"topics {names} have no leaders")
    finally:
        await admin.close()


def _has_leaders(topic: dict[str, Any], partitions: int) -> bool:
    parts = topic.get("partitions") or []
    return (
        topic.get("error_code", 0) == 0
        and len(parts) >= partitions
        and all(p.get("leader", -1) >= 0 for p in parts)
    )
