"""What tracing costs per task in CPU, in-process and deterministic (issue 20): the spans the
bridge makes for a task, through ``bridge.edges.tracing.Tracing`` as the daemon starts it
(the OpenTelemetry SDK, its BatchSpanProcessor and the OTLP/HTTP exporter), exported to a
local OTLP receiver in another process. Run from the repo root::

    python -m bench.span_cost            # ~1 minute

Per task: the CONSUMER span when it is taken, ``--polls`` CLIENT spans, the PRODUCER span
of its event (started and settled). Tasks come without a trace context (the bridge's
sampler decides), at about ``--rate`` tasks a second (in bursts of 50; the sleeps cost no
CPU), so the processor batches as in the daemon. The cost is the process's CPU time
(``time.process_time``: every thread, so the export thread's encoding and HTTP posts count)
from the first task until the last span is exported (the last, partial batch flushed), over
the tasks; the median of ``--rounds`` rounds, settings interleaved. The receiver counts the
spans it got: a span dropped (a full queue) would be CPU not spent, so the bench fails on one.

``--profile SETTING`` prints a cProfile of one round instead (deterministic, but slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from bench.throughput.stack import publish_md
from bridge.config import build_config
from bridge.core import tracecontext
from bridge.core.events import OutputRecord
from bridge.core.facts import Publish
from bridge.core.outcomes import Kind, Outcome
from bridge.core.tasks import Task
from bridge.edges.tracing import Tracing
from bridge.local.broker import free_port

SETTINGS: dict[str, dict[str, str] | None] = {
    "off": None,
    "on, 1% sampled": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "on, all sampled": {"OTEL_TRACES_SAMPLER": "always_on"},
}
OTEL_VARS = ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_EXPORTER_OTLP_ENDPOINT")
BURST = 50

# An OTLP/HTTP receiver: counts the spans of every export, answers an empty success.
RECEIVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

spans = 0

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global spans
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = ExportTraceServiceRequest.FromString(body)
        spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        self._answer(b"", "application/x-protobuf")

    def do_GET(self):
        self._answer(str(spans).encode(), "text/plain")

    def _answer(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@contextmanager
def receiver() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def received(url: str) -> int:
    return int(urllib.request.urlopen(url, timeout=5).read())


def start(otel: dict[str, str] | None, endpoint: str) -> Tracing:
    for name in OTEL_VARS:
        os.environ.pop(name, None)
    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **(otel or {})})
    config = build_config(
        {
            "kafka": {"input_topic": "wavespeed.tasks", "group_id": "wavespeed-bridge"},
            "api": {"base_url": "http://127.0.0.1:8080"},
            "tracing": {"enabled": otel is not None},
        },
        env={},
    )
    return Tracing.start(config)


def tasks(n: int, first: int) -> list[tuple[Task, Publish]]:
    made = []
    for i in range(first, first + n):
        task_id = f"pred_{i:012d}"
        task = Task(
            task_id=task_id,
            model="wavespeed-ai/flux-dev",
            created=0.0,
            created_wall=0.0,
            first_seen=0.0,
            timeout_s=300.0,
            key=task_id.encode(),
        )
        record = OutputRecord("wavespeed.completed", task_id.encode(), b"{}", [])
        made.append((task, Publish(i, record, None, ("wavespeed.tasks", 0), None, task.model)))
    return made


def run(tracing: Tracing, batch: list[tuple[Task, Publish]], polls: int, rate: float) -> None:
    done = Outcome(Kind.COMPLETED, 200)
    pending = Outcome(Kind.PENDING, 200)
    outcomes = [pending] * (polls - 1) + [done]
    started = time.monotonic()
    for i, (task, p) in enumerate(batch):
        if i % BURST == 0:  # about ``rate`` tasks a second, as a busy daemon takes them
            ahead = started + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        # as bridge.shell: telemetry (taken), dispatch (each poll), delivery (the event)
        if tracing.enabled:
            tracing.consumed(task, 0, i)
        for outcome in outcomes:
            span = tracing.poll(task) if tracing.enabled else None
            if span is not None:
                tracing.polled(span, outcome)
        p = Publish(p.ticket, p.record, None, p.partition, task.trace, p.model)
        if tracing.enabled:
            p = tracing.publish(p)
        if p.settle is not None:
            p.settle(True)


def spans_kept(batch: list[tuple[Task, Publish]], polls: int) -> int:
    return sum(2 + polls for task, _ in batch if tracecontext.recorded(task.trace))


def measure(
    name: str, endpoint: str, n: int, polls: int, rate: float, profile: bool = False
) -> float:
    """CPU seconds per task of ``n`` tasks, every span kept exported."""
    tracing = start(SETTINGS[name], endpoint)
    warm = tasks(500, 0)
    run(tracing, warm, polls, rate)
    provider = tracing._provider
    if provider is not None:
        provider.force_flush()
    before = received(endpoint)
    batch = tasks(n, 500)
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    cpu = time.process_time()
    run(tracing, batch, polls, rate)
    expected = before + spans_kept(batch, polls)
    if provider is not None:  # the last, partial batch now rather than on the schedule
        provider.force_flush()
    cpu = time.process_time() - cpu
    if profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    got = received(endpoint)
    if got != expected:
        raise RuntimeError(f"{name}: the receiver got {got - before} spans, not {expected}")
    tracing.shutdown()
    return cpu / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--polls", type=int, default=1, help="poll spans per task")
    parser.add_argument("--rate", type=float, default=2_000.0, help="tasks a second")
    parser.add_argument("--profile", choices=list(SETTINGS))
    parser.add_argument("--no-write", action="store_true", help="print, do not write")
    args = parser.parse_args()
    with receiver() as endpoint:
        if args.profile:
            measure(args.profile, endpoint, args.tasks, args.polls, args.rate, profile=True)
            return
        results: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name in SETTINGS:
                results[name].append(measure(name, endpoint, args.tasks, args.polls, args.rate))
    spans = 2 + args.polls
    lines = [
        "# What a span costs (issue 20)",
        "",
        f"`python -m bench.span_cost`, {time.strftime('%Y-%m-%d %H:%M')}: {args.tasks} tasks a"
        f" round, {spans} spans a task ({args.polls} poll), ~{args.rate:.0f} tasks/s, median of"
        f" {args.rounds} rounds; CPU of the process (every thread) per task.",
        "",
        "| tracing | CPU per task | rounds (µs) | per span kept, over off |",
        "|---|---|---|---|",
    ]
    for name, values in results.items():
        median = statistics.median(values)
        rounds = ", ".join(f"{v * 1e6:.0f}" for v in values)
        over = (median - statistics.median(results["off"])) * 1e6 / spans
        per_span = f"{over:.1f} µs" if name == "on, all sampled" else "-"
        lines.append(f"| {name} | {median * 1e6:.1f} µs | {rounds} | {per_span} |")
    publish_md("\n".join(lines) + "\n", "span_cost.md", print_only=args.no_write)


if __name__ == "__main__":
    main()
