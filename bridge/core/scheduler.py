"""When to poll which task: a timer heap, a priority pool of due tasks, and a global budget.

Pure, with time passed in: the daemon calls :meth:`Scheduler.take_due` with the clock's
``now`` and the polling benchmark with simulated time, thousands of times faster.

- Tasks wait in a min-heap by due time (one entry per task, stale ones skipped lazily).
- Once due they move to a pool ordered by the policy's priority; when the request
  budget binds, the most promising polls go first rather than first-come-first-served.
- A token bucket caps requests/s for the whole process; ``pause_until`` stops everything
  (HTTP 429 with Retry-After, or an authentication failure).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def available(self, now: float) -> int:
        self._refill(now)
        # The epsilon keeps float rounding from leaving a token at 0.9999999 forever.
        return int(self._tokens + 1e-9)

    def take(self, n: int, now: float) -> None:
        self._refill(now)
        self._tokens -= n

    def time_until(self, n: int, now: float) -> float:
        self._refill(now)
        missing = n - self._tokens
        held = max(0.0, self._last - now)  # drained until a future time
        return held if missing <= 1e-9 else held + missing / self.rate

    def set_rate(self, rate: float, burst: float, now: float) -> None:
        """A new rate (a replica's share of a shared budget moved): what was earned at the
        old rate is kept, up to the new burst."""
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._refill(now)
        self.rate, self.burst = rate, float(burst)
        self._tokens = min(self._tokens, self.burst)

    def drain_until(self, until: float) -> None:
        """No tokens until ``until``, then refill from empty: a pause ends with a trickle."""
        self._tokens = min(self._tokens, 0.0)
        self._last = max(self._last, until)


class Scheduler(Generic[K]):
    def __init__(
        self,
        *,
        priority: Callable[[K, float], float] | None = None,
        budget: TokenBucket | None = None,
    ) -> None:
        self._priority = priority
        self.budget = budget
        self._timers: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}  # key -> due time, while waiting on a timer
        self._ready: list[tuple[float, int, K, float]] = []  # (-priority, seq, key, due)
        self._in_ready: set[K] = set()
        self._seq = itertools.count()
        self.paused_until = float("-inf")
        self.budget_wait_s = 0.0  # time during which due polls waited on the budget alone
        self.taken = 0  # keys handed out by take(): requests spent, for budget utilisation
        self._budget_wait_since: float | None = None

    def __len__(self) -> int:
        return len(self._due) + len(self._in_ready)

    def __contains__(self, key: object) -> bool:
        return key in self._due or key in self._in_ready

    def schedule(self, key: K, due: float) -> None:
        """Poll ``key`` at ``due``; replaces any earlier schedule for it."""
        self._in_ready.discard(key)
        self._due[key] = due
        heapq.heappush(self._timers, (due, next(self._seq), key))

    def cancel(self, key: K) -> None:
        self._due.pop(key, None)
        self._in_ready.discard(key)

    def pause_until(self, until: float) -> None:
        """Hold every poll until ``until`` (a 429's Retry-After, an auth failure).

        The budget restarts empty then, so polling resumes at the budget's rate instead of
        with a burst of everything that fell due during the pause.
        """
        if until > self.paused_until:
            self.paused_until = until
            if self.budget is not None:
                self.budget.drain_until(until)

    def ready_count(self, now: float) -> int:
        self._promote(now)
        return len(self._in_ready)

    def _promote(self, now: float) -> None:
        timers, due = self._timers, self._due
        while timers and timers[0][0] <= now:
            when, seq, key = heapq.heappop(timers)
            if due.get(key) != when:
                continue  # stale: rescheduled or cancelled
            del due[key]
            score = self._priority(key, when) if self._priority is not None else -when
            heapq.heappush(self._ready, (-score, seq, key, when))
            self._in_ready.add(key)

    def waiting(self) -> list[K]:
        """Keys due and not yet taken: held by the request limit, the budget or a pause."""
        return list(self._in_ready)

    def take(self, now: float, limit: int) -> list[K]:
        """Up to ``limit`` due keys, best first, within the budget and outside a pause."""
        return [key for key, _ in self.take_due(now, limit)]

    def take_due(self, now: float, limit: int) -> list[tuple[K, float]]:
        """Like :meth:`take`, with the time each key was due (for lateness)."""
        self._promote(now)
        if self._budget_wait_since is not None:
            self.budget_wait_s += max(0.0, now - self._budget_wait_since)
            self._budget_wait_since = None
        if not self._in_ready or limit <= 0 or now < self.paused_until:
            return []
        want = min(limit, len(self._in_ready))
        n = want if self.budget is None else min(want, self.budget.available(now))
        out: list[tuple[K, float]] = []
        ready, in_ready = self._ready, self._in_ready
        while ready and len(out) < n:
            _, _, key, due = heapq.heappop(ready)
            if key in in_ready:
                in_ready.discard(key)
                out.append((key, due))
        if self.budget is not None and out:
            self.budget.take(len(out), now)
        if n < want:  # due polls held back by the budget alone, from now until the next take
            self._budget_wait_since = now
        self.taken += len(out)
        return out

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time at which :meth:`take` may return something, or None if idle."""
        self._promote(now)
        if self._in_ready:
            at = now
            if self.budget is not None:
                at = now + self.budget.time_until(1, now)
            return max(at, self.paused_until)
        timers, due = self._timers, self._due
        while timers and due.get(timers[0][2]) != timers[0][0]:
            heapq.heappop(timers)
        if not timers:
            return None
        return max(timers[0][0], self.paused_until)
