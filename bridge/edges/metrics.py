"""Prometheus metrics: one registry per bridge; base units, ``wavespeed_bridge_`` prefix."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar

# Defined beside the parser (the AsyncAPI document names them too); exported here as before.
from bridge.core.messages import DEAD_LETTER_REASONS as DEAD_LETTER_REASONS
from bridge.core.outcomes import ErrorKind

PREFIX = "wavespeed_bridge"
M = TypeVar("M", Counter, Histogram)

_LATENCY_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600)
_INFERENCE_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300, 600, 1800)
_POLL_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100, 200, 500)
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Fine around the default commit interval (1 s): exactly once acknowledges at the commit.
_PUBLISH_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9),
    *(1.0, 1.025, 1.05, 1.1, 1.25, 1.5, 2, 2.5, 5, 10),
)
_DELAY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120)

# Label values known in advance (see app and messages), exported at zero from the start.
API_ERROR_KINDS = tuple(kind.value for kind in ErrorKind)  # set where outcomes are built
PAUSE_REASONS = ("rate_limited", "auth", "retry_after")
KAFKA_ERROR_KINDS = ("auth", "tls", "network", "broker")

# webhook_deliveries_total{result}: every request to the webhook receiver ends in one.
# unknown_task is counted by the webhook topic's reader, the rest by the receiver.
WEBHOOK_RESULTS = (
    "accepted",  # verified, published to the webhook topic, 200
    "replay",  # a webhook-id already published: 200, not published again
    "unsigned",  # 401
    "bad_signature",  # 401
    "stale",  # authentic, signed more than webhooks.tolerance_s ago: 400
    "future",  # authentic, signed more than webhooks.tolerance_s ahead: 400
    "malformed",  # headers or body unusable: 400
    "too_large",  # over webhooks.max_body_bytes: 413
    "timeout",  # the body did not arrive within webhooks.read_timeout_s: 408
    "overloaded",  # over webhooks.max_concurrent_requests: 503
    "publish_failed",  # the broker did not acknowledge in time: 503
    "error",  # an unexpected failure in the receiver (a bug): 500, that request only
    "unknown_task",  # published, but no replica tracks the task (counted by the reader)
)


FOLD_AT = 4096  # updates a tallied series keeps before folding them in


class Tallied:
    """One series of a Counter or Histogram (a child, or an unlabelled metric) whose updates
    are kept in plain Python and folded into it in bulk: before every scrape, and every
    ``FOLD_AT`` updates. prometheus_client takes a lock, checks the metric and walks the
    buckets on every update: ~1.5 µs a histogram's, and a task makes a dozen updates (issue
    22). A fold adds a batch as its observations one by one would (the sum, each bucket,
    each bucket's last exemplar); ``tests/test_metrics_tally.py`` compares the two."""

    __slots__ = ("_count", "_exemplars", "_series", "_values")

    def __init__(self, series: Counter | Histogram) -> None:
        self._series: Any = series  # prometheus_client's child: its buckets and sum are used
        self._count = 0.0
        self._values: list[float] = []
        self._exemplars: list[tuple[float, dict[str, str], float]] = []

    def inc(self, amount: float = 1.0) -> None:
        self._count += amount

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        values = self._values
        values.append(amount)
        if exemplar:
            self._exemplars.append((amount, exemplar, time.time()))
        if len(values) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        series = self._series
        if self._count:
            series.inc(self._count)
            self._count = 0.0
        values = self._values
        if not values:
            return
        self._values = []
        bounds = series._upper_bounds
        counts = [0] * len(bounds)
        for v in values:
            if v == v:  # NaN lands in no bucket (prometheus_client: ``v <= bound`` is false)
                counts[bisect_left(bounds, v)] += 1
        series._sum.inc(sum(values))
        buckets = series._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        if self._exemplars:
            last: dict[int, tuple[float, dict[str, str], float]] = {}
            for e in self._exemplars:
                if e[0] == e[0]:
                    last[bisect_left(bounds, e[0])] = e
            for i, (v, labels, at) in last.items():
                buckets[i].set_exemplar(Exemplar(labels, v, at))
            self._exemplars = []


class Tallies:
    """Every :class:`Tallied` series of a registry, folded in before each collection (it
    is registered first, so the registry collects it before the metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._series: list[Tallied] = []
        registry.register(self)

    def of(self, series: Counter | Histogram) -> Tallied:
        tallied = Tallied(series)
        self._series.append(tallied)
        return tallied

    def fold(self) -> None:
        for series in self._series:
            series.fold()

    def collect(self) -> Iterable[Metric]:
        self.fold()
        return []


class Children(Generic[M]):
    """A labelled metric's series by their label values, kept and tallied: ``labels()``
    cost three times the update it was for, on every task. Only for metrics never cleared."""

    def __init__(self, metric: M, tallies: Tallies) -> None:
        self._metric: M = metric
        self._tallies = tallies
        self._by: dict[tuple[str, ...], Tallied] = {}

    def __call__(self, *values: str) -> Tallied:
        child = self._by.get(values)
        if child is None:
            child = self._by[values] = self._tallies.of(self._metric.labels(*values))
        return child


class ModelLabels:
    """Caps distinct ``model`` label values: model names come from untrusted input."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, model: str | None) -> str:
        if not model:
            return "unknown"
        if model in self._seen:
            return model
        if len(self._seen) >= self._limit:
            return "other"
        self._seen.add(model)
        return model


class TenantLabels:
    """Caps distinct ``tenant`` label values: the tenants named in the config, then the
    first ``limit`` others seen; the rest are "other". Tenants come from untrusted input."""

    def __init__(self, limit: int, named: list[str]) -> None:
        self._limit = limit
        self._named = set(named)
        self._seen: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self._named or tenant in self._seen:
            return tenant
        if len(self._seen) >= self._limit:
            return "other"
        self._seen.add(tenant)
        return tenant


class Metrics:
    def __init__(
        self,
        *,
        max_model_labels: int = 200,
        version: str = "0",
        max_tenant_labels: int = 20,
        named_tenants: list[str] | None = None,
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.tallies = Tallies(r)  # first: folded in before the metrics are collected
        self.model_label = ModelLabels(max_model_labels)
        self.tenant_label = TenantLabels(max_tenant_labels, named_tenants or [])
        p = PREFIX
        Info(f"{p}_build", "Build information.", registry=r).info({"version": version})
        self.consumed = Counter(
            f"{p}_tasks_consumed",
            "Task messages accepted from the input topic.",
            ["model"],
            registry=r,
        )
        self.finished = Counter(
            f"{p}_tasks_finished",
            "Tasks whose terminal event the broker acknowledged, by outcome "
            "(completed, failed, timeout).",
            ["model", "outcome"],
            registry=r,
        )
        self.duplicates = Counter(
            f"{p}_duplicate_tasks",
            "Input messages for a task id already in flight (polled once, one event).",
            registry=r,
        )
        self.dead_letters = Counter(
            f"{p}_dead_letters",
            "Input messages sent to the dead-letter topic.",
            ["reason"],
            registry=r,
        )
        self.end_to_end = Histogram(
            f"{p}_end_to_end_latency_seconds",
            "From the task's created_at to its event acknowledged by the broker.",
            ["model", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            f"{p}_inference_seconds",
            "timings.inference reported by the API for completed tasks.",
            ["model"],
            buckets=_INFERENCE_BUCKETS,
            registry=r,
        )
        self.polls_per_task = Histogram(
            f"{p}_polls_per_task",
            "Result requests made per finished task.",
            ["model"],
            buckets=_POLL_BUCKETS,
            registry=r,
        )
        self.detection_delay = Histogram(
            f"{p}_detection_delay_bound_seconds",
            "Gap between the last non-terminal poll and the terminal poll: an upper bound on "
            "how late the bridge noticed completion.",
            ["model"],
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.api_responses = Counter(
            f"{p}_api_responses",
            "Result API responses by HTTP status class (error: no response).",
            ["status_class"],
            registry=r,
        )
        self.api_errors = Counter(
            f"{p}_api_errors",
            "Result API calls that did not yield a usable answer, by kind.",
            ["kind"],
            registry=r,
        )
        self.api_request_duration = Histogram(
            f"{p}_api_request_duration_seconds",
            "Duration of result API requests.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.model_completion = Gauge(
            f"{p}_model_completion_seconds",
            "Learned time from created_at to completion, by model and percentile (50: median, "
            "90; adaptive policy; models with at least one completion).",
            # Not "quantile": Prometheus reserves that label for summaries (promtool rejects it).
            ["model", "percentile"],
            registry=r,
        )
        self.poll_lateness = Histogram(
            f"{p}_poll_lateness_seconds",
            "How long after its scheduled time a poll was sent (waiting for a request slot, "
            "the budget, or the event loop).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.api_up = Gauge(
            f"{p}_api_up", "1 if the last result API request got a usable answer.", registry=r
        )
        self.auth_errors = Counter(
            f"{p}_api_auth_errors", "HTTP 401/403 from the result API.", registry=r
        )
        self.rate_limited = Counter(
            f"{p}_api_rate_limited", "HTTP 429 from the result API.", registry=r
        )
        self.paused_seconds = Counter(
            f"{p}_api_pause_seconds",
            "Seconds of global polling pause ordered by 429 Retry-After or auth errors.",
            ["reason"],
            registry=r,
        )
        self.budget_wait = Counter(
            f"{p}_budget_wait_seconds",
            "Seconds due polls waited for the request budget.",
            registry=r,
        )
        self.budget_utilization = Gauge(
            f"{p}_budget_utilization_ratio",
            "Requests made over requests allowed by the budget in the last interval.",
            registry=r,
        )
        self.tenant_finished = Counter(
            f"{p}_tenant_tasks_finished",
            "Tasks finished per tenant (tenants.key; the named and first tenants, the rest "
            "as other).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.tenant_delay = Histogram(
            f"{p}_tenant_detection_delay_bound_seconds",
            "detection_delay_bound_seconds per tenant.",
            ["tenant"],
            buckets=_DELAY_BUCKETS,
            registry=r,
        )
        self.tenant_in_flight = Gauge(
            f"{p}_tenant_tasks_in_flight",
            "Tasks being polled or published, per tenant (the busiest named, the rest other).",
            ["tenant"],
            registry=r,
        )
        self.tenant_held = Gauge(
            f"{p}_tenant_records_held",
            "Records of tenants over their share of polling.max_in_flight, waiting unpolled.",
            ["tenant"],
            registry=r,
        )
        self.tenant_due = Gauge(
            f"{p}_tenant_polls_due",
            "Polls due and waiting (a request slot, the budget), per tenant.",
            ["tenant"],
            registry=r,
        )
        self.tenant_waited = Gauge(
            f"{p}_tenant_oldest_due_seconds",
            "How long the tenant's longest-waiting due poll has waited: a starved tenant's grows.",
            ["tenant"],
            registry=r,
        )
        self.headers_dropped = Counter(
            f"{p}_event_headers_dropped",
            "Input headers not carried to events: values that are not UTF-8 text, which the "
            "official CloudEvents SDK cannot read (events.binary_headers: drop).",
            registry=r,
        )
        self.tenant_unknown = Counter(
            f"{p}_tenant_key_missing",
            "Records whose tenant key was missing or unreadable (counted in tenants.default).",
            registry=r,
        )
        self.budget_share = Gauge(
            f"{p}_budget_share_requests_per_second",
            "This replica's share of the request budget now (requests/s).",
            registry=r,
        )
        self.budget_demand = Gauge(
            f"{p}_budget_demand_requests_per_second",
            "Result polls per second this replica wants: let out lately, plus waiting.",
            registry=r,
        )
        self.budget_replicas = Gauge(
            f"{p}_budget_replicas",
            "Replicas sharing the account's budget, as this one sees them.",
            registry=r,
        )
        self.budget_coordinated = Gauge(
            f"{p}_budget_coordinated",
            "1 while this replica reads its own reports back from the coordination topic "
            "(0: it keeps to cluster.fallback_share of the budget).",
            registry=r,
        )
        self.peer_pauses = Counter(
            f"{p}_peer_pauses",
            "Pauses another replica published (it saw a 429 or a Retry-After).",
            registry=r,
        )
        self.state_models = Counter(
            f"{p}_learned_state_models",
            "Models whose learned state was published to, or taken from, the state topic.",
            ["direction"],
            registry=r,
        )
        for direction in ("published", "adopted", "refused"):
            self.state_models.labels(direction)
        self.in_flight = Gauge(
            f"{p}_tasks_in_flight", "Tasks consumed and not yet finished.", registry=r
        )
        self.due = Gauge(
            f"{p}_polls_due",
            "Polls whose time has come, waiting for a slot or budget.",
            registry=r,
        )
        self.requests_in_flight = Gauge(
            f"{p}_api_requests_in_flight", "Result API requests under way.", registry=r
        )
        self.events_pending = Gauge(
            f"{p}_events_pending",
            "Events produced and not yet acknowledged by the broker.",
            registry=r,
        )
        self.published = Counter(
            f"{p}_events_published",
            "Records acknowledged by the broker, by topic kind.",
            ["kind"],
            registry=r,
        )
        self.publish_failures = Counter(
            f"{p}_publish_failures",
            "Produce attempts that failed and will be retried.",
            registry=r,
        )
        self.publish_latency = Histogram(
            f"{p}_publish_latency_seconds",
            "From the terminal poll's response to the event acknowledged by the broker (exactly "
            "once: its transaction committed).",
            buckets=_PUBLISH_BUCKETS,
            registry=r,
        )
        self.commits = Counter(f"{p}_commits", "Successful offset commits.", registry=r)
        self.commit_failures = Counter(
            f"{p}_commit_failures", "Offset commits that failed (retried).", registry=r
        )
        self.consumer_paused = Gauge(
            f"{p}_consumer_paused", "1 while fetching is paused at the in-flight cap.", registry=r
        )
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag_messages",
            "High watermark minus committed position, summed over assigned partitions.",
            registry=r,
        )
        self.assigned_partitions = Gauge(
            f"{p}_assigned_partitions", "Input partitions assigned to this member.", registry=r
        )
        self.rebalances = Counter(f"{p}_rebalances", "Partition assignments received.", registry=r)
        self.rebalances_per_minute = Gauge(
            f"{p}_rebalances_per_minute",
            "Assignments this member received in the last 60 s: 0 in a settled group.",
            registry=r,
        )
        self.group_unassigned = Gauge(
            f"{p}_group_unassigned_seconds",
            "How long this member has waited for a group assignment while Kafka answered "
            "(0 once assigned; it exits with code 3 past kafka.rebalance_timeout_ms x 3 + "
            "kafka.session_timeout_ms).",
            registry=r,
        )
        self.group_join_deadline = Gauge(
            f"{p}_group_join_deadline_seconds",
            "How long a member may wait for an assignment before it exits to be restarted.",
            registry=r,
        )
        self.revoked_in_flight = Counter(
            f"{p}_handed_over_tasks",
            "In-flight tasks whose partition moved to another member, which polls them again.",
            registry=r,
        )
        self.rebalance_duplicates = Counter(
            f"{p}_rebalance_duplicate_risk_tasks",
            "Input records whose event was (or may have been) published but whose offset "
            "could not be committed when their partition left this member (rebalance or "
            "shutdown): the next owner publishes them again.",
            registry=r,
        )
        self.kafka_up = Gauge(
            f"{p}_kafka_up", "1 if the last broker health check succeeded.", registry=r
        )
        self.kafka_errors = Counter(
            f"{p}_kafka_connection_errors",
            "Failed attempts to reach the brokers, by cause: auth (SASL), tls (certificate or "
            "handshake), network, broker (connected, then refused).",
            ["kind"],
            registry=r,
        )
        self.topics_missing = Gauge(
            f"{p}_kafka_topics_missing",
            "Configured topics the brokers do not list (events for them are held).",
            registry=r,
        )
        self.records_skipped = Counter(
            f"{p}_records_skipped",
            "Input records fetched again after an assignment whose event went out before "
            "(the commit's offset map lists them): skipped, not published twice.",
            registry=r,
        )
        self.offset_map_bytes = Gauge(
            f"{p}_offset_map_bytes",
            "Size of the offset map (finished offsets above the committed one) in the last "
            "commit's metadata, per input partition.",
            ["partition"],
            registry=r,
        )
        self.partitions_paused_full_map = Gauge(
            f"{p}_partitions_paused_full_map",
            "Input partitions paused because their offset map reached 75% of "
            "kafka.offset_metadata_max_bytes.",
            registry=r,
        )
        self.commit_metadata_supported = Gauge(
            f"{p}_commit_metadata_supported",
            "0 once the broker was seen dropping commit metadata (offset maps are then off).",
            registry=r,
        )
        self.transactions = Counter(
            f"{p}_transactions",
            "Exactly-once transactions by result: committed, aborted (retried after the "
            "records are fetched again), fenced (the partition's id went to another member).",
            ["result"],
            registry=r,
        )
        self.ready = Gauge(f"{p}_ready", "1 when /readyz reports ready.", registry=r)
        self.webhook_deliveries = Counter(
            f"{p}_webhook_deliveries",
            "Requests to the webhook receiver by result (accepted, replay, unsigned, "
            "bad_signature, stale, future, malformed, too_large, timeout, overloaded, "
            "publish_failed, error; unknown_task: published for a task no replica tracks).",
            ["result"],
            registry=r,
        )
        self.webhook_request_duration = Histogram(
            f"{p}_webhook_request_duration_seconds",
            "Webhook requests, received to answered (including the broker's acknowledgement).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.webhooks_enabled = Gauge(
            f"{p}_webhooks_enabled", "1 when webhooks.enabled (the receiver runs).", registry=r
        )
        self.webhook_finished = Counter(
            f"{p}_webhook_finished_tasks",
            "Tasks this replica acted on from a webhook delivery, by how: delivery (finished "
            "by it) or confirm_poll (one poll sent at once, webhooks.confirm_by_poll).",
            ["how"],
            registry=r,
        )
        self.polls_avoided = Counter(
            f"{p}_polls_avoided",
            "Polls the schedule without webhooks would have sent the tasks that deliveries "
            "finished.",
            registry=r,
        )
        self.webhook_late = Counter(
            f"{p}_webhook_late_deliveries",
            "Deliveries that came after a poll had already found their task finished.",
            registry=r,
        )
        self.delivery_to_event = Histogram(
            f"{p}_webhook_delivery_to_event_seconds",
            "From a delivery received (by any replica) to its task's event acknowledged.",
            buckets=_PUBLISH_BUCKETS,
            registry=r,
        )
        self.webhook_feed_live = Gauge(
            f"{p}_webhook_feed_live",
            "1 while this replica reads every partition of the webhook topic, caught up; "
            "0 otherwise, and then no poll waits for a delivery.",
            registry=r,
        )
        self.webhook_feed_partitions = Gauge(
            f"{p}_webhook_feed_partitions",
            "Partitions of the webhook topic this replica reads.",
            registry=r,
        )
        self._zero_known_labels()

    def _zero_known_labels(self) -> None:
        """Export every known series at 0, so rate() and alerts see the first increment."""
        for status in ("2xx", "3xx", "4xx", "5xx", "error"):
            self.api_responses.labels(status)
        for kind in API_ERROR_KINDS:
            self.api_errors.labels(kind)
        for reason in PAUSE_REASONS:
            self.paused_seconds.labels(reason)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)
        for kind in KAFKA_ERROR_KINDS:
            self.kafka_errors.labels(kind)
        for result in ("committed", "aborted", "fenced"):
            self.transactions.labels(result)
        for how in ("delivery", "confirm_poll"):
            self.webhook_finished.labels(how)
        self.commit_metadata_supported.set(1)
        for kind in ("completed", "failed", "timeout", "dead_letter"):
            self.published.labels(kind)
        for result in WEBHOOK_RESULTS:
            self.webhook_deliveries.labels(result)
