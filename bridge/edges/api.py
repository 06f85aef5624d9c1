"""The WaveSpeed result API over HTTP: :class:`ApiClient` GETs one prediction's result.

Thin: a :class:`Transport` sends the request within its time limits and size cap, and
:class:`ApiClient` hands status, header and body to :func:`bridge.core.outcomes.interpret`;
it never raises for anything the network or the server does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import quote

import aiohttp
import httpx
import structlog
import yarl

from bridge import __version__
from bridge.config import ApiConfig
from bridge.core.messages import task_path
from bridge.core.outcomes import ErrorKind, Kind, Outcome, interpret
from bridge.core.value import value

log = structlog.get_logger("wavespeed_bridge.api")

LIMIT_CHECK_S = 0.05  # how late past its total or read limit a request may be cut

# RFC 3986 reserved characters, '%' (escapes already there) and the {id} placeholder.
_URL_SAFE = ":/?#[]@!$&'()*+,;=%{}~"


# --- what a transport returns or raises ------------------------------------------------------


@value
class Response:
    """A whole response, as :func:`interpret` takes it."""

    status: int
    retry_after: str | None
    body: bytes


@value
class Oversize:
    """A response whose body is over the cap: not read, or not to the end."""

    status: int
    max_bytes: int
    declared: str | None = None  # the Content-Length that gave it away, if it did


class TransportError(Exception):
    """No response: the transport's own timeout passed, or the connection failed.

    ``name`` is the HTTP library's exception class, for the outcome's reason.
    """

    def __init__(self, error: Literal[ErrorKind.TIMEOUT, ErrorKind.NETWORK], name: str) -> None:
        super().__init__(name)
        self.error = error
        self.name = name


class Transport(Protocol):
    """One GET of a result, within the connect and read timeouts and the size cap, redirects
    not followed. Raises :class:`TransportError` when no response came; anything else it
    raises is a client error (a malformed response the library refused)."""

    @property
    def template(self) -> str:
        """The result path, with ``{id}`` in it, in the form :meth:`get` takes."""
        ...

    async def get(self, target: str) -> Response | Oversize: ...

    async def close(self) -> None: ...


async def read_capped(
    status: int,
    content_length: str | None,
    retry_after: str | None,
    chunks: AsyncIterable[bytes],
    max_bytes: int,
) -> Response | Oversize:
    """The body read up to ``max_bytes``: refused unread if Content-Length says it is larger,
    cut short if the stream goes past it (a length can be absent, or lie)."""
    declared = content_length or ""
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > max_bytes)
    ):
        return Oversize(status, max_bytes, declared[:20])
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            return Oversize(status, max_bytes)
    return Response(status, retry_after, bytes(body))


def _within(declared: str | None, max_bytes: int) -> bool:
    """A Content-Length that promises a body within the cap."""
    return (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and len(declared) <= 18
        and int(declared) <= max_bytes
    )


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """What both HTTP transports are built from."""

    base_url: str
    result_path: str
    headers: Mapping[str, str] = field(repr=False)  # carries the API key
    connect_timeout_s: float
    read_timeout_s: float
    max_connections: int
    max_response_bytes: int
    verify_tls: bool


class Deadlines:
    """Cancels each watched request once past its deadline, checked every ``LIMIT_CHECK_S``
    by one timer for them all: a timer per request (``asyncio.timeout``, aiohttp's
    ``sock_read`` moved on every chunk) cost ~9 µs of CPU a request (issue 22). With
    ``idle_s``, a request whose body is being read (:meth:`body`) is due ``idle_s`` after
    its last byte came (the stream's byte count, read at each check): a read timeout. A
    request cut here is told apart from any other cancel by :meth:`timed_out`."""

    def __init__(self, idle_s: float = 0.0) -> None:
        self._idle_s = idle_s
        # task -> [its body's stream once the headers came, bytes seen, when it is cut]
        self._watched: dict[asyncio.Task[Any], list[Any]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def start(self, task: asyncio.Task[Any], within_s: float) -> list[Any]:
        loop = asyncio.get_running_loop()
        entry = self._watched[task] = [None, 0, loop.time() + within_s]
        if self._timer is None or self._timer_loop is not loop:
            self._timer, self._timer_loop = loop.call_later(LIMIT_CHECK_S, self._check), loop
        return entry

    def body(self, entry: list[Any], stream: aiohttp.StreamReader) -> None:
        """The headers came: from now on the body must not stall for ``idle_s``."""
        entry[0], entry[1] = stream, stream.total_raw_bytes
        entry[2] = asyncio.get_running_loop().time() + self._idle_s

    def timed_out(self, task: asyncio.Task[Any]) -> bool:
        """For a request cancelled: whether that cancel was this watch's alone; it is taken
        back if so."""
        return task in self._expired and task.uncancel() == 0

    def stop(self, task: asyncio.Task[Any]) -> None:
        self._watched.pop(task, None)
        self._expired.discard(task)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle_s = self._idle_s
        for task, entry in self._watched.items():
            stream = entry[0]
            if stream is not None and stream.total_raw_bytes != entry[1]:
                entry[1], entry[2] = stream.total_raw_bytes, now + idle_s  # progress
            elif entry[2] <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(LIMIT_CHECK_S, self._check) if self._watched else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# --- the transports ------------------------------------------------------------------------


class AiohttpTransport:
    """An aiohttp session driven directly: ~4x the requests per CPU-second of httpx's
    ``AsyncClient`` over the same pool (bench/results/throughput.md)."""

    def __init__(self, options: HttpOptions) -> None:
        self._options = options
        # The whole URL is encoded once here and sent as is (no requoting that could
        # normalise a path); task_path fills in an id that is already percent-encoded.
        self.template = quote(options.base_url.rstrip("/") + options.result_path, safe=_URL_SAFE)
        self._session: aiohttp.ClientSession | None = None  # made in the running loop
        # The read timeout is ours (Deadlines: headers within connect + read of the start,
        # then each body byte within read of the last), the connect timeout aiohttp's: a
        # timer only when a connection is opened (``connect`` would set one per request).
        self._reads = Deadlines(idle_s=options.read_timeout_s)
        self._headers_within_s = options.connect_timeout_s + options.read_timeout_s

    def _open(self) -> aiohttp.ClientSession:
        o = self._options
        self._session = aiohttp.ClientSession(
            headers=dict(o.headers),
            connector=aiohttp.TCPConnector(limit=o.max_connections, ssl=o.verify_tls),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=o.connect_timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self._session

    async def get(self, target: str) -> Response | Oversize:
        session = self._session
        if session is None:
            session = self._open()
        url = yarl.URL(target, encoded=True)  # encoded already: see __init__
        me = asyncio.current_task()
        assert me is not None, "a request runs in a task"
        watched = self._reads.start(me, self._headers_within_s)
        try:
            async with session.get(url, allow_redirects=False) as response:
                self._reads.body(watched, response.content)
                headers = response.headers
                declared = headers.get("Content-Length")
                if _within(declared, self._options.max_response_bytes):
                    # One read: the framing stops at the length (a quarter of the chunked
                    # loop's cost per response).
                    return Response(
                        response.status, headers.get("Retry-After"), await response.read()
                    )
                return await read_capped(
                    response.status,
                    declared,
                    headers.get("Retry-After"),
                    response.content.iter_any(),
                    self._options.max_response_bytes,
                )
        except TimeoutError as exc:  # first: aiohttp's ServerTimeoutError is a connection error too
            raise TransportError(ErrorKind.TIMEOUT, type(exc).__name__) from exc
        except aiohttp.ClientConnectionError as exc:
            raise TransportError(ErrorKind.NETWORK, type(exc).__name__) from exc
        except asyncio.CancelledError:
            if self._reads.timed_out(me):
                raise TransportError(ErrorKind.TIMEOUT, "ReadTimeout") from None
            raise
        finally:
            self._reads.stop(me)

    async def close(self) -> None:
        self._reads.close()
        if self._session is not None:
            await self._session.close()


class HttpxTransport:
    """``httpx.AsyncClient`` over httpcore."""

    def __init__(self, options: HttpOptions) -> None:
        o = options
        self._max_bytes = o.max_response_bytes
        self.template = o.result_path  # the client joins base and path itself
        self._client = httpx.AsyncClient(
            base_url=o.base_url,
            headers=dict(o.headers),
            timeout=httpx.Timeout(o.read_timeout_s, connect=o.connect_timeout_s),
            follow_redirects=False,
            transport=httpx.AsyncHTTPTransport(
                verify=o.verify_tls,
                limits=httpx.Limits(
                    max_connections=o.max_connections,
                    max_keepalive_connections=o.max_connections,
                ),
            ),
        )

    async def get(self, target: str) -> Response | Oversize:
        try:
            async with self._client.stream("GET", target) as response:
                headers = response.headers
                return await read_capped(
                    response.status_code,
                    headers.get("content-length"),
                    headers.get("retry-after"),
                    response.aiter_bytes(),
                    self._max_bytes,
                )
        except httpx.TimeoutException as exc:  # first: it is a TransportError too
            raise TransportError(ErrorKind.TIMEOUT, type(exc).__name__) from exc
        except httpx.TransportError as exc:
            raise TransportError(ErrorKind.NETWORK, type(exc).__name__) from exc

    async def close(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True, slots=True)
class MockResponse:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


class MockTransport:
    """Answers from ``handler`` instead of the network, for tests. The handler gets the
    request's path and returns a :class:`MockResponse` or raises :class:`TransportError`;
    the size cap applies as over the network."""

    def __init__(
        self,
        handler: Callable[[str], Awaitable[MockResponse]],
        *,
        template: str = "/api/v3/predictions/{id}",
        max_bytes: int = 1_048_576,
    ) -> None:
        self._handler = handler
        self.template = template
        self._max_bytes = max_bytes

    async def get(self, target: str) -> Response | Oversize:
        answer = await self._handler(target)
        headers = {name.lower(): value for name, value in answer.headers.items()}

        async def chunks() -> AsyncIterable[bytes]:
            yield answer.body

        return await read_capped(
            answer.status,
            headers.get("content-length"),
            headers.get("retry-after"),
            chunks(),
            self._max_bytes,
        )

    async def close(self) -> None:
        pass  # nothing held


# --- the client ------------------------------------------------------------------------------


class ApiClient:
    """GET the result of one prediction. Thin: all meaning lives in :func:`interpret`.

    The transport is chosen by measurement (bench/results/throughput.md): ``aiohttp`` by
    default, ``httpx`` as the alternative; the client applies the same total limit to both
    and turns whatever they return or raise into an :class:`Outcome`.
    """

    def __init__(self, transport: Transport, *, total_timeout_s: float) -> None:
        self._transport = transport
        self._template = transport.template
        self._total_timeout_s = total_timeout_s
        self._unexpected_logged: set[str] = set()
        self._limits = Deadlines()  # the total limit of every request in flight

    @classmethod
    def over_http(
        cls,
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
    ) -> ApiClient:
        headers = {"User-Agent": user_agent, "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        options = HttpOptions(
            base_url=base_url,
            result_path=result_path,
            headers=headers,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_connections=max_connections,
            max_response_bytes=max_response_bytes,
            verify_tls=verify_tls,
        )
        chosen = AiohttpTransport(options) if transport == "aiohttp" else HttpxTransport(options)
        # The read timeout restarts with every chunk: only a total limit ends a trickle.
        total = total_timeout_s or connect_timeout_s + read_timeout_s
        return cls(chosen, total_timeout_s=total)

    @classmethod
    def from_config(cls, a: ApiConfig, api_key: str | None) -> ApiClient:
        return cls.over_http(
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
            target = task_path(self._template, task_id)
        except ValueError as exc:  # a bad id; the parser should have refused it
            return Outcome(Kind.NOT_FOUND, reason=f"invalid task id ({exc})")
        limit = self._total_timeout_s if limit_s is None else min(limit_s, self._total_timeout_s)
        me = asyncio.current_task()
        if limit <= 0 or me is None:
            return _timed_out(limit)
        self._limits.start(me, limit)
        try:
            got = await self._transport.get(target)
        except TransportError as exc:
            what = "timeout" if exc.error is ErrorKind.TIMEOUT else "network error"
            return Outcome(Kind.TRANSIENT, reason=f"{what} ({exc.name})", error=exc.error)
        except asyncio.CancelledError:
            if self._limits.timed_out(me):  # ours, and nobody else's
                return _timed_out(limit)
            raise
        except TimeoutError as exc:  # a transport names its own timeouts
            return Outcome(
                Kind.TRANSIENT, reason=f"timeout ({type(exc).__name__})", error=ErrorKind.TIMEOUT
            )
        except Exception as exc:  # a malformed response, or the client's own error
            name = type(exc).__name__
            if name not in self._unexpected_logged:  # a traceback once per kind, then counts
                self._unexpected_logged.add(name)
                log.warning("unexpected error from the HTTP client", error=name, exc_info=exc)
            # Counted with network errors: no usable response came.
            return Outcome(Kind.TRANSIENT, reason=f"client error ({name})", error=ErrorKind.NETWORK)
        finally:
            self._limits.stop(me)
        if isinstance(got, Oversize):
            return _oversize(got)
        return interpret(got.status, got.retry_after, got.body, now)

    async def aclose(self) -> None:
        self._limits.close()
        await self._transport.close()


def _timed_out(limit: float) -> Outcome:
    return Outcome(
        Kind.TRANSIENT,
        reason=f"timeout (no complete response within {max(0.0, limit):.3g}s)",
        error=ErrorKind.TIMEOUT,
    )


def _oversize(got: Oversize) -> Outcome:
    shown = f" (Content-Length {got.declared})" if got.declared is not None else ""
    return Outcome(
        Kind.TRANSIENT,
        got.status,
        reason=f"body larger than {got.max_bytes} bytes, not read{shown}",
        # A 5xx is a server error whatever its body, as interpret would say.
        error=ErrorKind.SERVER_ERROR if got.status >= 500 else ErrorKind.OVERSIZE_BODY,
    )
