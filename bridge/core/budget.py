"""One account's request budget, shared by every replica through Kafka. Pure.

Each replica reports, every ``cluster.report_interval_s``, how many result polls per
second it wants (its demand: what it let out lately plus what waits for the budget) to
the coordination topic, and reads every replica's reports, its own included. From the same
reports every replica computes the same shares: the account's limit split in proportion to
demand (a replica with nothing due keeps only a small floor, so a busy one gets the rest),
under a little headroom. A share grows only once the reports have called for it for a whole
interval, while it shrinks at once: when demand moves from one replica to another, the one
losing it lowers its share before the one gaining it raises its own, so the shares add up
to no more than the limit while their views of the reports differ. A replica whose reports stop
(it left, or died) is dropped after ``EXPIRY_REPORTS`` intervals; one that leaves cleanly
says so and is dropped at once.

A replica that does not see its own reports come back (the topic missing, unreadable, or
its writes failing) cannot know the others: it keeps to ``cluster.fallback_share`` of the
limit, never the whole of it.

A 429 or a ``Retry-After`` seen by any replica is published as a pause (until a wall
time), which every replica applies: the account is one, so are its limits.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass
from typing import TypeGuard

VERSION = 1
EXPIRY_REPORTS = 5  # a replica is gone after this many report intervals without a report
HEADROOM = 0.97  # shares add up to this much of the limit: views differ for an interval
FLOOR = 0.02  # of the limit: what a replica with no demand is still weighed at
DEMAND_HORIZON_S = 1.0  # polls waiting for the budget count as wanted within this
PAUSE_KEY = "pause"


@dataclass(frozen=True, slots=True)
class Report:
    """One replica's demand (requests/s), at a wall time of its own."""

    replica: str
    at: float
    demand: float
    leaving: bool = False


@dataclass(frozen=True, slots=True)
class Pause:
    """Every replica stops polling until ``until`` (wall time): ``by`` saw a 429."""

    until: float
    reason: str
    by: str


def encode(message: Report | Pause) -> tuple[bytes, bytes]:
    """The coordination record: (key, value)."""
    if isinstance(message, Pause):
        body = {"v": VERSION, "until": message.until, "reason": message.reason, "by": message.by}
        return PAUSE_KEY.encode(), json.dumps(body).encode()
    body = {
        "v": VERSION,
        "at": message.at,
        "demand": round(message.demand, 3),
        "leaving": message.leaving,
    }
    return message.replica.encode(), json.dumps(body).encode()


def decode(key: bytes | None, value: bytes | None) -> Report | Pause | None:
    """A record of the coordination topic, or None if it is not one this release reads
    (another version, another writer, damage): ignored, never trusted."""
    if not key or not value:
        return None
    try:
        body = json.loads(value)
        name = key.decode()
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        return None
    if name == PAUSE_KEY:
        until, reason, by = body.get("until"), body.get("reason"), body.get("by")
        if _number(until) and isinstance(reason, str) and isinstance(by, str):
            return Pause(float(until), reason[:40], by[:200])
        return None
    at, demand, leaving = body.get("at"), body.get("demand"), body.get("leaving", False)
    if not (_number(at) and _number(demand) and float(demand) >= 0 and isinstance(leaving, bool)):
        return None
    return Report(name[:200], float(at), float(demand), leaving)


def _number(x: object) -> TypeGuard[float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(slots=True)
class _Heard:
    report: Report
    received: float  # monotonic, on this replica's clock


class SharedBudget:
    def __init__(
        self, limit: float, replica: str, *, fallback_share: float, interval_s: float
    ) -> None:
        if limit <= 0 or not 0 < fallback_share <= 1 or interval_s <= 0:
            raise ValueError("invalid shared budget")
        self.limit = limit
        self.replica = replica
        self.fallback = fallback_share * limit
        self.expiry_s = EXPIRY_REPORTS * interval_s
        self._interval = interval_s
        self._heard: dict[str, _Heard] = {}
        self._echo: float | None = None  # when this replica last saw its own report
        self._targets: collections.deque[tuple[float, float]] = collections.deque()

    def heard(self, report: Report, now: float) -> None:
        """A report read from the topic at ``now`` (monotonic); the newest per replica."""
        known = self._heard.get(report.replica)
        if known is not None and known.report.at > report.at:
            return  # an older one read late
        self._heard[report.replica] = _Heard(report, now)
        if report.replica == self.replica and not report.leaving:
            self._echo = now

    def coordinated(self, now: float) -> bool:
        """Whether this replica's own reports come back: the others can be known."""
        return self._echo is not None and now - self._echo <= self.expiry_s

    def live(self, now: float) -> dict[str, float]:
        """The replicas reporting lately, and their demand."""
        for name in [n for n, h in self._heard.items() if now - h.received > self.expiry_s]:
            del self._heard[name]
        return {n: h.report.demand for n, h in self._heard.items() if not h.report.leaving}

    def share(self, now: float) -> float:
        """This replica's requests/s now: the least of what the reports called for over the
        last interval (a rise waits an interval, a fall does not)."""
        target = self._target(now)
        targets = self._targets
        targets.append((now, target))
        while len(targets) > 1 and targets[1][0] <= now - self._interval + 1e-9:
            targets.popleft()  # the oldest kept is the one in force an interval ago
        return min(t for _, t in targets)

    def _target(self, now: float) -> float:
        live = self.live(now)
        if not self.coordinated(now) or self.replica not in live:
            return self.fallback
        floor = FLOOR * self.limit
        weights = {name: max(demand, floor) for name, demand in live.items()}
        return HEADROOM * self.limit * weights[self.replica] / math.fsum(weights.values())


class Demand:
    """Result polls per second this replica wants: those the scheduler let out since the
    last reading, plus those waiting for the budget as if wanted within a second."""

    def __init__(self, taken: int, now: float) -> None:
        self._taken, self._at = taken, now

    def read(self, taken: int, waiting: int, now: float) -> float:
        elapsed = now - self._at
        rate = (taken - self._taken) / elapsed if elapsed > 0 else 0.0
        self._taken, self._at = taken, now
        return max(0.0, rate) + waiting / DEMAND_HORIZON_S
