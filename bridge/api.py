"""The WaveSpeed result API: what a response means (pure) and how to fetch one (I/O).

:func:`interpret` turns a status code, headers and body into one :class:`Outcome`;
:class:`ApiClient` performs the GET (aiohttp or httpx) and never raises for anything the
network or the server does.
"""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import structlog
import yarl

from bridge.messages import finite_number, parse_timestamp, safe_text, task_path

log = structlog.get_logger("wavespeed_bridge.api")

# RFC 3986 reserved characters, '%' (escapes already there) and the {id} placeholder.
_URL_SAFE = ":/?#[]@!$&'()*+,;=%{}~"


class Kind(enum.Enum):
    PENDING = "pending"  # created / processing: poll again
    COMPLETED = "completed"
    FAILED = "failed"  # the API says the task failed
    NOT_FOUND = "not_found"  # 404: unknown or expired (deleted after 7 days)
    AUTH = "auth"  # 401 / 403: the key is wrong; affects every task
    RATE_LIMITED = "rate_limited"  # 429
    TRANSIENT = "transient"  # 5xx, network errors, unreadable bodies: retry with backoff


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
    failure = FAILED_STATUSES.get(status) if status is not None else None
    if failure is not None:
        return Outcome(Kind.FAILED, code, prediction, reason=prediction.error or failure)
    if status in ("created", "processing"):
        return Outcome(Kind.PENDING, code, prediction)
    # Undocumented status: keep polling until the deadline rather than invent an outcome.
    shown = repr(status)[:40] if status is not None else "missing"
    return Outcome(Kind.PENDING, code, prediction, reason=f"unknown status {shown}")


class ApiClient:
    """GET the result of one prediction. Thin: all meaning lives in :func:`interpret`.

    Two transports, chosen by measurement (bench/results/throughput.md): ``aiohttp``
    (default) drives an aiohttp session directly, ~4x the requests per CPU-second of
    httpx's ``AsyncClient`` over the same pool; ``httpx`` uses ``httpx.AsyncClient``
    with httpcore. Both apply the same size cap, timeouts and no-redirect rule, and hand
    the same status, header and body to :func:`interpret`.
    """

    def __init__(
        self,
        *,
        base_url: str,
        result_path: str,
        api_key: str | None,
        connect_timeout_s: float,
        read_timeout_s: float,
        total_timeout_s: float | None = None,
        max_connections: int,
        max_response_bytes: int,
        verify_tls: bool = True,
        transport: str = "aiohttp",
        user_agent: str = "wavespeed-bridge",
    ) -> None:
        # For aiohttp, the whole URL is encoded once here and sent as is (no requoting that
        # could normalise a path); for httpx, the client joins base and path itself.
        self._path = (
            quote(base_url.rstrip("/") + result_path, safe=_URL_SAFE)
            if transport == "aiohttp"
            else result_path
        )
        self._max_bytes = max_response_bytes
        self._unexpected_logged: set[str] = set()
        self._headers = {"User-Agent": user_agent, "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        # The read timeout restarts with every chunk: only a total limit ends a trickle.
        self._total_timeout_s = total_timeout_s or connect_timeout_s + read_timeout_s
        self._max_connections = max_connections
        self._verify_tls = verify_tls
        self._session: aiohttp.ClientSession | None = None  # made in the running loop
        self._client: httpx.AsyncClient | None = None
        if transport != "aiohttp":
            self._client = httpx.AsyncClient(
                base_url=base_url,
                headers=self._headers,
                timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
                follow_redirects=False,
                transport=httpx.AsyncHTTPTransport(
                    verify=verify_tls,
                    limits=httpx.Limits(
                        max_connections=max_connections,
                        max_keepalive_connections=max_connections,
                    ),
                ),
            )

    async def fetch(self, task_id: str, now: float, limit_s: float | None = None) -> Outcome:
        """GET the task's result within ``api.total_timeout_s``, or ``limit_s`` if shorter
        (the caller's deadline), from connecting to the last byte."""
        try:
            path = task_path(self._path, task_id)
        except ValueError as exc:  # a bad id; the parser should have refused it
            return Outcome(Kind.NOT_FOUND, reason=f"invalid task id ({exc})")
        limit = self._total_timeout_s if limit_s is None else min(limit_s, self._total_timeout_s)
        total = asyncio.timeout(max(0.0, limit))
        try:
            async with total:
                if self._client is not None:
                    return await self._fetch_httpx(path, now)
                return await self._fetch_aiohttp(path, now)
        except (TimeoutError, httpx.TimeoutException) as exc:
            if total.expired():
                return Outcome(
                    Kind.TRANSIENT, reason=f"timeout (no complete response within {limit:.3g}s)"
                )
            return Outcome(Kind.TRANSIENT, reason=f"timeout ({type(exc).__name__})")
        except (aiohttp.ClientConnectionError, httpx.TransportError) as exc:
            return Outcome(Kind.TRANSIENT, reason=f"network error ({type(exc).__name__})")
        except Exception as exc:  # a malformed response, or the client's own error
            name = type(exc).__name__
            if name not in self._unexpected_logged:  # a traceback once per kind, then counts
                self._unexpected_logged.add(name)
                log.warning("unexpected error from the HTTP client", error=name, exc_info=exc)
            return Outcome(Kind.TRANSIENT, reason=f"client error ({name})")

    def _too_large(self, code: int, declared: str | None) -> Outcome | None:
        declared = declared or ""
        if (
            declared.isascii()
            and declared.isdigit()
            and (len(declared) > 18 or int(declared) > self._max_bytes)
        ):
            return Outcome(
                Kind.TRANSIENT,
                code,
                reason=f"body larger than {self._max_bytes} bytes, not read"
                f" (Content-Length {declared[:20]})",
            )
        return None

    def _over_cap(self, code: int) -> Outcome:
        return Outcome(
            Kind.TRANSIENT, code, reason=f"body larger than {self._max_bytes} bytes, not read"
        )

    async def _fetch_aiohttp(self, path: str, now: float) -> Outcome:
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=self._verify_tls),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self._connect_timeout_s,
                    sock_read=self._read_timeout_s,
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        url = yarl.URL(path, encoded=True)  # encoded already: see __init__ and task_path
        async with session.get(url, allow_redirects=False) as response:
            code = response.status
            if refused := self._too_large(code, response.headers.get("Content-Length")):
                return refused
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > self._max_bytes:
                    return self._over_cap(code)
            return interpret(code, response.headers.get("Retry-After"), bytes(body), now)

    async def _fetch_httpx(self, path: str, now: float) -> Outcome:
        assert self._client is not None
        async with self._client.stream("GET", path) as response:
            code = response.status_code
            if refused := self._too_large(code, response.headers.get("content-length")):
                return refused
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self._max_bytes:
                    return self._over_cap(code)
            return interpret(code, response.headers.get("retry-after"), bytes(body), now)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._session is not None:
            await self._session.close()
