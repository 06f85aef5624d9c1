"""The local stack in one process tree: a broker, API simulator, the bridge, a feeder, a tail.

``wavespeed-bridge demo`` (what ``scripts/demo`` runs): Tansu by default (pip-installed,
starts in milliseconds); ``--broker kafka`` runs Apache Kafka instead (Java 17 + Maven).
Needs the dev extra (the brokers).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from bridge.config import Config, load_config
from bridge.core.webhook_signature import secret_forms
from bridge.edges import logs
from bridge.local import apache_kafka
from bridge.local.broker import Broker, free_port
from bridge.local.feeder import produce_tasks, submit, tail
from bridge.local.simulator import ModelProfile, Simulator
from bridge.local.tansu import start_tansu
from bridge.shell.app import Bridge

DEMO_KEY = "local-demo-key"  # the simulator's key; never a real one
MODELS = (
    "wavespeed-ai/flux-dev",
    "wavespeed-ai/flux-schnell",
    "wavespeed-ai/wan-2.1-i2v-480p-video",
)
PROFILES = (
    ModelProfile("*video*", median_s=12.0, sigma=0.3, failure_rate=0.05, queue_s=1.0),
    ModelProfile("*schnell*", median_s=1.5, sigma=0.3, failure_rate=0.05),
    ModelProfile("*", median_s=4.0, sigma=0.4, failure_rate=0.05),
)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _start_broker(kind: str, workdir: Path) -> tuple[Broker, Callable[[], None], str]:
    """The demo's broker, how to stop it, and a line saying what it is."""
    if kind == "kafka":
        shutil.rmtree(workdir / "kafka", ignore_errors=True)
        _say(
            f"broker     starting Apache Kafka {apache_kafka.VERSION} (first run fetches its jars)"
        )
        kafka = await apache_kafka.start_cluster(1, directory=workdir / "kafka")
        where = f"(data and log in {workdir}/kafka; ready in {kafka.startup_s:.1f}s)"
        return kafka, kafka.close, f"{kafka.name} on {kafka.bootstrap} {where}"
    tansu = await start_tansu(workdir / "broker.log")
    line = f"{tansu.name} on {tansu.bootstrap} (in memory; log {workdir}/broker.log)"
    return tansu, tansu.stop, line


async def run_demo(
    *, tasks: int, config_path: str, keep_running: bool, broker_kind: str = "tansu"
) -> int:
    workdir = Path(".demo")
    workdir.mkdir(exist_ok=True)
    t0 = time.monotonic()
    broker, stop_broker, about = await _start_broker(broker_kind, workdir)
    sim = Simulator(api_key=DEMO_KEY, profiles=PROFILES, seed=7)
    try:
        await sim.start()
        base = load_config(config_path, env={})
        port = base.server.port if _port_free(base.server.port) else free_port()
        hooks = base.webhooks.port if _port_free(base.webhooks.port) else free_port()
        config = load_config(
            config_path,
            env={
                "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
                "BRIDGE_API__BASE_URL": sim.base_url,
                "BRIDGE_SERVER__PORT": str(port),
                "BRIDGE_WEBHOOKS__PORT": str(hooks),
                # Tansu lacks the idempotent producer; Kafka has it.
                "BRIDGE_KAFKA__ENABLE_IDEMPOTENCE": str(broker.features.idempotence).lower(),
            },
        )
        k = config.kafka
        await broker.create_topics([k.input_topic], partitions=3)
        await broker.create_topics([k.completed_topic, k.failed_topic, k.dead_letter_topic])
        if config.webhooks.enabled:
            await broker.create_topics([config.webhooks.topic], partitions=3)
        cluster = [config.cluster.coordination_topic, config.cluster.state_topic]
        await broker.create_topics([t for t in cluster if t is not None])
        log_file = (workdir / "bridge.log").open("w")
        logs.configure(
            fmt="json",
            level=config.logging.level,
            secrets=(DEMO_KEY, *secret_forms(sim.webhook_secret)),
            stream=log_file,
        )
        _say(f"broker     {about}")
        _say(f"simulator  WaveSpeed API on {sim.base_url}")
        _say(f"bridge     consuming {k.input_topic!r}; logs in {workdir}/bridge.log")
        _say(f"metrics    http://127.0.0.1:{port}/metrics   (health: /healthz, readiness: /readyz)")
        if config.webhooks.enabled:
            _say(
                f"webhooks   http://127.0.0.1:{hooks}{config.webhooks.path}  (tasks are"
                " submitted with it; the simulator posts signed deliveries there)"
            )
        _say()
        return await _drive(config, broker, sim, tasks, keep_running, t0, port)
    finally:
        await sim.stop()
        stop_broker()


async def _drive(
    config: Config,
    broker: Broker,
    sim: Simulator,
    n: int,
    keep_running: bool,
    t0: float,
    port: int,
) -> int:
    k = config.kafka
    bridge = Bridge(config, api_key=DEMO_KEY, webhook_secret=sim.webhook_secret)
    hook = None
    if config.webhooks.enabled:
        hook = f"http://127.0.0.1:{config.webhooks.port}{config.webhooks.path}"
    stop = asyncio.Event()
    bridge_task = asyncio.create_task(bridge.run(stop))
    seen: dict[str, int] = {}
    expected = n + 3  # n tasks, one unknown id, one doomed to time out, one malformed message
    done = asyncio.Event()
    submitted: dict[str, float] = {}

    async def watch() -> None:
        topics = [k.completed_topic, k.failed_topic, k.dead_letter_topic]
        async for topic, event, msg in tail(broker.bootstrap, topics):
            if topic == k.dead_letter_topic:
                reason = dict(msg.headers or ()).get("dlq.reason", b"?").decode()
                _say(
                    f"  dead-letter  offset {dict(msg.headers).get('dlq.offset', b'?').decode():>4}"
                    f"  reason={reason}  value={msg.value[:40]!r}"
                )
                kind = "dead_letter"
            elif event is not None:
                kind = event["type"].rsplit(".", 1)[-1]
                _say(_describe(kind, event, submitted))
            else:
                continue
            seen[kind] = seen.get(kind, 0) + 1
            if sum(seen.values()) >= expected:
                done.set()

    watcher = asyncio.create_task(watch())
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    rng = random.Random(11)
    try:
        async with httpx.AsyncClient(
            base_url=sim.base_url, headers={"Authorization": f"Bearer {DEMO_KEY}"}
        ) as api:
            _say(f"feeder     submitting {n} tasks to the simulator and their ids to Kafka ...")
            items: list[dict[str, Any] | bytes] = []
            for i in range(n):
                model = rng.choice(MODELS)
                data = await submit(api, model, webhook=hook)
                submitted[data["id"]] = time.monotonic()
                items.append(
                    {
                        "id": data["id"],
                        "model": model,
                        "metadata": {"order": i, "user": f"user-{i % 5}"},
                    }
                )
                if len(items) >= 5:
                    await produce_tasks(producer, k.input_topic, items)
                    items = []
                    await asyncio.sleep(0.3)
            slow = await submit(api, MODELS[0], {"duration_s": 3600}, webhook=hook)
            submitted[slow["id"]] = time.monotonic()
            items += [
                {
                    "id": "pred_does_not_exist",
                    "model": MODELS[0],
                    "metadata": {"note": "unknown id: expect a failed event (404)"},
                },
                {
                    "id": slow["id"],
                    "model": MODELS[0],
                    "timeout_s": 8,
                    "metadata": {"note": "runs for an hour: expect a timeout after 8 s"},
                },
                b"../balance?not=a-task-id",
            ]
            await produce_tasks(producer, k.input_topic, items)
        _say(f"feeder     done after {time.monotonic() - t0:.1f}s; waiting for events ...")
        _say()
        try:
            await asyncio.wait_for(done.wait(), timeout=120)
        except TimeoutError:
            _say("demo: not every event arrived within 120 s; see .demo/bridge.log")
            return 1
        _say()
        _say(
            f"all {expected} inputs accounted for in {time.monotonic() - t0:.1f}s: "
            + ", ".join(f"{v} {key}" for key, v in sorted(seen.items()))
        )
        polls = sum(t.polls for t in sim.tasks.values())
        _say(
            f"simulator answered {polls} result polls for {len(sim.tasks)} tasks "
            f"({polls / max(1, len(sim.tasks)):.1f} per task; {sim.requests} requests in all,"
            " submissions included)"
        )
        await _show_metrics(port)
        if keep_running:
            _say("stack keeps running; Ctrl-C to stop")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        return 0
    finally:
        watcher.cancel()
        await producer.stop()
        stop.set()
        await bridge_task
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _describe(kind: str, event: dict[str, Any], submitted: dict[str, float]) -> str:
    d = event["data"]
    took = ""
    if d["task_id"] in submitted:
        took = f"{time.monotonic() - submitted[d['task_id']]:5.1f}s after submit"
    extra = ""
    if kind == "completed" and d.get("inference_time_s") is not None:
        extra = f"inference {d['inference_time_s']:.1f}s"
    elif d.get("error"):
        extra = f"error: {d['error'][:60]}"
    return (
        f"  {kind:<9}  {d['task_id'][:16]:<16}  {str(d['model'])[:40]:<40}  {took:>20}"
        f"  polls={d['polls']:<2}  {extra}"
    )


async def _show_metrics(port: int) -> None:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    wanted = (
        "wavespeed_bridge_tasks_finished_total",
        "wavespeed_bridge_dead_letters_total",
        "wavespeed_bridge_api_responses_total",
        "wavespeed_bridge_model_completion_seconds",
        "wavespeed_bridge_webhook_finished_tasks_total",
        "wavespeed_bridge_polls_avoided_total",
    )
    # Series exported at zero from the start are left out: they say nothing here.
    lines = [ln for ln in text.splitlines() if ln.startswith(wanted) and not ln.endswith(" 0.0")]
    _say(f"from http://127.0.0.1:{port}/metrics:")
    for line in lines[:20]:
        _say(f"  {line}")
    sys.stdout.flush()
