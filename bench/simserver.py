"""The WaveSpeed simulator as a benchmark process, with a few ``/_bench/*`` endpoints.

``python -m bench.simserver --port P`` (the key from ``WAVESPEED_API_KEY``). It is
:class:`bridge.local.simulator.Simulator` unchanged, plus endpoints the benchmark needs and the
simulator lacks:

- ``POST /_bench/tasks`` ``{"model", "durations", "ages", "outcome"}``: create many tasks
  in one call; answers ``{"tasks": [[id, created_at], ...]}`` (``created_at`` exactly as
  the API will report it, so the bridge's schedule can be reconstructed);
- ``GET /_bench/counters``: request and task counts, without the per-task poll table
  that ``/_sim/stats`` builds;
- ``POST /_bench/record`` ``{"on": bool, "clear": bool}``: start or stop recording poll
  times (``clear`` forgets those recorded so far);
- ``GET /_bench/polls``: ``[[id, created_monotonic, [poll_monotonic, ...], finished], ...]``
  for every task polled while recording was on (``finished``: a poll saw it terminal).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import time
from typing import Any

from aiohttp import web

from bridge.core.events import rfc3339
from bridge.local.simulator import Simulator


class BenchSimulator(Simulator):
    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/_bench/tasks", self._bench_tasks)
        app.router.add_get("/_bench/counters", self._bench_counters)
        app.router.add_post("/_bench/record", self._bench_record)
        app.router.add_get("/_bench/polls", self._bench_polls)
        return app

    async def _bench_tasks(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        model = str(body.get("model", "sim/model"))
        outcome = str(body.get("outcome", "completed"))
        durations: list[float] = body["durations"]
        ages: list[float] = body.get("ages") or [0.0] * len(durations)
        out = []
        for duration, age in zip(durations, ages, strict=True):
            task = self.create(
                model,
                task_id="pred_" + secrets.token_hex(12),
                duration_s=float(duration),
                outcome=outcome,
                age_s=float(age),
            )
            out.append([task.id, rfc3339(task.created_wall)])
        return web.json_response({"tasks": out})

    async def _bench_counters(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "requests": self.requests,
                "tasks": len(self.tasks),
                "responses": {str(k): v for k, v in self.responses.items()},
                "monotonic": time.monotonic(),
            }
        )

    async def _bench_record(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.record_poll_times = bool(body.get("on"))
        if body.get("clear"):
            for task in self.tasks.values():
                task.poll_times.clear()
        return web.json_response({"ok": True})

    async def _bench_polls(self, request: web.Request) -> web.StreamResponse:
        rows = [
            [t.id, t.created, t.poll_times, t.first_terminal_poll is not None]
            for t in self.tasks.values()
            if t.poll_times
        ]
        return web.json_response(rows)


async def _serve(port: int, api_key: str | None) -> None:
    sim = BenchSimulator(api_key=api_key, port=port, seed=3)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sim.start()
    print(f"simulator on {sim.base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key-env", default="WAVESPEED_API_KEY")
    args = parser.parse_args()
    asyncio.run(_serve(args.port, os.environ.get(args.api_key_env) or None))


if __name__ == "__main__":
    main()
