"""Phase 4, memory: a fresh bridge fed 10,000 then 100,000 tasks that it polls once and
then holds; RSS per in-flight task over the idle bridge's."""

from __future__ import annotations

import asyncio
import time

from bench.procs import rss_bytes
from bench.throughput.feeding import Feeder, Spec
from bench.throughput.pollers import BridgeProc, bridge_config
from bench.throughput.stack import P, Stack, say


async def memory(stack: Stack) -> list[dict[str, float]]:
    s, sim, broker = stack.s, stack.sim, stack.broker
    sizes = sorted(s.memory_sizes)
    topics = await stack.topics()
    hour = 3600.0
    # Fixed policy with an hour's interval: every task is polled once (so it holds the
    # API's answer, as a task in flight does), then waits.
    config = bridge_config(
        s,
        broker,
        sim.base_url,
        topics,
        interval_s=hour,
        max_in_flight=max(sizes) + 1000,
        policy="fixed",
    )
    bridge = BridgeProc(stack.workdir, "bridge-memory", config)
    points: list[dict[str, float]] = []
    async with Feeder(sim, broker.bootstrap, stack.rng) as feeder:
        try:
            await bridge.wait_ready()
            await asyncio.sleep(2.0)
            base_requests = await sim.requests()
            points.append({"in_flight": 0, "rss": rss_bytes(bridge.pid)})
            fed = 0
            for size in sizes:
                t0 = time.monotonic()
                specs = [Spec(m.model, 2 * hour, hour) for m, _, _ in feeder.draw(size - fed)]
                await feeder.feed(topics.input, specs)
                fed = size
                deadline = time.monotonic() + 240
                while True:
                    polled = await sim.requests() - base_requests
                    held = (await bridge.scrape()).sum(f"{P}_tasks_in_flight")
                    if polled >= size and held >= size:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"memory: {polled} polled, {held} held of {size}")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2.0)
                rss = rss_bytes(bridge.pid)
                points.append({"in_flight": size, "rss": rss, "fill_s": time.monotonic() - t0})
                say(f"  memory: {size:>7,} in flight, RSS {rss / 2**20:7.1f} MiB")
        finally:
            await bridge.stop()
    rss0 = points[0]["rss"]
    for p in points[1:]:
        p["per_task"] = (p["rss"] - rss0) / p["in_flight"]
    return points
