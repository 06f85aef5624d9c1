"""Kafka as managed services run it: SASL_SSL with SCRAM-SHA-512 and a private CA, and a
cluster that does not create topics on demand.

The CA and the broker's certificate are made at test time (trustme); the broker listens
on SASL_SSL beside a plain listener the test's own clients use.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from bridge.config import Config
from bridge.local.apache_kafka import KafkaCluster, SaslSsl
from bridge.local.simulator import Simulator
from tests.conftest import BROKER
from tests.helpers import (
    Names,
    Received,
    StartBroker,
    config_data,
    create_topics,
    make_config,
    metric_value,
    produce,
    read_all,
    running_bridge,
    scrape,
    scrape_until,
    sim_create,
    spawn_daemon,
    wait_for_commits,
    wait_until,
)

pytestmark = pytest.mark.integration

USER, PASSWORD = "bridge", "scram-pw-4c1d9e"


@dataclass
class Secured:
    cluster: KafkaCluster
    ca: Path  # the CA that signed the broker's certificate
    stranger_ca: Path  # a CA that did not


@pytest.fixture
async def secured(tmp_path: Path, own_broker: StartBroker) -> AsyncIterator[Secured]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    # Kafka's PEM key store wants an unencrypted PKCS#8 key followed by the chain.
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    keystore = tmp_path / "broker.pem"
    keystore.write_bytes(pkcs8 + b"".join(c.bytes() for c in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "stranger.pem"))
    if BROKER != "kafka":
        pytest.skip("needs Apache Kafka (the local Tansu has no SASL_SSL listener)")
    cluster = await own_broker(sasl_ssl=SaslSsl(keystore, {USER: PASSWORD}))
    assert isinstance(cluster, KafkaCluster)
    yield Secured(cluster, tmp_path / "ca.pem", tmp_path / "stranger.pem")


def _secure_config(
    s: Secured, sim: Simulator, names: Names, tmp: Path, *, password: str, cafile: Path
) -> dict[str, Any]:
    data = config_data(s.cluster, sim.base_url, names)
    secret = tmp / f"sasl-{password}"
    secret.write_text(password + "\n")
    data["kafka"] |= {
        "bootstrap_servers": s.cluster.secure_bootstrap,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": USER,
        "sasl_password_file": str(secret),
        "ssl_cafile": str(cafile),
    }
    return data


async def test_sasl_ssl_scram_with_a_private_ca(
    secured: Secured, sim: Simulator, tmp_path: Path
) -> None:
    names = Names()
    await create_topics(secured.cluster, names)
    ids = await sim_create(sim, [{"model": "m", "duration_s": 0.1} for _ in range(5)])
    data = _secure_config(secured, sim, names, tmp_path, password=PASSWORD, cafile=secured.ca)
    daemon = spawn_daemon(data, tmp_path)
    try:
        await produce(secured.cluster.bootstrap, names.input, ids)
        got = await read_all(secured.cluster.bootstrap, [names.completed], expect=5, timeout=40)
        positions = await wait_for_commits(
            secured.cluster.bootstrap, names.group, names.input, 1, total=5
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
    assert sorted(r.event["subject"] for r in got) == sorted(ids)
    assert positions == [5]
    assert PASSWORD not in (tmp_path / "daemon.log").read_text()


@pytest.mark.parametrize(
    ("case", "kind", "says"),
    [
        ("wrong password", "auth", "SASL authentication failed"),
        ("untrusted certificate", "tls", "is not trusted"),
    ],
)
async def test_a_wrong_password_or_an_untrusted_certificate_is_one_clear_error(
    secured: Secured, sim: Simulator, tmp_path: Path, case: str, kind: str, says: str
) -> None:
    names = Names()
    await create_topics(secured.cluster, names)
    wrong = case == "wrong password"
    data = _secure_config(
        secured,
        sim,
        names,
        tmp_path,
        password="not-the-password" if wrong else PASSWORD,
        cafile=secured.ca if wrong else secured.stranger_ca,
    )
    port = data["server"]["port"]
    daemon = spawn_daemon(data, tmp_path)
    try:
        text = await scrape_until(port, lambda t: _errors(t, kind) >= 3, timeout=40)
        async with httpx.AsyncClient() as client:
            readyz = await client.get(f"http://127.0.0.1:{port}/readyz")
        alive = daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
    log = (tmp_path / "daemon.log").read_text()
    assert alive
    assert readyz.status_code == 503 and says in readyz.text
    # Said once, however many retries; retried with backoff, not in a tight loop.
    assert log.count('"kafka connection failed"') == 1
    assert says in log
    attempts = _errors(text, kind)
    assert 3 <= attempts <= 8, f"{attempts} attempts before the third backoff"
    assert "not-the-password" not in log


def _errors(text: str, kind: str) -> float:
    return metric_value(text, "wavespeed_bridge_kafka_connection_errors_total", kind=kind)


async def test_missing_output_topics_hold_their_events_until_created(
    sim: Simulator, own_broker: StartBroker
) -> None:
    if BROKER != "kafka":
        pytest.skip("needs a broker that can refuse to create topics")
    own = await own_broker(overrides={"auto.create.topics.enable": "false"})
    assert isinstance(own, KafkaCluster)
    names = Names()
    await own.create_topics([names.input, names.completed])  # no failed or dead-letter topic
    ok = await sim_create(sim, [{"model": "m", "duration_s": 0.1} for _ in range(3)])
    (fails,) = await sim_create(sim, [{"model": "m", "duration_s": 0.1, "outcome": "failed"}])
    config = make_config(own, sim.base_url, names)
    with capture_logs() as logs:
        held, reason, text, done, rest, positions = await _hold_then_create(
            own, sim, names, config, ok, fails
        )
    said = [e for e in logs if e["event"].startswith("topics missing")]
    assert len(said) == 1 and set(said[0]["topics"]) == {names.failed, names.dead_letter}
    assert sorted(r.event["subject"] for r in done) == sorted(ok)
    assert names.failed in reason and names.dead_letter in reason
    assert held == [1]  # nothing committed past the first held record
    assert metric_value(text, "wavespeed_bridge_kafka_topics_missing") == 2
    assert sorted(r.topic for r in rest) == sorted([names.failed, names.dead_letter])
    assert positions == [5]


async def _hold_then_create(
    own: KafkaCluster, sim: Simulator, names: Names, config: Config, ok: list[str], fails: str
) -> tuple[list[int], str, str, list[Received], list[Received], list[int]]:
    async with running_bridge(config, wait_ready=False) as bridge:
        await produce(own.bootstrap, names.input, [ok[0], fails, "not a task id!", *ok[1:]])
        # The completed topic exists: its events go out, not stuck behind the held ones.
        done = await read_all(own.bootstrap, [names.completed], expect=3, timeout=30)
        await wait_until(lambda: "missing topics" in bridge.readiness()[1], timeout=20)
        reason = bridge.readiness()[1]
        held = await wait_for_commits(own.bootstrap, names.group, names.input, 1, total=1)
        text = await scrape(bridge.server.port)
        await own.create_topics([names.failed, names.dead_letter])
        rest = await read_all(own.bootstrap, [names.failed, names.dead_letter], expect=2)
        positions = await wait_for_commits(own.bootstrap, names.group, names.input, 1, total=5)
        await wait_until(lambda: bridge.readiness()[0], timeout=20)
    return held, reason, text, done, rest, positions
