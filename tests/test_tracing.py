"""Trace context in and out (bridge.core.tracecontext, the core's events) and the bridge's
spans (bridge.edges.tracing) on the OpenTelemetry SDK with an in-memory exporter; the
exemplars of /metrics in OpenMetrics. The whole trace through Kafka and Jaeger is
tests/test_tracing_flow.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from bridge.config import build_config
from bridge.core import tracecontext
from bridge.core.book import Core
from bridge.core.clock import ManualClock
from bridge.core.events import OutputRecord
from bridge.core.facts import Consumed, Publish
from bridge.core.messages import Record
from bridge.core.outcomes import ErrorKind, Kind, Outcome
from bridge.edges.metrics import Metrics
from bridge.edges.tracing import Tracing
from bridge.shell.telemetry import Telemetry
from tests.test_core import T, completed, make, pending, poll_all, published

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
PARENT = f"00-{TRACE_ID}-{SPAN_ID}-01".encode()


def test_a_traceparent_is_kept_packed_and_written_back_the_same() -> None:
    packed = tracecontext.parse(PARENT)
    assert packed is not None
    assert tracecontext.traceparent(packed) == PARENT.decode()
    assert tracecontext.ids(packed) == (TRACE_ID, SPAN_ID)
    assert tracecontext.parse(PARENT.upper().replace(b"00-", b"00-", 1)) == packed


@pytest.mark.parametrize(
    "value",
    [
        b"00-" + b"0" * 32 + f"-{SPAN_ID}-01".encode(),  # all-zero trace id
        f"00-{TRACE_ID}-".encode() + b"0" * 16 + b"-01",  # all-zero span id
        f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01".encode(),  # short
        f"00-{TRACE_ID}-{SPAN_ID}-0g".encode(),  # not hex
        f"ff-{TRACE_ID}-{SPAN_ID}-01".encode(),  # a version this one does not read
        b"\xff\xfe",
        b"",
    ],
)
def test_a_broken_traceparent_is_no_context(value: bytes) -> None:
    assert tracecontext.parse(value) is None
    assert tracecontext.from_headers((("traceparent", value),)) is None


def test_the_context_comes_from_traceparent_or_a_binary_cloudevents_ce_traceparent() -> None:
    other = f"00-{'1' * 32}-{'2' * 16}-00".encode()
    both = (("ce_traceparent", other), ("traceparent", PARENT), ("tracestate", b"vendor=x"))
    t = tracecontext.from_headers(both)
    assert t is not None and tracecontext.traceparent(t) == PARENT.decode()
    assert tracecontext.tracestate(t) == "vendor=x"
    ce = tracecontext.from_headers((("ce_traceparent", other), ("ce_tracestate", b"a=1")))
    assert ce is not None and tracecontext.traceparent(ce) == other.decode()
    assert tracecontext.tracestate(ce) == "a=1"
    # A tracestate over the W3C limit, or not text, is left out; the traceparent stays.
    long = tracecontext.from_headers((("traceparent", PARENT), ("tracestate", b"a" * 600)))
    assert long is not None and tracecontext.tracestate(long) == ""


def traced(offset: int, headers: tuple[tuple[str, bytes | None], ...]) -> Record:
    value = json.dumps({"task_id": f"task{offset}"}).encode()
    return Record(T, 0, offset, b"k", value, headers, None)


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_the_event_carries_the_trace_the_task_started_with(mode: str) -> None:
    clock = ManualClock()
    core = make(clock, events={"mode": mode})
    headers = (("traceparent", PARENT), ("tracestate", b"congo=t61rcWkgMzE"))
    (consumed,) = core.on_record(traced(0, headers), clock.read())
    assert isinstance(consumed, Consumed) and consumed.task.trace is not None
    clock.advance(1.0)
    (p,) = published(poll_all(core, clock, completed()))
    assert p.trace == consumed.task.trace and p.model == "m"
    record = p.record
    if mode == "structured":
        event = json.loads(record.value or b"")
        assert (event["traceparent"], event["tracestate"]) == (
            PARENT.decode(),
            "congo=t61rcWkgMzE",
        )
    else:
        h = dict(record.headers)
        assert (h["ce_traceparent"], h["ce_tracestate"]) == (PARENT, b"congo=t61rcWkgMzE")


def test_without_a_context_the_event_has_no_trace_attributes() -> None:
    clock = ManualClock()
    core = make(clock)
    core.on_record(traced(0, ()), clock.read())
    clock.advance(1.0)
    (p,) = published(poll_all(core, clock, completed()))
    assert "traceparent" not in json.loads(p.record.value or b"")
    assert p.trace is None


def test_a_dead_letter_keeps_the_inputs_context() -> None:
    clock = ManualClock()
    core = make(clock)
    bad = Record(T, 0, 0, b"k", b"{not json", (("traceparent", PARENT),), None)
    (p,) = published(core.on_record(bad, clock.read()))
    assert p.trace is not None and tracecontext.traceparent(p.trace) == PARENT.decode()
    assert ("traceparent", PARENT) in list(p.record.headers)


# --- spans -------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, group="g", input_topic=T, api_url="http://api.test:8080")
    yield tracing, exporter
    provider.shutdown()


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


def parent_of(span: ReadableSpan) -> tuple[str, str] | None:
    if span.parent is None:
        return None
    return f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}"


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def test_spans_of_a_task_are_children_of_the_producers_context(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = spans
    clock = ManualClock()
    core = make(clock)
    (consumed,) = core.on_record(traced(7, (("traceparent", PARENT),)), clock.read())
    assert isinstance(consumed, Consumed)
    task = consumed.task
    tracing.consumed(task, 0, 7)
    span = tracing.poll(task)
    assert span is not None
    tracing.polled(span, Outcome(Kind.PENDING, 200))
    span = tracing.poll(task)
    assert span is not None
    tracing.polled(span, Outcome(Kind.TRANSIENT, 503, reason="503", error=ErrorKind.SERVER_ERROR))
    clock.advance(1.0)
    (p,) = published(poll_all(core, clock, completed()))
    sent = tracing.publish(p)
    assert sent.settle is not None
    sent.settle(True)

    process = one(exporter, f"process {T}")
    assert process.kind is SpanKind.CONSUMER and parent_of(process) == (TRACE_ID, SPAN_ID)
    attrs: dict[str, Any] = dict(process.attributes or {})
    assert attrs["messaging.system"] == "kafka"
    assert attrs["messaging.destination.name"] == T
    assert attrs["messaging.destination.partition.id"] == "0"
    assert attrs["messaging.kafka.offset"] == 7
    assert attrs["messaging.consumer.group.name"] == "g"
    assert attrs["wavespeed.task.id"] == "task7"
    polls = [s for s in exporter.get_finished_spans() if s.name == "GET"]
    assert [s.kind for s in polls] == [SpanKind.CLIENT] * 2
    assert all(parent_of(s) == (TRACE_ID, SPAN_ID) for s in polls)
    assert [dict(s.attributes or {}).get("http.response.status_code") for s in polls] == [
        200,
        503,
    ]
    assert polls[1].status.status_code is StatusCode.ERROR
    assert dict(polls[1].attributes or {})["error.type"] == ErrorKind.SERVER_ERROR.value
    assert dict(polls[0].attributes or {})["server.address"] == "api.test"
    send = one(exporter, f"send {p.record.topic}")
    assert send.kind is SpanKind.PRODUCER and parent_of(send) == (TRACE_ID, SPAN_ID)
    # The record's traceparent header is the PRODUCER span's context (one only).
    header = [v for k, v in sent.record.headers if k == "traceparent"]
    trace_id, span_id = hex_ids(send)
    assert header == [f"00-{trace_id}-{span_id}-01".encode()]
    # The event itself still names the trace the task started with.
    assert json.loads(sent.record.value or b"")["traceparent"] == PARENT.decode()
    assert sent.reduced is not None
    assert ("traceparent", header[0]) in list(sent.reduced().headers)


def test_a_task_without_a_context_starts_its_trace_at_the_consume_span(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = spans
    clock = ManualClock()
    core = make(clock)
    (consumed,) = core.on_record(traced(0, ()), clock.read())
    assert isinstance(consumed, Consumed)
    tracing.consumed(consumed.task, 0, 0)
    process = one(exporter, f"process {T}")
    assert process.parent is None
    assert consumed.task.trace is not None
    assert tracecontext.ids(consumed.task.trace) == hex_ids(process)
    clock.advance(1.0)
    (p,) = published(poll_all(core, clock, completed()))
    event = json.loads(p.record.value or b"")
    assert event["traceparent"] == tracecontext.traceparent(consumed.task.trace)


def test_a_send_not_delivered_ends_in_error(spans: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracing, exporter = spans
    recorded = tracecontext.mark_recorded(tracecontext.parse(PARENT) or 0)
    record = OutputRecord("out", b"k", b"v", [("traceparent", b"stale")])
    p = Publish(1, record, None, trace=recorded)
    sent = tracing.publish(p)
    assert [k for k, _ in sent.record.headers].count("traceparent") == 1
    assert exporter.get_finished_spans() == ()  # open until settled
    assert sent.settle is not None
    sent.settle(False)
    assert one(exporter, "send out").status.status_code is StatusCode.ERROR


def test_a_webhook_delivery_is_a_server_span_under_the_senders_context(
    spans: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = spans
    span = tracing.webhook("/webhooks/wavespeed", {"traceparent": PARENT.decode()})
    Tracing.answered(span, 200, "accepted", "task1")
    got = one(exporter, "POST /webhooks/wavespeed")
    assert got.kind is SpanKind.SERVER and parent_of(got) == (TRACE_ID, SPAN_ID)
    attrs = dict(got.attributes or {})
    assert attrs["http.response.status_code"] == 200
    assert attrs["wavespeed.task.id"] == "task1"


UNSAMPLED = f"00-{TRACE_ID}-{SPAN_ID}-00".encode()


@pytest.mark.parametrize(
    ("sampler", "parent", "recorded"),
    [
        (ParentBased(ALWAYS_ON), PARENT, True),
        (ParentBased(ALWAYS_ON), UNSAMPLED, False),  # the producer's decision stands
        (ALWAYS_ON, UNSAMPLED, True),
        (ALWAYS_OFF, PARENT, False),
        (ParentBased(TraceIdRatioBased(0.0)), None, False),
        (ParentBased(TraceIdRatioBased(1.0)), None, True),
    ],
)
def test_the_sampler_decides_once_per_task_and_a_task_left_out_costs_no_span(
    sampler: Sampler, parent: bytes | None, recorded: bool
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, group="g", input_topic=T, api_url="http://api.test")
    clock = ManualClock()
    core = make(clock)
    headers = (("traceparent", parent),) if parent is not None else ()
    (consumed,) = core.on_record(traced(0, headers), clock.read())
    assert isinstance(consumed, Consumed)
    tracing.consumed(consumed.task, 0, 0)
    assert consumed.task.trace is not None  # the context goes on either way
    assert tracecontext.recorded(consumed.task.trace) is recorded
    span = tracing.poll(consumed.task)
    assert (span is not None) is recorded
    if span is not None:
        tracing.polled(span, Outcome(Kind.PENDING, 200))
    clock.advance(1.0)
    (p,) = published(poll_all(core, clock, completed()))
    sent = tracing.publish(p)
    if sent.settle is not None:
        sent.settle(True)
    assert (sent is p) is not recorded
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == (sorted(["GET", f"process {T}", f"send {p.record.topic}"]) if recorded else [])
    if parent is not None:  # the event names the producer's trace, sampled or not
        event = json.loads(p.record.value or b"")
        assert event["traceparent"] == parent.decode()
    provider.shutdown()


def test_tracing_is_off_by_default_and_then_makes_no_spans() -> None:
    config = build_config({"kafka": {"input_topic": T}}, env={})
    assert not Tracing.start(config).enabled


def test_a_new_trace_is_sampled_before_any_span_and_a_kept_one_has_the_id_sampled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tasks that came without a context, through ``Tracing.start`` (its id generator):
    the dropped ones make no span, the kept ones' span is in the trace the task carries."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    config = build_config({"kafka": {"input_topic": T}, "tracing": {"enabled": True}}, env={})
    exporter = InMemorySpanExporter()
    tracing = Tracing.start(config, exporter)
    clock = ManualClock()
    core: Core = make(clock)
    tasks = []
    for offset in range(400):
        (fact, *_) = core.on_record(rec_plain(offset), clock.read())
        assert isinstance(fact, Consumed)
        tracing.consumed(fact.task, fact.partition, fact.offset)
        tasks.append(fact.task)
    tracing.shutdown()  # the batch exported
    spans = {s.context.trace_id: s for s in exporter.get_finished_spans()}
    kept = [t for t in tasks if t.trace is not None and tracecontext.recorded(t.trace)]
    assert 60 <= len(kept) <= 140  # a quarter of 400, give or take the dice
    assert len(spans) == len(kept)  # no span for a task left out
    for t in tasks:
        assert t.trace is not None
        trace_id, span_id, flags, _ = tracecontext.unpack(t.trace)
        if t in kept:  # the span is the one the task's context names
            assert spans[trace_id].context.span_id == span_id
            assert flags == int(spans[trace_id].context.trace_flags)
        else:  # the flags a dropped root span has: a random id, not sampled
            assert trace_id not in spans and flags == 2 and trace_id and span_id


@given(
    st.integers(min_value=1, max_value=(1 << 128) - 1),
    st.sampled_from([0.0, 0.01, 0.25, 0.5, 1.0]),
)
def test_a_ratio_samplers_decision_is_the_sdks_for_every_trace_id(
    trace_id: int, rate: float
) -> None:
    """The ratio sampler's decision is taken without asking the SDK (one comparison): it
    must be the one the SDK's ``should_sample`` takes, for a new trace and for a parent's."""
    sampler = TraceIdRatioBased(rate)
    tracing = Tracing(TracerProvider(sampler=sampler), group="g", input_topic=T, api_url="http://a")
    sdk = sampler.should_sample(None, trace_id, "n").decision is Decision.RECORD_AND_SAMPLE
    assert tracing._samples_root(trace_id, "n") is sdk
    parent = tracecontext.pack(trace_id, 1, 1)
    assert tracing._samples(parent, "n") is sdk


def rec_plain(offset: int) -> Record:
    return Record(T, 0, offset, None, f"task-{offset}".encode(), (), None)


# --- exemplars ---------------------------------------------------------------------------


def test_histograms_carry_the_trace_id_as_an_exemplar_in_openmetrics() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    clock = ManualClock()
    core: Core = make(clock)
    metrics = Metrics()
    telemetry = Telemetry(metrics, core, now=0.0)
    consumed = core.on_record(traced(0, (("traceparent", PARENT),)), clock.read())
    telemetry.observe([e for e in consumed if not isinstance(e, Publish)])
    clock.advance(1.0)
    poll_all(core, clock, pending())  # a pending poll, then the terminal one: a delay bound
    clock.advance(1.0)
    effects = poll_all(core, clock, completed())
    for p in published(effects):
        acked = core.acknowledged(p.ticket, clock.read())
        telemetry.observe([e for e in acked if not isinstance(e, Publish)])
    found: dict[str, str] = {}
    exposed = openmetrics(metrics.registry).decode()  # type: ignore[no-untyped-call]
    for family in text_string_to_metric_families(exposed):  # type: ignore[no-untyped-call]
        for sample in family.samples:
            if sample.exemplar is not None:
                found[family.name] = sample.exemplar.labels["trace_id"]
    assert found.get("wavespeed_bridge_end_to_end_latency_seconds") == TRACE_ID
    assert found.get("wavespeed_bridge_detection_delay_bound_seconds") == TRACE_ID
    assert b"trace_id" not in generate_latest(metrics.registry)  # the Prometheus text format
