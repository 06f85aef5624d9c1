"""Phase 3, 10,000 concurrent: a closed loop keeps ``Settings.concurrent`` tasks of the
model mix in flight while the bridge polls them at a fixed interval (one run per
interval); poll lateness from the simulator's poll times, publish latency, CPU, RSS and a
profile. Then the naive poller on the same load at the first interval."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from bench.procs import cpu_shares, rss_bytes, sample_cpu
from bench.throughput import profiles
from bench.throughput.feeding import Feeder, keep_in_flight
from bench.throughput.measurement import (
    lateness,
    metric_lateness,
    ms,
    rates,
    schedule,
    watch_gauges,
)
from bench.throughput.pollers import BridgeProc, bridge_config, start_naive
from bench.throughput.stack import P, Stack, say, terminate


async def concurrent(stack: Stack, interval: float, *, profile: bool) -> dict[str, Any]:
    s, sim, broker = stack.s, stack.sim, stack.broker
    n = s.concurrent
    topics = await stack.topics()
    config = bridge_config(
        s, broker, sim.base_url, topics, interval_s=interval, max_in_flight=2 * n
    )
    tag = f"{interval:g}s" if s.policy == "fixed" else "adaptive"
    bridge = BridgeProc(stack.workdir, f"bridge-concurrent-{tag}", config)
    finished: Counter[str] = Counter()
    prof: dict[str, Any] | None = None
    async with Feeder(sim, broker.bootstrap, stack.rng) as feeder:
        try:
            await bridge.wait_ready()
            await sim.record(True)
            await feeder.feed(topics.input, feeder.prefill(n, interval))
            loop = asyncio.create_task(keep_in_flight(feeder, broker.bootstrap, topics, finished))
            async with stack.background(loop):
                deadline = time.monotonic() + 60
                while (await bridge.scrape()).sum(f"{P}_tasks_in_flight") < 0.95 * n:
                    if time.monotonic() > deadline:
                        raise TimeoutError("in-flight never reached the target")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(s.concurrent_warmup_s)
                pids = {"bridge": bridge.pid, **stack.core1_pids()}
                m0, r0, c0 = await bridge.scrape(), await sim.requests(), sample_cpu(pids)
                gauges = await watch_gauges(bridge, s.concurrent_seconds)
                m1, r1, c1 = await bridge.scrape(), await sim.requests(), sample_cpu(pids)
                rss = rss_bytes(bridge.pid)
                await sim.record(False)
                stopped = time.monotonic()
                polls = await sim.polls()
                if profile:
                    raw = stack.workdir / f"profile-concurrent-{tag}.txt"
                    prof = await profiles.record(bridge.pid, raw, s.profile_seconds)
        finally:
            await bridge.stop()
    result = rates(m0, m1, r0, r1, c0, c1)
    result["interval_s"] = interval if s.policy == "fixed" else None
    result["broker"] = broker.key
    if prof is not None:
        result["profile"] = prof
    if s.policy == "fixed":  # the schedule is known from the poll times alone
        result["lateness"] = lateness(polls, feeder.fed, interval, c0.wall, c1.wall, stopped)
    result["lateness_metric"] = metric_lateness(m0, m1)
    result["gauges"] = gauges
    result["in_flight_min"] = gauges["tasks_in_flight"]["min"]
    result["in_flight_mean"] = gauges["tasks_in_flight"]["mean"]
    result["offered_polls_per_s"] = n / interval if s.policy == "fixed" else None
    result["rss_mb"] = rss / 2**20
    late = result.get("lateness") or {}
    say(
        f"  bridge, {schedule(result)}: {result['polls_per_s']:,.0f} polls/s, "
        "lateness p50/p99 "
        f"{ms(late.get('p50'))}/{ms(late.get('p99'))}, publish p99 "
        f"{ms(result['publish_latency']['p99'])}, bridge CPU {result['cpu']['bridge']:.0%}"
    )
    return result


async def naive_concurrent(stack: Stack, interval: float) -> dict[str, Any]:
    s, sim, broker = stack.s, stack.sim, stack.broker
    n = s.concurrent
    topics = await stack.topics()
    warmup = max(s.concurrent_warmup_s, 10.0)
    async with Feeder(sim, broker.bootstrap, stack.rng) as feeder:
        await sim.record(True)
        await feeder.feed(topics.input, feeder.prefill(n, interval))
        proc = start_naive(
            stack.workdir,
            "naive-concurrent",
            broker.bootstrap,
            sim.base_url,
            topics,
            interval,
            warmup + s.naive_concurrent_seconds + 30,
        )
        finished: Counter[str] = Counter()
        loop = asyncio.create_task(keep_in_flight(feeder, broker.bootstrap, topics, finished))
        try:
            async with stack.background(loop):
                await asyncio.sleep(warmup)
                pids = {"naive": proc.pid, **stack.core1_pids()}
                r0, c0 = await sim.requests(), sample_cpu(pids)
                await asyncio.sleep(s.naive_concurrent_seconds)
                r1, c1 = await sim.requests(), sample_cpu(pids)
                await sim.record(False)
                stopped = time.monotonic()
                polls = await sim.polls()
        finally:
            await asyncio.to_thread(terminate, proc)
    result: dict[str, Any] = {
        "polls_per_s": (r1 - r0) / (c1.wall - c0.wall),
        "cpu": cpu_shares(c0, c1),
        # Its first poll is due an interval after it consumed the id, which the bench
        # does not see: created_at is used, early by the feed's few milliseconds.
        "lateness": lateness(polls, feeder.fed, interval, c0.wall, c1.wall, stopped),
        "interval_s": interval,
        "broker": broker.key,
    }
    late = result["lateness"]
    say(
        f"  naive every {interval:g} s: {result['polls_per_s']:,.0f} polls/s, lateness p50/p99 "
        f"{ms(late.get('p50'))}/{ms(late.get('p99'))}, CPU {result['cpu']['naive']:.0%}"
    )
    return result
