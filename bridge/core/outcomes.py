"""What a result-API response means: one :class:`Outcome` per response. Pure.

:func:`interpret` turns a status code, the ``Retry-After`` header and the body into an
outcome. An outcome that is not an answer about the task carries an :class:`ErrorKind`,
set where it is built (here, or by the HTTP client for what never became a response). The
HTTP client (``bridge.edges.api``) and the decisions (``bridge.core``) both build on this; it
imports no I/O library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from bridge.core import jsoncodec
from bridge.core.messages import finite_number, parse_timestamp, safe_text


class Kind(enum.Enum):
    PENDING = "pending"  # created / processing: poll again
    COMPLETED = "completed"
    FAILED = "failed"  # the API says the task failed
    NOT_FOUND = "not_found"  # 404: unknown or expired (deleted after 7 days)
    AUTH = "auth"  # 401 / 403: the key is wrong; affects every task
    RATE_LIMITED = "rate_limited"  # 429
    TRANSIENT = "transient"  # 5xx, network errors, unreadable bodies: retry with backoff

    __hash__ = object.__hash__  # as bridge.core.tasks.State: every outcome is looked up


class ErrorKind(enum.Enum):
    """Why a poll got no usable answer: the ``api_errors_total{kind}`` label."""

    AUTH = "auth"  # 401 / 403
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx (and above), whatever the body
    TIMEOUT = "timeout"  # connect, read or total limit
    NETWORK = "network"  # no response: connection failed, or the client refused what came
    REDIRECT = "redirect"  # 3xx, not followed
    OVERSIZE_BODY = "oversize_body"  # body over api.max_response_bytes, not read
    BAD_RESPONSE = "bad_response"  # another status (408 and 4xx), or a body that is not the JSON
    UNKNOWN_STATUS = "unknown_status"  # an answer whose status nobody documented: polled on


TERMINAL = frozenset({Kind.COMPLETED, Kind.FAILED, Kind.NOT_FOUND})

# Statuses the official SDKs (Python ``wavespeed`` 2.0.5, JavaScript) end a wait on as a
# failure; the seed page documents only "failed". The error text when the API gives none:
FAILED_STATUSES: dict[str, str] = {
    "failed": "failed",
    "cancelled": "the API reports the task was cancelled",
    "timeout": "the API reports the task timed out",
    "deleted": "the API reports the task was deleted",
}


@dataclass(slots=True)
class Prediction:
    """The fields of ``data`` the bridge uses, type-checked."""

    id: str | None = None
    model: str | None = None
    status: str | None = None
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    inference_ms: int | None = None
    created_at: float | None = None
    created_at_raw: str | None = None
    has_nsfw_contents: list[bool] | None = None


@dataclass(slots=True)
class Outcome:
    kind: Kind
    status_code: int | None = None
    prediction: Prediction | None = None
    reason: str = ""  # why, for transient outcomes and logs
    retry_after_s: float | None = None
    error: ErrorKind | None = None  # None: an answer about the task


def status_class(code: int | None) -> str:
    return f"{code // 100}xx" if code is not None and 100 <= code < 600 else "error"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is true, and int() refuses it
        digits = value.lstrip("0") or "0"
        return 86_400.0 if len(digits) > 5 else float(min(int(digits), 86_400))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now), 86_400.0)


def _prediction(data: dict[str, Any]) -> Prediction:
    """Keep only well-typed fields; a wrong type is treated as absent."""

    def text(name: str, limit: int = 4096) -> str | None:
        v = data.get(name)
        return safe_text(v[:limit]) if isinstance(v, str) else None

    outputs_raw = data.get("outputs")
    outputs = (
        [safe_text(o) for o in outputs_raw[:1000] if isinstance(o, str)]
        if isinstance(outputs_raw, list)
        else []
    )
    timings = data.get("timings")
    inference = finite_number(timings.get("inference") if isinstance(timings, dict) else None)
    inference_ms = int(inference) if inference is not None and inference >= 0 else None
    nsfw = data.get("has_nsfw_contents")
    created_raw = text("created_at", 64)
    return Prediction(
        id=text("id", 256),
        model=text("model", 256),
        status=text("status", 64),
        outputs=outputs,
        error=text("error"),
        inference_ms=inference_ms,
        created_at=parse_timestamp(created_raw),
        created_at_raw=created_raw,
        has_nsfw_contents=[bool(x) for x in nsfw if isinstance(x, bool)]
        if isinstance(nsfw, list)
        else None,
    )


def interpret(code: int, retry_after: str | None, body: bytes, now: float) -> Outcome:
    """What one HTTP response means for the task it was polled for."""
    if code in (401, 403):
        return Outcome(
            Kind.AUTH, code, reason=f"HTTP {code}: API key rejected", error=ErrorKind.AUTH
        )
    if code == 404:
        return Outcome(Kind.NOT_FOUND, code, reason="unknown or expired task (HTTP 404)")
    if code == 429:
        return Outcome(
            Kind.RATE_LIMITED,
            code,
            reason="HTTP 429",
            retry_after_s=parse_retry_after(retry_after, now),
            error=ErrorKind.RATE_LIMITED,
        )
    if code >= 500 or code == 408:
        return Outcome(
            Kind.TRANSIENT,
            code,
            reason=f"HTTP {code}",
            retry_after_s=parse_retry_after(retry_after, now),
            # 408 is the server giving up on the request, counted with the odd statuses.
            error=ErrorKind.SERVER_ERROR if code >= 500 else ErrorKind.BAD_RESPONSE,
        )
    if 300 <= code < 400:
        return Outcome(
            Kind.TRANSIENT,
            code,
            reason=f"unexpected redirect (HTTP {code}), not followed",
            error=ErrorKind.REDIRECT,
        )
    if code != 200:
        return _bad(code, f"unexpected HTTP {code}")
    try:
        envelope = jsoncodec.loads(body)
    except (ValueError, RecursionError):
        return _bad(code, "body is not JSON")
    data = envelope.get("data") if isinstance(envelope, dict) else None
    if not isinstance(data, dict):
        return _bad(code, "envelope has no 'data' object")
    return outcome_from_data(data, code)


def _bad(code: int, reason: str) -> Outcome:
    return Outcome(Kind.TRANSIENT, code, reason=reason, error=ErrorKind.BAD_RESPONSE)


def outcome_from_data(data: dict[str, Any], code: int | None = None) -> Outcome:
    """What a prediction's ``data`` object says about its task.

    The result API's ``data`` and the body of a webhook delivery have the same shape, so
    both go through here: ``code`` is the HTTP status of a result response, None for a
    delivery (which has no response of its own).
    """
    prediction = _prediction(data)
    status = prediction.status
    if status == "completed":
        return Outcome(Kind.COMPLETED, code, prediction)
    failure = FAILED_STATUSES.get(status) if status is not None else None
    if failure is not None:
        return Outcome(Kind.FAILED, code, prediction, reason=prediction.error or failure)
    if status in ("created", "processing"):
        return Outcome(Kind.PENDING, code, prediction)
    # Undocumented status: keep polling until the deadline rather than invent an outcome.
    shown = repr(status)[:40] if status is not None else "missing"
    return Outcome(
        Kind.PENDING,
        code,
        prediction,
        reason=f"unknown status {shown}",
        error=ErrorKind.UNKNOWN_STATUS,
    )
