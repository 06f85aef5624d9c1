"""A faithful WaveSpeed API simulator, served over real HTTP (``wavespeed-bridge simulate-api``).

What it does, as the real API does (``shared/wavespeed-api.md``):

- ``POST /api/v3/{model-id}`` creates a task and answers with the envelope, ``status:
  created`` and ``urls.get``; with ``"enable_sync_mode": true`` it answers once the task
  is finished (or, after ``sync_timeout_s``, with the ``code: 5004`` "Sync mode timed out"
  data the official SDKs recognise);
- ``GET /api/v3/predictions/{id}`` and ``.../{id}/result`` return the task's state;
- ``POST /api/v3/media/uploads`` returns an upload ticket (a ``PUT`` URL on the simulator
  and a ``download_url``), as the official SDK's ``upload()`` expects;
- ``Authorization: Bearer <key>`` is checked (401 without, 403 for a wrong key);
- unknown ids are 404; tasks are ``created`` → ``processing`` → one terminal status:
  ``completed``, ``failed``, or the ``cancelled``, ``timeout`` and ``deleted`` the official
  SDKs also end on (chosen per task with ``outcome``).

Webhooks, as the docs describe them (``shared/wavespeed-api.md``, "Webhooks"): a submit
with ``?webhook=<url>`` (what WaveSpeed's docs and its JavaScript client send; a
``webhook_url`` body field is accepted too) gets one signed POST of the task's ``data``
object (plus its ``input``) when it reaches a terminal status, with ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature: v3,<hex>`` signed by
:func:`bridge.webhook_signature.sign` with the account's secret, which
``GET /api/v3/webhook/secret`` returns. No retries (none are documented): a lost delivery
is lost. :class:`WebhookFaults` adds loss, delay and jitter, duplicates (the same id,
timestamp and signature again), reordering (some held back) and bad signatures.

For tests and benchmarks it also has, per model, a lognormal completion-time
distribution and failure rate; global fault injection (429s with ``Retry-After``, 5xx,
outages that answer 503 or refuse connections, a requests/s limit); per-task hostile
behaviours; and ``/_sim/*`` endpoints to create tasks with known timings and read counts.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import json
import math
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web

from bridge.core.events import rfc3339
from bridge.core.scheduler import TokenBucket
from bridge.core.webhook_signature import signed_headers

BEHAVIOURS = (
    "normal",
    "truncated_json",  # a body cut in half
    "wrong_types",  # status is a number, outputs a string, timings a list
    "unknown_status",  # status "queued_for_gpu", never documented
    "huge_body",  # 50 MB of JSON padding
    "stall",  # headers, then nothing
    "redirect",  # 302 to another host
    "html",  # a proxy's HTML error page with 200
    "html_502",  # a proxy's HTML error page with 502
    "garbage",  # a broken proxy: an invalid status line
    "huge_chunked",  # 50 MB like huge_body, but chunked: no Content-Length to refuse it by
    "trickle",  # a valid body behind 10 kB of padding, one byte every trickle_interval_s
)
# Terminal statuses a task can end in (see shared/wavespeed-api.md).
OUTCOMES = ("completed", "failed", "cancelled", "timeout", "deleted")
# Model routes that are API endpoints, not models.
_NOT_MODELS = ("media/", "predictions/", "webhook/")


@dataclass(frozen=True, slots=True)
class ModelProfile:
    pattern: str
    median_s: float = 3.0
    sigma: float = 0.5  # lognormal shape; larger = heavier tail
    failure_rate: float = 0.0
    queue_s: float = 0.2  # time spent in "created" before "processing"


DEFAULT_PROFILES = (
    ModelProfile("*video*", median_s=120.0, sigma=0.6, failure_rate=0.02, queue_s=1.0),
    ModelProfile("*", median_s=3.0, sigma=0.4, failure_rate=0.02),
)


@dataclass(slots=True)
class SimTask:
    id: str
    model: str
    created_wall: float
    created: float  # monotonic
    duration_s: float
    queue_s: float
    outcome: str  # one of OUTCOMES
    error: str | None
    behaviour: str = "normal"
    polls: int = 0
    first_terminal_poll: float | None = None  # monotonic time a poll first saw it finished
    poll_times: list[float] = field(default_factory=list)
    webhook_url: str | None = None  # where its delivery goes, if the submit named one
    input: dict[str, Any] | None = None  # the submitted body, echoed in the delivery

    @property
    def done_at(self) -> float:
        return self.created + self.duration_s


@dataclass(slots=True)
class Faults:
    rate_429: float = 0.0
    next_429s: int = 0  # the next this many requests get a 429, whoever sends them
    rate_5xx: float = 0.0
    retry_after_s: int = 1
    outage_until: float = 0.0  # monotonic
    outage_mode: str = "503"  # 503 | refuse
    # The account's limit on requests/s, all clients together (0: none); above it a 429
    # with the Retry-After that a token takes to come back.
    requests_per_second: float = 0.0


@dataclass(slots=True)
class WebhookFaults:
    """How deliveries misbehave; each delivery draws its own fate from the simulator's rng."""

    loss_rate: float = 0.0  # never sent
    delay_s: float = 0.0  # after the task finishes
    jitter_s: float = 0.0  # plus uniform(0, jitter_s)
    duplicate_rate: float = 0.0  # sent twice: same id, timestamp, body and signature
    duplicate_gap_s: float = 0.05  # between the two copies
    reorder_rate: float = 0.0  # held back by reorder_delay_s, so later ones overtake it
    reorder_delay_s: float = 1.0
    bad_signature_rate: float = 0.0  # signed with another secret (1.0: every delivery)
    timeout_s: float = 10.0  # how long one POST may take


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """One POST the simulator made (a duplicate is a second attempt with the same id)."""

    task_id: str
    webhook_id: str
    url: str
    sent_at: float  # monotonic
    copy: int  # 0, or 1 for the duplicate
    bad_signature: bool
    status: int | None  # the receiver's answer; None when the request failed
    error: str | None = None


class Simulator:
    def __init__(
        self,
        *,
        api_key: str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        profiles: tuple[ModelProfile, ...] = DEFAULT_PROFILES,
        seed: int | None = None,
        record_poll_times: bool = False,
        webhook_secret: str | None = None,
    ) -> None:
        self.api_key = api_key
        # The account's webhook secret, as GET /api/v3/webhook/secret returns it.
        self.webhook_secret = webhook_secret or "whsec_" + secrets.token_hex(24)
        self.webhook_faults = WebhookFaults()
        self.webhook_attempts: list[WebhookAttempt] = []
        self.webhooks_lost: list[str] = []  # task ids whose delivery was dropped
        self._webhook_session: aiohttp.ClientSession | None = None
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        self.host = host
        self.port = port
        self.profiles = profiles
        self.rng = random.Random(seed)
        self.tasks: dict[str, SimTask] = {}
        self.faults = Faults()
        self.requests = 0
        self.responses: dict[int, int] = {}
        # Requests per wall-clock second, and the 429s among them: what the account sees.
        self.per_second: collections.Counter[int] = collections.Counter()
        self.per_tenth: collections.Counter[int] = collections.Counter()  # sliding windows
        self.limited_per_second: collections.Counter[int] = collections.Counter()
        self.record_poll_times = record_poll_times
        # Where "redirect" points: another host, which must never see a request.
        self.redirect_base = "http://169.254.169.254"
        # Bytes of each finished "huge_body" response written before the client went away.
        self.huge_body_writes: list[int] = []
        self.trickle_interval_s = 0.2
        # A sync-mode submit waits at most this long for its task, then says it timed out.
        self.sync_timeout_s = 60.0
        self.uploads: dict[str, bytes] = {}  # upload token -> content PUT there
        self._limiter: TokenBucket | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._restart: asyncio.TimerHandle | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1_048_576)
        app.router.add_post("/_sim/tasks", self._sim_create)
        app.router.add_post("/_sim/faults", self._sim_faults)
        app.router.add_post("/_sim/webhook_faults", self._sim_webhook_faults)
        app.router.add_get("/_sim/stats", self._sim_stats)
        app.router.add_put("/_sim/uploads/{token}", self._sim_upload_put)
        app.router.add_get("/_sim/uploads/{token}/{name}", self._sim_upload_get)
        app.router.add_get("/api/v3/predictions/{id}", self._get)
        app.router.add_get("/api/v3/predictions/{id}/result", self._get)
        app.router.add_post("/api/v3/media/uploads", self._upload_ticket)
        app.router.add_get("/api/v3/webhook/secret", self._webhook_secret)
        app.router.add_post("/api/v3/{model:.+}", self._submit)  # last: it matches any path
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
        for task in list(self._webhook_tasks):
            task.cancel()
        if self._webhook_tasks:
            await asyncio.gather(*self._webhook_tasks, return_exceptions=True)
        if self._webhook_session is not None:
            await self._webhook_session.close()
            self._webhook_session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- tasks -------------------------------------------------------------------------

    def profile(self, model: str) -> ModelProfile:
        for p in self.profiles:
            if fnmatch.fnmatchcase(model, p.pattern):
                return p
        return DEFAULT_PROFILES[-1]

    def create(
        self,
        model: str,
        *,
        task_id: str | None = None,
        duration_s: float | None = None,
        outcome: str | None = None,
        error: str | None = None,
        behaviour: str = "normal",
        age_s: float = 0.0,
        webhook_url: str | None = None,
        input: dict[str, Any] | None = None,
    ) -> SimTask:
        """A new task; with ``webhook_url`` its delivery is scheduled (needs a running loop)."""
        prof = self.profile(model)
        if duration_s is None:
            duration_s = prof.median_s * math.exp(self.rng.gauss(0.0, prof.sigma))
        if outcome is None:
            outcome = "failed" if self.rng.random() < prof.failure_rate else "completed"
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; one of {', '.join(OUTCOMES)}")
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        if webhook_url is not None and not _http_url(webhook_url):
            raise ValueError("webhook must be an http(s) URL")
        now, wall = time.monotonic(), time.time()
        task = SimTask(
            id=task_id or secrets.token_hex(16),
            model=model,
            created_wall=wall - age_s,
            created=now - age_s,
            duration_s=max(0.0, duration_s),
            queue_s=min(prof.queue_s, duration_s / 4),
            outcome=outcome,
            error=error
            or ("simulated failure: GPU out of memory" if outcome == "failed" else None),
            behaviour=behaviour,
            webhook_url=webhook_url,
            input=input,
        )
        self.tasks[task.id] = task
        if webhook_url is not None:
            self._schedule_webhook(task)
        return task

    def view(self, task: SimTask, now: float) -> dict[str, Any]:
        elapsed = now - task.created
        data: dict[str, Any] = {
            "id": task.id,
            "model": task.model,
            "outputs": [],
            "urls": {"get": f"{self.base_url}/api/v3/predictions/{task.id}/result"},
            "has_nsfw_contents": [],
            "created_at": rfc3339(task.created_wall),
        }
        if elapsed < task.queue_s:
            data["status"] = "created"
        elif elapsed < task.duration_s:
            data["status"] = "processing"
        elif task.outcome != "completed":
            data["status"] = task.outcome
            if task.error is not None:
                data["error"] = task.error
        else:
            data["status"] = "completed"
            data["outputs"] = [f"https://cdn.example.invalid/generated/{task.id}.png"]
            data["has_nsfw_contents"] = [False]
            data["timings"] = {"inference": int((task.duration_s - task.queue_s) * 1000)}
        return data

    # --- HTTP --------------------------------------------------------------------------

    @staticmethod
    def _envelope(code: int, message: str, data: Any = None) -> web.Response:
        body = {"code": code, "message": message, "data": data}
        return web.Response(
            status=code, body=json.dumps(body).encode(), content_type="application/json"
        )

    def _gate(self, request: web.Request) -> web.Response | None:
        """Auth, outages, limits and injected faults, in the order a real edge applies them."""
        self.requests += 1
        wall = time.time()
        second = int(wall)
        self.per_second[second] += 1
        self.per_tenth[int(wall * 10)] += 1
        now = time.monotonic()
        if now < self.faults.outage_until:
            return self._envelope(503, "service unavailable (simulated outage)")
        if self.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return self._envelope(401, "missing API key")
            if not secrets.compare_digest(auth[7:].encode(), self.api_key.encode()):
                return self._envelope(403, "invalid API key")
        if self._limiter is not None:
            if self._limiter.available(now) < 1:  # the account's limit, whoever asks
                self.limited_per_second[second] += 1
                resp = self._envelope(429, "too many requests")
                wait = max(1, math.ceil(self._limiter.time_until(1, now)))
                resp.headers["Retry-After"] = str(wait)
                return resp
            self._limiter.take(1, now)
        f = self.faults
        if f.next_429s > 0:
            f.next_429s -= 1
            self.limited_per_second[second] += 1
            resp = self._envelope(429, "too many requests")
            resp.headers["Retry-After"] = str(f.retry_after_s)
            return resp
        if f.rate_429 and self.rng.random() < f.rate_429:
            resp = self._envelope(429, "too many requests")
            resp.headers["Retry-After"] = str(f.retry_after_s)
            return resp
        if f.rate_5xx and self.rng.random() < f.rate_5xx:
            return self._envelope(self.rng.choice((500, 502, 503)), "internal error")
        return None

    def _count(self, response: web.StreamResponse) -> web.StreamResponse:
        self.responses[response.status] = self.responses.get(response.status, 0) + 1
        return response

    async def _get(self, request: web.Request) -> web.StreamResponse:
        refused = self._gate(request)
        if refused is not None:
            return self._count(refused)
        task = self.tasks.get(request.match_info["id"])
        if task is None:
            return self._count(self._envelope(404, "prediction not found"))
        now = time.monotonic()
        task.polls += 1
        if self.record_poll_times:
            task.poll_times.append(now)
        data = self.view(task, now)
        if data["status"] in OUTCOMES and task.first_terminal_poll is None:
            task.first_terminal_poll = now
        if task.behaviour != "normal":
            return self._count(await self._hostile(request, task, data))
        return self._count(self._envelope(200, "success", data))

    async def _hostile(
        self, request: web.Request, task: SimTask, data: dict[str, Any]
    ) -> web.StreamResponse:
        b = task.behaviour
        if b == "truncated_json":
            body = json.dumps({"code": 200, "message": "success", "data": data}).encode()
            return web.Response(body=body[: len(body) // 2], content_type="application/json")
        if b == "wrong_types":
            bad = {"id": 42, "status": 7, "outputs": "x", "timings": [1], "created_at": True}
            return self._envelope(200, "success", bad)
        if b == "unknown_status":
            return self._envelope(200, "success", {**data, "status": "queued_for_gpu"})
        if b == "html":
            return web.Response(
                body=b"<html><body>Bad gateway</body></html>", content_type="text/html"
            )
        if b == "html_502":
            return web.Response(
                status=502,
                body=b"<html><body>502 Bad gateway</body></html>",
                content_type="text/html",
            )
        if b == "redirect":
            raise web.HTTPFound(f"{self.redirect_base}/api/v3/predictions/{task.id}")
        if b == "garbage":
            if request.transport is not None:
                request.transport.write(b"HTTP/1.1 2x0 proxy error\r\n\r\n")
                request.transport.close()
            return web.Response()  # never reaches the client: the connection is gone
        if b == "trickle":
            return await self._trickle(request, data)
        if b in ("huge_body", "huge_chunked"):
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            if b == "huge_body":
                resp.content_length = 50 * 1024 * 1024
            else:
                resp.enable_chunked_encoding()
            await resp.prepare(request)
            chunk = b" " * 65536
            written = 0
            try:
                for _ in range(50 * 16):
                    await resp.write(chunk)
                    written += len(chunk)
            except (ConnectionError, RuntimeError):
                pass  # the client stopped reading, as it should
            finally:
                self.huge_body_writes.append(written)
            return resp
        # stall: headers, then silence until the client gives up (or an hour passes)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        for _ in range(36_000):
            if request.transport is None or request.transport.is_closing():
                break  # gone: do not hold the server's shutdown for the rest of the hour
            await asyncio.sleep(0.1)
        return resp

    async def _trickle(self, request: web.Request, data: dict[str, Any]) -> web.StreamResponse:
        """Every byte arrives within any read timeout; the whole body takes half an hour."""
        body = (
            b" " * 10_000 + json.dumps({"code": 200, "message": "success", "data": data}).encode()
        )
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        try:
            for i in range(len(body)):
                if request.transport is None or request.transport.is_closing():
                    break
                await resp.write(body[i : i + 1])
                await asyncio.sleep(self.trickle_interval_s)
        except (ConnectionError, RuntimeError):
            pass  # the client gave up, as it should
        return resp

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        refused = self._gate(request)
        if refused is not None:
            return self._count(refused)
        model = request.match_info["model"]
        if model.startswith(_NOT_MODELS):
            return self._count(self._envelope(404, f"no such endpoint: /api/v3/{model}"))
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return self._count(self._envelope(400, "body must be JSON"))
        if not isinstance(body, dict):
            return self._count(self._envelope(400, "body must be a JSON object"))
        raw = body.get("_sim")
        sim: dict[str, Any] = raw if isinstance(raw, dict) else {}
        webhook = request.query.get("webhook") or body.get("webhook_url")
        if webhook is not None:
            sim = {**sim, "webhook": webhook}
        model_input = {k: v for k, v in body.items() if k != "_sim"}
        try:
            task = self._create_from(model, sim, model_input)
        except (ValueError, TypeError) as exc:
            return self._count(self._envelope(400, str(exc)))
        if body.get("enable_sync_mode") is True:
            return self._count(self._envelope(200, "success", await self._sync_result(task)))
        return self._count(self._envelope(200, "success", self.view(task, time.monotonic())))

    async def _sync_result(self, task: SimTask) -> dict[str, Any]:
        """Sync mode: the task's data once it is finished, or the sync-timeout answer."""
        until = time.monotonic() + self.sync_timeout_s
        while True:
            now = time.monotonic()
            data = self.view(task, now)
            if data["status"] in OUTCOMES:
                return data
            if now >= until:
                return {
                    **data,
                    "status": "processing",
                    "code": 5004,
                    "error": "Sync mode timed out; the task is still running",
                }
            await asyncio.sleep(min(0.05, max(0.0, until - now)))

    async def _upload_ticket(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/v3/media/uploads``: where to PUT the file, and its download URL."""
        refused = self._gate(request)
        if refused is not None:
            return self._count(refused)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        name = body.get("filename") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name or "/" in name:
            return self._count(self._envelope(400, "'filename' must be a file name"))
        token = secrets.token_hex(16)
        content_type = body.get("content_type") if isinstance(body, dict) else None
        put_headers = {"Content-Type": content_type} if isinstance(content_type, str) else {}
        ticket = {
            "upload": {
                "method": "PUT",
                "url": f"{self.base_url}/_sim/uploads/{token}",
                "headers": put_headers,
            },
            "download_url": f"{self.base_url}/_sim/uploads/{token}/{quote(name)}",
        }
        self.uploads[token] = b""
        return self._count(self._envelope(200, "success", ticket))

    async def _sim_upload_put(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        if token not in self.uploads:
            return web.Response(status=403, text="no such upload ticket")
        self.uploads[token] = await request.read()
        return web.Response(status=200)

    async def _sim_upload_get(self, request: web.Request) -> web.StreamResponse:
        content = self.uploads.get(request.match_info["token"])
        if content is None:
            return web.Response(status=404)
        return web.Response(body=content)

    def _create_from(
        self, model: str, sim: dict[str, Any], model_input: dict[str, Any] | None = None
    ) -> SimTask:
        duration = sim.get("duration_s")
        webhook = sim.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            raise ValueError("webhook must be an http(s) URL")
        return self.create(
            model,
            task_id=sim.get("id"),
            duration_s=float(duration) if duration is not None else None,
            outcome=sim.get("outcome"),
            error=sim.get("error"),
            behaviour=sim.get("behaviour", "normal"),
            age_s=float(sim.get("age_s", 0.0)),
            webhook_url=webhook,
            input=model_input,
        )

    async def _sim_create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        items = body if isinstance(body, list) else [body]
        created = []
        try:
            for item in items:
                created.append(self._create_from(item.get("model", "sim/model"), item).id)
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ids": created})

    async def _sim_faults(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.set_faults(**body)
        return web.json_response({"ok": True})

    def set_faults(
        self,
        *,
        rate_429: float | None = None,
        next_429s: int | None = None,
        rate_5xx: float | None = None,
        retry_after_s: int | None = None,
        outage_s: float | None = None,
        outage_mode: str | None = None,
        requests_per_second: float | None = None,
    ) -> None:
        f = self.faults
        if rate_429 is not None:
            f.rate_429 = rate_429
        if next_429s is not None:
            f.next_429s = next_429s
        if rate_5xx is not None:
            f.rate_5xx = rate_5xx
        if retry_after_s is not None:
            f.retry_after_s = retry_after_s
        if requests_per_second is not None:
            f.requests_per_second = requests_per_second
            self._limiter = (
                TokenBucket(requests_per_second, max(1, requests_per_second), time.monotonic())
                if requests_per_second > 0
                else None
            )
        if outage_s is not None:
            mode = outage_mode or "503"
            if mode == "refuse":
                asyncio.get_running_loop().create_task(self._refuse_for(outage_s))
            else:
                f.outage_mode = mode
                f.outage_until = time.monotonic() + outage_s

    async def _refuse_for(self, seconds: float) -> None:
        """Close the listening socket so connections are refused, then listen again."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server if self._runner is not None else None
        if server is not None:  # kept-alive connections must break too
            for handler in server.connections:
                handler.force_close()
                if handler.transport is not None:
                    handler.transport.close()
        await asyncio.sleep(seconds)
        if self._runner is not None:
            await self._listen()

    # --- webhooks ------------------------------------------------------------------------

    async def _webhook_secret(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v3/webhook/secret``. The response shape is not documented: the secret
        is given as ``data.secret`` in the usual envelope."""
        refused = self._gate(request)
        if refused is not None:
            return self._count(refused)
        return self._count(self._envelope(200, "success", {"secret": self.webhook_secret}))

    async def _sim_webhook_faults(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        try:
            self.set_webhook_faults(**body)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    def set_webhook_faults(self, **changes: float) -> None:
        """Change some of :class:`WebhookFaults` (``loss_rate=0.1``, ``delay_s=0.5``, ...)."""
        names = set(WebhookFaults.__dataclass_fields__)
        for name, value in changes.items():
            if name not in names:
                raise ValueError(f"unknown webhook fault {name!r}; one of {sorted(names)}")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
            if name.endswith("_rate") and value > 1:
                raise ValueError(f"{name} must be in [0, 1]")
            setattr(self.webhook_faults, name, float(value))

    def _schedule_webhook(self, task: SimTask) -> None:
        """Draw the delivery's fate now (seeded rng: reproducible), send it when due."""
        f = self.webhook_faults
        if self.rng.random() < f.loss_rate:
            self.webhooks_lost.append(task.id)
            return
        delay = max(0.0, task.done_at - time.monotonic()) + f.delay_s
        delay += self.rng.uniform(0.0, f.jitter_s) if f.jitter_s else 0.0
        if self.rng.random() < f.reorder_rate:
            delay += f.reorder_delay_s
        copies = 2 if self.rng.random() < f.duplicate_rate else 1
        bad = self.rng.random() < f.bad_signature_rate
        job = asyncio.get_running_loop().create_task(self._deliver(task, delay, copies, bad))
        self._webhook_tasks.add(job)
        job.add_done_callback(self._webhook_tasks.discard)

    async def _deliver(self, task: SimTask, delay: float, copies: int, bad: bool) -> None:
        await asyncio.sleep(delay)
        assert task.webhook_url is not None
        data = self.view(task, max(time.monotonic(), task.done_at))
        body = json.dumps({**data, "input": task.input or {}}).encode()
        webhook_id = secrets.token_hex(12)
        secret = "whsec_not-the-account-secret" if bad else self.webhook_secret
        headers = signed_headers(secret, webhook_id, int(time.time()), body)
        headers["Content-Type"] = "application/json"
        if self._webhook_session is None:
            self._webhook_session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.webhook_faults.timeout_s)
        for copy in range(copies):
            if copy:
                await asyncio.sleep(self.webhook_faults.duplicate_gap_s)
            sent_at = time.monotonic()
            status: int | None = None
            error: str | None = None
            try:
                async with self._webhook_session.post(
                    task.webhook_url, data=body, headers=headers, timeout=timeout
                ) as response:
                    status = response.status
                    await response.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = type(exc).__name__
            self.webhook_attempts.append(
                WebhookAttempt(
                    task.id, webhook_id, task.webhook_url, sent_at, copy, bad, status, error
                )
            )

    def webhook_stats(self) -> dict[str, Any]:
        answers: dict[str, int] = {}
        for a in self.webhook_attempts:
            key = str(a.status) if a.status is not None else "error"
            answers[key] = answers.get(key, 0) + 1
        return {
            "sent": len(self.webhook_attempts),
            "lost": len(self.webhooks_lost),
            "duplicates": sum(1 for a in self.webhook_attempts if a.copy),
            "bad_signature": sum(1 for a in self.webhook_attempts if a.bad_signature),
            "pending": len(self._webhook_tasks),
            "answers": answers,
        }

    async def _sim_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
            "limited_per_second": {str(k): v for k, v in sorted(self.limited_per_second.items())},
            "tasks": len(self.tasks),
            "polls": {t.id: t.polls for t in self.tasks.values()},
            "webhooks": self.webhook_stats(),
        }


def _http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
