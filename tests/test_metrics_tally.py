"""Tallied series (bridge.edges.metrics.Tallied) expose what prometheus_client's own
updates would: the same buckets, sum, count and last exemplar per bucket, at every scrape."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from bridge.edges.metrics import FOLD_AT, Tallied, Tallies

BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 20)
observation = st.tuples(
    st.one_of(
        st.floats(min_value=0, max_value=50, allow_nan=False),
        st.sampled_from([0.5, 1.0, 20.0, 21.0, math.inf]),
    ),
    st.one_of(st.none(), st.sampled_from(["a" * 32, "b" * 32, "c" * 32])),
)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], object]:
    """Every sample by name and labels: its value, and its exemplar without the time."""
    text = generate_latest(registry).decode()  # type: ignore[no-untyped-call]
    out: dict[tuple[str, tuple[tuple[str, str], ...]], object] = {}
    for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            ex = s.exemplar
            value = round(s.value, 6)
            out[(s.name, tuple(sorted(s.labels.items())))] = (
                value,
                None if ex is None else (dict(ex.labels), ex.value),
            )
    return out


@dataclass
class Pair:
    """The same metrics in two registries: updated directly, and through tallies."""

    direct: CollectorRegistry
    h: Any  # prometheus_client's children
    c: Any
    tallied: CollectorRegistry
    th: Tallied
    tc: Tallied


def pair() -> Pair:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    tallies = Tallies(tallied)
    series = [
        (
            Histogram("h_seconds", "h", ["model"], buckets=BUCKETS, registry=r).labels("x"),
            Counter("c", "c", ["model"], registry=r).labels("x"),
        )
        for r in (direct, tallied)
    ]
    (h, c), (th, tc) = series
    return Pair(direct, h, c, tallied, tallies.of(th), tallies.of(tc))


@given(st.lists(observation, max_size=60), st.lists(st.integers(0, 5), max_size=10))
def test_a_tallied_series_scrapes_as_prometheus_clients_own_updates(
    observed: list[tuple[float, str | None]], incs: list[int]
) -> None:
    p = pair()
    for value, trace in observed:
        exemplar = {"trace_id": trace} if trace else None
        p.h.observe(value, exemplar)
        p.th.observe(value, exemplar)
    for n in incs:
        p.c.inc(n)
        p.tc.inc(n)
    assert scrape(p.tallied) == scrape(p.direct)  # no fold called: the scrape folds


def test_a_busy_series_folds_without_a_scrape() -> None:
    p = pair()
    for _ in range(FOLD_AT):
        p.th.observe(1.5)
    # Folded when the batch filled: prometheus_client's own series has them already.
    assert sum(b.get() for b in p.th._series._buckets) == FOLD_AT
    assert p.tallied.get_sample_value("h_seconds_count", {"model": "x"}) == FOLD_AT
