"""The simulator's webhooks (issue 13): signed deliveries that verify, and their faults.

Deliveries go over real HTTP either to a recording endpoint (raw headers and body, checked
with the bridge's verifier) or to the bridge's own receiver with a fake ``publish``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from bridge.config import WebhooksConfig
from bridge.core.outcomes import Kind
from bridge.core.webhook_signature import Accepted, Delivery, Rejected, parse_delivery, verify
from bridge.edges.metrics import Metrics
from bridge.edges.webhook_server import WebhookServer
from bridge.local.simulator import Simulator
from tests.helpers import API_KEY, metric_value, sim_create, wait_until
from tests.test_webhook_server import FakePublish


@dataclass
class Received:
    at: float  # monotonic
    headers: dict[str, str]
    body: bytes


@dataclass
class Endpoint:
    """Records every POST and answers 200."""

    received: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Received(time.monotonic(), dict(request.headers), body))
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    e = Endpoint()
    await e.start()
    yield e
    assert e.runner is not None
    await e.runner.cleanup()


async def own_sim(seed: int) -> Simulator:
    s = Simulator(api_key=API_KEY, seed=seed)
    await s.start()
    return s


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


async def test_the_secret_endpoint_needs_the_key(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        assert (await client.get("/api/v3/webhook/secret")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.get("/api/v3/webhook/secret", headers=wrong)).status_code == 403
        response = await client.get("/api/v3/webhook/secret", headers=auth())
    assert response.status_code == 200
    envelope = response.json()
    assert envelope["code"] == 200 and envelope["message"] == "success"
    assert envelope["data"]["secret"] == sim.webhook_secret
    assert sim.webhook_secret.startswith("whsec_") and len(sim.webhook_secret) > 20


async def test_a_submit_with_a_webhook_gets_a_signed_delivery_that_verifies(
    sim: Simulator, endpoint: Endpoint
) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url, headers=auth()) as client:
        secret = (await client.get("/api/v3/webhook/secret")).json()["data"]["secret"]
        # As WaveSpeed's JavaScript client sends it: the URL appended unencoded.
        submitted = await client.post(
            f"/api/v3/wavespeed-ai/flux-dev?webhook={endpoint.url}",
            json={"prompt": "octopus", "_sim": {"duration_s": 0.3}},
        )
    assert submitted.status_code == 200
    task_id = submitted.json()["data"]["id"]
    done_at = sim.tasks[task_id].done_at
    await wait_until(lambda: len(endpoint.received) == 1, timeout=5)
    (got,) = endpoint.received
    assert got.at >= done_at  # sent once the task finished, not before
    verdict = verify(got.headers, got.body, secret, now=time.time())
    assert isinstance(verdict, Accepted) and verdict.webhook_id == got.headers["webhook-id"]
    assert got.headers["webhook-signature"].startswith("v3,")
    assert got.headers["Content-Type"] == "application/json"
    delivery = parse_delivery(got.body)
    assert isinstance(delivery, Delivery)
    assert (delivery.task_id, delivery.status) == (task_id, "completed")
    assert delivery.outcome.kind is Kind.COMPLETED and delivery.model == "wavespeed-ai/flux-dev"
    data = json.loads(got.body)
    assert data["input"] == {"prompt": "octopus"}  # echoed, as the docs show
    assert data["outputs"] and data["timings"]["inference"] > 0
    # The simulator records an attempt once it has read the answer, after the endpoint saw it.
    await wait_until(lambda: len(sim.webhook_attempts) == 1, timeout=5)
    assert sim.stats()["webhooks"]["sent"] == 1 and sim.webhook_attempts[0].status == 200


async def test_webhook_url_in_the_body_and_failed_tasks(sim: Simulator, endpoint: Endpoint) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url, headers=auth()) as client:
        r = await client.post(
            "/api/v3/m/img",
            json={
                "webhook_url": endpoint.url,
                "_sim": {"duration_s": 0.1, "outcome": "failed", "error": "GPU on fire"},
            },
        )
        assert r.status_code == 200
        bad = await client.post("/api/v3/m/img?webhook=ftp://example.com/x", json={})
        assert bad.status_code == 400 and "webhook" in bad.json()["message"]
    await wait_until(lambda: len(endpoint.received) == 1, timeout=5)
    delivery = parse_delivery(endpoint.received[0].body)
    assert isinstance(delivery, Delivery) and delivery.outcome.kind is Kind.FAILED
    assert delivery.status == "failed" and delivery.outcome.reason == "GPU on fire"


async def test_delay_and_jitter(endpoint: Endpoint) -> None:
    sim = await own_sim(seed=5)
    try:
        sim.set_webhook_faults(delay_s=0.4, jitter_s=0.2)
        ids = await sim_create(
            sim, [{"model": "m", "duration_s": 0.1, "webhook": endpoint.url} for _ in range(8)]
        )
        await wait_until(lambda: len(endpoint.received) == 8, timeout=10)
    finally:
        await sim.stop()
    by_task = {json.loads(r.body)["id"]: r.at for r in endpoint.received}
    lags = [by_task[i] - sim.tasks[i].done_at for i in ids]
    assert all(0.4 <= lag <= 0.6 + 1.0 for lag in lags), lags  # + a loaded machine
    assert max(lags) - min(lags) > 0.02  # jittered, not in lockstep


async def test_loss_means_lost(endpoint: Endpoint) -> None:
    sim = await own_sim(seed=7)
    try:
        sim.set_webhook_faults(loss_rate=1.0)
        await sim_create(sim, [{"model": "m", "duration_s": 0.05, "webhook": endpoint.url}] * 5)
        sim.set_webhook_faults(loss_rate=0.5)
        ids = await sim_create(
            sim, [{"model": "m", "duration_s": 0.05, "webhook": endpoint.url} for _ in range(40)]
        )
        await wait_until(lambda: not sim.webhook_stats()["pending"], timeout=10)
    finally:
        await sim.stop()
    arrived = {json.loads(r.body)["id"] for r in endpoint.received}
    lost = set(sim.webhooks_lost)
    assert len(lost) >= 5 + 10 and len(arrived) >= 10  # 5 certain, then about half of 40
    assert arrived.isdisjoint(lost) and arrived | lost >= set(ids)
    assert sim.webhook_stats()["lost"] == len(lost)


async def test_reordering_lets_later_completions_overtake(endpoint: Endpoint) -> None:
    sim = await own_sim(seed=11)
    try:
        sim.set_webhook_faults(reorder_rate=0.5, reorder_delay_s=0.6)
        items = [
            {"model": "m", "duration_s": 0.05 * (i + 1), "webhook": endpoint.url} for i in range(10)
        ]
        ids = await sim_create(sim, items)
        await wait_until(lambda: len(endpoint.received) == 10, timeout=10)
    finally:
        await sim.stop()
    arrival_order = [json.loads(r.body)["id"] for r in endpoint.received]
    assert sorted(arrival_order) == sorted(ids)
    assert arrival_order != ids  # ids are in completion order


async def test_duplicates_and_bad_signatures_at_the_bridges_receiver() -> None:
    publish = FakePublish()
    metrics = Metrics()
    sim = await own_sim(seed=3)
    server = WebhookServer(
        WebhooksConfig(enabled=True, port=0),
        secret=sim.webhook_secret,
        publish=publish,
        metrics=metrics,
    )
    await server.start()
    url = f"http://127.0.0.1:{server.port}/webhooks/wavespeed"
    try:
        sim.set_webhook_faults(duplicate_rate=1.0)
        dup_ids = await sim_create(
            sim, [{"model": "m", "duration_s": 0.05, "webhook": url} for _ in range(10)]
        )
        await wait_until(lambda: len(sim.webhook_attempts) == 20, timeout=10)
        sim.set_webhook_faults(duplicate_rate=0.0, bad_signature_rate=1.0)
        await sim_create(sim, [{"model": "m", "duration_s": 0.05, "webhook": url}] * 5)
        await wait_until(lambda: len(sim.webhook_attempts) == 25, timeout=10)
    finally:
        await server.stop()
        await sim.stop()
    dups = sim.webhook_attempts[:20]
    assert [a.status for a in dups if a.copy == 0] == [200] * 10
    assert [a.status for a in dups if a.copy == 1] == [200] * 10  # answered as replays
    assert {a.webhook_id for a in dups if a.copy} == {a.webhook_id for a in dups if not a.copy}
    assert sorted(k.decode() for k, _v, _h in publish.calls) == sorted(dup_ids)  # once each
    bad = sim.webhook_attempts[20:]
    assert [a.status for a in bad] == [401] * 5 and all(a.bad_signature for a in bad)
    text = generate_latest(metrics.registry).decode()
    name = "wavespeed_bridge_webhook_deliveries_total"
    assert metric_value(text, name, result="accepted") == 10
    assert metric_value(text, name, result="replay") == 10
    assert metric_value(text, name, result="bad_signature") == 5
    assert sim.webhook_stats()["answers"] == {"200": 20, "401": 5}


async def test_bad_signature_mode_does_not_verify(endpoint: Endpoint) -> None:
    sim = await own_sim(seed=4)
    try:
        sim.set_webhook_faults(bad_signature_rate=1.0)
        await sim_create(sim, [{"model": "m", "duration_s": 0.05, "webhook": endpoint.url}])
        await wait_until(lambda: len(endpoint.received) == 1, timeout=5)
    finally:
        await sim.stop()
    got = endpoint.received[0]
    verdict = verify(got.headers, got.body, sim.webhook_secret, now=time.time())
    assert isinstance(verdict, Rejected) and verdict.reason == "bad_signature"


async def test_faults_over_the_control_endpoint(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        ok = await client.post("/_sim/webhook_faults", json={"loss_rate": 0.25, "delay_s": 2})
        assert ok.status_code == 200
        assert (sim.webhook_faults.loss_rate, sim.webhook_faults.delay_s) == (0.25, 2.0)
        for bad in ({"loss_rate": 2}, {"nope": 1}, {"delay_s": "soon"}, {"jitter_s": -1}):
            assert (await client.post("/_sim/webhook_faults", json=bad)).status_code == 400
        stats = (await client.get("/_sim/stats")).json()
    assert stats["webhooks"] == {
        "sent": 0,
        "lost": 0,
        "duplicates": 0,
        "bad_signature": 0,
        "pending": 0,
        "answers": {},
    }


async def test_an_unreachable_webhook_is_recorded_not_retried() -> None:
    sim = await own_sim(seed=6)
    try:
        from bridge.local.broker import free_port

        dead = f"http://127.0.0.1:{free_port()}/hook"
        await sim_create(sim, [{"model": "m", "duration_s": 0.05, "webhook": dead}])
        await wait_until(lambda: len(sim.webhook_attempts) == 1, timeout=5)
    finally:
        await sim.stop()
    (attempt,) = sim.webhook_attempts
    assert attempt.status is None and attempt.error is not None
