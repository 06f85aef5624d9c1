"""What a task costs (issue 22): the bridge end to end against a bare aiohttp loop, in one
run, on the throughput benchmark's stack. Run from the repo root::

    python -m bench.cost --before REF     # ~11 minutes (3 rounds; ~6 without --before)

Apache Kafka (one KRaft node) and the simulator on core 1, every poller on core 0, as in
``python -m bench.throughput``. It measures, the runs interleaved so drift favours no side:

1. the bare aiohttp loop (the ceiling; ``bench.throughput``'s ``aiohttp`` ceiling), at the
   start and at the end;
2. the bridge end to end (its ``sustained`` scenario: a backlog of tasks done on the first
   poll) in each delivery mode, each with a py-spy profile split by stage;
3. the same with the JSON codec forced to the standard library
   (``WAVESPEED_BRIDGE_JSON=stdlib``);
4. tracing on with a 1% ratio sampler (at least once), exporting to a local Jaeger over
   OTLP as ``bench.tracing`` does;
5. ``--before REF``: the runs of 2 for an older revision, checked out in a git worktree
   in the work directory and run from there (``cwd`` and ``PYTHONPATH``).

Writes ``bench/results/cost.md`` (``--no-write``: prints it); ``results.json`` in the work
directory re-renders with ``--report-from``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.throughput.measurement import ms, other_work
from bench.throughput.pollers import BridgeProc
from bench.throughput.scenarios import sustained as sustained_scenario
from bench.throughput.scenarios.ceilings import ceilings
from bench.throughput.settings import Settings
from bench.throughput.stack import BRIDGE_CORE, ROOT, SIM_CORE, Stack, publish_md, say
from bridge.local.jaeger import Jaeger, start_jaeger

TRACING_1PCT = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
TARGETS = (  # (what, at least this ratio to the bare loop, the run that decides it)
    ("end to end, at_least_once", 0.5, ("after", "at_least_once", "default", False)),
    ("end to end, exactly_once", 0.5, ("after", "exactly_once", "default", False)),
    ("end to end, tracing at 1%, at_least_once", 0.47, ("after", "at_least_once", "default", True)),
)
STAGE_ROWS = (
    "intake",
    "core",
    "HTTP",
    "publish",
    "commit",
    "telemetry",
    "event loop",
    "Kafka client's own tasks",
)


@dataclass(frozen=True, slots=True)
class Variant:
    """One end-to-end run: which bridge, how it is configured."""

    revision: str  # "after" (this checkout) or "before" (--before REF)
    delivery: str
    json: str = "default"  # or "stdlib": WAVESPEED_BRIDGE_JSON=stdlib
    tracing: bool = False  # on with a 1% ratio sampler
    profile: bool = False

    @property
    def key(self) -> tuple[str, str, str, bool]:
        return (self.revision, self.delivery, self.json, self.tracing)

    @property
    def slug(self) -> str:
        return "-".join(
            [self.revision, self.delivery]
            + (["stdlib-json"] if self.json == "stdlib" else [])
            + (["tracing"] if self.tracing else [])
        )


BARE = None  # a step of the plan: the bare aiohttp loop


def plan(before: bool, rounds: int = 1) -> list[Variant | None]:
    """The run's order: the bare loop first, after each round and last, before and after
    interleaved (ABBA). The first round has every variant and the profiles; each further
    round repeats the runs the targets compare (no profile, no stdlib JSON), so a target
    is judged on the median of ``rounds`` ratios, each to the bare loops around its round:
    a single window on these shared machines moves by ±10%."""
    after_alo = Variant("after", "at_least_once", profile=True)
    after_eo = Variant("after", "exactly_once", profile=True)
    steps: list[Variant | None] = [
        BARE,
        after_alo,
        Variant("before", "at_least_once", profile=True),
        Variant("after", "at_least_once", json="stdlib"),
        Variant("after", "at_least_once", tracing=True),
        Variant("after", "exactly_once", json="stdlib"),
        Variant("before", "exactly_once", profile=True),
        after_eo,
        BARE,
    ]
    again: list[Variant | None] = [
        Variant("after", "exactly_once"),
        Variant("before", "exactly_once"),
        Variant("after", "at_least_once", tracing=True),
        Variant("before", "at_least_once"),
        Variant("after", "at_least_once"),
        BARE,
    ]
    for _ in range(rounds - 1):
        steps += again
    return [v for v in steps if before or v is None or v.revision == "after"]


def rounds_of(
    results: dict[str, Any],
) -> list[tuple[float, float, list[tuple[Variant, dict[str, Any]]]]]:
    """Each round's runs with its reference: the mean of the bare loops before and after
    it, in requests per second and µs of CPU per request."""
    out: list[tuple[float, float, list[tuple[Variant, dict[str, Any]]]]] = []
    bare, runs = iter(results["bare"]), iter(results["runs"])
    last: tuple[float, float] | None = None
    current: list[tuple[Variant, dict[str, Any]]] = []
    for at in results["load"]:
        if at["at"] == "bare":
            b = next(bare)
            now = (float(b["rps"]), 1e6 * float(b["cpu_share"]) / float(b["rps"]))
            if last is not None and current:
                out.append(((last[0] + now[0]) / 2, (last[1] + now[1]) / 2, current))
            last, current = now, []
        else:
            r = next(runs)
            current.append((Variant(**r["variant"]), r))
    return out


def before_after(rounds: list[tuple[float, float, list[tuple[Variant, dict[str, Any]]]]]) -> str:
    """CPU µs per task of each variant in each round, with the median."""
    by: dict[tuple[str, str, str, bool], list[float]] = {}
    for _, _, members in rounds:
        for v, r in members:
            by.setdefault(v.key, []).append(per_task_us(r))
    lines = [
        "| revision | delivery | JSON codec | tracing | CPU µs per task, per round | median |",
        "|---|---|---|---|---|---|",
    ]
    for (revision, delivery, json_codec, tracing), values in by.items():
        lines.append(
            f"| {revision} | {delivery} | {json_codec} | {'1%' if tracing else 'off'} | "
            f"{', '.join(f'{x:,.0f}' for x in values)} | {statistics.median(values):,.0f} |"
        )
    return "\n".join(lines) + "\n"


# --- the run ------------------------------------------------------------------------------


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def bridge_module(cwd: Path, env: dict[str, str]) -> str:
    """Where ``python -m bridge`` run with this ``cwd`` and ``env`` imports the bridge from."""
    done = subprocess.run(
        [sys.executable, "-c", "import bridge.cli; print(bridge.cli.__file__)"],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@contextmanager
def worktree(ref: str, directory: Path) -> Iterator[dict[str, Any]]:
    """``ref`` checked out (detached) in ``directory`` for the block, then removed."""
    git("worktree", "add", "--detach", str(directory), ref)
    try:
        env = {"PYTHONPATH": str(directory)}
        module = bridge_module(directory, env)
        if not Path(module).is_relative_to(directory):
            raise RuntimeError(f"the bridge of {ref} would be imported from {module}")
        yield {
            "ref": ref,
            "commit": git("rev-parse", "--short", f"{ref}^{{commit}}"),
            "subject": git("log", "-1", "--format=%s", ref),
            "module": module,
            "orjson": subprocess.run(
                ["git", "grep", "-q", "orjson", ref, "--", "bridge"], cwd=ROOT, check=False
            ).returncode
            == 0,
            "cwd": str(directory),
            "env": env,
        }
    finally:
        git("worktree", "remove", "--force", str(directory))


async def measure(
    stack: Stack, v: Variant, before: dict[str, Any] | None, jaeger: Jaeger
) -> dict[str, Any]:
    """The ``sustained`` scenario with this variant's bridge: its ``BridgeProc`` is swapped
    for one started from the variant's checkout, with its environment and config."""
    cwd, env = ROOT, {}
    if v.revision == "before":
        assert before is not None
        cwd, env = Path(before["cwd"]), dict(before["env"])
    if v.json == "stdlib":
        env["WAVESPEED_BRIDGE_JSON"] = "stdlib"
    if v.tracing:
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_endpoint, **TRACING_1PCT}

    def proc(workdir: Path, name: str, config: dict[str, Any]) -> BridgeProc:
        config["tracing"] = {"enabled": v.tracing}
        return BridgeProc(workdir, name, config, cwd=cwd, env=env)

    s = stack.s
    say(f"  {v.slug}{' (profiled)' if v.profile else ''}")
    r = await sustained_scenario.sustained(
        stack,
        stack.broker,
        s.transport,
        seconds=s.sustained_seconds,
        profile=v.profile,
        delivery=v.delivery,
        bridge_proc=proc,
        label=f"-{v.slug}",
    )
    return {"variant": dataclasses.asdict(v), **r}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "")
    return (
        f"{os.cpu_count()} cores ({model}, {platform.machine()}), "
        f"Python {platform.python_version()}"
    )


async def run(
    s: Settings, workdir: Path, before_ref: str | None, rounds: int = 1
) -> dict[str, Any]:
    os.sched_setaffinity(0, {SIM_CORE})  # children (broker, simulator, Jaeger) inherit it
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    orjson = importlib.util.find_spec("orjson") is not None
    dirty = bool(git("status", "--porcelain", "--", "bridge"))
    results: dict[str, Any] = {
        "settings": s.as_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "after": {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty, "orjson": orjson},
        "before": None,
        "load": [],
        "bare": [],
        "runs": [],
    }
    stack = Stack(s, workdir)
    results["brokers"] = stack.brokers
    with _before(before_ref, workdir) as before:
        results["before"] = before
        jaeger: Jaeger | None = None
        try:
            say(f"starting Apache Kafka, the simulator and Jaeger on core {SIM_CORE} ({workdir})")
            await stack.start()
            jaeger = await start_jaeger(workdir / "jaeger")
            for step in plan(before is not None, rounds):
                results["load"].append(
                    {"at": "bare" if step is None else step.slug, "loadavg": os.getloadavg()}
                )
                if step is None:
                    results["bare"].append((await ceilings(stack))["aiohttp"])
                else:
                    results["runs"].append(await measure(stack, step, before, jaeger))
        finally:
            await stack.stop()
            if jaeger is not None:
                jaeger.close()
    return results


@contextmanager
def _before(ref: str | None, workdir: Path) -> Iterator[dict[str, Any] | None]:
    if ref is None:
        yield None
    else:
        with worktree(ref, workdir / "before") as info:
            yield info


# --- the report ---------------------------------------------------------------------------


def per_task_us(r: dict[str, Any]) -> float:
    """The bridge's CPU per acknowledged task, µs."""
    rate = float(r["tasks_per_s"])
    return 1e6 * float(r["cpu"].get("bridge", 0.0)) / rate if rate > 0 else math.nan


def codec(results: dict[str, Any], v: Variant) -> str:
    if v.json == "stdlib":
        return "stdlib (forced)"
    rev = results[v.revision] or {}
    return "orjson" if rev.get("orjson") else "stdlib"


def variant_cells(results: dict[str, Any], v: Variant) -> str:
    rev = results[v.revision] or {}
    name = f"{v.revision} ({rev.get('commit', '?')}{'+' if rev.get('dirty') else ''})"
    tracing = "1% sampled" if v.tracing else "off"
    return f"{name} | {v.delivery} | {codec(results, v)} | {tracing}"


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def report(results: dict[str, Any], workdir: Path, elapsed: float, command: str) -> str:
    s = results["settings"]
    bare = results["bare"]
    bare_rps = statistics.mean(b["rps"] for b in bare) if bare else math.nan
    bare_us = statistics.mean(1e6 * b["cpu_share"] / b["rps"] for b in bare) if bare else math.nan
    runs = [(Variant(**r["variant"]), r) for r in results["runs"]]
    kafka: dict[str, Any] = next(iter(results["brokers"].values()), {})
    after, before = results["after"], results["before"]
    out: list[str] = []
    add = out.append
    add("# What a task costs (issue 22)")
    add("")
    add(
        f"Produced by `{command}` in {elapsed / 60:.1f} min, {results['started']}, on "
        f"{results['machine']}. "
        f"{kafka.get('name', 'Apache Kafka')} ({kafka.get('runtime', '')}) and the simulator "
        f"on core {SIM_CORE}, the pollers on core {BRIDGE_CORE}. **After**: this checkout, "
        f"{after['commit']}{' with uncommitted changes to bridge/' if after['dirty'] else ''}"
        + (
            f"; **before**: `{before['ref']}` = {before['commit']} ({before['subject']})."
            if before
            else "; no before run (`--before REF`)."
        )
    )
    add("")
    add(load_note(results, runs))
    add("")
    add("## Targets")
    add("")
    rounds = rounds_of(results)
    add(
        "Each ratio is to the bare aiohttp loop measured just before and just after the "
        f"run's round ({len(rounds)} round{'s' if len(rounds) != 1 else ''}; the bare loop's "
        f"mean over the run: {bare_rps:,.0f} req/s, {bare_us:,.0f} µs CPU per request): "
        "tasks/s ÷ bare req/s, and bare CPU per request ÷ bridge CPU per task (steadier on "
        "a busy machine). A target is judged on the median of its rounds."
    )
    add("")
    add("| target | tasks/s ratio per round | median | met | CPU-per-task ratio median | met |")
    add("|---|---|---|---|---|---|")
    for what, limit, key in TARGETS:
        ratios, cpu_ratios = [], []
        for ref_rps, ref_us, members in rounds:
            for v, r in members:
                if v.key == key:
                    ratios.append(r["tasks_per_s"] / ref_rps)
                    cpu_ratios.append(ref_us / per_task_us(r))
        if not ratios:
            add(f"| {what} ≥ {limit}x | not run | | | | |")
            continue
        ratio, cpu_ratio = statistics.median(ratios), statistics.median(cpu_ratios)
        add(
            f"| {what} ≥ {limit}x | {', '.join(f'{x:.3f}x' for x in ratios)} | "
            f"{ratio:.3f}x | {_mark(ratio >= limit)} | {cpu_ratio:.3f}x | "
            f"{_mark(cpu_ratio >= limit)} |"
        )
    add("")
    add("CPU µs per task of each variant, round by round (the first round's are in the table")
    add("below too):")
    add("")
    add(before_after(rounds))
    add("## Every run, in the order run")
    add("")
    add(
        "| # | revision | delivery | JSON codec | tracing | tasks/s | ratio to bare | "
        "bridge CPU | CPU µs per task | publish p50 / p99 |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    n, bare_i, run_i = 0, iter(bare), iter(runs)
    for at in results["load"]:
        n += 1
        if at["at"] == "bare":
            b = next(bare_i)
            add(
                f"| {n} | bare aiohttp loop | | | | {b['rps']:,.0f} req/s | "
                f"{b['rps'] / bare_rps:.2f}x of the mean | {b['cpu_share']:.0%} | "
                f"{1e6 * b['cpu_share'] / b['rps']:,.0f} per request | |"
            )
            continue
        v, r = next(run_i)
        pub = r["publish_latency"]
        add(
            f"| {n} | {variant_cells(results, v)} | {r['tasks_per_s']:,.0f} | "
            f"{r['tasks_per_s'] / bare_rps:.2f}x | {r['cpu'].get('bridge', 0.0):.0%} | "
            f"{per_task_us(r):,.0f} | {ms(pub['p50'])} / {ms(pub['p99'])} |"
        )
    add("")
    add(stage_table(results, runs))
    add("## Method")
    add("")
    add(
        METHOD.format(
            bare_s=s["bare_seconds"],
            warmup=s["sustained_warmup_s"],
            window=s["sustained_seconds"],
            profile=s["profile_seconds"],
            concurrency=s["concurrency"],
            workdir=workdir,
        )
    )
    return "\n".join(out) + "\n"


def stage_table(results: dict[str, Any], runs: list[tuple[Variant, dict[str, Any]]]) -> str:
    """CPU µs per task by stage, one column per profiled run, before then after."""
    cols = sorted(
        (
            (v, r)
            for v, r in runs
            if "cpu_us_per_task" in r.get("profile", {}) and r["profile"].get("stages")
        ),
        key=lambda vr: (vr[0].delivery, vr[0].revision != "before"),
    )
    if not cols:
        return "No profile with a stage table in this run.\n"
    rows: dict[str, list[float]] = {k: [] for k in (*STAGE_ROWS, "other")}
    for _, r in cols:
        shares = {k: 0.0 for k in rows}
        for name, share in r["profile"]["stages"]:
            row = next((k for k in STAGE_ROWS if name == k or name.startswith(k + " (")), "other")
            shares[row] += share
        for k, share in shares.items():
            rows[k].append(share * r["profile"]["cpu_us_per_task"])
    head = [f"{v.revision} {v.delivery}" for v, _ in cols]
    lines = [
        "## CPU µs per task by stage",
        "",
        "The profile's share of samples per stage (the deepest bridge frame's module; the "
        "library work below it included) times the run's CPU µs per task. Other: the "
        "bridge's other loops and what no stage claims.",
        "",
        "| stage | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(cols),
    ]
    lines += [f"| {k} | " + " | ".join(f"{x:,.0f}" for x in v) + " |" for k, v in rows.items()]
    totals = " | ".join(f"**{r['profile']['cpu_us_per_task']:,.0f}**" for _, r in cols)
    lines += [f"| **total** | {totals} |", ""]
    return "\n".join(lines)


def load_note(results: dict[str, Any], runs: list[tuple[Variant, dict[str, Any]]]) -> str:
    """Other work on the machine per window (see :func:`other_work`), the bare loop's drift."""
    bare = results["bare"]
    seen = [(f"bare {i + 1}", other_work(b["core1"], b["cpu_share"])) for i, b in enumerate(bare)]
    seen += [(v.slug, other_work(r["cpu"])) for v, r in runs]
    values = sorted(x for _, x in seen if x is not None)
    text = ""
    if values:
        busy = [f"{label} ({x:.0%})" for label, x in seen if x is not None and x > 0.2]
        text = (
            "Other work on the machine in the measuring windows (both cores' busy time minus "
            "the benchmark's processes; a few percent is loopback work): median "
            f"{values[len(values) // 2]:.0%} of a core"
            + (f", over 20% in {', '.join(busy)}" if busy else "")
            + ". "
        )
    if len(bare) == 2:
        a, b = bare[0]["rps"], bare[1]["rps"]
        text += f"Bare loop at the start {a:,.0f} req/s, at the end {b:,.0f} ({b / a - 1:+.0%}). "
    load = ", ".join(f"{x['at']} {x['loadavg'][0]:.1f}" for x in results["load"])
    return text + f"Load average (1 min) before each step: {load}."


METHOD = """\
- **Bare loop**: `bench.naive bare --client aiohttp` ({concurrency} connections, GET and
  decode the JSON body of 2,000 pending tasks round-robin, {bare_s:g} s after a 3 s
  warm-up): `bench.throughput`'s ceiling, run first and last.
- **End to end**: `bench.throughput`'s sustained scenario: `python -m bridge run`
  (`taskset -c 0`, `api.transport: aiohttp`, INFO JSON logs, webhooks off) kept ahead of
  by a backlog of ~20,000 tasks done on the first poll, so every poll is consume → GET →
  CloudEvent → produce (acks=all, idempotent) → commit (or the transaction). tasks/s is
  the bridge's `tasks_finished_total` over a {window:g} s window after a {warmup:g} s
  warm-up; CPU from `/proc`. Profiled runs are then sampled by py-spy (200 Hz,
  {profile:g} s) on the same load.
- **Variants**: `WAVESPEED_BRIDGE_JSON=stdlib` in the bridge's environment forces the
  standard library's json (the default is orjson when installed); tracing on is
  `tracing.enabled` with `OTEL_TRACES_SAMPLER=traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.01`,
  exporting OTLP/HTTP to a local Jaeger v2 on core 1 (as `bench.tracing`). **Before** is
  `git worktree add --detach` of the revision in the work directory; its bridge runs with
  that directory as cwd and `PYTHONPATH` (checked: `bridge.cli` imports from there).
- The runs alternate (before/after ABBA, variants between) so the machine's drift favours
  no side; the bare loop's start and end show the drift.
- Working files (configs, logs, raw profiles `profile-sustained-*.txt`, `results.json`):
  `{workdir}`.
"""


# --- the command --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--before", metavar="REF", help="also run this older revision of the bridge")
    p.add_argument("--quick", action="store_true", help="short windows (smoke)")
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds of the compared runs (median; default 3)"
    )
    p.add_argument("--no-write", action="store_true", help="print the report, write nothing")
    p.add_argument("--report-from", metavar="RESULTS_JSON", help="render a saved run")
    a = p.parse_args(argv)
    s = Settings(brokers=("kafka",), compare_transports=(), bare_clients=("aiohttp",))
    s = dataclasses.replace(s, bare_seconds=10.0)
    if a.quick:
        s = dataclasses.replace(
            s, bare_seconds=2.0, sustained_warmup_s=2.0, sustained_seconds=5.0, profile_seconds=4.0
        )
    if a.report_from:
        saved = json.loads(Path(a.report_from).read_text())
        workdir = Path(a.report_from).parent
    else:
        workdir = Path(tempfile.mkdtemp(prefix="bench-cost-"))
        t0 = time.monotonic()
        results = asyncio.run(run(s, workdir, a.before, max(1, a.rounds)))
        args = sys.argv[1:] if argv is None else argv
        saved = {
            "results": results,
            "elapsed": time.monotonic() - t0,
            "command": " ".join(["python -m bench.cost", *args]),
        }
        (workdir / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    md = report(saved["results"], workdir, saved["elapsed"], saved["command"])
    publish_md(md, "cost.md", print_only=a.no_write)
    say(f"done in {saved['elapsed'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
