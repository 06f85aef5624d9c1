from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
import wavespeed

from bridge.config import build_config
from bridge.core.book import Core
from bridge.core.outcomes import ErrorKind, Kind, interpret, parse_retry_after, status_class
from bridge.core.policy import FixedInterval
from bridge.edges.api import ApiClient, MockResponse, MockTransport, TransportError
from bridge.edges.metrics import API_ERROR_KINDS, Metrics
from bridge.shell.telemetry import Telemetry

NOW = 1_700_000_000.0


def body(data: object, code: int = 200) -> bytes:
    return json.dumps({"code": code, "message": "success", "data": data}).encode()


def test_statuses_from_the_seed_page() -> None:
    for status in ("created", "processing"):
        out = interpret(200, None, body({"id": "p", "status": status, "outputs": []}), NOW)
        assert out.kind is Kind.PENDING and out.reason == ""
    done = interpret(
        200,
        None,
        body(
            {
                "id": "p",
                "model": "m",
                "status": "completed",
                "outputs": ["u"],
                "timings": {"inference": 2500},
                "created_at": "2024-01-01T12:00:00.000Z",
            }
        ),
        NOW,
    )
    assert done.kind is Kind.COMPLETED
    assert done.prediction is not None
    assert done.prediction.outputs == ["u"] and done.prediction.inference_ms == 2500
    assert done.prediction.created_at == 1704110400.0
    failed = interpret(200, None, body({"id": "p", "status": "failed", "error": "boom"}), NOW)
    assert failed.kind is Kind.FAILED and failed.reason == "boom"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (401, Kind.AUTH),
        (403, Kind.AUTH),
        (404, Kind.NOT_FOUND),
        (429, Kind.RATE_LIMITED),
        (500, Kind.TRANSIENT),
        (502, Kind.TRANSIENT),
        (503, Kind.TRANSIENT),
        (302, Kind.TRANSIENT),
        (400, Kind.TRANSIENT),
        (408, Kind.TRANSIENT),
    ],
)
def test_http_codes(code: int, kind: Kind) -> None:
    assert interpret(code, None, b"", NOW).kind is kind


def test_bodies_that_are_not_the_documented_json() -> None:
    for raw in (b"<html>oops</html>", b'{"code": 200, "data": ', b"[]", b'{"data": 5}', b""):
        out = interpret(200, None, raw, NOW)
        assert out.kind is Kind.TRANSIENT, raw


def test_wrong_types_are_dropped_not_trusted() -> None:
    out = interpret(
        200,
        None,
        body(
            {
                "status": "completed",
                "outputs": "x",
                "timings": {"inference": "fast"},
                "created_at": 5,
                "error": ["e"],
            }
        ),
        NOW,
    )
    assert out.kind is Kind.COMPLETED
    assert out.prediction is not None
    assert out.prediction.outputs == [] and out.prediction.inference_ms is None
    assert out.prediction.error is None


def test_unknown_status_keeps_polling_with_a_reason() -> None:
    out = interpret(200, None, body({"status": "queued_for_gpu"}), NOW)
    assert out.kind is Kind.PENDING and "unknown status" in out.reason
    out = interpret(200, None, body({"status": 7}), NOW)
    assert out.kind is Kind.PENDING and "missing" in out.reason


def test_retry_after() -> None:
    assert parse_retry_after("7", NOW) == 7.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", NOW) == 10.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", NOW) == 0.0  # in the past
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None
    out = interpret(429, "3", b"", NOW)
    assert out.retry_after_s == 3.0


def test_status_class() -> None:
    assert [status_class(c) for c in (200, 404, 503, None)] == ["2xx", "4xx", "5xx", "error"]


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        ("failed", None, "failed"),
        ("cancelled", None, "the API reports the task was cancelled"),
        ("timeout", None, "the API reports the task timed out"),
        ("deleted", None, "the API reports the task was deleted"),
        ("cancelled", "cancelled by the user", "cancelled by the user"),
    ],
)
def test_failure_statuses_of_the_official_sdks(status: str, error: str | None, reason: str) -> None:
    out = interpret(200, None, body({"id": "p", "status": status, "error": error}), NOW)
    assert out.kind is Kind.FAILED and out.reason == reason
    assert out.prediction is not None and out.prediction.status == status


class _StillPolling(Exception):
    pass


CANDIDATE_STATUSES = [
    "created",
    "processing",
    "completed",
    "failed",
    "cancelled",
    "timeout",
    "deleted",
    "canceled",
    "queued_for_gpu",
    "succeeded",
    "expired",
    "",
]


@pytest.mark.parametrize("status", CANDIDATE_STATUSES)
def test_a_status_ends_a_task_exactly_when_the_official_sdk_ends_its_wait(
    status: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official Python SDK (``wavespeed`` 2.0.5) decides, for each status, whether its
    wait is over: the bridge must end a task on the same statuses, failed unless completed."""
    client = wavespeed.Client(api_key="k", base_url="http://sdk.invalid")
    data = {"id": "p", "status": status, "outputs": ["u"], "error": None}
    answers = iter([{"code": 200, "message": "success", "data": data}])

    def get_result(request_id: str, timeout: float | None = None) -> dict[str, Any]:
        try:
            return next(answers)
        except StopIteration:  # asked again: the SDK keeps polling
            raise _StillPolling from None

    monkeypatch.setattr(client, "_get_result", get_result)
    try:
        client._wait("p", None, 0.0)
        sdk = Kind.COMPLETED
    except _StillPolling:
        sdk = Kind.PENDING
    except RuntimeError as exc:
        assert f"Prediction {status}" in str(exc)
        sdk = Kind.FAILED
    assert interpret(200, None, body(data), NOW).kind is sdk


# --- the error kind, named where the outcome is built ----------------------------------------


def test_the_error_kind_labels_are_the_published_ones() -> None:
    """Dashboards and alerts select on these label values: the enum must not move them."""
    assert API_ERROR_KINDS == (
        "auth",
        "rate_limited",
        "server_error",
        "timeout",
        "network",
        "redirect",
        "oversize_body",
        "bad_response",
        "unknown_status",
    )


@pytest.mark.parametrize(
    ("code", "raw", "error"),
    [
        (401, b"", ErrorKind.AUTH),
        (403, b"", ErrorKind.AUTH),
        (429, b"", ErrorKind.RATE_LIMITED),
        (500, b"", ErrorKind.SERVER_ERROR),
        (502, b"<html>bad gateway</html>", ErrorKind.SERVER_ERROR),
        (503, b"", ErrorKind.SERVER_ERROR),
        (999, b"", ErrorKind.SERVER_ERROR),
        (301, b"", ErrorKind.REDIRECT),
        (302, b"", ErrorKind.REDIRECT),
        (408, b"", ErrorKind.BAD_RESPONSE),
        (400, b"", ErrorKind.BAD_RESPONSE),
        (204, b"", ErrorKind.BAD_RESPONSE),
        (200, b"<html>oops</html>", ErrorKind.BAD_RESPONSE),
        (200, b'{"data": 5}', ErrorKind.BAD_RESPONSE),
        (200, body({"status": "queued_for_gpu"}), ErrorKind.UNKNOWN_STATUS),
        (200, body({"status": 7}), ErrorKind.UNKNOWN_STATUS),
        (200, body({"status": "processing"}), None),
        (200, body({"status": "completed", "outputs": ["u"]}), None),
        (200, body({"status": "failed", "error": "boom"}), None),
        (404, b"", None),
    ],
)
def test_interpret_names_the_error_kind(code: int, raw: bytes, error: ErrorKind | None) -> None:
    assert interpret(code, None, raw, NOW).error is error


DONE = body({"id": "p", "status": "completed", "outputs": ["u"]})


def over_mock(
    *answers: MockResponse | Exception, max_bytes: int = 1_000, total_timeout_s: float = 1.0
) -> tuple[ApiClient, list[str]]:
    """A client whose transport gives ``answers`` in turn (an exception is raised), and the
    paths it was asked for."""
    asked: list[str] = []
    queue = list(answers)

    async def handler(path: str) -> MockResponse:
        asked.append(path)
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    transport = MockTransport(handler, max_bytes=max_bytes)
    return ApiClient(transport, total_timeout_s=total_timeout_s), asked


async def test_the_client_asks_for_the_task_path_and_interprets_the_answer() -> None:
    client, asked = over_mock(
        MockResponse(200, DONE), MockResponse(429, headers={"retry-after": "3"})
    )
    done = await client.fetch("pred_1", NOW)
    assert done.kind is Kind.COMPLETED and done.error is None and done.status_code == 200
    limited = await client.fetch("pred_2", NOW)
    assert limited.kind is Kind.RATE_LIMITED and limited.retry_after_s == 3.0
    assert limited.error is ErrorKind.RATE_LIMITED
    assert asked == ["/api/v3/predictions/pred_1", "/api/v3/predictions/pred_2"]
    await client.aclose()


async def test_an_invalid_task_id_is_never_sent() -> None:
    client, asked = over_mock(MockResponse(200, DONE))
    out = await client.fetch("../etc", NOW)
    assert out.kind is Kind.NOT_FOUND and out.error is None and asked == []


@pytest.mark.parametrize(
    ("answer", "reason", "status", "error"),
    [
        (
            MockResponse(200, DONE, {"Content-Length": "1001"}),
            "body larger than 1000 bytes, not read (Content-Length 1001)",
            200,
            ErrorKind.OVERSIZE_BODY,
        ),
        (
            MockResponse(200, DONE, {"Content-Length": "9" * 40}),
            f"body larger than 1000 bytes, not read (Content-Length {'9' * 20})",
            200,
            ErrorKind.OVERSIZE_BODY,
        ),
        (  # no Content-Length to refuse it by: cut while reading
            MockResponse(200, b" " * 1001),
            "body larger than 1000 bytes, not read",
            200,
            ErrorKind.OVERSIZE_BODY,
        ),
        (  # a 5xx is a server error whatever its body
            MockResponse(503, b" " * 1001),
            "body larger than 1000 bytes, not read",
            503,
            ErrorKind.SERVER_ERROR,
        ),
        (
            TransportError(ErrorKind.TIMEOUT, "ReadTimeout"),
            "timeout (ReadTimeout)",
            None,
            ErrorKind.TIMEOUT,
        ),
        (
            TransportError(ErrorKind.NETWORK, "ClientConnectorError"),
            "network error (ClientConnectorError)",
            None,
            ErrorKind.NETWORK,
        ),
        (  # what the HTTP library itself refused: counted with network errors
            RuntimeError("a status line that is not HTTP"),
            "client error (RuntimeError)",
            None,
            ErrorKind.NETWORK,
        ),
    ],
)
async def test_what_is_not_a_response_is_named_by_the_client(
    answer: MockResponse | Exception, reason: str, status: int | None, error: ErrorKind
) -> None:
    client, _ = over_mock(answer)
    out = await client.fetch("pred_1", NOW)
    assert (out.kind, out.reason, out.status_code, out.error) == (
        Kind.TRANSIENT,
        reason,
        status,
        error,
    )


async def test_a_body_exactly_at_the_cap_is_read() -> None:
    client, _ = over_mock(
        MockResponse(200, DONE.ljust(1_000)), MockResponse(200, DONE.ljust(1_001))
    )
    assert (await client.fetch("pred_1", NOW)).kind is Kind.COMPLETED
    assert (await client.fetch("pred_1", NOW)).error is ErrorKind.OVERSIZE_BODY


async def test_the_total_limit_or_the_callers_ends_a_slow_answer() -> None:
    async def never(path: str) -> MockResponse:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    client = ApiClient(MockTransport(never), total_timeout_s=0.05)
    out = await client.fetch("pred_1", NOW)
    assert out.reason == "timeout (no complete response within 0.05s)"
    assert out.kind is Kind.TRANSIENT and out.error is ErrorKind.TIMEOUT
    out = await client.fetch("pred_1", NOW, limit_s=0.02)
    assert out.reason == "timeout (no complete response within 0.02s)"


async def test_a_cancel_from_outside_is_passed_on_not_taken_for_the_limit() -> None:
    started = asyncio.Event()

    async def slow(path: str) -> MockResponse:
        started.set()
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    client = ApiClient(MockTransport(slow), total_timeout_s=5.0)
    fetching = asyncio.create_task(client.fetch("pred_1", NOW))
    await started.wait()
    fetching.cancel()  # the shutdown's cancel: never an outcome
    with pytest.raises(asyncio.CancelledError):
        await fetching
    # The limit passing is an outcome, not a cancel.
    started.clear()
    fetching = asyncio.create_task(client.fetch("pred_1", NOW, limit_s=0.01))
    await started.wait()
    await asyncio.sleep(0.2)  # the limit has passed and the check has run
    assert fetching.done() and (await fetching).error is ErrorKind.TIMEOUT
    await client.aclose()


def _telemetry() -> Telemetry:
    config = build_config({"kafka": {"input_topic": "in"}}, env={})
    core = Core(config, policy=FixedInterval(1.0, jitter=0.0), rng=random.Random(1), now=0.0)
    return Telemetry(Metrics(), core, now=0.0)


# Every way a poll can end, through the client, to the api_errors_total label it counts.
COUNTED: list[tuple[MockResponse | Exception, str | None]] = [
    (MockResponse(401), "auth"),
    (MockResponse(403), "auth"),
    (MockResponse(429, headers={"Retry-After": "5"}), "rate_limited"),
    (MockResponse(500), "server_error"),
    (MockResponse(502, b"<html>502 Bad gateway</html>"), "server_error"),
    (MockResponse(503, b" " * 1001), "server_error"),
    (TransportError(ErrorKind.TIMEOUT, "ConnectTimeout"), "timeout"),
    (TransportError(ErrorKind.NETWORK, "ConnectError"), "network"),
    (ValueError("garbage"), "network"),
    (MockResponse(302, headers={"Location": "http://elsewhere.invalid/"}), "redirect"),
    (MockResponse(200, b" " * 1001), "oversize_body"),
    (MockResponse(200, b"", {"Content-Length": "50000000"}), "oversize_body"),
    (MockResponse(200, b"<html>oops</html>"), "bad_response"),
    (MockResponse(200, b'{"code": 200, "data": '), "bad_response"),
    (MockResponse(200, b'{"data": []}'), "bad_response"),
    (MockResponse(408), "bad_response"),
    (MockResponse(400), "bad_response"),
    (MockResponse(200, body({"status": "queued_for_gpu"})), "unknown_status"),
    (MockResponse(200, body({"status": "processing"})), None),
    (MockResponse(200, DONE), None),
    (MockResponse(200, body({"status": "failed"})), None),
    (MockResponse(404), None),
]


@pytest.mark.parametrize(("answer", "label"), COUNTED)
async def test_api_errors_total_counts_the_kind_the_outcome_carries(
    answer: MockResponse | Exception, label: str | None
) -> None:
    client, _ = over_mock(answer)
    telemetry = _telemetry()
    telemetry.request_done(await client.fetch("pred_1", NOW), 0.01)
    registry = telemetry.metrics.registry
    counts = {
        kind: registry.get_sample_value("wavespeed_bridge_api_errors_total", {"kind": kind})
        for kind in API_ERROR_KINDS
    }
    assert counts == {kind: 1.0 if kind == label else 0.0 for kind in API_ERROR_KINDS}


def test_every_kind_is_counted_by_some_case() -> None:
    assert {label for _, label in COUNTED} == {*API_ERROR_KINDS, None}
