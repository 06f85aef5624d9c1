"""Time, injected: the daemon uses :class:`SystemClock`, simulations and tests their own.

The pure core never reads a clock: the shell reads one :class:`Instant` and passes it in.
"""

from __future__ import annotations

import time
from typing import Protocol

from bridge.core.value import value


@value
class Instant:
    """One reading of a clock: ``mono`` orders and measures, ``wall`` is unix seconds."""

    mono: float
    wall: float


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def read(self) -> Instant: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def read(self) -> Instant:
        return Instant(time.monotonic(), time.time())


class ManualClock:
    """A clock that moves only when told to; wall time is ``epoch`` plus monotonic."""

    def __init__(self, start: float = 0.0, epoch: float = 1_700_000_000.0) -> None:
        self.now = start
        self.epoch = epoch

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch + self.now

    def read(self) -> Instant:
        return Instant(self.now, self.epoch + self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def at(self, mono: float) -> Instant:
        """The reading at ``mono`` (moving the clock there)."""
        self.now = max(self.now, mono)
        return self.read()
