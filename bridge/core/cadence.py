"""When an exactly-once transaction closes. Pure: times are monotonic seconds, passed in.

An event is acknowledged when its transaction commits, so it waits for the transaction to
close and then for the commit itself: the offsets, the flush of its records, the end of
the transaction, and, with the event loop busy, the loop's queue at each of those steps
(100-300 ms with the bridge at its CPU limit, against ~20 ms when it is not). So it closes
``interval - expected`` after its oldest event, ``expected`` being the longest of its
recent commits, each measured from when it was due to its acknowledgement (late timers
included): no event waits much longer than the interval, however busy the process. Never
sooner than half the interval after the oldest event: a broker slow to commit makes
transactions shorter, not back to back.
"""

from __future__ import annotations

from collections import deque

# Commits remembered: their longest is about the 94th percentile, so the few commits slower
# still overshoot, and only for the oldest of their events.
RECENT = 16
FLOOR = 0.5  # of the interval: the least a transaction's oldest event waits for its close


class TransactionCadence:
    def __init__(self, interval_s: float, *, recent: int = RECENT, floor: float = FLOOR) -> None:
        self.interval = interval_s
        self._least = floor * interval_s
        self._took: deque[float] = deque(maxlen=recent)

    def expected(self) -> float:
        """How long a commit takes, from when it is due to its acknowledgement: the
        longest of the recent ones (none yet: 0)."""
        return max(self._took, default=0.0)

    def due(self, oldest: float) -> float:
        """When to close the transaction whose oldest event was published at ``oldest``."""
        return oldest + max(self._least, self.interval - self.expected())

    def committed(self, due: float, acknowledged: float) -> None:
        """A commit due at ``due`` was acknowledged at ``acknowledged``."""
        self._took.append(max(0.0, acknowledged - due))
