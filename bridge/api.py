"""The WaveSpeed result API: what a response means (pure) and how to fetch one (I/O).

:func:`interpret` turns a status code, headers and body into one :class:`Outcome`;
:class:`ApiClient` performs the GET through httpx and never raises for anything the
network or the server does.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import structlog

from bridge.messages import finite_number, parse_timestamp, safe_text, task_path

log = structlog.get_logger("wavespeed_bridge.api")


class Kind(enum.Enum):
    PENDING = "pending"  # created / processing: poll again
    COMPLETED = "completed"
    FAILED = "failed"  # the API says the task failed
    NOT_FOUND = "not_found"  # 404: unknown or expired (deleted after 7 days)
    AUTH = "auth"  # 401 / 403: the key is wrong; affects every task
    RATE_LIMITED = "rate_limited"  # 429
    TRANSIENT = "transient"  # 5xx, network errors, unreadable bodies: retry with backoff


TERMINAL = frozenset({Kind.COMPLETED, Kind.FAILED, Kind.NOT_FOUND})


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
        return Outcome(Kind.AUTH, code, reason=f"HTTP {code}: API key rejected")
    if code == 404:
        return Outcome(Kind.NOT_FOUND, code, reason="unknown or expired task (HTTP 404)")
    if code == 429:
        return Outcome(
            Kind.RATE_LIMITED,
            code,
            reason="HTTP 429",
            retry_after_s=parse_retry_after(retry_after, now),
        )
    if code >= 500 or code == 408:
        return Outcome(
            Kind.TRANSIENT,
            code,
            reason=f"HTTP {code}",
            retry_after_s=parse_retry_after(retry_after, now),
        )
    if 300 <= code < 400:
        return Outcome(
            Kind.TRANSIENT, code, reason=f"unexpected redirect (HTTP {code}), not followed"
        )
    if code != 200:
        return Outcome(Kind.TRANSIENT, code, reason=f"unexpected HTTP {code}")
    try:
        envelope = json.loads(body)
    except (ValueError, RecursionError):
        return Outcome(Kind.TRANSIENT, code, reason="body is not JSON")
    data = envelope.get("data") if isinstance(envelope, dict) else None
    if not isinstance(data, dict):
        return Outcome(Kind.TRANSIENT, code, reason="envelope has no 'data' object")
    prediction = _prediction(data)
    status = prediction.status
    if status == "completed":
        return Outcome(Kind.COMPLETED, code, prediction)
    if status == "failed":
        return Outcome(Kind.FAILED, code, prediction, reason=prediction.error or "failed")
    if status in ("created", "processing"):
        return Outcome(Kind.PENDING, code, prediction)
    # Undocumented status: keep polling until the deadline rather than invent an outcome.
    shown = repr(status)[:40] if status is not None else "missing"
    return Outcome(Kind.PENDING, code, prediction, reason=f"unknown status {shown}")


class ApiClient:
    """GET the result of one prediction. Thin: all meaning lives in :func:`interpret`."""

    def __init__(
        self,
        *,
        base_url: str,
        result_path: str,
        api_key: str | None,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        max_response_bytes: int,
        verify_tls: bool = True,
        transport: str = "aiohttp",
        user_agent: str = "wavespeed-bridge",
    ) -> None:
        self._path = result_path
        self._max_bytes = max_response_bytes
        self._unexpected_logged: set[str] = set()
        headers = {"User-Agent": user_agent, "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        async_transport: httpx.AsyncBaseTransport
        if transport == "aiohttp":
            async_transport = _aiohttp_transport(verify_tls, limits)
        else:
            async_transport = httpx.AsyncHTTPTransport(verify=verify_tls, limits=limits)
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
            transport=async_transport,
        )

    async def fetch(self, task_id: str, now: float) -> Outcome:
        try:
            url = task_path(self._path, task_id)
        except ValueError as exc:  # a bad id; the parser should have refused it
            return Outcome(Kind.NOT_FOUND, reason=f"invalid task id ({exc})")
        try:
            async with self._client.stream("GET", url) as response:
                declared = response.headers.get("content-length", "")
                if (
                    declared.isascii()
                    and declared.isdigit()
                    and (len(declared) > 18 or int(declared) > self._max_bytes)
                ):
                    return Outcome(
                        Kind.TRANSIENT,
                        response.status_code,
                        reason=f"body larger than {self._max_bytes} bytes, not read"
                        f" (Content-Length {declared[:20]})",
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self._max_bytes:
                        return Outcome(
                            Kind.TRANSIENT,
                            response.status_code,
                            reason=f"body larger than {self._max_bytes} bytes, not read",
                        )
                return interpret(
                    response.status_code, response.headers.get("retry-after"), bytes(body), now
                )
        except httpx.HTTPError as exc:
            return Outcome(Kind.TRANSIENT, reason=_network_reason(exc))
        except Exception as exc:  # the transport's own errors must not end the daemon
            name = type(exc).__name__
            if name not in self._unexpected_logged:  # a traceback once per kind, then counts
                self._unexpected_logged.add(name)
                log.warning("unexpected error from the HTTP client", error=name, exc_info=exc)
            return Outcome(Kind.TRANSIENT, reason=f"client error ({name})")

    async def aclose(self) -> None:
        await self._client.aclose()


def _network_reason(exc: Exception) -> str:
    # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout: name the cause.
    name = type(exc.__cause__ or exc).__name__
    if "Timeout" in name:
        return f"timeout ({name})"
    return f"network error ({name})"


def _aiohttp_transport(verify_tls: bool, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx's API over aiohttp's connection pool: ~5x the requests/s of httpcore here."""
    from httpx_aiohttp import AiohttpTransport

    transport: httpx.AsyncBaseTransport = AiohttpTransport(verify=verify_tls, limits=limits)
    return transport
