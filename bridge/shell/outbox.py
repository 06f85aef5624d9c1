"""The outbox: records out to the broker until acknowledged, acknowledgements back to the core.

:class:`Publisher` feeds the producer in order from one coroutine and retries with backoff;
:class:`Outbox` carries out the core's effects (a :class:`~bridge.facts.Publish` becomes a
produce, every fact goes to telemetry) and hands each acknowledgement back to the core by
its ticket.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from bridge.core.book import Core, Partition
from bridge.core.clock import Clock
from bridge.core.events import OutputRecord
from bridge.core.facts import Effect, Publish
from bridge.shell.telemetry import Telemetry

log = structlog.get_logger("wavespeed_bridge.outbox")

RETRY_LOG_INTERVAL_S = 5.0


@dataclass(slots=True)
class _Delivery:
    record: OutputRecord
    on_ack: Callable[[], None]
    reduced: Callable[[], OutputRecord] | None
    done: asyncio.Future[None]
    attempt: int = 0


class Publisher:
    """Produces records until the broker acknowledges each (acks=all), then calls ``on_ack``.

    One coroutine feeds the producer in order and acknowledgements arrive as callbacks:
    a task per record waiting on its batch costs a timer and a wake-up each, which
    dominated the profile at a thousand events per second. Retriable errors retry with
    backoff for ever (the in-flight cap bounds what waits); a record that can never be
    sent is replaced once by its ``reduced`` form, else given up so its offset moves on.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        retry_delay: Callable[[int], float],
        on_error: Callable[[], None] = lambda: None,
        on_pending: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._producer = producer
        self._retry_delay = retry_delay
        self._on_error = on_error
        self._on_pending = on_pending
        self._queue: collections.deque[_Delivery] = collections.deque()
        self._wake = asyncio.Event()
        # Topics the brokers do not list: their records wait here, the others go on.
        self._missing: frozenset[str] = frozenset()
        self._held: list[_Delivery] = []
        self.pending = 0  # published and not yet acknowledged or given up
        # Retry warnings are summarised: an outage fails every pending record, repeatedly.
        self._retries_unlogged = 0
        self._retry_logged_at = float("-inf")

    def publish(
        self,
        record: OutputRecord,
        on_ack: Callable[[], None],
        reduced: Callable[[], OutputRecord] | None = None,
    ) -> asyncio.Future[None]:
        """Queue ``record``; the returned future resolves once it is acknowledged."""
        done = asyncio.get_running_loop().create_future()
        self.pending += 1
        self._on_pending(self.pending)
        self._enqueue(_Delivery(record, on_ack, reduced, done))
        return done

    def hold_topics(self, missing: frozenset[str]) -> None:
        """Hold records for ``missing`` topics (a send would block the queue on metadata)."""
        self._missing = missing
        held, self._held = self._held, []
        for d in held:
            self._enqueue(d)

    def _enqueue(self, delivery: _Delivery) -> None:
        self._queue.append(delivery)
        self._wake.set()

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            d = queue.popleft()
            r = d.record
            if r.topic in self._missing:
                self._held.append(d)
                continue
            try:
                # Waits only while the producer's buffer is full: back-pressure.
                future = await self._producer.send(
                    r.topic, value=r.value, key=r.key, headers=r.headers
                )
            except Exception as exc:  # every failure has a defined path below
                self._failed(d, exc)
                continue
            future.add_done_callback(lambda f, d=d: self._sent(d, f))

    def _sent(self, d: _Delivery, future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self._failed(d, exc)
            return
        self._settle(d)

    def _failed(self, d: _Delivery, exc: BaseException) -> None:
        self._on_error()
        if isinstance(exc, KafkaError) and not isinstance(exc, MessageSizeTooLargeError):
            d.attempt += 1
            loop = asyncio.get_running_loop()
            self._retries_unlogged += 1
            if loop.time() - self._retry_logged_at >= RETRY_LOG_INTERVAL_S:
                log.warning(
                    "publish failed, retrying",
                    topic=d.record.topic,
                    attempt=d.attempt,
                    error=type(exc).__name__,
                    failures_since_last_warning=self._retries_unlogged,
                )
                self._retry_logged_at, self._retries_unlogged = loop.time(), 0
            loop.call_later(self._retry_delay(d.attempt), self._enqueue, d)
            return
        # Never going to fit (or not a record the client accepts): shrink once, else drop.
        log.error(
            "record cannot be published",
            topic=d.record.topic,
            error=type(exc).__name__,
            reduced=d.reduced is not None,
        )
        if d.reduced is not None:
            d.record, d.reduced = d.reduced(), None
            self._enqueue(d)
            return
        self._settle(d)

    def _settle(self, d: _Delivery) -> None:
        self.pending -= 1
        self._on_pending(self.pending)
        # Given up counts as done too: the offset moves on rather than block the partition.
        d.on_ack()
        if not d.done.done():
            d.done.set_result(None)


class AnyOutbox(Protocol):
    """What the loops need of an outbox: :class:`Outbox` (at least once) or
    ``transactions.TransactionalOutbox`` (exactly once)."""

    listeners: list[Callable[[Effect], None]]

    def apply(self, effects: Iterable[Effect]) -> None: ...

    async def settled(self, timeout: float) -> None: ...

    async def open(self, partitions: set[Partition]) -> None: ...

    async def close(self, partitions: set[Partition]) -> None: ...

    def cancel(self) -> None: ...


class Outbox:
    """Carries out the core's effects and reports acknowledgements back to it."""

    def __init__(
        self, publisher: Publisher, core: Core, telemetry: Telemetry, clock: Clock
    ) -> None:
        self.publisher = publisher
        self._core, self._telemetry, self._clock = core, telemetry, clock
        self._unsettled: set[asyncio.Future[None]] = set()
        self.listeners: list[Callable[[Effect], None]] = []  # facts, after telemetry

    def apply(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Publish):
                self._send(effect)
            else:
                self._telemetry.observe((effect,))
                for listener in self.listeners:
                    listener(effect)

    def _send(self, p: Publish) -> None:
        def on_ack() -> None:
            self._telemetry.observe(self._core.acknowledged(p.ticket, self._clock.read()))

        done = self.publisher.publish(p.record, on_ack, p.reduced)
        self._unsettled.add(done)
        done.add_done_callback(self._unsettled.discard)

    async def settled(self, timeout: float) -> None:
        """Until every record produced so far is acknowledged (or ``timeout``)."""
        if self._unsettled and timeout > 0:
            await asyncio.wait(list(self._unsettled), timeout=timeout)

    async def open(self, partitions: set[Partition]) -> None:
        """Nothing per partition: one producer serves them all."""

    async def close(self, partitions: set[Partition]) -> None:
        """Nothing per partition: one producer serves them all."""

    def cancel(self) -> None:
        for done in self._unsettled:
            done.cancel()
