"""Dev tools: submit tasks to a (simulated) API, feed their ids to Kafka, tail the events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def submit(
    client: httpx.AsyncClient,
    model: str,
    sim: dict[str, Any] | None = None,
    webhook: str | None = None,
) -> dict[str, Any]:
    """POST /api/v3/{model} as a platform would (``?webhook=`` for signed deliveries);
    returns the envelope's ``data``."""
    body: dict[str, Any] = {"prompt": "a lighthouse at dusk"}
    if sim:
        body["_sim"] = sim
    params = {"webhook": webhook} if webhook else None
    response = await client.post(f"/api/v3/{model}", json=body, params=params)
    response.raise_for_status()
    data: dict[str, Any] = response.json()["data"]
    return data


async def produce_tasks(
    producer: AIOKafkaProducer, topic: str, items: Sequence[dict[str, Any] | bytes]
) -> None:
    """Send task messages (JSON objects or raw bytes) and wait for every ack."""
    futures = []
    for item in items:
        value = item if isinstance(item, bytes) else json.dumps(item).encode()
        key = None if isinstance(item, bytes) else str(item.get("id", "")).encode() or None
        futures.append(await producer.send(topic, value=value, key=key))
    for fut in futures:
        await fut


async def tail(
    bootstrap: str, topics: list[str], *, group: str | None = None
) -> AsyncIterator[tuple[str, dict[str, Any] | None, Any]]:
    """Yield ``(topic, event or None, raw message)`` from the output topics, from the start."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for msg in messages:
                    try:
                        event = json.loads(msg.value) if msg.value else None
                    except ValueError:
                        event = None
                    yield msg.topic, event, msg
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
