"""One trace across the platform (issue 20), on Apache Kafka with the daemon itself and a
real tracing backend (Jaeger v2, built by scripts/jaeger): the platform's span that put a
task on the input topic, the bridge's spans for that task, and a subscriber's span made
from the event's context, read back from Jaeger's query API as one trace. The log lines
and the OpenMetrics exemplars of the same task name the same trace."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudevents.core.bindings import kafka
from cloudevents.v1.kafka import KafkaMessage, from_binary, from_structured
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bridge.local.broker import Broker
from bridge.local.jaeger import Jaeger, start_jaeger
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    Tail,
    config_data,
    create_topics,
    produce,
    read_all,
    sim_create,
    spawn_daemon,
    wait_until,
)

# The first test may wait for scripts/test's background build of Jaeger (a fresh machine).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
async def jaeger(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Jaeger]:
    j = await start_jaeger(tmp_path_factory.mktemp("jaeger"))
    try:
        yield j
    finally:
        j.close()


def _provider(jaeger: Jaeger, service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=f"{jaeger.otlp_endpoint}/v1/traces")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _tree(spans: list[dict[str, Any]]) -> str:
    """The trace as indented text: service, span name, kind."""
    by_id = {s["spanID"]: s for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in sorted(spans, key=lambda s: s["startTime"]):
        parent = next((r["spanID"] for r in s["references"] if r["refType"] == "CHILD_OF"), None)
        children.setdefault(parent if parent in by_id else None, []).append(s)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in children.get(parent, []):
            kind = next((t["value"] for t in s["tags"] if t["key"] == "span.kind"), "")
            lines.append(f"{'  ' * depth}{s['serviceName']}: {s['operationName']} ({kind})")
            walk(s["spanID"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def _parent(span: dict[str, Any]) -> str | None:
    return next((r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"), None)


def per_task_lines(log: Path, task_id: str) -> list[dict[str, Any]]:
    """The task's own log lines (``task finished``); its id is also in the ``tasks consumed``
    line of its fetch, which lists ids and carries no trace (checked here too)."""
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert any(task_id in x.get("task_ids", ()) for x in lines if x["event"] == "tasks consumed")
    return [x for x in lines if x.get("task_id") == task_id]


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_one_trace_from_the_producers_span_to_the_subscribers(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path, jaeger: Jaeger, delivery: str
) -> None:
    await create_topics(broker, names)
    # Runs until the test has seen it polled (pending), then finishes: two polls at least.
    (task_id,) = await sim_create(sim, [{"model": "m", "duration_s": 600, "outcome": "completed"}])
    service = f"bridge-{names.tag}"
    data = config_data(broker, sim.base_url, names, tracing={"enabled": True})
    data["delivery"] = delivery
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_endpoint,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    daemon = spawn_daemon(data, tmp_path, env=env)
    platform, subscriber = _provider(jaeger, "platform"), _provider(jaeger, "subscriber")
    try:
        # The platform's request: its span's context goes on the input record.
        with platform.get_tracer("test").start_as_current_span(
            f"send {names.input}", kind=SpanKind.PRODUCER
        ) as submit:
            carrier: dict[str, str] = {}
            inject(carrier)
            ctx = submit.get_span_context()
            trace_id, submit_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        headers = [(k, v.encode()) for k, v in carrier.items()]
        async with Tail(broker.bootstrap, [names.completed]) as tail:
            await produce(broker.bootstrap, names.input, [task_id], headers=headers)
            await wait_until(lambda: sim.tasks[task_id].polls >= 1, timeout=60)
            sim_task = sim.tasks[task_id]
            sim_task.duration_s = time.monotonic() - sim_task.created  # it finishes now
            await tail.wait_for(lambda t: task_id in t.subjects(), timeout=60)
        (_, record) = next((at, r) for at, r in tail.records if r.event["subject"] == task_id)
        # The subscriber: the official SDK reads the event; its span continues the record's.
        assert record.event["traceparent"] == carrier["traceparent"]  # the trace it started
        message = KafkaMessage(headers=record.headers, key=record.key, value=record.value or b"")
        modern = kafka.from_structured_event(
            kafka.KafkaMessage(headers=record.headers, key=record.key, value=record.value or b"")
        )
        assert modern.get_attributes()["traceparent"] == carrier["traceparent"]
        # 1.x lets a record's headers override the event's attributes: it reports the
        # bridge's send span instead, a span of the same trace.
        legacy = from_structured(message)
        assert legacy["traceparent"] == record.headers["traceparent"].decode()
        assert legacy["traceparent"].split("-")[1] == trace_id
        parent = TraceContextTextMapPropagator().extract(
            {k: v.decode() for k, v in record.headers.items()}
        )
        with subscriber.get_tracer("test").start_as_current_span(
            f"process {names.completed}", context=parent, kind=SpanKind.CONSUMER
        ):
            pass
        async with httpx.AsyncClient() as client:  # exemplars, as Prometheus asks for them
            metrics = (
                await client.get(
                    f"http://127.0.0.1:{data['server']['port']}/metrics",
                    headers={"Accept": "application/openmetrics-text; version=1.0.0"},
                )
            ).text
    finally:
        daemon.send_signal(signal.SIGTERM)  # exports what is batched on the way out
        await asyncio.to_thread(daemon.wait, 30)
        platform.shutdown()
        subscriber.shutdown()

    wanted = {
        ("platform", f"send {names.input}"),
        (service, f"process {names.input}"),
        (service, "GET"),
        (service, f"send {names.completed}"),
        ("subscriber", f"process {names.completed}"),
    }
    spans: list[dict[str, Any]] = []

    async def fetch() -> bool:
        nonlocal spans
        spans = await jaeger.trace(trace_id)
        return wanted <= {(s["serviceName"], s["operationName"]) for s in spans}

    for _ in range(300):  # until the daemon's last batch is stored
        if await fetch():
            break
        await asyncio.sleep(0.1)
    tree = _tree(spans)
    print(f"trace {trace_id}:\n{tree}")
    assert wanted <= {(s["serviceName"], s["operationName"]) for s in spans}, tree
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_name.setdefault(s["operationName"], []).append(s)
    (send,) = [s for s in spans if s["operationName"] == f"send {names.completed}"]
    (received,) = by_name[f"process {names.completed}"]
    # The bridge's spans sit under the platform's; the subscriber's under the bridge's send.
    assert _parent(by_name[f"process {names.input}"][0]) == submit_id
    assert all(_parent(s) == submit_id for s in by_name["GET"])
    assert _parent(send) == submit_id
    assert _parent(received) == send["spanID"]
    assert len(by_name["GET"]) >= 2  # pending at least once, then completed
    tags = {t["key"]: t["value"] for t in by_name[f"process {names.input}"][0]["tags"]}
    assert tags["messaging.system"] == "kafka"
    assert tags["messaging.consumer.group.name"] == names.group
    assert tags["wavespeed.task.id"] == task_id
    # Logs and metrics name the same trace.
    logged = per_task_lines(tmp_path / "daemon.log", task_id)
    assert logged and all(entry.get("trace_id") == trace_id for entry in logged)
    assert f'trace_id="{trace_id}"' in metrics


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_without_tracing_the_input_context_still_reaches_the_event(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path, mode: str
) -> None:
    """Tracing off (the default): no spans, but the event (read with the official SDK, in
    both content modes) and the log lines still carry the producer's context, so a
    subscriber's trace joins the platform's."""
    await create_topics(broker, names)
    (task_id,) = await sim_create(sim, [{"model": "m", "duration_s": 0.2, "outcome": "completed"}])
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    data = config_data(broker, sim.base_url, names, events={"mode": mode})
    daemon = spawn_daemon(data, tmp_path)
    try:
        headers = [("traceparent", parent.encode()), ("tracestate", b"congo=t61rcWkgMzE")]
        await produce(broker.bootstrap, names.input, [task_id], headers=headers)
        (record,) = await read_all(broker.bootstrap, [names.completed], expect=1, timeout=60)
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
    message = KafkaMessage(headers=record.headers, key=record.key, value=record.value or b"")
    event = from_structured(message) if mode == "structured" else from_binary(message)
    assert event["subject"] == task_id
    assert (event["traceparent"], event["tracestate"]) == (parent, "congo=t61rcWkgMzE")
    logged = per_task_lines(tmp_path / "daemon.log", task_id)
    assert logged and all(e.get("trace_id") == "0af7651916cd43dd8448eb211c80319c" for e in logged)
