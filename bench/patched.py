"""The bridge daemon with prototype changes applied by monkeypatching: measure before editing.

``python -m bench.patched --patch batch,publisher run --config X.yaml`` is
``python -m bridge run --config X.yaml`` with the named patches applied first. Nothing
under ``bridge/`` is edited; each patch is the smallest stand-in for a change proposed in
``bench/results/throughput.md``, so ``bench.throughput --patches ...`` can measure it.

Patches:

- ``batch``: the producer's ``max_batch_size`` 16 KiB → 1 MiB. aiokafka keeps one
  produce request in flight per broker and one batch per partition in it, so a 16 KiB
  batch (~20 events of ~700 B) caps the events per broker round trip.
- ``publisher``: one publishing coroutine instead of a task per event. With a task per
  event, every task waits on the full batch's drain (``MessageBatch.wait_drain``, an
  ``asyncio.wait`` with a timer each) and all wake at once when it drains: quadratic.
  One loop calls ``producer.send`` in order and acks through the futures' callbacks.
- ``quiet``: the two per-task INFO log lines ("task consumed", "task finished") at DEBUG.
- ``fetch-transport``: ``ApiClient.fetch`` keeps httpx's types but skips ``AsyncClient``:
  an ``httpx.Request`` straight to the transport (no URL merge, auth/redirect flows,
  cookie jar, hooks or stream wrapper). Same size cap, same ``interpret``.
- ``fetch-native``: ``ApiClient.fetch`` on an ``aiohttp.ClientSession`` (the pool that
  ``transport: aiohttp`` uses anyway), no httpx on the hot path. Same size cap, same
  ``interpret``, same timeouts, redirects not followed.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import sys
from collections.abc import Callable
from typing import Any

PATCHES = ("batch", "publisher", "quiet", "fetch-transport", "fetch-native")


def _patch_batch() -> None:
    from aiokafka import AIOKafkaProducer

    from bridge import kafka as kafka_io

    # What the change would be: ``max_batch_size=config.max_batch_bytes`` (1 MiB) in
    # ``make_producer``.
    setattr(  # noqa: B010
        kafka_io,
        "AIOKafkaProducer",
        functools.partial(AIOKafkaProducer, max_batch_size=1_048_576),
    )


class _Publisher:
    """One coroutine feeds the producer; acks and retries arrive through callbacks."""

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.queue: collections.deque[tuple[Any, Callable[[], None], asyncio.Future[None], int]]
        self.queue = collections.deque()
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.run(), name="publisher")

    def put(self, record: Any, on_ack: Callable[[], None], done: asyncio.Future[None]) -> None:
        self.queue.append((record, on_ack, done, 0))
        self.wake.set()

    async def run(self) -> None:
        from aiokafka.errors import KafkaError

        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            record, on_ack, done, attempt = self.queue.popleft()
            producer = self.bridge._producer
            try:
                future = await producer.send(
                    record.topic, value=record.value, key=record.key, headers=record.headers
                )
            except KafkaError:
                self._retry(record, on_ack, done, attempt)
                continue
            future.add_done_callback(functools.partial(self._acked, record, on_ack, done, attempt))

    def _acked(
        self,
        record: Any,
        on_ack: Callable[[], None],
        done: asyncio.Future[None],
        attempt: int,
        future: asyncio.Future[Any],
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            self._retry(record, on_ack, done, attempt)
            return
        on_ack()
        if not done.done():
            done.set_result(None)
        self.bridge.metrics.events_pending.set(len(self.bridge._deliveries) - 1)

    def _retry(
        self, record: Any, on_ack: Callable[[], None], done: asyncio.Future[None], attempt: int
    ) -> None:
        from bridge.policy import retry_delay

        self.bridge.metrics.publish_failures.inc()
        delay = retry_delay(attempt + 1, 0.5, 10.0, self.bridge.rng)

        def again() -> None:
            self.queue.append((record, on_ack, done, attempt + 1))
            self.wake.set()

        asyncio.get_running_loop().call_later(delay, again)


def _patch_publisher() -> None:
    from bridge.app import Bridge

    def _deliver(self: Any, record: Any, on_ack: Callable[[], None]) -> None:
        publisher = getattr(self, "_bench_publisher", None)
        if publisher is None:
            publisher = self._bench_publisher = _Publisher(self)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deliveries.add(done)
        done.add_done_callback(self._deliveries.discard)
        publisher.put(record, on_ack, done)
        self.metrics.events_pending.set(len(self._deliveries))

    Bridge._deliver = _deliver  # type: ignore[method-assign,assignment]


def _patch_quiet() -> None:
    from bridge import app

    real = app.log

    class Quiet:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def info(self, event: str, *args: Any, **kw: Any) -> Any:
            if event in ("task consumed", "task finished"):
                return None
            return real.info(event, *args, **kw)

    app.log = Quiet()


def _patch_fetch_transport() -> None:
    import httpx

    from bridge import api
    from bridge.messages import task_path

    async def fetch(self: Any, task_id: str, now: float) -> Any:
        client = self._client
        try:
            url = str(client.base_url).rstrip("/") + task_path(self._path, task_id)
            t = client.timeout
            request = httpx.Request(
                "GET",
                url,
                headers=client.headers,
                extensions={
                    "timeout": {"connect": t.connect, "read": t.read, "write": t.write,
                                "pool": t.pool}
                },
            )  # fmt: skip
            response = await client._transport.handle_async_request(request)
            try:
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > self._max_bytes:
                        return api.Outcome(
                            api.Kind.TRANSIENT,
                            response.status_code,
                            reason=f"body larger than {self._max_bytes} bytes, not read",
                        )
            finally:
                await response.aclose()
            return api.interpret(
                response.status_code, response.headers.get("retry-after"), bytes(body), now
            )
        except httpx.TimeoutException as exc:
            return api.Outcome(api.Kind.TRANSIENT, reason=f"timeout ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return api.Outcome(api.Kind.TRANSIENT, reason=f"network error ({type(exc).__name__})")
        except ValueError as exc:
            return api.Outcome(api.Kind.NOT_FOUND, reason=f"invalid task id ({exc})")
        except Exception as exc:
            return api.Outcome(api.Kind.TRANSIENT, reason=f"client error ({type(exc).__name__})")

    api.ApiClient.fetch = fetch  # type: ignore[method-assign]


def _patch_fetch_native() -> None:
    import aiohttp

    from bridge import api
    from bridge.messages import task_path

    original_close = api.ApiClient.aclose

    def session(self: Any) -> aiohttp.ClientSession:
        s: aiohttp.ClientSession | None = getattr(self, "_bench_session", None)
        if s is None:
            client = self._client
            limit = client._transport.limits.max_connections or 100
            t = client.timeout
            s = self._bench_session = aiohttp.ClientSession(
                base_url=str(client.base_url),
                headers=dict(client.headers),
                connector=aiohttp.TCPConnector(limit=limit),
                timeout=aiohttp.ClientTimeout(sock_connect=t.connect, sock_read=t.read),
            )
        return s

    async def fetch(self: Any, task_id: str, now: float) -> Any:
        try:
            path = task_path(self._path, task_id)
            async with session(self).get(path, allow_redirects=False) as r:
                if r.content_length is not None and r.content_length > self._max_bytes:
                    return api.Outcome(
                        api.Kind.TRANSIENT,
                        r.status,
                        reason=f"body larger than {self._max_bytes} bytes, not read",
                    )
                body = bytearray()
                async for chunk in r.content.iter_any():
                    body += chunk
                    if len(body) > self._max_bytes:
                        return api.Outcome(
                            api.Kind.TRANSIENT,
                            r.status,
                            reason=f"body larger than {self._max_bytes} bytes, not read",
                        )
                return api.interpret(r.status, r.headers.get("Retry-After"), bytes(body), now)
        except TimeoutError as exc:
            return api.Outcome(api.Kind.TRANSIENT, reason=f"timeout ({type(exc).__name__})")
        except aiohttp.ClientError as exc:
            return api.Outcome(api.Kind.TRANSIENT, reason=f"network error ({type(exc).__name__})")
        except ValueError as exc:
            return api.Outcome(api.Kind.NOT_FOUND, reason=f"invalid task id ({exc})")
        except Exception as exc:
            return api.Outcome(api.Kind.TRANSIENT, reason=f"client error ({type(exc).__name__})")

    async def aclose(self: Any) -> None:
        s = getattr(self, "_bench_session", None)
        if s is not None:
            await s.close()
        await original_close(self)

    api.ApiClient.fetch = fetch  # type: ignore[method-assign]
    api.ApiClient.aclose = aclose  # type: ignore[method-assign]


def main() -> int:
    argv = sys.argv[1:]
    names: list[str] = []
    if len(argv) >= 2 and argv[0] == "--patch":
        names = [n for n in argv[1].split(",") if n]
        argv = argv[2:]
    for name in names:
        if name not in PATCHES:
            raise SystemExit(f"unknown patch {name!r}; known: {', '.join(PATCHES)}")
        globals()[f"_patch_{name.replace('-', '_')}"]()
    from bridge.cli import main as bridge_main

    return bridge_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
