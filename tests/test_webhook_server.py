"""The webhook receiver over real HTTP (issue 13): what it answers, counts, logs and publishes.

With a fake ``publish`` for every rejection path and failure, and with a real one producing
to the Kafka test broker: a valid delivery lands on the topic once (key, raw body, headers)
and is acknowledged only after that; forged, stale, future, replayed, oversized, unsigned
and malformed ones are refused with their code and counter and publish nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import StreamReader
from prometheus_client import generate_latest

from bridge.config import KafkaConfig, WebhooksConfig
from bridge.core.messages import parse_timestamp
from bridge.core.webhook_signature import sign, signed_headers
from bridge.edges import logs
from bridge.edges.kafka import make_producer
from bridge.edges.metrics import WEBHOOK_RESULTS, Metrics
from bridge.edges.webhook_server import (
    STATUS,
    RecordHeaders,
    WebhookServer,
    kafka_publish,
    read_capped,
)
from bridge.local.broker import Broker
from tests.helpers import metric_value, read_all, wait_until

SECRET = "whsec_" + "k3y-for-tests-" + "9f2c41"
PATH = "/webhooks/wavespeed"


def delivery_body(task_id: str = "pred_abc123", status: str = "completed") -> bytes:
    data: dict[str, Any] = {
        "id": task_id,
        "model": "wavespeed-ai/flux-dev",
        "status": status,
        "outputs": [f"https://cdn.example.invalid/{task_id}.png"],
        "timings": {"inference": 1200},
        "created_at": "2024-01-01T12:00:00.000Z",
    }
    return json.dumps(data).encode()


def signed(
    body: bytes, *, webhook_id: str | None = None, ts: int | None = None, secret: str = SECRET
) -> dict[str, str]:
    return signed_headers(
        secret,
        webhook_id or f"msg_{uuid.uuid4().hex[:16]}",
        int(time.time()) if ts is None else ts,
        body,
    )


@dataclass
class FakePublish:
    calls: list[tuple[bytes, bytes, RecordHeaders]] = field(default_factory=list)
    fail: Exception | None = None
    gate: asyncio.Event | None = None

    async def __call__(self, key: bytes, value: bytes, headers: RecordHeaders) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.calls.append((key, value, headers))


@dataclass
class Receiver:
    server: WebhookServer
    publish: FakePublish
    metrics: Metrics

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}{PATH}"

    def count(self, result: str) -> float:
        text = generate_latest(self.metrics.registry).decode()
        return metric_value(text, "wavespeed_bridge_webhook_deliveries_total", result=result)


CONFIG = WebhooksConfig(
    enabled=True, host="127.0.0.1", port=0, path=PATH, max_body_bytes=4096, read_timeout_s=1.0
)


@pytest.fixture
async def receiver(request: pytest.FixtureRequest) -> AsyncIterator[Receiver]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    publish = FakePublish()
    metrics = Metrics()
    server = WebhookServer(
        CONFIG.model_copy(update=overrides), secret=SECRET, publish=publish, metrics=metrics
    )
    await server.start()
    yield Receiver(server, publish, metrics)
    await server.stop()


async def post(
    url: str, body: bytes | Any, headers: dict[str, str], method: str = "POST"
) -> tuple[int, str, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers=headers) as response,
    ):
        return response.status, (await response.text()).strip(), dict(response.headers)


# --- accepted, replayed ---------------------------------------------------------------


async def test_a_valid_delivery_is_published_then_acknowledged(receiver: Receiver) -> None:
    body = delivery_body()
    headers = signed(body, webhook_id="msg_valid1")
    before = time.time()
    status, text, _ = await post(receiver.url, body, headers)
    assert (status, text) == (200, "accepted")
    ((key, value, record_headers),) = receiver.publish.calls
    assert key == b"pred_abc123" and value == body
    h = dict(record_headers)
    assert h["webhook-id"] == b"msg_valid1"
    assert h["webhook-timestamp"] == headers["webhook-timestamp"].encode()
    received = parse_timestamp(h["received-at"].decode())
    assert received is not None and before - 0.01 <= received <= time.time() + 0.01
    assert receiver.count("accepted") == 1


async def test_a_replay_is_answered_200_and_not_published_again(receiver: Receiver) -> None:
    body = delivery_body()
    headers = signed(body)
    assert (await post(receiver.url, body, headers))[:2] == (200, "accepted")
    for _ in range(3):
        assert (await post(receiver.url, body, headers))[:2] == (200, "replay")
    # Re-signed by a retrying sender (new timestamp, same id): still the same delivery.
    again = signed(body, webhook_id=headers["webhook-id"], ts=int(time.time()) + 1)
    assert (await post(receiver.url, body, again))[:2] == (200, "replay")
    assert len(receiver.publish.calls) == 1
    assert (receiver.count("accepted"), receiver.count("replay")) == (1, 4)


async def test_the_same_delivery_twice_at_once_is_published_once(receiver: Receiver) -> None:
    receiver.publish.gate = asyncio.Event()
    body = delivery_body()
    headers = signed(body)
    first = asyncio.create_task(post(receiver.url, body, headers))
    await wait_until(lambda: receiver.server.active == 1, timeout=5)
    second = asyncio.create_task(post(receiver.url, body, headers))
    await wait_until(lambda: receiver.server.active == 2, timeout=5)  # both wait for the broker
    assert not first.done() and not second.done()
    receiver.publish.gate.set()
    assert (await first)[:2] == (200, "accepted")
    assert (await second)[:2] == (200, "replay")
    assert len(receiver.publish.calls) == 1


# --- rejections -----------------------------------------------------------------------


def _forged() -> tuple[bytes, dict[str, str]]:
    body = delivery_body()
    return body, signed(body, secret="whsec_not-the-secret")


def _tampered() -> tuple[bytes, dict[str, str]]:
    body = delivery_body()
    return body.replace(b"completed", b"failed\x20\x20\x20"), signed(body)


def _unsigned() -> tuple[bytes, dict[str, str]]:
    body = delivery_body()
    h = signed(body)
    del h["webhook-signature"]
    return body, h


def _stale() -> tuple[bytes, dict[str, str]]:
    body = delivery_body()
    return body, signed(body, ts=int(time.time()) - 301)


def _future() -> tuple[bytes, dict[str, str]]:
    body = delivery_body()
    return body, signed(body, ts=int(time.time()) + 400)


def _bad_timestamp() -> tuple[bytes, dict[str, str]]:
    body = delivery_body()
    return body, {**signed(body), "webhook-timestamp": "yesterday"}


def _not_json() -> tuple[bytes, dict[str, str]]:
    body = b"<html>not json</html>"
    return body, signed(body)


def _bad_task_id() -> tuple[bytes, dict[str, str]]:
    body = delivery_body(task_id="pred_1").replace(b'"pred_1"', b'"../balance"')
    return body, signed(body)


def _no_status() -> tuple[bytes, dict[str, str]]:
    body = b'{"id": "pred_1"}'
    return body, signed(body)


@pytest.mark.parametrize(
    ("make", "code", "result"),
    [
        (_forged, 401, "bad_signature"),
        (_tampered, 401, "bad_signature"),
        (_unsigned, 401, "unsigned"),
        (_stale, 400, "stale"),
        (_future, 400, "future"),
        (_bad_timestamp, 400, "malformed"),
        (_not_json, 400, "malformed"),
        (_bad_task_id, 400, "malformed"),
        (_no_status, 400, "malformed"),
    ],
)
async def test_refused_deliveries_get_their_code_and_counter_and_publish_nothing(
    receiver: Receiver, make: Any, code: int, result: str
) -> None:
    body, headers = make()
    assert (await post(receiver.url, body, headers))[:2] == (code, result)
    assert receiver.publish.calls == []
    assert receiver.count(result) == 1
    assert sum(receiver.count(r) for r in WEBHOOK_RESULTS) == 1
    # The receiver goes on: a valid delivery right after is accepted.
    good = delivery_body()
    assert (await post(receiver.url, good, signed(good)))[:2] == (200, "accepted")


async def test_a_body_over_the_cap_is_413_by_content_length(receiver: Receiver) -> None:
    body = delivery_body() + b" " * 5000
    status, text, headers = await post(receiver.url, body, signed(body))
    assert (status, text) == (413, "too_large")
    assert headers.get("Connection", "").lower() == "close"
    assert receiver.publish.calls == [] and receiver.count("too_large") == 1


async def test_a_chunked_body_over_the_cap_is_413(receiver: Receiver) -> None:
    body = delivery_body() + b" " * 5000
    headers = signed(body)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    assert (await post(receiver.url, chunks(), headers))[:2] == (413, "too_large")
    assert receiver.publish.calls == []


async def test_a_huge_announced_body_is_refused_before_it_is_sent(receiver: Receiver) -> None:
    """50 MB announced, 1 kB sent: the 413 comes at once and the connection closes, so the
    rest would never be read."""
    body = delivery_body()
    h = signed(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.server.port)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {50 * 1024 * 1024}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        + "\r\n"
    )
    writer.write(head.encode() + b" " * 1024)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), timeout=2)  # until the server closes
    assert response.startswith(b"HTTP/1.1 413"), response[:60]
    writer.close()
    assert receiver.count("too_large") == 1


async def test_read_capped_never_reads_past_the_cap() -> None:
    class Source:
        def __init__(self, size: int) -> None:
            self.left, self.read_bytes = size, 0

        async def read(self, n: int) -> bytes:
            take = min(n, self.left)
            self.left -= take
            self.read_bytes += take
            return b"x" * take

    huge = Source(50 * 1024 * 1024)
    assert await read_capped(cast(StreamReader, huge), 4096) is None
    assert huge.read_bytes == 4097
    exact = Source(4096)
    assert await read_capped(cast(StreamReader, exact), 4096) == b"x" * 4096


async def test_a_slow_body_times_out_with_408(receiver: Receiver) -> None:
    body = delivery_body()
    h = signed(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.server.port)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        + "\r\n"
    )
    writer.write(head.encode() + body[:10])  # and the rest never comes
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), timeout=5)
    assert response.startswith(b"HTTP/1.1 408"), response[:60]
    writer.close()
    assert receiver.publish.calls == [] and receiver.count("timeout") == 1


async def test_other_methods_and_paths_are_not_deliveries(receiver: Receiver) -> None:
    body = delivery_body()
    assert (await post(receiver.url, body, signed(body), method="GET"))[0] == 405
    other = receiver.url.replace(PATH, "/metrics")
    assert (await post(other, body, signed(body)))[0] == 404
    assert receiver.publish.calls == []


# --- the broker's side ----------------------------------------------------------------


async def test_a_publish_failure_is_503_and_a_retry_is_published(receiver: Receiver) -> None:
    receiver.publish.fail = ConnectionError("broker unreachable")
    body = delivery_body()
    headers = signed(body)
    status, text, response_headers = await post(receiver.url, body, headers)
    assert (status, text) == (503, "publish_failed")
    assert response_headers["Retry-After"] == "5"
    assert receiver.count("publish_failed") == 1 and receiver.publish.calls == []
    receiver.publish.fail = None  # the sender retries the same delivery: not a replay
    assert (await post(receiver.url, body, headers))[:2] == (200, "accepted")
    assert len(receiver.publish.calls) == 1


@pytest.mark.parametrize("receiver", [{"publish_timeout_s": 0.3}], indirect=True)
async def test_a_broker_that_does_not_acknowledge_gives_503(receiver: Receiver) -> None:
    receiver.publish.gate = asyncio.Event()  # never set
    body = delivery_body()
    started = time.monotonic()
    assert (await post(receiver.url, body, signed(body)))[:2] == (503, "publish_failed")
    assert time.monotonic() - started < 2
    assert receiver.count("publish_failed") == 1


@pytest.mark.parametrize("receiver", [{"max_concurrent_requests": 1}], indirect=True)
async def test_over_the_concurrency_cap_is_503_overloaded(receiver: Receiver) -> None:
    receiver.publish.gate = asyncio.Event()
    body = delivery_body()
    first = asyncio.create_task(post(receiver.url, body, signed(body)))
    await wait_until(lambda: receiver.server.active == 1, timeout=5)
    other = delivery_body("pred_other")
    status, text, headers = await post(receiver.url, other, signed(other))
    assert (status, text, headers["Retry-After"]) == (503, "overloaded", "1")
    receiver.publish.gate.set()
    assert (await first)[:2] == (200, "accepted")
    assert receiver.count("overloaded") == 1


# --- metrics, logs, hostile input ------------------------------------------------------


def test_every_result_is_exported_at_zero_from_the_start() -> None:
    text = generate_latest(Metrics().registry).decode()
    for result in WEBHOOK_RESULTS:
        assert f'wavespeed_bridge_webhook_deliveries_total{{result="{result}"}} 0.0' in text
    assert "wavespeed_bridge_webhook_request_duration_seconds_bucket" in text


async def test_logs_carry_ids_and_results_never_the_secret_or_a_signature(
    receiver: Receiver, restore_logging: None
) -> None:
    stream = io.StringIO()
    # No secrets given to the redactor: the receiver itself must never log them.
    logs.configure(fmt="json", level="DEBUG", secrets=(), stream=stream)
    signatures = []
    for make in (_forged, _tampered, _stale, _future, _not_json, _bad_timestamp):
        body, headers = make()
        signatures.append(headers["webhook-signature"].split(",")[1])
        await post(receiver.url, body, headers)
    body = delivery_body()
    headers = signed(body, webhook_id="msg_logged")
    signatures.append(headers["webhook-signature"].split(",")[1])
    await post(receiver.url, body, headers)
    await post(receiver.url, body, headers)
    logs.flush()  # lines are written in batches
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    accepted = [ln for ln in lines if ln.get("result") == "accepted"]
    assert accepted and accepted[0]["webhook_id"] == "msg_logged"
    assert accepted[0]["task_id"] == "pred_abc123"
    assert {ln["result"] for ln in lines} >= {"bad_signature", "stale", "future", "replay"}
    key = SECRET.removeprefix("whsec_")
    for secret_form in (SECRET, key, key.encode().hex()):
        assert secret_form not in text
    for sig in signatures:
        assert sig not in text and sig[:16] not in text


async def test_refusals_are_logged_at_most_once_per_result_per_interval(
    receiver: Receiver, restore_logging: None
) -> None:
    stream = io.StringIO()
    logs.configure(fmt="json", level="INFO", stream=stream)
    for _ in range(50):
        body, headers = _forged()
        await post(receiver.url, body, headers)
    logs.flush()
    refused = [ln for ln in stream.getvalue().splitlines() if "bad_signature" in ln]
    assert len(refused) == 1
    assert receiver.count("bad_signature") == 50


async def test_random_requests_never_break_the_receiver(receiver: Receiver) -> None:
    rng = random.Random(13)
    names = ["webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "x"]
    pieces = ["", "v3,", "v3,zz", "v1,a b", "1700000000", "-1", "msg_1", "é", "a" * 300]
    for _ in range(80):
        headers = {rng.choice(names): rng.choice(pieces) for _ in range(rng.randint(0, 4))}
        headers = {k: v for k, v in headers.items() if v.isascii()}
        body = rng.randbytes(rng.randint(0, 6000))
        if rng.random() < 0.3:
            body = json.dumps({"id": rng.choice(["p", "../x", 7]), "status": "completed"}).encode()
            headers.update(signed(body))
        status, _text, _ = await post(receiver.url, body, headers)
        assert status in (200, 400, 401, 413), status
    assert receiver.count("error") == 0
    good = delivery_body("pred_after_fuzz")
    assert (await post(receiver.url, good, signed(good)))[:2] == (200, "accepted")


async def test_a_bug_costs_one_request_not_the_receiver(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(body: bytes) -> None:
        raise RuntimeError("a bug in parsing")

    monkeypatch.setattr("bridge.edges.webhook_server.parse_delivery", broken)
    body = delivery_body()
    assert (await post(receiver.url, body, signed(body)))[:2] == (500, "error")
    assert receiver.count("error") == 1 and receiver.publish.calls == []
    monkeypatch.undo()
    assert (await post(receiver.url, body, signed(body)))[:2] == (200, "accepted")


def test_every_answer_has_a_result_label() -> None:
    assert set(STATUS) == set(WEBHOOK_RESULTS) - {"unknown_task"}


def test_the_receiver_refuses_to_start_without_a_secret() -> None:
    for secret in ("", "whsec_"):
        with pytest.raises(ValueError, match="empty"):
            WebhookServer(CONFIG, secret=secret, publish=FakePublish(), metrics=Metrics())


# --- with the real broker -------------------------------------------------------------


@pytest.mark.integration
async def test_deliveries_reach_the_kafka_topic_only_when_verified(broker: Broker) -> None:
    topic = f"webhooks-{uuid.uuid4().hex[:10]}"
    await broker.create_topics([topic])
    producer = make_producer(
        KafkaConfig(
            bootstrap_servers=broker.bootstrap,
            enable_idempotence=broker.features.idempotence,
            request_timeout_ms=5000,
        )
    )
    await producer.start()
    metrics = Metrics()
    server = WebhookServer(
        CONFIG, secret=SECRET, publish=kafka_publish(producer, topic), metrics=metrics
    )
    await server.start()
    url = f"http://127.0.0.1:{server.port}{PATH}"
    try:
        body = delivery_body("pred_kafka1")
        headers = signed(body, webhook_id="msg_kafka1")
        assert (await post(url, body, headers))[:2] == (200, "accepted")
        # Acknowledged means on the topic: read it back.
        (record,) = await read_all(broker.bootstrap, [topic], expect=1, timeout=20)
        assert record.key == b"pred_kafka1" and record.value == body
        assert record.headers["webhook-id"] == b"msg_kafka1"
        assert record.headers["webhook-timestamp"] == headers["webhook-timestamp"].encode()
        assert parse_timestamp(record.headers["received-at"].decode()) is not None

        refused = [_forged(), _stale(), _future(), _unsigned(), _not_json(), _bad_timestamp()]
        codes = [(await post(url, b, h))[0] for b, h in refused]
        assert codes == [401, 400, 400, 401, 400, 400]
        assert (await post(url, body, headers))[:2] == (200, "replay")
        big = delivery_body("pred_big") + b" " * 5000
        assert (await post(url, big, signed(big)))[:2] == (413, "too_large")
        records = await read_all(broker.bootstrap, [topic], expect=1, timeout=10, settle=1.5)
        assert [r.key for r in records] == [b"pred_kafka1"]

        # The producer gone, a delivery is 503 and nothing is acknowledged.
        await producer.stop()
        lost = delivery_body("pred_kafka2")
        assert (await post(url, lost, signed(lost)))[:2] == (503, "publish_failed")
    finally:
        await server.stop()
        await producer.stop()
    text = generate_latest(metrics.registry).decode()
    name = "wavespeed_bridge_webhook_deliveries_total"
    assert metric_value(text, name, result="accepted") == 1
    assert metric_value(text, name, result="publish_failed") == 1
    assert metric_value(text, name, result="replay") == 1


def test_sign_is_what_the_tests_send() -> None:
    body = delivery_body()
    h = signed(body, webhook_id="m", ts=1)
    assert h["webhook-signature"] == sign(SECRET, "m", 1, body)
