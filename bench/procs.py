"""Process accounting from ``/proc`` and Prometheus text parsing, for the benchmarks."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

CLK_TCK = os.sysconf("SC_CLK_TCK")


def kafka_section(bootstrap: str, tag: str) -> dict[str, str]:
    """The ``kafka`` config of a benchmark's daemon: its group and topics named by ``tag``."""
    return {
        "bootstrap_servers": bootstrap,
        "group_id": f"group-{tag}",
        "input_topic": f"in-{tag}",
        "completed_topic": f"done-{tag}",
        "failed_topic": f"failed-{tag}",
        "dead_letter_topic": f"dlq-{tag}",
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall: float
    cpu: dict[str, float]


def core_busy_seconds() -> dict[str, float]:
    """Busy (non-idle, non-iowait) time of each core, as ``cpu0``, ``cpu1``, ..."""
    out: dict[str, float] = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in values]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                out[name] = (sum(v[:8]) - idle) / CLK_TCK
    return out


def sample_cpu(pids: dict[str, int]) -> CpuSample:
    """CPU time of each named process, and of each core as a whole (``cpu0``, ...)."""
    cpu: dict[str, float] = core_busy_seconds()
    for name, pid in pids.items():
        try:
            cpu[name] = cpu_seconds(pid)
        except (OSError, ValueError):
            continue
    return CpuSample(time.monotonic(), cpu)


def cpu_shares(a: CpuSample, b: CpuSample) -> dict[str, float]:
    """Share of one core used by each process between two samples."""
    wall = b.wall - a.wall
    return {k: (b.cpu[k] - a.cpu[k]) / wall for k in b.cpu if k in a.cpu and wall > 0}


Labels = frozenset[tuple[str, str]]


class Scrape:
    """One scrape of a ``/metrics`` page: sample name and labels to value."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = float(s.value)

    def sum(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and want <= lab)

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """Cumulative ``(le, count)`` of a histogram, summed over its other labels."""
        out: dict[float, float] = {}
        for (n, lab), v in self.samples.items():
            if n != f"{name}_bucket":
                continue
            le = float(dict(lab)["le"])
            out[le] = out.get(le, 0.0) + v
        return sorted(out.items())


def histogram_quantile(
    q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> float | None:
    """Quantile of the observations made between two scrapes, as Prometheus interpolates it.

    Returns ``inf`` when the quantile falls in the ``+Inf`` bucket, None with no observations.
    """
    prev = dict(before)
    delta = [(le, c - prev.get(le, 0.0)) for le, c in after]
    if not delta or delta[-1][1] <= 0:
        return None
    rank = q * delta[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in delta:
        if count >= rank:
            if math.isinf(le):
                return math.inf
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return math.inf


def histogram_bucket(
    q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> tuple[float, float] | None:
    """The bucket ``(lower, upper]`` the quantile falls in: how precise the estimate is."""
    prev = dict(before)
    delta = [(le, c - prev.get(le, 0.0)) for le, c in after]
    if not delta or delta[-1][1] <= 0:
        return None
    rank = q * delta[-1][1]
    lower = 0.0
    for le, count in delta:
        if count >= rank:
            return (lower, le)
        lower = le
    return (lower, math.inf)


def histogram_share_within(
    limit: float, before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> float | None:
    """Exact share of the observations between two scrapes that were ``<= limit``.

    Only when ``limit`` is a bucket bound (else None): it decides "p99 < limit" without
    interpolating (p99 < limit exactly when this share is at least 99%).
    """
    prev = dict(before)
    delta = {le: c - prev.get(le, 0.0) for le, c in after}
    total = delta.get(math.inf, 0.0)
    if total <= 0 or limit not in delta:
        return None
    return delta[limit] / total


def histogram_count(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    if not after:
        return 0.0
    return after[-1][1] - (before[-1][1] if before else 0.0)
