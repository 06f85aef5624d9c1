"""OpenTelemetry tracing: the bridge's spans, on the OpenTelemetry SDK, exported over OTLP.

Off by default (``tracing.enabled``). When on, the standard ``OTEL_*`` environment
variables configure it as in any instrumented service: ``OTEL_EXPORTER_OTLP_ENDPOINT``
(OTLP over HTTP), ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG`` (default: parent
based, always on), ``OTEL_SERVICE_NAME`` (default ``wavespeed-bridge``), and the others the
SDK reads. The spans follow the semantic conventions for messaging and HTTP:

- ``process <input topic>`` (CONSUMER), short, when a record becomes a task: a child of the
  producer's context (the record's ``traceparent``), or the root of a new trace;
- ``GET`` (CLIENT) for each result poll, never one span open for the minutes a task takes;
- ``POST <webhook path>`` (SERVER) for each webhook delivery;
- ``send <topic>`` (PRODUCER) for each event, from the send to the broker's acknowledgement
  (in exactly-once mode, the transaction's commit); its context is the record's
  ``traceparent`` header.

Every span of a task is a child of the context the task started with
(``bridge.core.tracecontext``): polls and the event's send sit beside the consume span.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import Status, StatusCode

from bridge import __version__
from bridge.config import Config
from bridge.core import tracecontext
from bridge.core.events import OutputRecord
from bridge.core.facts import Publish
from bridge.core.outcomes import Outcome
from bridge.core.tasks import Task
from bridge.core.tracecontext import Trace

if TYPE_CHECKING:  # the SDK is imported only when tracing is on
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.sdk.trace.id_generator import IdGenerator

SYSTEM = "kafka"
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


_NO_STATE = TraceState()  # immutable: one for every context without a tracestate


def _context(t: Trace | None) -> Context | None:
    """The parent context for a span of a task that started with ``t``."""
    if t is None:
        return None
    trace_id, span_id, flags, state = tracecontext.unpack(t)
    parent = SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=TraceFlags(flags),
        trace_state=TraceState.from_header([state]) if state else _NO_STATE,
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


# The BatchSpanProcessor's defaults the bridge sets, unless OTEL_BSP_MAX_QUEUE_SIZE or
# OTEL_BSP_MAX_EXPORT_BATCH_SIZE is set: batches of 2,048 spans (fewer OTLP requests, each a
# few hundred KB) and room for four of them, so a burst at full sampling is not dropped.
BSP_MAX_QUEUE_SIZE = 8192
BSP_MAX_EXPORT_BATCH_SIZE = 2048


def _processor(exporter: SpanExporter) -> BatchSpanProcessor:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if {"OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"} & os.environ.keys():
        return BatchSpanProcessor(exporter)  # the user's, as the SDK reads them
    return BatchSpanProcessor(
        exporter,
        max_queue_size=BSP_MAX_QUEUE_SIZE,
        max_export_batch_size=BSP_MAX_EXPORT_BATCH_SIZE,
    )


def _resource(name: str) -> Resource:
    """The SDK's resource (``OTEL_RESOURCE_ATTRIBUTES``, the service name, the SDK's own),
    hashed once: the OTLP encoder looks every span's resource up in a dict, and the SDK's
    ``Resource.__hash__`` dumps its attributes as JSON each time (~3 µs a span)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    class _HashedOnce(Resource):
        def __init__(self, resource: Resource) -> None:
            super().__init__(resource.attributes, resource.schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return _HashedOnce(Resource.create({SERVICE_NAME: name}))


class Poll:
    """A result poll under way for a recorded task: its CLIENT span is made when the answer
    is known (``Tracing.polled``), with its start time and every attribute at once."""

    __slots__ = ("start", "task")

    def __init__(self, task: Task, start: int) -> None:
        self.task, self.start = task, start


def _parent_based(provider: TracerProvider) -> bool:
    from opentelemetry.sdk.trace.sampling import ParentBased

    return isinstance(provider.sampler, ParentBased)


_RANDOM_ID = int(trace.TraceFlags.RANDOM_TRACE_ID)
_LOW64 = (1 << 64) - 1  # TraceIdRatioBased.TRACE_ID_LIMIT: what a ratio sampler reads


def _preset_ids() -> IdGenerator:
    """The SDK's random ids, except that the next trace id can be chosen: a task that starts
    a trace is sampled before any span is made (a dropped root span cost ~6 µs a task, at
    every ratio), and a kept one gets its span with the trace id the sampler saw."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        def __init__(self) -> None:
            self.next_trace_id = 0

        def generate_trace_id(self) -> int:
            chosen, self.next_trace_id = self.next_trace_id, 0
            return chosen or super().generate_trace_id()

    return PresetIds()


def _packed(span: Span) -> int:
    ctx = span.get_span_context()
    return tracecontext.pack(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))


class Tracing:
    """The bridge's tracer, or nothing at all when tracing is off (``enabled`` False: every
    caller checks it first, so the hot path pays one attribute read)."""

    def __init__(
        self, provider: TracerProvider | None, *, group: str, input_topic: str, api_url: str
    ) -> None:
        self._provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("wavespeed_bridge", __version__) if provider else None
        self._group, self._input = group, input_topic
        url = urlsplit(api_url)
        self._api_host = url.hostname or ""
        self._api_port = url.port or (443 if url.scheme == "https" else 80)
        self._parent_based = provider is not None and _parent_based(provider)
        self._record_and_sample: object = None
        ids = provider.id_generator if provider is not None else None
        self._ids = ids if ids is not None and hasattr(ids, "next_trace_id") else None
        self._consumed_name = f"process {input_topic}"
        # The ratio sampler's decision is one comparison of the trace id's low 64 bits with
        # its bound; asked of the SDK, it builds a result and reads the context (~1.5 µs a
        # task). Only that exact class: any other sampler is asked (tests compare the two).
        self._ratio_bound: int | None = None
        if provider is not None:
            from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

            self._record_and_sample = Decision.RECORD_AND_SAMPLE
            if type(provider.sampler) is TraceIdRatioBased:
                self._ratio_bound = provider.sampler.bound

    @classmethod
    def start(cls, config: Config, exporter: SpanExporter | None = None) -> Tracing:
        names = {
            "group": config.kafka.group_id,
            "input_topic": config.kafka.input_topic,
            "api_url": config.api.base_url,
        }
        if not config.tracing.enabled:
            return cls(None, **names)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider

        name = os.environ.get("OTEL_SERVICE_NAME") or "wavespeed-bridge"
        provider = TracerProvider(resource=_resource(name), id_generator=_preset_ids())
        provider.add_span_processor(_processor(exporter or OTLPSpanExporter()))
        return cls(provider, **names)

    def shutdown(self) -> None:
        """Export what is left (blocking: call it from a thread)."""
        if self._provider is not None:
            self._provider.shutdown()

    @property
    def _t(self) -> trace.Tracer:
        assert self._tracer is not None, "tracing is off"
        return self._tracer

    # --- spans ---------------------------------------------------------------------------

    def consumed(self, task: Task, partition: int, offset: int) -> None:
        """The short CONSUMER span of a record that became a task; a task that came without
        a context starts its trace here. The sampler decides here, once per task: a task it
        leaves out costs its later polls and its send one bit test each, and no span."""
        name = self._consumed_name
        t = task.trace
        if t is not None:
            if not self._samples(t, name):
                return  # the input's context goes on, unrecorded
            # Kept: the attributes go in with the span (cheaper than set after).
            span = self._t.start_span(
                name,
                context=_context(t),
                kind=SpanKind.CONSUMER,
                attributes=self._consumed_attributes(task, partition, offset),
            )
        else:  # a new trace: sampled before a span is made, attributes only if kept
            if self._ids is not None:
                trace_id = self._ids.generate_trace_id()
                if not self._samples_root(trace_id, name):
                    # The flags the SDK gives a dropped root: not sampled, a random id.
                    flags = _RANDOM_ID if self._ids.is_trace_id_random() else 0
                    task.trace = tracecontext.pack(trace_id, self._ids.generate_span_id(), flags)
                    return
                self._ids.next_trace_id = trace_id  # the span gets the id sampled
            span = self._t.start_span(name, kind=SpanKind.CONSUMER)
            t = _packed(span)
            if span.is_recording():
                span.set_attributes(self._consumed_attributes(task, partition, offset))
        if span.is_recording():
            t = tracecontext.mark_recorded(t)
        task.trace = t
        span.end()

    def _consumed_attributes(self, task: Task, partition: int, offset: int) -> dict[str, str | int]:
        return {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": self._input,
            "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset,
            "messaging.consumer.group.name": self._group,
            "wavespeed.task.id": task.task_id,
            "wavespeed.model": task.model or "",
        }

    def _samples(self, t: Trace, name: str) -> bool:
        """The sampler's decision for a task that came with context ``t``, taken without
        making a span: a parent-based sampler follows the producer's sampled flag (the
        defaults of every ``OTEL_TRACES_SAMPLER`` choice), the others decide by trace id."""
        if self._parent_based:
            return tracecontext.sampled(t)
        return self._samples_root(tracecontext.unpack(t)[0], name)

    def _samples_root(self, trace_id: int, name: str) -> bool:
        """The sampler's decision by trace id alone, as for a span starting a trace."""
        assert self._provider is not None
        if self._ratio_bound is not None:
            return trace_id & _LOW64 < self._ratio_bound
        decision = self._provider.sampler.should_sample(None, trace_id, name, SpanKind.CONSUMER)
        return decision.decision is self._record_and_sample

    def poll(self, task: Task) -> Poll | None:
        """Start timing the CLIENT span of one result poll (None for a task not recorded);
        :meth:`polled` makes and ends it."""
        if not tracecontext.recorded(task.trace):
            return None
        return Poll(task, time.time_ns())

    def polled(self, poll: Poll, outcome: Outcome) -> None:
        """The poll's span, made whole at once: every attribute at its creation (no
        ``set_attribute`` calls), started when the poll was and ended now."""
        task = poll.task
        attributes: dict[str, str | int] = {
            "http.request.method": "GET",
            "server.address": self._api_host,
            "server.port": self._api_port,
            "wavespeed.task.id": task.task_id,
        }
        if outcome.status_code is not None:
            attributes["http.response.status_code"] = outcome.status_code
        attributes["wavespeed.outcome"] = outcome.kind.value
        if outcome.error is not None:  # no usable answer: the HTTP conventions' error.type
            attributes["error.type"] = outcome.error.value
        span = self._t.start_span(
            "GET",
            context=_context(task.trace),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=poll.start,
        )
        if outcome.error is not None:
            span.set_status(Status(StatusCode.ERROR, outcome.reason[:200]))
        span.end()

    def publish(self, p: Publish) -> Publish:
        """``p`` with the PRODUCER span of its record started: the span's context in the
        record's ``traceparent`` header, and ``settle`` ending the span (with whether the
        record was delivered: acknowledged, or committed in its transaction). A task not
        recorded keeps its record as it is (the input's ``traceparent`` among its headers)."""
        if not tracecontext.recorded(p.trace):
            return p
        span = self._t.start_span(
            f"send {p.record.topic}",
            context=_context(p.trace),
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": p.record.topic,
                "messaging.kafka.message.key": (p.record.key or b"").decode("utf-8", "replace"),
                "wavespeed.model": p.model or "",
            },
        )
        header = ("traceparent", tracecontext.traceparent(_packed(span)).encode())

        def traced(record: OutputRecord) -> OutputRecord:
            kept = [(k, v) for k, v in record.headers if k.lower() not in _TRACE_HEADERS]
            return OutputRecord(record.topic, record.key, record.value, [*kept, header])

        def settle(delivered: bool) -> None:
            if not delivered:
                span.set_status(Status(StatusCode.ERROR, "not delivered"))
            span.end()

        reduced = p.reduced
        return dataclasses.replace(
            p,
            record=traced(p.record),
            reduced=(lambda: traced(reduced())) if reduced is not None else None,
            settle=settle,
        )

    def webhook(self, path: str, headers: Mapping[str, str]) -> Span:
        """Start the SERVER span of one webhook delivery (a child of the sender's context,
        if it sent one); :meth:`answered` ends it."""
        parent = _PROPAGATOR.extract(headers)
        return self._t.start_span(
            f"POST {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": path, "url.path": path},
        )

    @staticmethod
    def answered(span: Span, status: int, result: str, task_id: str | None) -> None:
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("wavespeed.webhook.result", result)
        if task_id is not None:
            span.set_attribute("wavespeed.task.id", task_id)
        if status >= 500:  # the sender retries; a 4xx is the sender's error, not ours
            span.set_status(Status(StatusCode.ERROR, result))
        span.end()
