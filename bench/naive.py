"""Comparison pollers for ``bench.throughput``, each run as its own process pinned to a core.

``python -m bench.naive bare --client aiohttp ...``: a bare polling loop. ``concurrency``
workers GET result URLs of known task ids round-robin for ``--seconds`` and decode the
JSON, nothing else: the practical ceiling for Python HTTP on one core. ``--client``
picks aiohttp itself, httpx (default transport), httpx over httpx-aiohttp, or the
bridge's own :class:`bridge.api.ApiClient` (httpx API, streaming read, ``interpret``).

``python -m bench.naive naive ...``: the naive bridge. One coroutine per task that sleeps
``--interval`` (1 s, as the seed and the official SDKs do) and polls with a default
``httpx.AsyncClient``; the terminal status is produced to Kafka with acks=all and
awaited. Offsets are auto-committed. No scheduling, no back-pressure, no metrics.

Both print one JSON line of results on stdout when they stop (``--seconds`` elapsed, or
SIGTERM/SIGINT); ``bare`` first prints ``measuring`` when its warm-up ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

CLIENTS = (
    "aiohttp",
    "httpx",
    "httpx-aiohttp",
    "bridge-api",
    "bridge-api-httpx",
)
RESULT_PATH = "/api/v3/predictions/{id}"


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _fetcher(
    client: str, base_url: str, api_key: str, concurrency: int
) -> tuple[Callable[[str], Awaitable[int]], Callable[[], Awaitable[None]]]:
    """A ``fetch(task_id) -> status code`` for ``client`` (body read and decoded) and a closer."""
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
    if client == "aiohttp":
        session = aiohttp.ClientSession(
            base_url=base_url,
            headers=headers,
            connector=aiohttp.TCPConnector(limit=concurrency),
        )

        async def fetch_aiohttp(task_id: str) -> int:
            async with session.get(RESULT_PATH.format(id=task_id)) as r:
                json.loads(await r.read())
                return r.status

        return fetch_aiohttp, session.close
    if client in ("httpx", "httpx-aiohttp"):
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        transport: httpx.AsyncBaseTransport
        if client == "httpx":
            transport = httpx.AsyncHTTPTransport(limits=limits)
        else:
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits)
        hx = httpx.AsyncClient(base_url=base_url, headers=headers, transport=transport)

        async def fetch_httpx(task_id: str) -> int:
            r = await hx.get(RESULT_PATH.format(id=task_id))
            json.loads(r.content)
            return r.status_code

        return fetch_httpx, hx.aclose
    from bridge.edges.api import ApiClient

    api = ApiClient.over_http(
        base_url=base_url,
        result_path=RESULT_PATH,
        api_key=api_key,
        connect_timeout_s=5.0,
        read_timeout_s=10.0,
        max_connections=concurrency,
        max_response_bytes=1_048_576,
        transport="aiohttp" if client == "bridge-api" else "httpx",
    )

    async def fetch_api(task_id: str) -> int:
        outcome = await api.fetch(task_id, time.time())
        return outcome.status_code or 0

    return fetch_api, api.aclose


async def bare(args: argparse.Namespace) -> dict[str, Any]:
    ids: list[str] = json.loads(sys.stdin.read())
    fetch, close = await _fetcher(args.client, args.base_url, args.api_key, args.concurrency)
    stop = _stop_event()
    count = 0
    errors = 0
    measuring = False
    measured = 0
    cursor = 0

    async def worker() -> None:
        nonlocal count, errors, measured, cursor
        while not stop.is_set():
            task_id = ids[cursor % len(ids)]
            cursor += 1
            try:
                code = await fetch(task_id)
            except Exception:
                code = 0
            count += 1
            if measuring:
                measured += 1
            if code != 200:
                errors += 1

    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    # Warm up (connections, caches), then measure over a fixed window.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.warmup)
    measuring = True
    print("measuring", flush=True)
    t0, c0 = time.monotonic(), time.process_time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.seconds)
    measuring = False
    t1, c1 = time.monotonic(), time.process_time()
    stop.set()
    await asyncio.gather(*workers, return_exceptions=True)
    await close()
    return {
        "client": args.client,
        "concurrency": args.concurrency,
        "requests": measured,
        "seconds": t1 - t0,
        "rps": measured / (t1 - t0),
        "cpu_share": (c1 - c0) / (t1 - t0),
        "errors": errors,
    }


async def naive(args: argparse.Namespace) -> dict[str, Any]:
    stop = _stop_event()
    consumer = AIOKafkaConsumer(
        args.input_topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    client = httpx.AsyncClient(
        base_url=args.base_url, headers={"Authorization": f"Bearer {args.api_key}"}
    )
    await producer.start()
    await consumer.start()
    polls = finished = errors = 0
    kinds: dict[str, int] = {}
    trackers: set[asyncio.Task[None]] = set()

    async def track(task_id: str) -> None:
        nonlocal polls, finished, errors
        while True:
            await asyncio.sleep(args.interval)
            try:
                r = await client.get(RESULT_PATH.format(id=task_id))
                data = r.json()["data"]
            except Exception as exc:
                errors += 1
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
                continue
            polls += 1
            if data["status"] in ("completed", "failed"):
                event = {"type": f"ai.wavespeed.prediction.{data['status']}", "data": data}
                await producer.send_and_wait(
                    args.output_topic, json.dumps(event).encode(), key=task_id.encode()
                )
                finished += 1
                return

    async def consume() -> None:
        async for msg in consumer:
            value = json.loads(msg.value)
            t = asyncio.create_task(track(value["id"]))
            trackers.add(t)
            t.add_done_callback(trackers.discard)

    consuming = asyncio.create_task(consume())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.seconds)
    consuming.cancel()
    for t in list(trackers):
        t.cancel()
    await asyncio.gather(consuming, *trackers, return_exceptions=True)
    await client.aclose()
    await consumer.stop()
    await producer.stop()
    return {"polls": polls, "finished": finished, "errors": errors, "error_kinds": kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("bare", help="bare polling loop; task ids as a JSON list on stdin")
    b.add_argument("--client", choices=CLIENTS, default="aiohttp")
    b.add_argument("--concurrency", type=int, default=100)
    b.add_argument("--warmup", type=float, default=1.0)
    n = sub.add_parser("naive", help="naive bridge: a coroutine per task, sleep, default httpx")
    n.add_argument("--bootstrap", required=True)
    n.add_argument("--input-topic", required=True)
    n.add_argument("--output-topic", required=True)
    n.add_argument("--group", required=True)
    n.add_argument("--interval", type=float, default=1.0)
    for p in (b, n):
        p.add_argument("--base-url", required=True)
        p.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    args.api_key = os.environ.get("WAVESPEED_API_KEY", "")
    result = asyncio.run(bare(args) if args.mode == "bare" else naive(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
