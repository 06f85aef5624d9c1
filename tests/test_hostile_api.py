"""Hostile or broken API responses (issue 4): each ends as a defined outcome; the daemon goes on.

The defined outcome of a response that is not an answer about the task (truncated or
non-JSON bodies, HTML error pages, wrong field types, statuses nobody documented, a body
too large to read, a server that stalls after the headers, a redirect to another host, a
status line that is not HTTP) is: counted in ``wavespeed_bridge_api_errors_total{kind}``,
retried with backoff (or, for an unknown status, polled on) until the task's deadline, then
one ``ai.wavespeed.prediction.timeout`` event whose ``data.error`` names the last problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bridge.core.outcomes import TERMINAL, ErrorKind, Kind, Outcome, interpret, parse_retry_after
from bridge.edges.api import ApiClient
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    API_KEY,
    Names,
    committed,
    create_topics,
    make_config,
    metric_value,
    produce,
    read_all,
    running_bridge,
    scrape,
    sim_create,
)

NOW = 1_700_000_000.0
MAX_BODY = 1_048_576
FIFTY_MB = 50 * 1024 * 1024

# behaviour -> (what data.error must say about the last poll, api_errors_total kind)
EXPECTED: dict[str, tuple[str, str]] = {
    "truncated_json": ("last poll: body is not JSON", "bad_response"),
    "html": ("last poll: body is not JSON", "bad_response"),
    "html_502": ("last poll: HTTP 502", "server_error"),
    "wrong_types": ("last poll: unknown status missing", "unknown_status"),
    "unknown_status": ("last poll: unknown status 'queued_for_gpu'", "unknown_status"),
    "huge_body": (f"last poll: body larger than {MAX_BODY} bytes, not read", "oversize_body"),
    "huge_chunked": (f"last poll: body larger than {MAX_BODY} bytes, not read", "oversize_body"),
    "stall": ("last poll: timeout (", "timeout"),  # ReadTimeout, or aiohttp's own name
    "redirect": ("last poll: unexpected redirect (HTTP 302), not followed", "redirect"),
    "garbage": ("last poll: client error (ClientResponseError)", "network"),
}


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free local port, its base URL; requests still open are cut at the end."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def api_client(
    base_url: str,
    *,
    read_s: float,
    result_path: str = "/api/v3/predictions/{id}",
    connect_s: float = 1.0,
    total_s: float | None = None,
    transport: str = "aiohttp",
    connections: int = 2,
) -> ApiClient:
    return ApiClient.over_http(
        base_url=base_url,
        result_path=result_path,
        api_key=API_KEY,
        connect_timeout_s=connect_s,
        read_timeout_s=read_s,
        total_timeout_s=total_s,
        max_connections=connections,
        max_response_bytes=MAX_BODY,
        transport=transport,
    )


# --- pure: interpret never raises and never invents a terminal outcome --------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["\ud800", "completed", "failed", "created", "processing"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)
data_objects = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "model": json_values,
        "status": st.sampled_from(["completed", "failed", "created", "processing", "queued"])
        | json_values,
        "outputs": json_values,
        "error": json_values,
        "timings": st.fixed_dictionaries({}, optional={"inference": json_values}) | json_values,
        "created_at": json_values,
        "has_nsfw_contents": json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda code, data: json.dumps({"code": code, "message": "x", "data": data}).encode(),
        json_values,
        data_objects | json_values,
    ),
)
retry_afters = st.none() | st.text(max_size=12) | st.sampled_from(["²", "9" * 5000, "0" * 40])


@settings(max_examples=800, deadline=None)
@given(code=st.integers(0, 999), retry_after=retry_afters, body=bodies)
@example(code=503, retry_after="²", body=b"")  # "²".isdigit() is true; int("²") raises
@example(code=429, retry_after="9" * 5000, body=b"")  # past int()'s digit limit
@example(
    code=200,
    retry_after=None,
    body=b'{"data": {"status": "completed", "timings": {"inference": 1' + b"0" * 400 + b"}}}",
)
def test_interpret_is_total(code: int, retry_after: str | None, body: bytes) -> None:
    out = interpret(code, retry_after, body, NOW)
    assert isinstance(out, Outcome) and isinstance(out.kind, Kind)
    assert out.status_code == code
    if out.kind in TERMINAL:  # only an answer about the task ends it
        assert code in (200, 404)
    if out.retry_after_s is not None:
        assert 0 <= out.retry_after_s <= 86_400
    p = out.prediction
    if p is not None:  # whatever came in can go out: every string encodes as UTF-8
        for text in [p.id, p.model, p.status, p.error, p.created_at_raw, *p.outputs]:
            if text is not None:
                text.encode("utf-8")
        assert p.inference_ms is None or p.inference_ms >= 0


@settings(max_examples=300, deadline=None)
@given(value=retry_afters)
def test_parse_retry_after_is_total(value: str | None) -> None:
    got = parse_retry_after(value, NOW)
    assert got is None or 0 <= got <= 86_400


# --- the client against a server with odd headers ----------------------------------------


@pytest.fixture
async def odd_server() -> AsyncIterator[str]:
    """503 with a Retry-After no int() accepts; 200 whose Content-Length is absurd."""

    async def retry_after(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": request.query["v"]})

    app = web.Application()
    app.router.add_get("/api/v3/predictions/{id}", retry_after)
    async with serving(app) as url:
        yield url


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_odd_retry_after_is_a_transient_error_not_a_missing_task(
    odd_server: str, transport: str
) -> None:
    for value in ("²", "9" * 5000):
        client = api_client(
            odd_server,
            result_path="/api/v3/predictions/{id}?v=" + value,
            read_s=1,
            transport=transport,
        )
        try:
            out = await client.fetch("pred_1", NOW)
        finally:
            await client.aclose()
        assert out.kind is Kind.TRANSIENT, out
        assert out.status_code == 503


# --- a body that trickles, a proxy that answers garbage ------------------------------------


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_trickling_body_is_cut_at_the_total_timeout(sim: Simulator, transport: str) -> None:
    """One byte every 0.2 s never trips a 1 s read timeout; only a total limit ends it."""
    (task_id,) = await sim_create(sim, [{"model": "m", "duration_s": 0, "behaviour": "trickle"}])
    client = api_client(sim.base_url, read_s=1, total_s=1.5, transport=transport)
    try:
        started = time.monotonic()
        out = await client.fetch(task_id, NOW)
        took = time.monotonic() - started
        assert out.kind is Kind.TRANSIENT
        assert out.reason == "timeout (no complete response within 1.5s)"
        assert 1.4 <= took < 2.5, took
        # A shorter limit from the caller (the task's deadline) wins over the total.
        started = time.monotonic()
        out = await client.fetch(task_id, NOW, limit_s=0.6)
        took = time.monotonic() - started
        assert out.reason == "timeout (no complete response within 0.6s)"
        assert 0.5 <= took < 1.3, took
        # The connection pool is still usable afterwards.
        (done,) = await sim_create(sim, [{"model": "m", "duration_s": 0}])
        assert (await client.fetch(done, NOW)).kind is Kind.COMPLETED
    finally:
        await client.aclose()
    assert sim.tasks[task_id].polls == 2


@pytest.fixture
async def slow_server() -> AsyncIterator[str]:
    """``/late-{ms}``: headers after ``ms`` milliseconds, then the body; ``/stall``: the
    headers and the first bytes of the body, then nothing."""

    async def late(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.json_response({"code": 200, "data": {"id": "p", "status": "created"}})

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b'{"code": 200')
        await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_get("/late-{ms}", late)
    app.router.add_get("/stall", stall)
    async with serving(app) as url:
        yield url


async def test_the_read_timeout_cuts_late_headers_and_a_stalled_body_not_a_slow_answer(
    slow_server: str,
) -> None:
    """aiohttp's read timeout is the bridge's own (``Deadlines``, one timer for every
    request): headers must come within connect + read, then each body byte within read."""
    client = api_client(slow_server, result_path="/{id}", connect_s=0.5, read_s=1.0, total_s=6.0)
    try:

        async def timed(path: str) -> tuple[Outcome, float]:
            started = time.monotonic()
            out = await client.fetch(path, NOW)
            return out, time.monotonic() - started

        out, took = await timed("stall")  # headers at once, then the body stops
        assert (out.kind, out.error, out.reason) == (
            Kind.TRANSIENT,
            ErrorKind.TIMEOUT,
            "timeout (ReadTimeout)",
        )
        assert 1.0 <= took < 4.0, took  # cut by the read timeout, well before the total
        out, took = await timed("late-5000")  # no headers within connect + read: cut
        assert out.reason == "timeout (ReadTimeout)" and 1.5 <= took < 4.0, (out, took)
        out, took = await timed("late-200")  # slow, but within: answered
        assert out.kind is Kind.PENDING and took >= 0.2, (out, took)
    finally:
        await client.aclose()


async def test_garbage_does_not_echo_the_credentials(sim: Simulator) -> None:
    (task_id,) = await sim_create(sim, [{"model": "m", "behaviour": "garbage"}])
    reader, writer = await asyncio.open_connection(sim.host, sim.port)
    writer.write(
        f"GET /api/v3/predictions/{task_id} HTTP/1.1\r\nHost: sim\r\n"
        f"Authorization: Bearer {API_KEY}\r\n\r\n".encode()
    )
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 2x0 ")
    assert API_KEY.encode() not in raw


@pytest.fixture
async def elsewhere() -> AsyncIterator[Simulator]:
    """Another host (127.0.0.2) that the redirect points at: it must never be asked."""
    other = Simulator(api_key=None, host="127.0.0.2")
    await other.start()
    yield other
    await other.stop()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_each_hostile_response_is_named_where_it_is_read(
    sim: Simulator, elsewhere: Simulator, transport: str
) -> None:
    """Every behaviour of :data:`EXPECTED`, one poll each over either transport: the outcome
    carries the error kind the daemon counts, and (aiohttp, the default) the reason its
    timeout event names."""
    sim.redirect_base = elsewhere.base_url
    behaviours = list(EXPECTED)
    ids = await sim_create(
        sim, [{"model": "m", "duration_s": 0, "behaviour": b} for b in behaviours]
    )
    client = api_client(sim.base_url, read_s=0.5, transport=transport, connections=4)
    try:
        for task_id, behaviour in zip(ids, behaviours, strict=True):
            out = await client.fetch(task_id, time.time())
            message, kind = EXPECTED[behaviour]
            assert out.kind in (Kind.TRANSIENT, Kind.PENDING), (behaviour, out)
            assert out.error is ErrorKind(kind), (behaviour, out)
            if transport == "aiohttp" or behaviour != "garbage":  # httpx names it otherwise
                assert message.removeprefix("last poll: ") in out.reason, (behaviour, out)
    finally:
        await client.aclose()
    assert elsewhere.requests == 0


# --- the daemon ---------------------------------------------------------------------------


@pytest.mark.integration
async def test_hostile_responses_end_as_timeouts_and_the_daemon_goes_on(
    broker: Broker, sim: Simulator, elsewhere: Simulator, names: Names
) -> None:
    await create_topics(broker, names)
    sim.redirect_base = elsewhere.base_url
    behaviours = list(EXPECTED)
    config = make_config(
        broker,
        sim.base_url,
        names,
        api={"read_timeout_s": 0.5, "max_response_bytes": MAX_BODY},
        polling={"interval_s": 0.2, "backoff_base_s": 0.1, "backoff_max_s": 0.4},
    )
    timeout_s = 2.5
    async with running_bridge(config) as bridge:
        # Each task is finished underneath: only the hostile response hides it. Created
        # now, so that the deadline (counted from the API's created_at) leaves room for
        # several polls.
        hostile = await sim_create(
            sim, [{"model": "m/hostile", "duration_s": 0.1, "behaviour": b} for b in behaviours]
        )
        normal = await sim_create(sim, [{"model": "m/normal", "duration_s": 0.3}])
        await produce(
            broker.bootstrap,
            names.input,
            [{"id": i, "timeout_s": timeout_s} for i in [*hostile, *normal]],
        )
        got = await read_all(broker.bootstrap, names.outputs, expect=len(hostile) + 1, timeout=20)
        text = await scrape(bridge.server.port)
        assert bridge.readiness() == (True, "ready")
        assert not bridge.tasks
        # The daemon goes on: a task submitted after all that completes normally.
        after = await sim_create(sim, [{"model": "m/normal", "duration_s": 0.1}])
        await produce(broker.bootstrap, names.input, after)
        got += await read_all(
            broker.bootstrap,
            [names.completed],
            timeout=10,
            until=lambda rs: any(r.event["subject"] == after[0] for r in rs),
        )
    events = {r.event["subject"]: r.event for r in got}
    assert len(events) == len(hostile) + 2
    for task_id, behaviour in zip(hostile, behaviours, strict=True):
        e = events[task_id]
        message, _kind = EXPECTED[behaviour]
        assert e["type"] == "ai.wavespeed.prediction.timeout", (behaviour, e)
        error = e["data"]["error"]
        assert error.startswith(f"deadline of {timeout_s:g}s passed"), (behaviour, error)
        assert message in error, (behaviour, error)
        assert e["data"]["outputs"] == []
        assert e["data"]["polls"] >= 2, (behaviour, e["data"]["polls"])  # retried, not dropped
        assert API_KEY not in json.dumps(e)
    for task_id in (*normal, *after):
        e = events[task_id]
        assert e["type"] == "ai.wavespeed.prediction.completed"
        assert e["data"]["outputs"] == [f"https://cdn.example.invalid/generated/{task_id}.png"]
    # Counted, by kind: each hostile task's problem was seen at least once per poll.
    kinds: dict[str, int] = {}
    for _message, kind in EXPECTED.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind, tasks in kinds.items():
        seen = metric_value(text, "wavespeed_bridge_api_errors_total", kind=kind)
        assert seen >= 2 * tasks, (kind, seen, tasks)
    assert metric_value(text, "wavespeed_bridge_tasks_finished_total", outcome="timeout") == len(
        hostile
    )
    assert metric_value(text, "wavespeed_bridge_tasks_finished_total", outcome="completed") == 1
    # The 50 MB bodies were cut short: every response the simulator finished writing stopped
    # far below 50 MB (what the kernel buffers took), and none was read to the end.
    writes = list(sim.huge_body_writes)
    assert len(writes) >= 2, writes
    assert all(w < FIFTY_MB // 2 for w in writes), writes
    # The redirect was not followed: the other host never saw a request.
    assert sim.tasks[hostile[behaviours.index("redirect")]].polls >= 2
    assert elsewhere.requests == 0
    assert (await committed(broker.bootstrap, names.group, names.input)) == [len(hostile) + 2]
