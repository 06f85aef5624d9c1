"""The metrics and health HTTP server: ``/metrics``, ``/healthz`` (alive), ``/readyz`` (ready).

``/metrics`` speaks the Prometheus text format, or OpenMetrics (with the histograms'
exemplars: trace ids) to a scraper that asks for it in ``Accept``, as Prometheus does when
exemplar storage is on."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


class HealthServer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], tuple[bool, str]],
        alive: Callable[[], tuple[bool, str]],
    ) -> None:
        self._host, self._port = host, port
        self._registry = registry
        self._ready = ready
        self._alive = alive
        self._runner: web.AppRunner | None = None
        self.port = port

    async def _metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encode(self._registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    @staticmethod
    def _probe(check: Callable[[], tuple[bool, str]]) -> web.Response:
        ok, why = check()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._probe(self._ready)

    async def _healthz(self, request: web.Request) -> web.Response:
        return self._probe(self._alive)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        if self._runner.addresses:  # port 0 asks for a free port: learn which one it got
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
