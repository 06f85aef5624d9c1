"""What a phase reads off the bridge and the simulator: rates and CPU over a window,
histogram quantiles, poll lateness reconstructed from the simulator's poll times, and the
bridge's gauges over time. Also the few number formats the progress lines and the report
share."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.procs import (
    CpuSample,
    Scrape,
    cpu_shares,
    histogram_bucket,
    histogram_count,
    histogram_quantile,
    histogram_share_within,
)
from bench.throughput.feeding import Fed
from bench.throughput.pollers import BridgeProc
from bench.throughput.stack import P

GAUGES = (
    "tasks_in_flight",
    "polls_due",
    "api_requests_in_flight",
    "events_pending",
    "consumer_paused",
)


async def watch_gauges(bridge: BridgeProc, seconds: float) -> dict[str, dict[str, float]]:
    """Min, mean and max of the bridge's gauges, scraped every 2 s for ``seconds``.

    Not faster: rendering ``/metrics`` costs the bridge CPU (Prometheus scrapes every 15 s
    or more).
    """
    seen: dict[str, list[float]] = {g: [] for g in GAUGES}
    end = time.monotonic() + seconds
    while True:
        m = await bridge.scrape()
        for g in GAUGES:
            seen[g].append(m.sum(f"{P}_{g}"))
        left = end - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(2.0, left))
    return {
        g: {"min": min(v), "mean": sum(v) / len(v), "max": max(v)} for g, v in seen.items() if v
    }


def count_log_events(path: Path, event: str) -> int:
    """Lines of the bridge's JSON log with this ``event``, over the whole run."""
    needle = json.dumps(event)
    with path.open(encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if f'"event": {needle}' in line)


async def wait_until(check: Callable[[], Awaitable[bool]], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.2)


async def metric_above(bridge: BridgeProc, name: str, value: float) -> bool:
    return (await bridge.scrape()).sum(name) > value


def rates(m0: Scrape, m1: Scrape, r0: int, r1: int, c0: CpuSample, c1: CpuSample) -> dict[str, Any]:
    """Polls (simulator), tasks and publish latency (bridge) and CPU between two samples."""
    dt = c1.wall - c0.wall
    pub0 = m0.buckets(f"{P}_publish_latency_seconds")
    pub1 = m1.buckets(f"{P}_publish_latency_seconds")
    api0 = m0.buckets(f"{P}_api_request_duration_seconds")
    api1 = m1.buckets(f"{P}_api_request_duration_seconds")
    finished = m1.sum(f"{P}_tasks_finished_total") - m0.sum(f"{P}_tasks_finished_total")
    failures = m1.sum(f"{P}_publish_failures_total") - m0.sum(f"{P}_publish_failures_total")
    return {
        "seconds": dt,
        "publish_failures_per_s": failures / dt,
        "polls_per_s": (r1 - r0) / dt,
        "bridge_requests_per_s": histogram_count(api0, api1) / dt,
        "tasks_per_s": finished / dt,
        "cpu": cpu_shares(c0, c1),
        "publish_latency": {
            "p50": histogram_quantile(0.5, pub0, pub1),
            "p99": histogram_quantile(0.99, pub0, pub1),
            "p99_bucket": histogram_bucket(0.99, pub0, pub1),
            "within_50ms": histogram_share_within(0.05, pub0, pub1),
            "count": histogram_count(pub0, pub1),
        },
        "api_request_duration": {
            "p50": histogram_quantile(0.5, api0, api1),
            "p99": histogram_quantile(0.99, api0, api1),
        },
    }


def metric_lateness(m0: Scrape, m1: Scrape) -> dict[str, Any] | None:
    """The bridge's own poll-lateness histogram, once it exports one."""
    name = f"{P}_poll_lateness_seconds"
    b0, b1 = m0.buckets(name), m1.buckets(name)
    if not b1:
        return None
    return {
        "p50": histogram_quantile(0.5, b0, b1),
        "p99": histogram_quantile(0.99, b0, b1),
        "count": histogram_count(b0, b1),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def lateness(
    polls: dict[str, tuple[float, list[float], bool]],
    fed: dict[str, Fed],
    interval: float,
    t0: float,
    t1: float,
    stopped: float,
) -> dict[str, Any]:
    """Actual poll time minus scheduled time, for the polls of the window ``[t0, t1]``.

    Fixed policy without jitter: the first poll is due one interval after the task's
    ``created_at``, every later one an interval after the previous poll. Poll times are the
    simulator's, so they include the request's trip (sub-millisecond on loopback). The
    window's polls: those scheduled up to ``t1`` and made from ``t0`` on, and those
    scheduled up to ``t1`` and still not made when recording ``stopped``, which count with
    the lateness they had by then (a lower bound): a poller that falls behind cannot hide.
    Seconds in ``series`` are by scheduled time, clamped to the window.
    """
    made: list[float] = []
    firsts: list[float] = []
    overdue: list[float] = []
    by_second: dict[int, list[float]] = {}
    for task_id, f in fed.items():
        _, times, finished = polls.get(task_id, (0.0, [], False))
        due = f.created_monotonic + interval  # what the bridge schedules from
        for i, t in enumerate(times):
            if due <= t1 and t >= t0:
                (firsts if i == 0 else made).append(t - due)
                by_second.setdefault(max(0, int(due - t0)), []).append(t - due)
            due = t + interval
        if not finished and due <= t1:
            overdue.append(stopped - due)
            by_second.setdefault(max(0, int(due - t0)), []).append(stopped - due)
    every = made + firsts + overdue
    series = [
        (sec, len(v), percentile(v, 0.5), percentile(v, 0.99), max(v))
        for sec, v in sorted(by_second.items())
    ]
    return {
        "count": len(every),
        "overdue": len(overdue),
        "p50": percentile(every, 0.5),
        "p99": percentile(every, 0.99),
        "max": max(every) if every else math.nan,
        "later_p99": percentile(made, 0.99),
        "first_p99": percentile(firsts, 0.99),
        "series": series,  # per second of due time: count, p50, p99, max
        "sample": random.Random(0).sample(every, min(len(every), 20_000)),
    }


# --- shared formats -----------------------------------------------------------------------


def e2e(r: dict[str, Any]) -> float:
    """End-to-end rate when every poll completes its task: a poll counts once acknowledged."""
    return float(min(r["polls_per_s"], r["tasks_per_s"]))


def ms(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "> 10 s"
    return f"{v * 1000:,.1f} ms"


def schedule(c: dict[str, Any]) -> str:
    interval = c.get("interval_s")
    return f"fixed every {interval:g} s" if interval else "adaptive"


def other_work(cpu: dict[str, float], poller: float | None = None) -> float | None:
    """Share of a core busy with work other than the named processes in one window: both
    cores' busy time minus every named process's share (``poller``: one not in ``cpu``).

    A few percent is the kernel's loopback work; more is another process on the machine.
    """
    cores = [v for k, v in cpu.items() if k.startswith("cpu") and k[3:].isdigit()]
    if not cores:
        return None
    named = sum(v for k, v in cpu.items() if not (k.startswith("cpu") and k[3:].isdigit()))
    return max(0.0, sum(cores) - named - (poller or 0.0))
