"""The webhook receiver: WaveSpeed's signed deliveries in, records on the webhook topic out.

``POST {webhooks.path}`` on ``webhooks.host:webhooks.port``. Each request, in order:

1. over ``max_concurrent_requests`` at once: 503 (``overloaded``), nothing read;
2. a ``Content-Length`` over ``max_body_bytes``: 413 (``too_large``), nothing read;
3. the signing headers (:func:`bridge.webhook_signature.parse_headers`): no signature 401
   (``unsigned``), unusable headers 400 (``malformed``), before the body is read;
4. the body, at most ``max_body_bytes + 1`` bytes within ``read_timeout_s``: 413 past the
   cap (the connection is closed, the rest never read), 408 (``timeout``) if it is slow;
5. the signature over the raw body: 401 (``bad_signature``); then the signed timestamp:
   400 (``stale`` / ``future``): the request is authentic but outside the window, so it is
   no authentication failure, and a 400 tells a wrong secret (401s) from clock skew;
6. the body (:func:`bridge.webhook_signature.parse_delivery`): 400 (``malformed``);
7. a webhook-id already published: 200 (``replay``) and nothing published, the answer an
   idempotent receiver gives a sender that retries because it missed our 2xx: a 409 would
   only make it retry again or report a failure for a delivery we hold;
8. ``publish(key=task id, value=raw body, headers)``, within ``publish_timeout_s``: 200
   (``accepted``) only once it returned, i.e. once the broker has acknowledged the record
   (acks=all), so a crash after a 2xx loses nothing; 503 (``publish_failed``, with
   ``Retry-After``) otherwise, so the sender tries again. Only then is the webhook-id
   remembered, so a retry after a 503 is published, not taken for a replay.

Every request counts once in ``webhook_deliveries_total{result}``. Logs carry the
webhook-id, task id and result, never the signature or the secret; rejections are logged
at most once per result every 10 s (with the number held back), so a flood of forgeries
cannot flood the logs. Any exception in a request is answered 500 (``error``) and logged by
type: no input can stop the receiver, let alone the daemon.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from bridge.config import WebhooksConfig
from bridge.core.clock import Clock, SystemClock
from bridge.core.events import rfc3339
from bridge.core.webhook_signature import (
    ID_HEADER,
    RECEIVED_AT_HEADER,
    RECEIVED_BY_HEADER,
    TIMESTAMP_HEADER,
    BadDelivery,
    Rejected,
    ReplayGuard,
    check,
    parse_delivery,
    parse_headers,
    signing_key,
)
from bridge.edges.metrics import Metrics
from bridge.edges.tracing import Tracing

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

log = structlog.get_logger("wavespeed_bridge.webhooks")

# Kafka record headers (name, value), as aiokafka takes them.
RecordHeaders = list[tuple[str, bytes]]
# Produce one record and return once the broker acknowledged it; raise on any failure.
Publish = Callable[[bytes, bytes, RecordHeaders], Awaitable[None]]

STATUS: dict[str, int] = {
    "accepted": 200,
    "replay": 200,
    "unsigned": 401,
    "bad_signature": 401,
    "stale": 400,
    "future": 400,
    "malformed": 400,
    "too_large": 413,
    "timeout": 408,
    "overloaded": 503,
    "publish_failed": 503,
    "error": 500,
}
RETRY_AFTER_S = {"overloaded": "1", "publish_failed": "5"}
LOG_INTERVAL_S = 10.0
_CHUNK = 65_536


@dataclass(frozen=True, slots=True)
class Answer:
    result: str  # a webhook_deliveries_total label
    detail: str = ""
    webhook_id: str | None = None
    task_id: str | None = None
    status: str | None = None  # the delivery's task status

    @property
    def code(self) -> int:
        return STATUS[self.result]


async def read_capped(content: StreamReader, cap: int) -> bytes | None:
    """The whole body, or None as soon as it proves longer than ``cap``: never more than
    ``cap + 1`` bytes are read."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await content.read(min(_CHUNK, cap + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return None


def kafka_publish(producer: AIOKafkaProducer, topic: str) -> Publish:
    """A :data:`Publish` producing to ``topic`` with a started producer (``acks=all``, as
    :func:`bridge.kafka.make_producer` builds it); returns once the broker acknowledged."""

    async def publish(key: bytes, value: bytes, headers: RecordHeaders) -> None:
        await producer.send_and_wait(topic, value=value, key=key, headers=headers)

    return publish


class _LogLimiter:
    """At most one line per result every ``interval`` s; the next one says how many were held."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def allow(self, result: str, now: float) -> int | None:
        last = self._last.get(result)
        if last is not None and now - last[0] < self._interval:
            self._last[result] = (last[0], last[1] + 1)
            return None
        self._last[result] = (now, 0)
        return last[1] if last is not None else 0


class WebhookServer:
    """The receiver's HTTP server; ``await start()``, ``await stop()``."""

    def __init__(
        self,
        config: WebhooksConfig,
        *,
        secret: str,
        publish: Publish,
        metrics: Metrics,
        clock: Clock | None = None,
        replica: str = "",
        tracing: Tracing | None = None,
    ) -> None:
        self._config = config
        self._tracing = tracing if tracing is not None and tracing.enabled else None
        self._replica = replica  # named in each record: its reader counts what no task took
        self._key = signing_key(secret)  # raises on an empty secret: refuse to start
        self._publish = publish
        self._metrics = metrics
        self._clock = clock or SystemClock()
        self._guard = ReplayGuard(config.tolerance_s, config.replay_max_ids)
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        self._active = 0
        self._limiter = _LogLimiter(LOG_INTERVAL_S)
        self._runner: web.AppRunner | None = None
        self.port = config.port

    @property
    def active(self) -> int:
        """Requests being processed now (the concurrency cap counts these)."""
        return self._active

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_body_bytes)
        app.router.add_post(self._config.path, self._handle)
        return app

    async def start(self) -> None:
        # lingering_time=0: after a 413 the connection is closed, not drained: the rest of
        # an oversized body is never read.
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, lingering_time=0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port)
        await site.start()
        if self._runner.addresses:  # port 0 asks for a free port: learn which one it got
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- one request --------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        span = self._tracing.webhook(request.path, request.headers) if self._tracing else None
        if self._active >= self._config.max_concurrent_requests:
            answer = Answer("overloaded", f"{self._active} requests in progress")
        else:
            self._active += 1
            try:
                answer = await self._process(request)
            except Exception as exc:  # a bug must cost one request, never the receiver
                answer = Answer("error", f"{type(exc).__name__} in the receiver")
            finally:
                self._active -= 1
        self._metrics.webhook_deliveries.labels(answer.result).inc()
        self._metrics.webhook_request_duration.observe(time.monotonic() - started)
        self._log(answer, request.remote)
        if span is not None:
            Tracing.answered(span, answer.code, answer.result, answer.task_id)
        response = web.Response(status=answer.code, text=answer.result + "\n")
        if answer.result in RETRY_AFTER_S:
            response.headers["Retry-After"] = RETRY_AFTER_S[answer.result]
        if answer.result == "too_large":
            response.force_close()
        return response

    async def _process(self, request: web.Request) -> Answer:
        cfg = self._config
        length = request.content_length
        if length is not None and length > cfg.max_body_bytes:
            return Answer("too_large", f"Content-Length {length} > {cfg.max_body_bytes}")
        signed = parse_headers(request.headers)
        if isinstance(signed, Rejected):
            return Answer(signed.reason, signed.detail)
        wid = signed.webhook_id
        try:
            async with asyncio.timeout(cfg.read_timeout_s):
                body = await read_capped(request.content, cfg.max_body_bytes)
        except TimeoutError:
            return Answer("timeout", f"body not received within {cfg.read_timeout_s:g}s", wid)
        except (HttpProcessingError, ConnectionError) as exc:
            return Answer("malformed", f"body unreadable ({type(exc).__name__})", wid)
        if body is None:
            return Answer("too_large", f"body over {cfg.max_body_bytes} bytes", wid)
        now = self._clock.time()
        verdict = check(signed, body, self._key, now, cfg.tolerance_s)
        if isinstance(verdict, Rejected):
            return Answer(verdict.reason, verdict.detail, wid)
        delivery = parse_delivery(body)
        if isinstance(delivery, BadDelivery):
            return Answer("malformed", f"{delivery.reason}: {delivery.detail}", wid)
        answer = Answer("accepted", "", wid, delivery.task_id, delivery.status)
        if self._guard.seen(wid, now):
            return _with(answer, "replay", "webhook-id already published")
        pending = self._inflight.get(wid)
        if pending is not None:  # the same delivery, twice at once: wait for the first
            published = await asyncio.shield(pending)
            if published:
                return _with(answer, "replay", "webhook-id published meanwhile")
            return _with(answer, "publish_failed", "the same webhook-id failed to publish")
        return await self._publish_once(answer, body, verdict.timestamp, signed.timestamp_raw)

    async def _publish_once(self, answer: Answer, body: bytes, timestamp: int, raw: str) -> Answer:
        wid = answer.webhook_id
        assert wid is not None and answer.task_id is not None
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inflight[wid] = done
        headers: RecordHeaders = [
            (ID_HEADER, wid.encode()),
            (TIMESTAMP_HEADER, raw.encode()),
            (RECEIVED_AT_HEADER, rfc3339(self._clock.time()).encode()),
            (RECEIVED_BY_HEADER, self._replica.encode()),
        ]
        try:
            async with asyncio.timeout(self._config.publish_timeout_s):
                await self._publish(answer.task_id.encode(), body, headers)
        except Exception as exc:
            return _with(answer, "publish_failed", _describe(exc))
        else:
            self._guard.remember(wid, timestamp, self._clock.time())
            done.set_result(True)
            return answer
        finally:
            del self._inflight[wid]
            if not done.done():
                done.set_result(False)

    # --- logs -------------------------------------------------------------------------------

    def _log(self, answer: Answer, remote: str | None) -> None:
        fields: dict[str, Any] = {"result": answer.result, "http_status": answer.code}
        if answer.webhook_id is not None:
            fields["webhook_id"] = answer.webhook_id
        if answer.task_id is not None:
            fields["task_id"] = answer.task_id
            fields["status"] = answer.status
        if answer.result in ("accepted", "replay"):
            log.info("webhook delivery", **fields)
            return
        held = self._limiter.allow(answer.result, time.monotonic())
        if held is None:
            return
        if held:
            fields["similar_held_back"] = held
        fields["reason"] = answer.detail
        fields["remote"] = remote
        level = log.error if answer.result == "error" else log.warning
        level("webhook delivery refused", **fields)


def _with(answer: Answer, result: str, detail: str) -> Answer:
    return Answer(result, detail, answer.webhook_id, answer.task_id, answer.status)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the broker did not acknowledge in time"
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
