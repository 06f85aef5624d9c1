"""When to poll which task: a timer heap, a priority pool of due tasks, and a global budget.

Pure, with time passed in: the daemon calls :meth:`Scheduler.take_due` with the clock's
``now`` and the polling benchmark with simulated time, thousands of times faster.

- Tasks wait in a min-heap by due time (one entry per task, stale ones skipped lazily).
- Once due they move to a pool ordered by the policy's priority; when the request
  budget binds, the most promising polls go first rather than first-come-first-served.
- A token bucket caps requests/s for the whole process; ``pause_until`` stops everything
  (HTTP 429 with Retry-After, or an authentication failure).
- With tenants (``tenant_of``), each tenant's due keys wait in a pool of their own, and the
  budget is shared between the pools by weighted fair queuing (start-time fair queuing: a
  tenant's next key goes out at its virtual time, which advances by 1/weight per key, and
  an idle tenant rejoins at the current virtual time, with no credit saved up); a tenant
  may also have a token bucket of its own.
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


class FairPools(Generic[K]):
    """Due keys in one pool per tenant, taken by weighted fair queuing."""

    def __init__(
        self,
        tenant_of: Callable[[K], str],
        weight: Callable[[str], float],
        rate_cap: Callable[[str], float | None],
    ) -> None:
        self._tenant_of, self._weight, self._rate_cap = tenant_of, weight, rate_cap
        self._pools: dict[str, list[tuple[float, int, K, float]]] = {}
        self._queued: dict[str, int] = {}  # live keys per tenant
        self._tenant: dict[K, str] = {}  # the tenant of each live key
        self._tags: list[tuple[float, int, str]] = []  # (virtual start, seq, tenant)
        self._listed: set[str] = set()  # tenants in _tags
        self._vtime: dict[str, float] = {}
        self._vclock = 0.0
        self._caps: dict[str, TokenBucket] = {}
        self._seq = itertools.count()

    def push(self, entry: tuple[float, int, K, float]) -> None:
        tenant = self._tenant[entry[2]] = self._tenant_of(entry[2])
        heapq.heappush(self._pools.setdefault(tenant, []), entry)
        self._queued[tenant] = self._queued.get(tenant, 0) + 1
        if tenant not in self._listed:  # rejoins at the current virtual time
            start = max(self._vtime.get(tenant, 0.0), self._vclock)
            heapq.heappush(self._tags, (start, next(self._seq), tenant))
            self._listed.add(tenant)

    def discard(self, key: K) -> None:
        """``key`` left the ready set (cancelled or rescheduled): its entry goes stale."""
        tenant = self._tenant.pop(key, None)
        if tenant is not None:
            self._queued[tenant] -= 1

    def queued(self) -> dict[str, int]:
        return {t: n for t, n in self._queued.items() if n > 0}

    def oldest_due(self, live: set[K]) -> dict[str, float]:
        """Per tenant, when its longest-waiting due key fell due (a scan: for the gauges)."""
        out: dict[str, float] = {}
        for tenant, pool in self._pools.items():
            dues = [due for _, _, key, due in pool if key in live]
            if dues:
                out[tenant] = min(dues)
        return out

    def take(self, n: int, now: float, live: set[K]) -> list[tuple[K, float]]:
        out: list[tuple[K, float]] = []
        capped: list[tuple[float, int, str]] = []
        while len(out) < n and self._tags:
            tag = heapq.heappop(self._tags)
            start, _, tenant = tag
            pool = self._pools[tenant]
            while pool and pool[0][2] not in live:
                heapq.heappop(pool)  # stale: cancelled or taken through a duplicate entry
            if not pool:
                self._listed.discard(tenant)
                continue
            cap = self._cap(tenant, now)
            if cap is not None and cap.available(now) < 1:
                capped.append(tag)  # its own cap: the others go on
                continue
            _, _, key, due = heapq.heappop(pool)
            live.discard(key)
            del self._tenant[key]
            self._queued[tenant] -= 1
            out.append((key, due))
            if cap is not None:
                cap.take(1, now)
            self._vclock = start
            self._vtime[tenant] = finish = start + 1.0 / self._weight(tenant)
            heapq.heappush(self._tags, (finish, next(self._seq), tenant))
        for tag in capped:
            heapq.heappush(self._tags, tag)
        return out

    def capped_until(self, now: float) -> float | None:
        """When the first capped tenant may go again, if every queued tenant is capped."""
        waits = []
        for tenant, n in self._queued.items():
            if n <= 0:
                continue
            cap = self._cap(tenant, now)
            if cap is None or cap.available(now) >= 1:
                return None
            waits.append(now + cap.time_until(1, now))
        return min(waits) if waits else None

    def _cap(self, tenant: str, now: float) -> TokenBucket | None:
        cap = self._caps.get(tenant)
        if cap is None:
            rate = self._rate_cap(tenant)
            if rate is None:
                return None
            cap = self._caps[tenant] = TokenBucket(rate, max(1.0, rate), now)
        return cap


class Scheduler(Generic[K]):
    def __init__(
        self,
        *,
        priority: Callable[[K, float], float] | None = None,
        budget: TokenBucket | None = None,
        fair: FairPools[K] | None = None,
    ) -> None:
        self._priority = priority
        self.budget = budget
        self.fair = fair  # with tenants: one pool each, shared by weighted fair queuing
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
        self._leave_ready(key)
        self._due[key] = due
        heapq.heappush(self._timers, (due, next(self._seq), key))

    def cancel(self, key: K) -> None:
        self._due.pop(key, None)
        self._leave_ready(key)

    def _leave_ready(self, key: K) -> None:
        if key in self._in_ready:
            self._in_ready.discard(key)
            if self.fair is not None:
                self.fair.discard(key)

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
            if key in self._in_ready:  # promoted twice (rescheduled while due): once
                continue
            if self.fair is not None:
                self.fair.push((-score, seq, key, when))
            else:
                heapq.heappush(self._ready, (-score, seq, key, when))
            self._in_ready.add(key)

    def waiting_set(self) -> set[K]:
        """The keys due and not yet taken (the scheduler's own set: read, never change)."""
        return self._in_ready

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
        if self.fair is not None:
            out = self.fair.take(n, now, in_ready)
        while ready and len(out) < n:
            _, _, key, due = heapq.heappop(ready)
            if key in in_ready:
                in_ready.discard(key)
                out.append((key, due))
        if not in_ready:  # a set never shrinks: drop the table a burst of due polls grew
            self._in_ready = set()
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
            if self.fair is not None:  # every waiting tenant may be at its own cap
                at = max(at, self.fair.capped_until(now) or at)
            return max(at, self.paused_until)
        timers, due = self._timers, self._due
        while timers and due.get(timers[0][2]) != timers[0][0]:
            heapq.heappop(timers)
        if not timers:
            return None
        return max(timers[0][0], self.paused_until)
