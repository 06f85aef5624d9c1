"""Phase 2, sustained end to end: ``python -m bridge run`` on core 0 fed ids of tasks that
are done on the first poll, so every poll is a consume, a GET, a produce (acks=all) and a
commit. On the first broker with each transport (a py-spy profile of the first), then on
every other broker with the first transport; then the naive poller on the first broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procs import cpu_shares, rss_bytes, sample_cpu
from bench.throughput import profiles
from bench.throughput.feeding import Feeder, done_on_first_poll, paced, top_up
from bench.throughput.measurement import (
    count_log_events,
    metric_above,
    rates,
    wait_until,
    watch_gauges,
)
from bench.throughput.pollers import BridgeProc, bridge_config, start_naive
from bench.throughput.stack import P, RunningBroker, Stack, end_offsets, say, terminate


async def sustained_all(stack: Stack) -> list[dict[str, Any]]:
    """Every run of the phase, the first broker's first transport first."""
    s = stack.s
    runs = [
        await sustained(stack, stack.broker, s.transport, seconds=s.sustained_seconds, profile=True)
    ]
    for key in s.brokers[1:]:
        other = await stack.start_broker(key)
        try:
            runs.append(
                await sustained(
                    stack, other, s.transport, seconds=s.sustained_seconds, profile=False
                )
            )
        finally:
            stack.note_broker_rss(other)
            other.close()
    for transport in s.compare_transports:
        if transport != s.transport:
            runs.append(
                await sustained(
                    stack, stack.broker, transport, seconds=s.compare_seconds, profile=False
                )
            )
    return runs


async def sustained(
    stack: Stack,
    broker: RunningBroker,
    transport: str,
    *,
    seconds: float,
    profile: bool,
    delivery: str = "at_least_once",
    rate: float | None = None,
    bridge_proc: Callable[[Path, str, dict[str, Any]], BridgeProc] = BridgeProc,
    label: str = "",
) -> dict[str, Any]:
    """One run; ``rate``: feed that many tasks/s instead of keeping a backlog (latency at a
    load the bridge keeps up with, rather than at its limit). ``bridge_proc`` starts the
    bridge (another checkout, another environment); ``label`` tells the run's files apart."""
    s, sim = stack.s, stack.sim
    topics = await stack.topics(broker)
    base = await sim.requests()

    async def polled() -> int:
        return await sim.requests() - base

    name = f"{broker.key}-{transport}-{delivery}-{rate or 'max'}{label}"
    async with Feeder(sim, broker.bootstrap, stack.rng) as feeder:
        if rate is None:
            await feeder.feed(topics.input, done_on_first_poll(20_000))
        config = bridge_config(
            s,
            broker,
            sim.base_url,
            topics,
            interval_s=2.0,
            max_in_flight=10_000,
            transport=transport,
        )
        config["delivery"] = delivery
        bridge = bridge_proc(stack.workdir, f"bridge-sustained-{name}", config)
        feeding = asyncio.create_task(
            top_up(feeder, topics.input, polled, 20_000)
            if rate is None
            else paced(feeder, topics.input, rate)
        )
        try:
            async with stack.background(feeding):
                await bridge.wait_ready()
                await wait_until(
                    lambda: metric_above(bridge, f"{P}_tasks_finished_total", 0), timeout=60
                )
                await asyncio.sleep(s.sustained_warmup_s)
                pids = {"bridge": bridge.pid, **stack.core1_pids(broker)}
                m0, r0, c0 = await bridge.scrape(), await sim.requests(), sample_cpu(pids)
                gauges = await watch_gauges(bridge, seconds)
                m1, r1, c1 = await bridge.scrape(), await sim.requests(), sample_cpu(pids)
                result = rates(m0, m1, r0, r1, c0, c1)
                result["gauges"] = gauges
                result["transport"] = transport
                result["broker"] = broker.key
                result["delivery"] = delivery
                result["offered"] = rate
                result["rss_mb"] = rss_bytes(bridge.pid) / 2**20
                result["broker_rss_mb"] = broker.rss_mb()
                if profile:
                    raw = stack.workdir / f"profile-sustained-{name}.txt"
                    prof = await profiles.record(bridge.pid, raw, s.profile_seconds)
                    if "error" not in prof and result["tasks_per_s"] > 0:
                        # The window's CPU per task, split by the profile's stage shares.
                        cpu = result["cpu"]["bridge"]
                        prof["cpu_us_per_task"] = 1e6 * cpu / result["tasks_per_s"]
                    result["profile"] = prof
        finally:
            await bridge.stop()
    result["log_publish_retries"] = count_log_events(bridge.log_path, "publish failed, retrying")
    say(
        f"  bridge ({transport:<7}, {broker.name}, {delivery})"
        f" {result['polls_per_s']:8,.0f} polls/s "
        f"{result['tasks_per_s']:8,.0f} tasks/s  bridge CPU {result['cpu']['bridge']:.0%}  "
        f"simulator CPU {result['cpu'].get('simulator', 0):.0%}  "
        f"broker CPU {result['cpu'].get('broker', 0):.0%}"
    )
    return result


async def naive_sustained(stack: Stack) -> dict[str, Any]:
    s, sim, broker = stack.s, stack.sim, stack.broker
    topics = await stack.topics()
    base = await sim.requests()

    async def polled() -> int:
        return await sim.requests() - base

    backlog = 300  # about what its pool serves per second: busy, not buried
    async with Feeder(sim, broker.bootstrap, stack.rng) as feeder:
        await feeder.feed(topics.input, done_on_first_poll(backlog))
        proc = start_naive(
            stack.workdir,
            "naive-sustained",
            broker.bootstrap,
            sim.base_url,
            topics,
            1.0,
            s.compare_seconds + 30,
        )
        feeding = asyncio.create_task(top_up(feeder, topics.input, polled, backlog, chunk=250))
        try:
            async with stack.background(feeding):

                async def produced() -> bool:
                    if proc.poll() is not None:
                        raise RuntimeError("naive poller exited early")
                    return await end_offsets(broker.bootstrap, topics.outputs) > 0

                with contextlib.suppress(TimeoutError):  # measure it anyway: it may be stuck
                    await wait_until(produced, timeout=45)
                await asyncio.sleep(s.sustained_warmup_s)
                pids = {"naive": proc.pid, **stack.core1_pids()}
                e0, r0, c0 = (
                    await end_offsets(broker.bootstrap, topics.outputs),
                    await sim.requests(),
                    sample_cpu(pids),
                )
                await asyncio.sleep(s.compare_seconds)
                e1, r1, c1 = (
                    await end_offsets(broker.bootstrap, topics.outputs),
                    await sim.requests(),
                    sample_cpu(pids),
                )
        finally:
            await asyncio.to_thread(terminate, proc)
    dt = c1.wall - c0.wall
    result: dict[str, Any] = {
        "polls_per_s": (r1 - r0) / dt,
        "tasks_per_s": (e1 - e0) / dt,
        "cpu": cpu_shares(c0, c1),
        "broker": broker.key,
    }
    say(
        f"  naive            {result['polls_per_s']:8,.0f} polls/s "
        f"{result['tasks_per_s']:8,.0f} tasks/s  naive CPU {result['cpu']['naive']:.0%}"
    )
    return result
