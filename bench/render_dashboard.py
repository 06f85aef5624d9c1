"""Render docs/dashboard.png from the Grafana dashboard's own queries, answered by a real
Prometheus that scraped running bridges. Not part of the test suite.

Run from the repo root (needs /usr/bin/prometheus from Debian's ``prometheus`` package and
matplotlib from the ``bench`` extra)::

    .venv/bin/python -m bench.render_dashboard            # ~5 minutes
    .venv/bin/python -m bench.render_dashboard --minutes 2 --out /tmp/dash.png

What it does, all on loopback:

1. starts a Tansu broker, the WaveSpeed API simulator and two bridge replicas (in this
   process, same consumer group, a 4-partition input topic), each serving ``/metrics``;
2. starts Prometheus scraping both every 2 s, with the labels a ServiceMonitor would add
   (``namespace``, ``job``, ``pod``);
3. feeds task ids for ``--minutes``: a ramp of image and video models with lognormal
   completion times, ~3% failures, a few tasks that outlive their ``timeout_s``, some
   malformed messages (dead letters), and a minute in which the simulator answers 5% of
   polls with 429; every task is submitted with a replica's webhook URL (the simulator
   loses 5% of deliveries, delays the rest by 0.1-0.6 s and signs 1% with a wrong secret);
4. takes every target of ``helm/wavespeed-bridge/dashboards/wavespeed-bridge.json``, puts
   Grafana's variables in (``$__rate_interval`` = 30s, ``$namespace``/``$job`` = ``.*``),
   runs it through Prometheus' ``/api/v1/query_range`` and plots the result per panel with
   the panel's title, unit and legend format. It fails if any panel query returns nothing.

This is the dashboard's data, not Grafana's rendering of it: no Grafana runs here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiokafka import AIOKafkaProducer

from bridge.config import Config, build_config
from bridge.edges import logs
from bridge.local.broker import free_port
from bridge.local.simulator import Simulator
from bridge.local.tansu import TansuBroker
from bridge.shell.app import Bridge

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "helm" / "wavespeed-bridge" / "dashboards" / "wavespeed-bridge.json"
API_KEY = "render-dashboard-key"
NAMESPACE, JOB = "wavespeed", "wavespeed-bridge"
PODS = ("wavespeed-bridge-6c9f7d-2xkqp", "wavespeed-bridge-6c9f7d-9wlzt")
WEBHOOK_TOPIC = "wavespeed.webhooks"
# Every task is submitted with a replica's webhook URL; some deliveries get lost or late.
WEBHOOK_FAULTS = {"loss_rate": 0.05, "delay_s": 0.1, "jitter_s": 0.5, "bad_signature_rate": 0.01}
SCRAPE_S = 2
STEP_S = 5
# Grafana's $__rate_interval would be max(4 x scrape, step + scrape) = 8 s here; 30 s gives
# smoother lines over a few minutes of data.
RATE_INTERVAL = "30s"

# model -> (median completion s, lognormal sigma, share of traffic)
MODELS = {
    "wavespeed-ai/flux-schnell": (1.6, 0.35, 0.45),
    "wavespeed-ai/flux-dev": (4.5, 0.4, 0.35),
    "wavespeed-ai/wan-2.1/t2v-480p": (28.0, 0.3, 0.20),
}


@dataclass
class Stack:
    broker: TansuBroker
    sim: Simulator
    bridges: list[Bridge]
    prometheus_url: str


def bridge_config(broker: TansuBroker, sim: Simulator, port: int, hook_port: int) -> Config:
    return build_config(
        {
            "kafka": {
                "bootstrap_servers": broker.bootstrap,
                "group_id": "render-dashboard",
                "input_topic": "wavespeed.tasks",
                "commit_interval_s": 0.5,
                "health_check_interval_s": 1.0,
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
                "enable_idempotence": False,  # Tansu has no InitProducerId
            },
            "api": {"base_url": sim.base_url, "requests_per_second": 15},
            "polling": {"policy": "fixed", "interval_s": 2.0, "default_timeout_s": 90},
            "server": {"host": "127.0.0.1", "port": port},
            "webhooks": {"enabled": True, "port": hook_port, "topic": WEBHOOK_TOPIC},
            "logging": {"format": "json", "level": "WARNING"},
            "shutdown_grace_s": 5,
        },
        env={},
    )


@contextlib.asynccontextmanager
async def prometheus(workdir: Path, ports: list[int]) -> AsyncIterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus not found: apt-get install prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{p}"], "labels": {"namespace": NAMESPACE, "pod": pod}}
                    for p, pod in zip(ports, PODS, strict=True)
                ],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (workdir / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/-/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"prometheus did not start; see {workdir / 'prometheus.log'}")
        yield url
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()


def pick_model(rng: random.Random) -> str:
    r, acc = rng.random(), 0.0
    for model, (_median, _sigma, share) in MODELS.items():
        acc += share
        if r < acc:
            return model
    return next(iter(MODELS))


async def feed(
    sim: Simulator, bootstrap: str, minutes: float, rng: random.Random, hooks: list[str]
) -> int:
    """Submit tasks to the simulator and their ids to Kafka; returns the number of inputs."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    sent = 0
    start = time.monotonic()
    end = start + minutes * 60
    fault_window = (start + minutes * 60 * 0.45, start + minutes * 60 * 0.65)
    faults_on = False
    try:
        while (now := time.monotonic()) < end:
            phase = (now - start) / (end - start)
            in_window = fault_window[0] <= now < fault_window[1]
            if in_window != faults_on:
                faults_on = in_window
                sim.set_faults(rate_429=0.05 if faults_on else 0.0, retry_after_s=1)
            # A ramp with a bump: 2 -> 9 tasks/s and back.
            rate = 2 + 7 * math.sin(math.pi * phase) ** 2
            for _ in range(max(1, round(rate))):
                model = pick_model(rng)
                median, sigma, _share = MODELS[model]
                duration = median * math.exp(rng.gauss(0.0, sigma))
                outcome = "failed" if rng.random() < 0.03 else "completed"
                url = rng.choice(hooks)  # the receiving replica rarely tracks the task
                task = sim.create(model, duration_s=duration, outcome=outcome, webhook_url=url)
                message: dict[str, Any] = {"id": task.id, "model": model}
                if rng.random() < 0.02:
                    message["timeout_s"] = max(1.0, duration / 3)  # will time out
                await producer.send(
                    "wavespeed.tasks", json.dumps(message).encode(), key=task.id.encode()
                )
                sent += 1
            if rng.random() < 0.08:
                bad = rng.choice([b"not json {", b'{"model": "x"}', b"../etc/passwd", b""])
                await producer.send("wavespeed.tasks", bad)
                sent += 1
            await asyncio.sleep(1.0)
        await producer.flush()
    finally:
        sim.set_faults(rate_429=0.0)
        await producer.stop()
    return sent


def to_promql(expr: str, rate_interval: str, interval: str) -> str:
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", interval)
    return re.sub(r"\$\{?(namespace|job|pod)\}?", ".*", expr)


def seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


async def query_panels(url: str, start: float, end: float) -> list[dict[str, Any]]:
    dash = json.loads(DASHBOARD.read_text())
    out: list[dict[str, Any]] = []
    empty: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:
        for panel in dash["panels"]:
            if panel["type"] == "row":
                out.append({"panel": panel, "series": [], "step": STEP_S})
                continue
            series: list[tuple[str, list[float], list[float]]] = []
            # Grafana: a panel's min interval sets the step and $__interval.
            step = seconds(panel.get("interval", f"{STEP_S}s"))
            for target in panel["targets"]:
                params = {
                    "query": to_promql(target["expr"], RATE_INTERVAL, f"{step}s"),
                    "start": str(start),
                    "end": str(end),
                    "step": str(step),
                }
                body = (await client.get(f"{url}/api/v1/query_range", params=params)).json()
                if body.get("status") != "success":
                    raise RuntimeError(f"{panel['title']}: {body}")
                result = body["data"]["result"]
                if not result:
                    empty.append(f"{panel['title']}: {target['expr']}")
                for r in sorted(result, key=lambda r: legend(target["legendFormat"], r["metric"])):
                    ts = [float(t) - start for t, _v in r["values"]]
                    vs = [float(v) for _t, v in r["values"]]
                    series.append((legend(target["legendFormat"], r["metric"]), ts, vs))
            out.append({"panel": panel, "series": series, "step": step})
    if empty:
        raise RuntimeError("panel queries with no data:\n  " + "\n  ".join(empty))
    return out


def fmt_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "ops":
        return f"{value:.1f}/s"
    if unit == "s":
        return f"{value:.1f} s"
    return f"{value:,.0f}"


def plot(panels: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bg, fg, grid, panel_bg = "#111217", "#ccccdc", "#2c3235", "#181b1f"
    palette = [
        "#73bf69",
        "#f2cc0c",
        "#5794f2",
        "#ff780a",
        "#f2495c",
        "#b877d9",
        "#8ab8ff",
        "#fade2a",
        "#96d98d",
        "#ffb357",
    ]
    rows = max(p["panel"]["gridPos"]["y"] + p["panel"]["gridPos"]["h"] for p in panels)
    end_s = max((ts[-1] for p in panels for _n, ts, _v in p["series"] if ts), default=60.0)
    fig = plt.figure(figsize=(18, rows * 0.42), facecolor=bg)
    gs = fig.add_gridspec(rows, 24, hspace=0.0, wspace=0.0)
    for item in panels:
        panel, series = item["panel"], item["series"]
        g = panel["gridPos"]
        ax = fig.add_subplot(gs[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        if panel["type"] == "row":
            ax.axis("off")
            ax.text(
                0, 0.1, panel["title"], color=fg, fontsize=12, weight="bold", transform=ax.transAxes
            )
            continue
        ax.set_facecolor(panel_bg)
        for spine in ax.spines.values():
            spine.set_color(grid)
        unit = panel["fieldConfig"]["defaults"].get("unit", "none")
        ax.set_title(panel["title"], color=fg, fontsize=10, loc="left", pad=4)
        if panel["type"] == "stat":
            value = series[0][2][-1] if series and series[0][2] else float("nan")
            ax.text(
                0.5,
                0.42,
                fmt_value(value, unit),
                color=palette[0],
                fontsize=22,
                ha="center",
                va="center",
                transform=ax.transAxes,
                weight="bold",
            )
            if series:
                ts, vs = series[0][1], series[0][2]
                ax.fill_between(ts, vs, color=palette[0], alpha=0.15, linewidth=0)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        custom = panel["fieldConfig"]["defaults"].get("custom", {})
        bars = custom.get("drawStyle") == "bars"
        bottom: dict[float, float] = {}
        top = 0.0
        for i, (name, ts, vs) in enumerate(series):
            color = palette[i % len(palette)]
            if bars:  # stacked, like the panel's stacking mode
                base = [bottom.get(t, 0.0) for t in ts]
                ax.bar(
                    ts,
                    vs,
                    bottom=base,
                    width=item["step"] * 0.8,
                    color=color,
                    label=name,
                    alpha=0.85,
                    align="edge",
                )
                for t, b, v in zip(ts, base, vs, strict=True):
                    bottom[t] = b + v
                top = max([top, *bottom.values()])
            else:
                ax.plot(ts, vs, color=color, linewidth=1.2, label=name)
                top = max([top, *[v for v in vs if not math.isnan(v)]])
        ax.tick_params(colors=fg, labelsize=7)
        ax.grid(color=grid, linewidth=0.5)
        ax.set_xlim(0, end_s)
        ax.xaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda x, _p: f"{int(x // 60)}:{int(x % 60):02d}")
        )
        if unit == "s":
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _p: f"{y:g} s"))
        elif unit in ("ops", "reqps"):
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _p: f"{y:g}/s"))
        ax.set_ylim(0, top * 1.35 if top > 0 else 1)  # room for the legend
        if series:
            ax.legend(
                loc="upper left",
                fontsize=7,
                facecolor=panel_bg,
                edgecolor=grid,
                labelcolor=fg,
                ncol=min(4, len(series)),
            )
    fig.suptitle(
        "WaveSpeed bridge dashboard: each panel's PromQL from dashboards/wavespeed-bridge.json,"
        " answered by Prometheus scraping two live bridge replicas (simulated API, Tansu broker)",
        color=fg,
        fontsize=11,
        x=0.01,
        ha="left",
        y=0.995,
    )
    fig.text(
        0.01,
        0.002,
        "x axis: minutes into the run; rendered by bench/render_dashboard.py"
        " (matplotlib, not Grafana)",
        color="#8e8e8e",
        fontsize=8,
    )
    fig.subplots_adjust(left=0.03, right=0.995, top=0.965, bottom=0.02)
    for ax in fig.axes:  # space between panels, like Grafana's gutters
        box = ax.get_position()
        ax.set_position((box.x0 + 0.004, box.y0 + 0.006, box.width - 0.008, box.height - 0.022))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=bg)
    print(f"wrote {out}")


async def main(minutes: float, out: Path, seed: int) -> None:
    logs.configure(fmt="console", level="WARNING")
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="render-dashboard-"))
    print(f"working files in {workdir}")
    broker = TansuBroker(log_path=workdir / "broker.log")
    broker.start()
    try:
        await broker.wait_ready()
        await broker.create_topics(["wavespeed.tasks"], partitions=4)
        await broker.create_topics(
            ["wavespeed.completed", "wavespeed.failed", "wavespeed.dead-letter", WEBHOOK_TOPIC]
        )
        sim = Simulator(api_key=API_KEY, seed=seed)
        await sim.start()
        sim.set_webhook_faults(**WEBHOOK_FAULTS)
        ports = [free_port() for _ in PODS]
        hook_ports = [free_port() for _ in PODS]
        hooks = [f"http://127.0.0.1:{p}/webhooks/wavespeed" for p in hook_ports]
        bridges = [
            Bridge(
                bridge_config(broker, sim, p, h), api_key=API_KEY, webhook_secret=sim.webhook_secret
            )
            for p, h in zip(ports, hook_ports, strict=True)
        ]
        stop = asyncio.Event()
        runs = [asyncio.create_task(b.run(stop)) for b in bridges]
        try:
            async with prometheus(workdir, ports) as url:
                start = time.time()
                sent = await feed(sim, broker.bootstrap, minutes, rng, hooks)
                print(f"fed {sent} inputs; draining")
                await asyncio.sleep(45)  # video tasks finish, timeouts fire, rates decay
                end = time.time()
                panels = await query_panels(url, start, end)
        finally:
            stop.set()
            await asyncio.gather(*runs, return_exceptions=True)
            await sim.stop()
    finally:
        broker.stop()
    plot(panels, out)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=4.0, help="how long to feed tasks")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.minutes, args.out, args.seed))


if __name__ == "__main__":
    cli()
