"""The markdown report (``bench/results/throughput.md``) from a run's results, including
results saved by older versions of the script (one broker, Tansu; sustained runs keyed by
transport)."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.throughput.measurement import e2e, ms, other_work, schedule
from bench.throughput.stack import BRIDGE_CORE, SIM_CORE

# Results saved before the benchmark ran on more than one broker: all on Tansu.
OLD_BROKER: dict[str, Any] = {"key": "tansu", "name": "Tansu, version not recorded"}


def sustained_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The sustained runs, first broker's first transport first; also from older results."""
    sus = results.get("sustained") or []
    if isinstance(sus, dict):  # older results: {transport: run}, all on one broker
        return [{**r, "transport": t, "broker": OLD_BROKER["key"]} for t, r in sus.items()]
    return list(sus)


def brokers(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Broker key to what was recorded about it, the first broker (every phase's) first."""
    return results.get("brokers") or {OLD_BROKER["key"]: OLD_BROKER}


def broker_name(results: dict[str, Any], key: str | None) -> str:
    info = brokers(results).get(key or OLD_BROKER["key"])
    return str(info["name"]) if info else str(key)


def broker_short(results: dict[str, Any], key: str | None) -> str:
    """ "Kafka", "Tansu": for plot labels."""
    name = broker_name(results, key)
    return "Kafka" if "Kafka" in name else name.split()[0]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _cpu(result: dict[str, Any], key: str) -> str:
    return _pct(result.get("cpu", {}).get(key))


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f} MiB"


def report(results: dict[str, Any], workdir: Path, elapsed: float, command: str) -> str:
    s = results["settings"]
    infos = brokers(results)
    first = next(iter(infos))
    lines: list[str] = []
    add = lines.append
    add("# Throughput: one core, 10,000 concurrent tasks (issue 6)")
    add("")
    names = " and ".join(f"{i['name']}" for i in infos.values())
    add(
        f"Produced by `{command}` in {elapsed / 60:.1f} min on {os.cpu_count()} cores "
        f"({platform.machine()}), Python {platform.python_version()}, "
        f"{results.get('started') or time.strftime('%Y-%m-%d %H:%M')}. Pollers under test run "
        f"pinned to core {BRIDGE_CORE} (`taskset`); the simulator, the "
        f"{'brokers' if len(infos) > 1 else 'broker'} ({names}) and the bench's feeder share "
        f"core {SIM_CORE}. "
        + (
            f"Every phase runs on {infos[first]['name']}; the sustained end-to-end scenario "
            "runs on each broker. "
            if len(infos) > 1
            else ""
        )
        + f"Policy `{s['policy']}` (jitter 0), `api.transport: "
        f"{s['transport']}`, `api.max_concurrent_requests: {s['concurrency']}`, production "
        "logging (JSON, INFO). Working files: see Method."
    )
    add("")
    machine = _machine_note(results)
    if machine:
        add(machine)
        add("")
    ceil = results.get("ceilings", {})
    runs = sustained_runs(results)
    main = runs[0] if runs else {}
    by_broker = [r for r in runs if r["transport"] == s["transport"]]
    nv = results.get("naive_sustained")
    cons: list[dict[str, Any]] = results.get("concurrent", [])
    ncon = results.get("naive_concurrent")
    mem = results.get("memory", [])
    bare = ceil.get("aiohttp", {}).get("rps")

    add("## Targets")
    add("")
    add("| target | measured | met |")
    add("|---|---|---|")
    for r in by_broker:
        rate = e2e(r)
        ratio = f" = {rate / bare:.1%} of the bare aiohttp loop" if bare else ""
        add(
            "| ≥ 1,000 polls/s sustained end to end, one core (every poll completes its task: "
            "the rate is tasks acknowledged per second), on "
            f"{broker_name(results, r.get('broker'))} | {rate:,.0f}/s{ratio} "
            f"({r['polls_per_s']:,.0f} polls/s, {r['tasks_per_s']:,.0f} tasks/s) | "
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
            f"| publish latency p99 < 50 ms at that load, on "
            f"{broker_name(results, c.get('broker'))} | {ms(pub['p99'])}"
            f"{_bucket_note(pub)} | {_met_publish(pub)} |"
        )
    for c in cons[1:]:
        if c.get("interval_s") != 5.0:
            continue
        late = c.get("lateness") or c.get("lateness_metric") or {}
        pub = c["publish_latency"]
        add(
            f"| {s['concurrent']:,} concurrent, {schedule(c)} (issue 22): p99 poll lateness "
            f"< 50 ms | {ms(late.get('p99'))} | {_met(late.get('p99'), 0.05)} |"
        )
        add(
            f"| the same: publish latency p99 < 50 ms | {ms(pub['p99'])}{_bucket_note(pub)} "
            f"| {_met_publish(pub)} |"
        )
    big = [p for p in mem if p["in_flight"] >= 100_000]
    if big:
        add(
            f"| ≤ 1,024 B RSS per in-flight task at {big[-1]['in_flight']:,} (issue 22) | "
            f"{big[-1]['per_task']:,.0f} B | {_met(big[-1]['per_task'], 1024.5)} |"
        )
    add("")

    if by_broker:
        add("## Sustained end to end on each broker")
        add("")
        add(_brokers_md(results, by_broker, bare))

    add("## Throughput and CPU")
    add("")
    add(
        "| measurement | poller (core 0) | rate | poller CPU | simulator CPU | broker CPU "
        "| bench CPU | core 0 / core 1 busy |"
    )
    add("|---|---|---|---|---|---|---|---|")
    clients = {
        "aiohttp": "aiohttp `ClientSession`",
        "httpx-aiohttp": "httpx over httpx-aiohttp",
        "bridge-api": "the bridge's `ApiClient` (aiohttp session, size cap, `interpret`)",
        "httpx": "httpx, default transport (httpcore)",
        "bridge-api-httpx": "the bridge's `ApiClient`, httpx default transport",
    }
    for client, r in ceil.items():
        c1 = r["core1"]
        add(
            f"| bare polling loop, {s['concurrency']} connections | "
            f"{clients.get(client, client)} "
            f"| {r['rps']:,.0f} req/s, {_us(r['cpu_share'], r['rps'])} | "
            f"{_pct(r['cpu_share'])} | {_pct(c1.get('simulator'))} "
            f"| {_pct(c1.get('broker'))} | {_pct(c1.get('bench'))} | "
            f"{_pct(c1.get('cpu0'))} / {_pct(c1.get('cpu1'))} |"
        )
    for r in runs:
        ratio = f" ({e2e(r) / bare:.1%} of bare aiohttp)" if bare else ""
        retries = r.get("publish_failures_per_s")
        note = f"; {retries:,.0f} publish retries/s" if retries else ""
        add(
            f"| sustained end to end, done on 1st poll, {broker_name(results, r.get('broker'))} "
            f"| bridge, `transport: {r['transport']}` | "
            f"{r['polls_per_s']:,.0f} polls/s, {r['tasks_per_s']:,.0f} tasks/s{ratio}, "
            f"{_us(r['cpu'].get('bridge', 0.0), e2e(r))}{note} | " + _cpu_cells(r, "bridge")
        )
    if nv:
        ratio = f" ({e2e(nv) / bare:.1%} of bare aiohttp)" if bare else ""
        add(
            "| sustained end to end, done on 1st poll, "
            f"{broker_name(results, nv.get('broker'))} | naive: coroutine per task, "
            f"sleep(1), default httpx | {nv['polls_per_s']:,.0f} polls/s, "
            f"{nv['tasks_per_s']:,.0f} tasks/s{ratio} | " + _cpu_cells(nv, "naive")
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
    if mem:
        add("## Memory")
        add("")
        add("| tasks in flight | bridge RSS | RSS per task over the idle bridge | target |")
        add("|---|---|---|---|")
        for p in mem:
            per = f"{p['per_task']:,.0f} B" if "per_task" in p else "-"
            target = "≤ 1,024 B" if p["in_flight"] >= 100_000 else ""
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
        (
            f"the sustained load on {broker_name(results, main.get('broker'))}",
            main.get("profile") if main else None,
        ),
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
    interval = cons[0]["interval_s"] if cons and cons[0].get("interval_s") else 10.0
    if "brokers" in results:
        add(_METHOD_BROKERS)
    add(_METHOD.format(interval=interval, n=s["concurrent"], workdir=workdir))
    return "\n".join(lines) + "\n"


def _brokers_md(results: dict[str, Any], runs: list[dict[str, Any]], bare: float | None) -> str:
    infos = brokers(results)
    out = [
        "| broker | end to end | bridge CPU | publish latency p50 / p99 | "
        "events produced, not yet acked (mean) | requests in flight / polls due (mean) | "
        "broker CPU | broker RSS (ready / in the window) | idempotent producer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        info = infos.get(r.get("broker") or OLD_BROKER["key"], {})
        g = r.get("gauges", {})
        pub = r["publish_latency"]
        ratio = f" = {e2e(r) / bare:.1%} of bare aiohttp" if bare else ""
        retries = r.get("log_publish_retries")
        retry_note = f"; {retries:,} publish retries logged" if retries else ""
        idem = info.get("idempotence")
        out.append(
            f"| {info.get('name', r.get('broker'))} | {e2e(r):,.0f} tasks/s{ratio} "
            f"({r['polls_per_s']:,.0f} polls/s){retry_note} | {_cpu(r, 'bridge')}, "
            f"{_us(r['cpu'].get('bridge', 0.0), e2e(r))} | {ms(pub['p50'])} / "
            f"{ms(pub['p99'])} | {g.get('events_pending', {}).get('mean', math.nan):,.0f} | "
            f"{g.get('api_requests_in_flight', {}).get('mean', math.nan):.0f} of "
            f"{results['settings']['concurrency']} / "
            f"{g.get('polls_due', {}).get('mean', math.nan):,.0f} | {_cpu(r, 'broker')} | "
            f"{_mib(info.get('rss_mb_ready'))} / {_mib(r.get('broker_rss_mb'))} | "
            f"{'n/a' if idem is None else ('yes' if idem else 'no')} |"
        )
    out.append("")
    for key, info in infos.items():
        if "runtime" not in info:
            continue
        heap = f"; heap limit {info['heap_mb']:,} MB" if info.get("heap_mb") else ""
        out.append(
            f"- **{info['name']}**: {info['runtime']}{heap}; pinned to core(s) "
            f"{', '.join(str(c) for c in info['cores'])} (every thread, `taskset -a`); "
            f"ready {info['startup_s']:.1f} s after start; RSS at its last use "
            f"{_mib(info.get('rss_mb_end'))}"
            + (" (every phase ran on it)." if key == next(iter(infos)) else ".")
        )
    idle = [r for r in runs if "idle broker" in r.get("cpu", {})]
    if idle:
        out.append(
            f"- While another broker is measured, {next(iter(infos.values()))['name']} stays up "
            "idle on core 1: "
            + ", ".join(
                f"{_pct(r['cpu']['idle broker'])} of a core during the "
                f"{broker_name(results, r.get('broker'))} window"
                for r in idle
            )
            + "."
        )
    out.append("")
    return "\n".join(out)


def windows(results: dict[str, Any]) -> list[tuple[str, float]]:
    """Each measured window's other work (see :func:`other_work`), labelled."""
    out: list[tuple[str, float | None]] = []
    for client, r in results.get("ceilings", {}).items():
        out.append((f"bare {client}", other_work(r["core1"], r["cpu_share"])))
    for r in sustained_runs(results):
        out.append(
            (
                f"sustained {r['transport']} on {broker_name(results, r.get('broker'))}",
                other_work(r["cpu"]),
            )
        )
    if results.get("naive_sustained"):
        out.append(("naive sustained", other_work(results["naive_sustained"]["cpu"])))
    for c in results.get("concurrent", []):
        out.append((f"concurrent, {schedule(c)}", other_work(c["cpu"])))
    if results.get("naive_concurrent"):
        out.append(("naive concurrent", other_work(results["naive_concurrent"]["cpu"])))
    return [(label, v) for label, v in out if v is not None]


def _machine_note(results: dict[str, Any]) -> str:
    """Was anything else running? Other work per window, and load averages."""
    seen = windows(results)
    if not seen:
        return ""
    values = sorted(v for _, v in seen)
    median = values[len(values) // 2]
    busy = [(label, v) for label, v in seen if v > 0.20]
    loaded = median > 0.10 or bool(busy)
    text = (
        "Other work on the machine during the measuring windows (both cores' busy time "
        "minus the shares of the benchmark's processes; a few percent is the kernel's "
        f"loopback work): median {median:.0%} of a core"
    )
    if busy:
        text += "; over 20% in " + ", ".join(f"{label} ({v:.0%})" for label, v in busy)
    text += (
        ". **The machine was loaded** by other work during this run: rates and latencies "
        "of the windows named are worse than a quiet machine gives (latency most of all); "
        "rows measured side by side in a quiet window still compare."
        if loaded
        else ". The machine was quiet apart from the benchmark."
    )
    load = results.get("load")
    if load:
        text += " Load average (1 min; the benchmark itself keeps up to ~2 runnable) at " + (
            ", ".join(f"{x['at']} {x['loadavg'][0]:.1f}" for x in load)
        )
        text += "."
    return text


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
    if prof.get("stages"):  # profiles recorded before the stage breakdown have none
        per_task = prof.get("cpu_us_per_task")
        out += [
            "",
            "| stage (deepest bridge frame's module; library work below it included)"
            " | share | CPU µs per task |",
            "|---|---|---|",
        ]
        out += [
            f"| {k} | {v:.1%} | {'' if per_task is None else f'{v * per_task:,.0f}'} |"
            for k, v in prof["stages"]
        ]
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


_METHOD_BROKERS = """\
- **Brokers**: Apache Kafka is one KRaft node (broker and controller in one JVM, jars from
  Maven Central, `bridge.local.apache_kafka`), its log on disk in the work directory
  (Kafka's defaults: written to the page cache, no fsync per batch); Tansu
  (`bridge.local.tansu`) keeps its log in memory. Each is pinned, every thread, to core 1
  beside the simulator (a JVM there sees one processor). The bridge's producer is
  idempotent where the broker has the idempotent producer (`kafka.enable_idempotence`:
  true on Apache Kafka, false on Tansu, which lacks `InitProducerId`); acks=all on both.
  The first broker serves every phase; for the sustained scenario each other broker is
  started, measured the same way and stopped, while the first stays up, idle.\
"""

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
  profile (200 Hz) is taken right after the first broker's window, on the same load.
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
