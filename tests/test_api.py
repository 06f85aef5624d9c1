from __future__ import annotations

import json
from typing import Any

import pytest
import wavespeed

from bridge.core.outcomes import Kind, interpret, parse_retry_after, status_class

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
