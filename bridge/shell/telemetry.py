"""The core's facts and the dispatch loop's measurements into log lines and Prometheus series.

Every fact type of :data:`bridge.core.facts.Fact` is matched in :meth:`Telemetry.observe`
(mypy proves the match complete) and has one small handler here. The dispatch loop reports
each request through :meth:`Telemetry.request_done`, and :meth:`Telemetry.gauges` samples
the core's state. It is not the only writer of either: other modules of the shell and the
edges (intake, the delivery modes, the health checks, the webhook receiver, the app's start
and stop) write their own metrics and log lines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import assert_never

import structlog

from bridge.core import facts, tracecontext
from bridge.core.book import Core
from bridge.core.facts import Fact
from bridge.core.outcomes import Kind, Outcome, status_class
from bridge.core.tasks import Task
from bridge.core.tracecontext import Trace
from bridge.edges.metrics import Children, Metrics
from bridge.edges.tracing import Tracing

log = structlog.get_logger("wavespeed_bridge")
TAKEN_LINE_MAX = 500  # task ids per ``tasks consumed`` line (a line stays a few KiB)


class Telemetry:
    def __init__(
        self, metrics: Metrics, core: Core, tracing: Tracing | None = None, *, now: float
    ) -> None:
        self.metrics = metrics
        self.tracing = tracing or Tracing.start(core.config)  # off unless configured
        self._core = core
        self._tenants = core.tenants_enabled
        self._tenant_labels = core.config.tenants.max_labels
        self._budget_wait_seen = 0.0
        self._taken_seen = 0  # scheduler.taken at the last gauge sample
        self._sampled_at = now
        # Bound now (after logs.configure): the module's proxy binds again on every line.
        self._log = log.bind()
        self._debug = self._log.is_enabled_for(logging.DEBUG)
        self._api_up = -1  # what api_up was last set to
        # partition -> (offset, task id, trace) taken since the fetch began
        self._taken: dict[int, list[tuple[int, str, Trace | None]]] = {}
        m = metrics
        m.in_flight.set_function(lambda: core.in_flight)
        self._consumed_n = Children(m.consumed, m.tallies)
        self._finished_n = Children(m.finished, m.tallies)
        self._published_n = Children(m.published, m.tallies)
        self._polls = Children(m.polls_per_task, m.tallies)
        self._end_to_end = Children(m.end_to_end, m.tallies)
        self._inference = Children(m.inference, m.tallies)
        self._delay = Children(m.detection_delay, m.tallies)
        self._responses = Children(m.api_responses, m.tallies)
        self._publish_latency = m.tallies.of(m.publish_latency)
        self._request_duration = m.tallies.of(m.api_request_duration)
        self.poll_lateness = m.tallies.of(m.poll_lateness)

    def observe(self, observed: Iterable[Fact]) -> None:
        """Report facts. A :class:`~bridge.core.facts.Publish` never comes here: the shell
        routes it to the delivery mode."""
        for fact in observed:
            # Each case is an isinstance check in turn: a task's three facts come first.
            match fact:
                case facts.Consumed():
                    self._consumed(fact)
                case facts.Finished():
                    self._finished(fact)
                case facts.Delivered():
                    self._delivered(fact)
                case facts.Joined():
                    self._joined(fact)
                case facts.Revived():
                    self._revived(fact)
                case facts.Held():
                    pass  # counted by the gauges' sample: one per record would cost
                case facts.TenantUnknown():
                    self.metrics.tenant_unknown.inc()
                case facts.HeadersDropped():
                    self.metrics.headers_dropped.inc(fact.count)
                case facts.Skipped():
                    self._skipped(fact)
                case facts.DeadLettered():
                    self._dead_lettered(fact)
                case facts.DeadLetterDelivered():
                    self._dead_letter_delivered(fact)
                case facts.Paused():
                    self._paused(fact)
                case facts.PausedByPeer():
                    self._paused_by_peer(fact)
                case facts.Released():
                    self._released(fact)
                case facts.Assigned():
                    self._assigned(fact)
                case facts.DeliveryApplied():
                    self._delivery_applied(fact)
                case facts.DeliveryLate():
                    self.metrics.webhook_late.inc()
                case facts.DeliveryExpired():
                    self._delivery_expired(fact)
                case facts.WebhookFeed():
                    self._webhook_feed(fact)
                case _:
                    assert_never(fact)

    # --- facts -----------------------------------------------------------------------------

    def _consumed(self, f: facts.Consumed) -> None:
        self._consumed_n(self.metrics.model_label(f.task.model)).inc()
        if self.tracing.enabled:
            self.tracing.consumed(f.task, f.partition, f.offset)
        taken = self._taken.get(f.partition)
        if taken is None:
            taken = self._taken[f.partition] = []
        taken.append((f.offset, f.task.task_id, f.task.trace))
        if len(taken) >= TAKEN_LINE_MAX:
            self._say_taken(f.partition, taken)
            del self._taken[f.partition]

    def intake_batch_done(self) -> None:
        """The tasks a fetch brought, one ``tasks consumed`` line per partition: ids and
        offsets, so a task id or an offset is still found by a search. One line per task
        cost ~7 µs of the ~200 µs a task costs (issue 22); the task's own line is its
        ``task finished``, and ``log.level: DEBUG`` adds a ``task consumed`` line each."""
        for partition, taken in self._taken.items():
            self._say_taken(partition, taken)
        self._taken.clear()

    def _say_taken(self, partition: int, taken: list[tuple[int, str, Trace | None]]) -> None:
        self._log.info(
            "tasks consumed",
            partition=partition,
            offsets=[taken[0][0], taken[-1][0]],
            count=len(taken),
            task_ids=[task_id for _, task_id, _ in taken],
        )
        if self._debug:
            for offset, task_id, trace in taken:
                self._log.debug(
                    "task consumed",
                    task_id=task_id,
                    partition=partition,
                    offset=offset,
                    trace=trace,
                )

    def _joined(self, f: facts.Joined) -> None:
        self.metrics.duplicates.inc()
        log.info(
            "duplicate task id joined the one in flight",
            task_id=f.task_id,
            partition=f.partition,
            offset=f.offset,
        )

    def _revived(self, f: facts.Revived) -> None:
        # Not counted: "partitions assigned" already says how many parked tasks were kept to
        # be revived, and a revived task goes on as if never parked. Traced at debug level.
        log.debug(
            "parked task revived",
            task_id=f.task.task_id,
            polls=f.task.polls,
            partition=f.task.origins[0][1] if f.task.origins else None,
            offset=f.task.origins[0][2] if f.task.origins else None,
            trace=f.task.trace,
        )

    def _skipped(self, f: facts.Skipped) -> None:
        self.metrics.records_skipped.inc()

    def _dead_lettered(self, f: facts.DeadLettered) -> None:
        log.warning(
            "message dead-lettered",
            reason=f.reason,
            detail=f.detail,
            partition=f.partition,
            offset=f.offset,
        )

    def _dead_letter_delivered(self, f: facts.DeadLetterDelivered) -> None:
        self.metrics.dead_letters.labels(f.reason).inc()
        self.metrics.published.labels("dead_letter").inc()

    def _finished(self, f: facts.Finished) -> None:
        t = f.task
        origins = t.origins  # derived on each read (core.tasks): read once
        self._log.info(
            "task finished",
            task_id=t.task_id,
            model=t.model,
            outcome=f.kind,
            polls=t.polls,
            reason=f.reason,
            partition=origins[0][1] if origins else None,
            offset=origins[0][2] if origins else None,
            trace=t.trace,
        )

    def _delivered(self, f: facts.Delivered) -> None:
        m, t, kind = self.metrics, f.task, f.kind
        model = m.model_label(t.model)
        self._finished_n(model, kind).inc()
        self._published_n(kind).inc()
        self._polls(model).observe(t.polls)
        exemplar = exemplar_of(t)
        self._end_to_end(model, kind).observe(max(0.0, f.at.wall - t.created_wall), exemplar)
        self._publish_latency.observe(max(0.0, f.at.mono - f.finished.mono))
        p = t.prediction
        if kind == "completed" and p is not None and p.inference_ms is not None:
            self._inference(model).observe(p.inference_ms / 1000.0)
        delay = None
        if kind != "timeout" and t.last_pending_poll is not None:
            delay = f.finished.mono - t.last_pending_poll
            self._delay(model).observe(delay, exemplar)
        if self._tenants:
            tenant = m.tenant_label(t.tenant)
            m.tenant_finished.labels(tenant, kind).inc()
            if delay is not None:
                m.tenant_delay.labels(tenant).observe(delay)
        if t.delivered_wall is not None:
            m.delivery_to_event.observe(max(0.0, f.at.wall - t.delivered_wall))

    def _delivery_applied(self, f: facts.DeliveryApplied) -> None:
        m = self.metrics
        m.webhook_finished.labels("confirm_poll" if f.confirm else "delivery").inc()
        m.polls_avoided.inc(f.spared)
        self._log.info(
            "webhook delivery applied",
            task_id=f.task.task_id,
            webhook_id=f.webhook_id,
            confirm_by_poll=f.confirm,
            trace=f.task.trace,
        )

    def _delivery_expired(self, f: facts.DeliveryExpired) -> None:
        if f.mine:  # counted once, by the replica that received it
            self.metrics.webhook_deliveries.labels("unknown_task").inc()
            log.info("webhook delivery for a task no replica took", task_id=f.task_id)

    def _webhook_feed(self, f: facts.WebhookFeed) -> None:
        self.metrics.webhook_feed_live.set(1 if f.live else 0)
        if f.live:
            log.info("webhook feed live: polls wait for deliveries", rescheduled=f.rescheduled)
        else:  # deliveries may be missed: every task is polled as without webhooks
            log.warning(
                "webhook feed not live: polls follow the schedule",
                why=f.why,
                rescheduled=f.rescheduled,
            )

    def _paused(self, f: facts.Paused) -> None:
        if f.added_s:
            self.metrics.paused_seconds.labels(f.reason).inc(f.added_s)
        if f.announce:
            logger = log.error if f.reason == "auth" else log.warning
            logger(
                "polling paused for every task",
                reason=f.outcome.reason,
                status=f.outcome.status_code,
                pause_s=round(f.seconds, 3),
            )

    def _paused_by_peer(self, f: facts.PausedByPeer) -> None:
        self.metrics.peer_pauses.inc()
        if f.added_s:  # counted as the pause it shares, and said once per pause
            self.metrics.paused_seconds.labels(f.reason).inc(f.added_s)
            log.warning(
                "polling paused for every task: another replica was told to wait",
                reason=f.reason,
                by=f.by,
                pause_s=round(f.seconds, 3),
            )

    def _released(self, f: facts.Released) -> None:
        self.metrics.rebalance_duplicates.inc(f.duplicate_risk)
        if f.why == "revoked":
            log.info(
                "partitions revoked",
                partitions=f.partitions,
                parked=f.parked,
                duplicate_risk=f.duplicate_risk,
            )

    def _assigned(self, f: facts.Assigned) -> None:
        m = self.metrics
        m.rebalances.inc()
        m.assigned_partitions.set(len(f.partitions))
        m.revoked_in_flight.inc(f.handed_over)
        log.info(
            "partitions assigned",
            partitions=f.partitions,
            kept_parked=f.kept_parked,
            handed_over=f.handed_over,
            known_finished=f.known_finished,
        )

    # --- measurements from the shell -------------------------------------------------------

    def request_done(self, outcome: Outcome, seconds: float) -> None:
        m = self.metrics
        self._request_duration.observe(seconds)
        self._responses(status_class(outcome.status_code)).inc()
        up = 0 if outcome.kind in (Kind.TRANSIENT, Kind.AUTH) else 1
        if up != self._api_up:  # a Gauge.set takes a lock: once per change, not per request
            self._api_up = up
            m.api_up.set(up)
        if outcome.error is not None:
            m.api_errors.labels(outcome.error.value).inc()
        if outcome.kind is Kind.AUTH:
            m.auth_errors.inc()
        elif outcome.kind is Kind.RATE_LIMITED:
            m.rate_limited.inc()

    def _tenant_gauges(self, now: float) -> None:
        """The busiest tenants by name (those with the most in flight, held or due), the
        rest summed as "other": the label set stays bounded however many tenants come."""
        m, limit = self.metrics, self._tenant_labels
        sample = self._core.tenants_sample(now)
        ranked = sorted(
            sample, key=lambda t: -(sample[t].in_flight + sample[t].held + sample[t].due)
        )
        rows: dict[str, list[float]] = {}
        for i, tenant in enumerate(ranked):
            s = sample[tenant]
            row = rows.setdefault(tenant if i < limit else "other", [0, 0, 0, 0.0])
            row[0] += s.in_flight
            row[1] += s.held
            row[2] += s.due
            row[3] = max(row[3], s.waited_s)
        for gauge in (m.tenant_in_flight, m.tenant_held, m.tenant_due, m.tenant_waited):
            gauge.clear()
        for label, (in_flight, held, due, waited) in rows.items():
            m.tenant_in_flight.labels(label).set(in_flight)
            m.tenant_held.labels(label).set(held)
            m.tenant_due.labels(label).set(due)
            m.tenant_waited.labels(label).set(waited)

    def gauges(self, now: float, lag: int | None) -> None:
        """Sample the core's state (every commit interval)."""
        self.intake_batch_done()  # a safety net: a fetch cut short says its tasks here
        m, core = self.metrics, self._core
        sample = core.sample(now)
        m.due.set(sample.due)
        m.budget_wait.inc(max(0.0, sample.budget_wait_s - self._budget_wait_seen))
        self._budget_wait_seen = sample.budget_wait_s
        if sample.budget_rate is not None and now > self._sampled_at:
            allowed = sample.budget_rate * (now - self._sampled_at)
            spent = sample.taken - self._taken_seen
            m.budget_utilization.set(min(1.0, spent / allowed))
        self._sampled_at, self._taken_seen = now, sample.taken
        for model, (median, p90) in sample.model_stats.items():
            label = m.model_label(model)
            m.model_completion.labels(label, "50").set(median)
            m.model_completion.labels(label, "90").set(p90)
        if self._tenants:
            self._tenant_gauges(now)
        if lag is not None:
            m.consumer_lag.set(lag)
        m.offset_map_bytes.clear()
        for (_, partition), size in core.map_sizes().items():
            m.offset_map_bytes.labels(str(partition)).set(size)


def exemplar_of(task: Task) -> dict[str, str] | None:
    """The exemplar of a task's histogram observations: its trace id (OpenMetrics only),
    when that trace is sampled (an exemplar pointing at a trace nobody kept is noise)."""
    if task.trace is None or not tracecontext.sampled(task.trace):
        return None
    return {"trace_id": tracecontext.ids(task.trace)[0]}
