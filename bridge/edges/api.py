"""The WaveSpeed result API over HTTP: :class:`ApiClient` GETs one prediction's result.

Thin: it sends the request within its time limits and size cap and hands status, header
and body to :func:`bridge.outcomes.interpret`; it never raises for anything the network or
the server does.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp
import httpx
import structlog
import yarl

from bridge import __version__
from bridge.config import ApiConfig
from bridge.core.messages import task_path
from bridge.core.outcomes import Kind, Outcome, interpret

log = structlog.get_logger("wavespeed_bridge.api")

# RFC 3986 reserved characters, '%' (escapes already there) and the {id} placeholder.
_URL_SAFE = ":/?#[]@!$&'()*+,;=%{}~"


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

    @classmethod
    def from_config(cls, a: ApiConfig, api_key: str | None) -> ApiClient:
        return cls(
            base_url=a.base_url,
            result_path=a.result_path,
            api_key=api_key,
            connect_timeout_s=a.connect_timeout_s,
            read_timeout_s=a.read_timeout_s,
            total_timeout_s=a.total_timeout_s,
            max_connections=a.max_concurrent_requests,
            max_response_bytes=a.max_response_bytes,
            verify_tls=a.verify_tls,
            transport=a.transport,
            user_agent=f"{a.user_agent}/{__version__}",
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
