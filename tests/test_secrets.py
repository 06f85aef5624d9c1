"""Secrets (issue 4): the API key and the SASL password never show up anywhere the bridge writes.

The whole flow runs in the real daemon process (``wavespeed-bridge run``, so the real logging
set-up applies) with recognisable secrets, through paths that log errors and a traceback
whose exception message carries the key; then every log line, event, dead-letter record,
metric and probe answer is searched for them. Also: TLS is verified by default, for the
API client and for Kafka, and the metrics server binds only the configured address.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import structlog
from aiohttp import web

from bridge.config import ApiConfig, KafkaConfig, ServerConfig, build_config
from bridge.core.outcomes import Kind
from bridge.edges import logs
from bridge.edges.api import ApiClient
from bridge.edges.kafka import client_options
from bridge.local.broker import Broker, free_port
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    Received,
    config_data,
    create_topics,
    metric_value,
    produce,
    read_all,
    sim_create,
    spawn_daemon,
)

PASSWORD_SENTINEL = "sasl-canary-"
KEY_SENTINEL = "wsk-canary-"


def _forms(secret: str) -> set[str]:
    """The secret as it could appear: raw, base64, hex, percent-encoded."""
    raw = secret.encode()
    return {secret, base64.b64encode(raw).decode(), raw.hex(), quote(secret, safe="")}


def _assert_absent(secrets: list[str], where: str, text: str) -> None:
    for secret in secrets:
        for form in _forms(secret):
            assert form not in text, f"a secret ({form[:14]}...) leaked into {where}"


def _record_text(r: Received) -> str:
    parts = [r.key or b"", r.value or b""]
    for k, v in r.headers.items():
        parts += [k.encode(), v]
    return "\n".join(p.decode("utf-8", "replace") for p in parts)


async def _get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=2.0) as client:
        return await client.get(url)


async def _wait_ready(url: str, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert daemon.poll() is None, log.read_text()[-3000:]
        try:
            if (await _get(url)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("daemon not ready: " + log.read_text()[-3000:])


class EchoingProxy:
    """A broken proxy in front of the simulator: for one task id it answers an invalid
    status line that carries the request's Authorization header, so the HTTP client's
    exception message (and the traceback logged for it) holds the key. Test-only: the
    shipped simulator never echoes credentials."""

    def __init__(self, upstream: Simulator, echo_for: str) -> None:
        self._upstream, self._echo_for = upstream, echo_for
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> EchoingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            if self._echo_for in lines[0]:
                auth = next((ln for ln in lines if ln.lower().startswith("authorization:")), "")
                writer.write(f"HTTP/1.1 2x0 {auth}\r\n\r\n".encode("latin-1"))
                return
            # Anything else goes to the simulator, one request per connection.
            kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith("connection:")]
            up_reader, up_writer = await asyncio.open_connection(
                self._upstream.host, self._upstream.port
            )
            request = "\r\n".join([lines[0], *kept, "Connection: close", "", ""])
            up_writer.write(request.encode("latin-1"))
            writer.write(await up_reader.read())
            up_writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.integration
async def test_secrets_never_leave_the_process(
    broker: Broker, names: Names, tmp_path: Path
) -> None:
    key = KEY_SENTINEL + uuid.uuid4().hex
    password = PASSWORD_SENTINEL + uuid.uuid4().hex
    sim = Simulator(api_key=key, seed=2)
    await sim.start()
    await create_topics(broker, names)
    # The task behind the broken proxy never finishes: it times out naming the client error.
    garbage = await sim_create(sim, [{"model": "m/img", "duration_s": 3600}])
    proxy = await EchoingProxy(sim, echo_for=garbage[0]).__aenter__()
    port = free_port()
    config = config_data(
        broker,
        f"http://127.0.0.1:{proxy.port}",
        names,
        kafka={
            # The test broker is PLAINTEXT; the password is set anyway, as an operator would
            # leave it in a shared config file.
            "security_protocol": "PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "bridge",
            "sasl_password": password,
        },
        api={"auth_error_pause_s": 0.3},
        server={"host": "127.0.0.2", "port": port},
        logging={"format": "json", "level": "DEBUG"},
    )
    log_path = tmp_path / "daemon.log"
    daemon = spawn_daemon(config, tmp_path, env={"WAVESPEED_API_KEY": key})
    base = f"http://127.0.0.2:{port}"
    try:
        await _wait_ready(f"{base}/readyz", daemon, log_path)
        ok = await sim_create(sim, [{"model": "m/img", "duration_s": 0.1} for _ in range(2)])
        bad = await sim_create(
            sim, [{"model": "m/img", "duration_s": 0.1, "outcome": "failed", "error": "no GPU"}]
        )
        await produce(
            broker.bootstrap,
            names.input,
            [
                {"id": ok[0], "metadata": {"n": 1}},
                ok[1],
                bad[0],
                "pred_unknown_404",
                {"id": garbage[0], "timeout_s": 1.5},
                b"{not json",
            ],
            key=b"user-1",
            headers=[("trace", b"t-1")],
        )
        got = await read_all(broker.bootstrap, names.outputs, expect=6, timeout=20, settle=0.2)
        assert len(got) == 6
        # The key is rotated under the bridge: 403 for every poll, an error logged, polling
        # paused; then it is put back and the waiting task completes.
        sim.api_key = "rotated-" + uuid.uuid4().hex
        late = await sim_create(sim, [{"model": "m/img", "duration_s": 0.1}])
        await produce(broker.bootstrap, names.input, late)
        deadline = time.monotonic() + 10
        while sim.responses.get(403, 0) < 1:
            assert time.monotonic() < deadline, "the bridge never met the rotated key"
            await asyncio.sleep(0.05)
        sim.api_key = key
        got += await read_all(
            broker.bootstrap,
            [names.completed],
            timeout=15,
            until=lambda rs: any(r.event["subject"] == late[0] for r in rs),
        )
        metrics = (await _get(f"{base}/metrics")).text
        probes = (await _get(f"{base}/readyz")).text + (await _get(f"{base}/healthz")).text
        # The metrics server listens on the configured address only.
        with pytest.raises(httpx.ConnectError):
            await _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
        await proxy.__aexit__()
        await sim.stop()
    assert daemon.returncode == 0
    log = log_path.read_text(encoding="utf-8", errors="replace")

    # The paths that could leak were taken.
    events = {r.event["subject"]: r.event for r in got if r.topic != names.dead_letter}
    assert events[garbage[0]]["type"] == "ai.wavespeed.prediction.timeout"
    assert "client error" in events[garbage[0]]["data"]["error"]
    assert events[late[0]]["type"] == "ai.wavespeed.prediction.completed"
    assert [r.headers["dlq.reason"] for r in got if r.topic == names.dead_letter] == [
        b"invalid_json"
    ]
    assert metric_value(metrics, "wavespeed_bridge_api_auth_errors_total") >= 1
    assert metric_value(metrics, "wavespeed_bridge_api_errors_total", kind="network") >= 1
    assert "Traceback (most recent call last)" in log
    assert "unexpected error from the HTTP client" in log
    assert "polling paused for every task" in log and "API key rejected" in log
    assert logs.REDACTED in log  # the key did reach the logger, and was scrubbed

    # And the secrets are nowhere.
    secrets = [key, password]
    _assert_absent(secrets, "the daemon's log", log)
    _assert_absent(secrets, "the metrics", metrics)
    _assert_absent(secrets, "the health probes", probes)
    for r in got:
        _assert_absent(secrets, f"a record on {r.topic}", _record_text(r))


# --- the logging set-up on its own: uncaught exceptions and library loggers ----------------


def test_uncaught_exceptions_and_library_tracebacks_are_scrubbed(restore_logging: None) -> None:
    secret = KEY_SENTINEL + uuid.uuid4().hex
    stream = io.StringIO()
    logs.configure(fmt="json", secrets=[secret], stream=stream)

    def fail() -> None:
        raise RuntimeError(f"bad credentials: Bearer {secret}")

    try:
        fail()
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)  # what Python does on a crash
        logging.getLogger("aiokafka").error("connect failed for %s", secret, exc_info=exc)
        structlog.get_logger("t").warning("oops", password=secret, exc_info=exc)
    logs.flush()  # lines are written in batches
    out = stream.getvalue()
    assert "uncaught exception" in out and "connect failed for" in out and "oops" in out
    assert out.count("Traceback (most recent call last)") == 3
    assert out.count(logs.REDACTED) >= 5
    _assert_absent([secret], "the log stream", out)


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for localhost/127.0.0.1 that no default trust store knows."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _server_context(self_signed: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*self_signed)
    return ctx


@pytest.fixture
async def https_api(self_signed: tuple[Path, Path]) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTPS result API with an untrusted certificate; yields (base URL, paths served)."""
    served: list[str] = []

    async def get(request: web.Request) -> web.Response:
        served.append(request.path)
        body = {"code": 200, "message": "success", "data": {"id": "p1", "status": "completed"}}
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/api/v3/predictions/{id}", get)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_context(self_signed))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"https://127.0.0.1:{port}", served
    await runner.cleanup()


def test_tls_verification_is_the_default() -> None:
    assert ApiConfig().verify_tls is True
    assert build_config({}, env={}).api.verify_tls is True
    assert ServerConfig().host == "127.0.0.1"  # metrics are not exposed to the network


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_api_client_refuses_an_untrusted_certificate(
    https_api: tuple[str, list[str]], transport: str
) -> None:
    base_url, served = https_api

    def client(**kw: Any) -> ApiClient:
        return ApiClient.over_http(
            base_url=base_url,
            result_path="/api/v3/predictions/{id}",
            api_key="k-" + uuid.uuid4().hex,
            connect_timeout_s=2,
            read_timeout_s=2,
            max_connections=2,
            max_response_bytes=10_000,
            transport=transport,
            **kw,
        )

    default = client()  # verify_tls not given: the default must verify
    try:
        refused = await default.fetch("p1", time.time())
    finally:
        await default.aclose()
    assert refused.kind is Kind.TRANSIENT and refused.status_code is None, refused
    assert served == []  # the request (and its key) never went out
    insecure = client(verify_tls=False)  # the server works: it is verification that refused
    try:
        accepted = await insecure.fetch("p1", time.time())
    finally:
        await insecure.aclose()
    assert accepted.kind is Kind.COMPLETED and served == ["/api/v3/predictions/p1"]


async def _tls_handshake(port: int, ctx: ssl.SSLContext, hostname: str) -> None:
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname), 5
    )
    writer.close()


async def test_kafka_ssl_context_verifies(self_signed: tuple[Path, Path]) -> None:
    cert, _key = self_signed

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=_server_context(self_signed))
    port = server.sockets[0].getsockname()[1]
    try:
        for protocol in ("SSL", "SASL_SSL"):
            cfg = KafkaConfig(
                security_protocol=protocol,
                sasl_mechanism="PLAIN",
                sasl_username="u",
                sasl_password="p",
            )
            ctx = client_options(cfg)["ssl_context"]
            assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname is True
            # An untrusted broker certificate is refused...
            with pytest.raises(ssl.SSLCertVerificationError):
                await _tls_handshake(port, ctx, "localhost")
        # ...a trusted one accepted, but only for the name it was issued to.
        trusted = client_options(KafkaConfig(security_protocol="SSL", ssl_cafile=str(cert)))
        await _tls_handshake(port, trusted["ssl_context"], "localhost")
        with pytest.raises(ssl.SSLCertVerificationError):
            await _tls_handshake(port, trusted["ssl_context"], "broker.example")
        # Turning the hostname check off keeps chain verification.
        loose = client_options(KafkaConfig(security_protocol="SSL", ssl_check_hostname=False))
        assert loose["ssl_context"].verify_mode is ssl.CERT_REQUIRED
        with pytest.raises(ssl.SSLCertVerificationError):
            await _tls_handshake(port, loose["ssl_context"], "localhost")
    finally:
        server.close()
        await server.wait_closed()
    # PLAINTEXT: no TLS context, and the (unused) password is not handed to the client.
    plain = client_options(KafkaConfig(sasl_password="p-" + uuid.uuid4().hex))
    assert "ssl_context" not in plain and "sasl_plain_password" not in plain
