"""The markdown report (``bench/results/throughput.md``) from a run's results."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.throughput.measurement import e2e, ms, schedule
from bench.throughput.stack import BRIDGE_CORE, SIM_CORE


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _cpu(result: dict[str, Any], key: str) -> str:
    return _pct(result.get("cpu", {}).get(key))


def report(results: dict[str, Any], workdir: Path, elapsed: float, command: str) -> str:
    s = results["settings"]
    lines: list[str] = []
    add = lines.append
    add("# Throughput: one core, 10,000 concurrent tasks (issue 6)")
    add("")
    add(
        f"Produced by `{command}` in {elapsed / 60:.1f} min on {os.cpu_count()} cores "
        f"({platform.machine()}), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Pollers under test run pinned to core "
        f"{BRIDGE_CORE} (`taskset`); the simulator, the Tansu broker and the bench's feeder "
        f"share core {SIM_CORE}. Policy `{s['policy']}` (jitter 0), `api.transport: "
        f"{s['transport']}`, `api.max_concurrent_requests: {s['concurrency']}`, production "
        "logging (JSON, INFO). Working files: see Method."
    )
    add("")
    ceil = results.get("ceilings", {})
    sus = results.get("sustained", {})
    main = sus.get(s["transport"], {})
    nv = results.get("naive_sustained")
    cons: list[dict[str, Any]] = results.get("concurrent", [])
    ncon = results.get("naive_concurrent")
    mem = results.get("memory", [])
    bare = ceil.get("aiohttp", {}).get("rps")

    add("## Targets")
    add("")
    add("| target | measured | met |")
    add("|---|---|---|")
    if main:
        rate = e2e(main)
        ratio = f" = {rate / bare:.1%} of the bare aiohttp loop" if bare else ""
        add(
            "| ≥ 1,000 polls/s sustained end to end, one core (every poll completes its task: "
            f"the rate is tasks acknowledged per second) | {rate:,.0f}/s{ratio} "
            f"({main['polls_per_s']:,.0f} polls/s, {main['tasks_per_s']:,.0f} tasks/s) | "
            f"{_met(1000, rate)} |"
        )
    if cons:
        c = cons[0]
        late = c.get("lateness") or c.get("lateness_metric") or {}
        add(
            f"| {s['concurrent']:,} concurrent, p99 poll lateness < 250 ms "
            f"({schedule(c)}) | {ms(late.get('p99'))} | {_met(late.get('p99'), 0.25)} |"
        )
        pub = c["publish_latency"]
        add(
            f"| publish latency p99 < 50 ms at that load | {ms(pub['p99'])}"
            f"{_bucket_note(pub)} | {_met_publish(pub)} |"
        )
    big = [p for p in mem if p["in_flight"] >= 100_000]
    if big:
        add(
            f"| < 2 KB RSS per in-flight task at {big[-1]['in_flight']:,} | "
            f"{big[-1]['per_task']:,.0f} B | {_met(big[-1]['per_task'], 2048)} |"
        )
    add("")

    add("## Throughput and CPU")
    add("")
    add(
        "| measurement | poller (core 0) | rate | poller CPU | simulator CPU | broker CPU "
        "| bench CPU | core 0 / core 1 busy |"
    )
    add("|---|---|---|---|---|---|---|---|")
    names = {
        "aiohttp": "aiohttp `ClientSession`",
        "httpx-aiohttp": "httpx over httpx-aiohttp",
        "bridge-api": "the bridge's `ApiClient` (aiohttp session, size cap, `interpret`)",
        "httpx": "httpx, default transport (httpcore)",
        "bridge-api-httpx": "the bridge's `ApiClient`, httpx default transport",
    }
    for client, r in ceil.items():
        c1 = r["core1"]
        add(
            f"| bare polling loop, {s['concurrency']} connections | {names.get(client, client)} "
            f"| {r['rps']:,.0f} req/s, {_us(r['cpu_share'], r['rps'])} | "
            f"{_pct(r['cpu_share'])} | {_pct(c1.get('simulator'))} "
            f"| {_pct(c1.get('broker'))} | {_pct(c1.get('bench'))} | "
            f"{_pct(c1.get('cpu0'))} / {_pct(c1.get('cpu1'))} |"
        )
    for transport, r in sus.items():
        ratio = f" ({e2e(r) / bare:.1%} of bare aiohttp)" if bare else ""
        retries = r.get("publish_failures_per_s")
        note = f"; {retries:,.0f} publish retries/s" if retries else ""
        add(
            f"| sustained end to end, done on 1st poll | bridge, `transport: {transport}` | "
            f"{r['polls_per_s']:,.0f} polls/s, {r['tasks_per_s']:,.0f} tasks/s{ratio}, "
            f"{_us(r['cpu'].get('bridge', 0.0), e2e(r))}{note} | " + _cpu_cells(r, "bridge")
        )
    if nv:
        ratio = f" ({e2e(nv) / bare:.1%} of bare aiohttp)" if bare else ""
        add(
            f"| sustained end to end, done on 1st poll | naive: coroutine per task, sleep(1), "
            f"default httpx | {nv['polls_per_s']:,.0f} polls/s, {nv['tasks_per_s']:,.0f} "
            f"tasks/s{ratio} | " + _cpu_cells(nv, "naive")
        )
    for c in cons:
        offered = c.get("offered_polls_per_s")
        add(
            f"| {s['concurrent']:,} concurrent, {schedule(c)} | bridge | "
            f"{c['polls_per_s']:,.0f} polls/s (offered "
            f"{'n/a' if offered is None else f'{offered:,.0f}'}), {c['tasks_per_s']:,.0f} "
            "tasks/s | " + _cpu_cells(c, "bridge")
        )
    if ncon:
        add(
            f"| {s['concurrent']:,} concurrent, every {ncon['interval_s']:g} s | naive (sleeps "
            f"{ncon['interval_s']:g} s) | {ncon['polls_per_s']:,.0f} polls/s | "
            + _cpu_cells(ncon, "naive")
        )
    add("")

    if cons or ncon:
        add(f"## {s['concurrent']:,} tasks in flight: lateness and publish latency")
        add("")
        add(
            "| poller, schedule | tasks in flight (mean) | poll lateness p50 / p99 | "
            "p99 first polls / later polls | polls due in window / not made by its end | "
            "publish latency p50 / p99 | poller CPU | RSS |"
        )
        add("|---|---|---|---|---|---|---|---|")
        rows = [("bridge", c) for c in cons] + ([("naive", ncon)] if ncon else [])
        for who, c in rows:
            late = c.get("lateness") or c.get("lateness_metric") or {}
            pub = c.get("publish_latency")
            pub_text = f"{ms(pub['p50'])} / {ms(pub['p99'])}" if pub else "n/a"
            flight = (
                f"{c['in_flight_mean']:,.0f}"
                if "in_flight_mean" in c
                else "~" + str(s["concurrent"])
            )
            rss = f"{c['rss_mb']:,.0f} MiB" if "rss_mb" in c else "n/a"
            add(
                f"| {who}, {schedule(c)} | {flight} | {ms(late.get('p50'))} / "
                f"{ms(late.get('p99'))} | {ms(late.get('first_p99'))} / "
                f"{ms(late.get('later_p99'))} | {late.get('count', 0):,} / "
                f"{late.get('overdue', 0):,} | {pub_text} | "
                f"{_pct(c['cpu'].get(who))} | {rss} |"
            )
        add("")
    if main:
        pub = main["publish_latency"]
        g = main.get("gauges", {})
        retries = main.get("log_publish_retries")
        add(
            f"Sustained load (`transport: {s['transport']}`), for reference: publish latency "
            f"p50 / p99 {ms(pub['p50'])} / {ms(pub['p99'])}; events produced and not yet "
            f"acknowledged (mean) {g.get('events_pending', {}).get('mean', math.nan):,.0f}; "
            f"requests in flight (mean) "
            f"{g.get('api_requests_in_flight', {}).get('mean', math.nan):.0f} of "
            f"{s['concurrency']}; polls due (mean) "
            f"{g.get('polls_due', {}).get('mean', math.nan):,.0f}"
            + (
                f'; "publish failed, retrying" (KafkaTimeoutError) logged {retries:,} times '
                "over the phase (window and profile)."
                if retries is not None
                else "."
            )
        )
        add("")
    if mem:
        add("## Memory")
        add("")
        add("| tasks in flight | bridge RSS | RSS per task over the idle bridge | target |")
        add("|---|---|---|---|")
        for p in mem:
            per = f"{p['per_task']:,.0f} B" if "per_task" in p else "-"
            target = "< 2,048 B" if p["in_flight"] >= 100_000 else ""
            add(f"| {p['in_flight']:,} | {p['rss'] / 2**20:,.1f} MiB | {per} | {target} |")
        if len(mem) >= 3:
            a, b = mem[-2], mem[-1]
            marginal = (b["rss"] - a["rss"]) / (b["in_flight"] - a["in_flight"])
            add("")
            add(
                f"Marginal cost between {a['in_flight']:,} and {b['in_flight']:,}: "
                f"{marginal:,.0f} B per task."
            )
        add("")
    for label, prof in (
        ("the sustained load", main.get("profile") if main else None),
        (
            f"{s['concurrent']:,} in flight, {schedule(cons[0])}" if cons else "",
            cons[0].get("profile") if cons else None,
        ),
    ):
        if prof and "error" not in prof:
            add(_profile_md(prof, label))
        elif prof:
            add(f"Profile of {label}: {prof['error']}")
            add("")
    add("## Method")
    add("")
    first = cons[0]["interval_s"] if cons and cons[0].get("interval_s") else 10.0
    add(_METHOD.format(interval=first, n=s["concurrent"], workdir=workdir))
    return "\n".join(lines) + "\n"


def _us(cpu_share: float, rate: float) -> str:
    """CPU time per request (or per acknowledged poll)."""
    return f"{1e6 * cpu_share / rate:,.0f} µs CPU each" if rate > 0 else "n/a"


def _met_publish(pub: dict[str, Any]) -> str:
    """p99 < 50 ms, decided exactly from the 50 ms bucket when there is one."""
    within = pub.get("within_50ms")
    if within is None:
        return _met(pub["p99"], 0.05)
    return "yes" if within >= 0.99 else "**no**"


def _bucket_note(pub: dict[str, Any]) -> str:
    b = pub.get("p99_bucket")
    if not b:
        return ""
    note = f" (interpolated in the histogram's {ms(b[0])} to {ms(b[1])} bucket"
    within = pub.get("within_50ms")
    if within is not None:
        note += f"; exactly {within:.2%} of events within 50 ms"
    return note + ")"


def _cpu_cells(r: dict[str, Any], poller: str) -> str:
    return (
        f"{_cpu(r, poller)} | {_cpu(r, 'simulator')} | {_cpu(r, 'broker')} | "
        f"{_cpu(r, 'bench')} | {_cpu(r, 'cpu0')} / {_cpu(r, 'cpu1')} |"
    )


def _met(value: float | None, limit: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "yes" if value < limit else "**no**"


def _profile_md(prof: dict[str, Any], label: str) -> str:
    out = [
        f"## Profile: the bridge under {label} (py-spy, {prof['samples']:,} samples of CPU)",
        "",
        "| own time by library (top of stack) | share |",
        "|---|---|",
    ]
    out += [f"| {k} | {v:.1%} |" for k, v in prof["groups"][:12]]
    out += [
        "",
        "| what the bridge's code calls (inclusive: deepest bridge frame → library) | share |",
        "|---|---|",
    ]
    out += [f"| `{k}` | {v:.1%} |" for k, v in prof["called"][:14]]
    out += ["", "| function, inclusive | share |", "|---|---|"]
    out += [f"| `{k}` | {v:.1%} |" for k, v in prof["total"][:16]]
    out += ["", "| function, own time | share |", "|---|---|"]
    out += [f"| `{k}` | {v:.1%} |" for k, v in prof["own"][:12]]
    out.append("")
    return "\n".join(out)


_METHOD = """\
- **Bare loops** (`bench.naive bare`): 100 workers GET the result URL of 2,000 pending
  tasks round-robin and decode the JSON body, nothing else: what each HTTP stack costs
  (after a 3 s warm-up: httpcore's pool takes seconds to reach its pace). The
  `bridge-api` loops are the bridge's own `ApiClient.fetch` (size cap and `interpret`
  included), over each transport, so the price of httpx's client layer shows in one run.
- **Sustained** (`python -m bridge run`): tasks that finish on the first poll (created
  10 min ago, duration 0) are fed ahead of the bridge (a backlog of ~20,000), so it never
  lacks due work and every poll is consume → GET → CloudEvent → produce (acks=all) →
  commit. polls/s is the simulator's request counter, tasks/s the bridge's
  `tasks_finished_total` (acknowledged events), over a window after a warm-up. The py-spy
  profile (200 Hz) is taken right after the window, on the same load.
- **{n:,} concurrent**: a closed loop (every event read from the output topics starts a
  new task) keeps {n:,} tasks in flight: 20% flux-dev (median 8 s), 10% flux-schnell
  (2 s), 70% video (120 s) of starts, lognormal, 2% failures; mean ~100 s, so ~100
  completions/s, the Ultra tier's 5,000 starts per minute. The first {n:,} are drawn as
  found in flight in steady state (length-biased durations, uniform ages) with message
  `created_at`s that spread first polls over one interval. Fixed policy without jitter,
  so every poll's scheduled time is known: the first is due one interval after the
  message's `created_at`, each later one an interval after the previous poll (as seen
  by the simulator). **Lateness** = the simulator's arrival time of a poll minus that, for
  every poll *scheduled* in the window; one still not made when the window's data is
  read counts with the lateness it had then. It includes the request's trip (loopback).
  10 s is the headline: 1,000 polls/s at {n:,} in flight, about what the adaptive
  policy asks for this mix; 5 s (2,000 polls/s) is WaveSpeed's minimum for video.
  **Publish latency** is the bridge's `publish_latency_seconds` histogram (terminal
  poll's response → broker ack), quantiles interpolated within its buckets.
- **Naive** (`bench.naive naive`): a coroutine per task: `asyncio.sleep`, GET with a
  default `httpx.AsyncClient`, `send_and_wait` when terminal; auto-commit. Sustained it
  sleeps 1 s (the SDKs' loop) with a backlog of 300 ids; at {n:,} in flight it sleeps
  the headline interval so both follow the same schedule (its first poll is due an
  interval after it consumed the id, which the bench approximates by `created_at`).
- **Memory**: a fresh bridge (fixed policy, interval 1 h) is fed tasks created an hour
  ago, so each is polled once and then held with the API's answer; RSS
  (`/proc/<pid>/status`) minus the idle bridge's, over the tasks in flight.
- CPU shares from `/proc/<pid>/stat` and `/proc/stat` (core busy time: core 0 busy minus
  the poller's share is interference, e.g. loopback softirqs or other processes).
- Working files (configs, logs, raw py-spy profiles, `results.json`): `{workdir}`.
"""
