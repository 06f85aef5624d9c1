"""When to poll which task: a timer heap, a priority pool of due tasks, and a global budget.

Pure, with time passed in: the daemon calls :meth:`Scheduler.take_due` with the clock's
``now`` and the polling benchmark with simulated time, thousands of times faster.

- Tasks wait in a min-queue by due time (one entry per task, stale ones skipped lazily).
- Once due they move to a pool ordered by the policy's priority; when the request
  budget binds, the most promising polls go first rather than first-come-first-served.
- Both are :class:`MinQueue`: entries that arrive in order (a poll is scheduled from now
  on; the fixed policy's priority is its due time) go to a FIFO, the rest to a heap.
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
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=tuple[Any, ...])


class MinQueue(Generic[E]):
    """A min-queue of tuples: a FIFO for the entries pushed in order, a heap for the rest.

    Most entries arrive in order: a poll is scheduled from now on, and due polls are
    promoted in due order. A FIFO takes those in O(1) and reads them in order, where a heap
    of 10,000 scattered entries cost ~5 µs a pop in cache misses alone (issue 22). The
    smallest entry comes out first either way; entries must be totally ordered (a unique
    sequence number in each)."""

    __slots__ = ("_heap", "_run")

    def __init__(self) -> None:
        self._heap: list[E] = []
        self._run: deque[E] = deque()

    def __len__(self) -> int:
        return len(self._heap) + len(self._run)

    def push(self, entry: E) -> None:
        run = self._run
        if not run or entry > run[-1]:
            run.append(entry)
        else:
            heapq.heappush(self._heap, entry)

    def peek(self) -> E | None:
        heap, run = self._heap, self._run
        if heap and (not run or heap[0] < run[0]):
            return heap[0]
        return run[0] if run else None

    def pop(self) -> E:
        """The smallest entry, removed (IndexError if empty)."""
        heap, run = self._heap, self._run
        if heap and (not run or heap[0] < run[0]):
            return heapq.heappop(heap)
        return run.popleft()


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

    def oldest_due(self, live: Mapping[K, int]) -> dict[str, float]:
        """Per tenant, when its longest-waiting due key fell due (a scan: for the gauges)."""
        out: dict[str, float] = {}
        for tenant, pool in self._pools.items():
            dues = [due for _, seq, key, due in pool if live.get(key) == seq]
            if dues:
                out[tenant] = min(dues)
        return out

    def take(self, n: int, now: float, live: dict[K, int]) -> list[tuple[K, float]]:
        """Up to ``n`` keys; ``live``: each due key's entry (its sequence number), taken
        out of it here; any other entry is stale."""
        out: list[tuple[K, float]] = []
        capped: list[tuple[float, int, str]] = []
        while len(out) < n and self._tags:
            tag = heapq.heappop(self._tags)
            start, _, tenant = tag
            pool = self._pools[tenant]
            while pool and live.get(pool[0][2]) != pool[0][1]:
                heapq.heappop(pool)  # stale: cancelled, or due again as a newer entry
            if not pool:
                self._listed.discard(tenant)
                continue
            cap = self._cap(tenant, now)
            if cap is not None and cap.available(now) < 1:
                capped.append(tag)  # its own cap: the others go on
                continue
            _, _, key, due = heapq.heappop(pool)
            del live[key]
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
        self._timers: MinQueue[tuple[float, int, K]] = MinQueue()  # (due, seq, key)
        # Each key waiting on a timer, with its entry's sequence number: any other is stale.
        self._due: dict[K, int] = {}
        self._ready: MinQueue[tuple[float, int, K, float]] = (
            MinQueue()
        )  # (-priority, seq, key, due)
        # Each due key's entry in the ready queue, by sequence number: any other is stale.
        self._in_ready: dict[K, int] = {}
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
        seq = self._due[key] = next(self._seq)
        self._timers.push((due, seq, key))

    def cancel(self, key: K) -> None:
        self._due.pop(key, None)
        self._leave_ready(key)

    def _leave_ready(self, key: K) -> None:
        if self._in_ready.pop(key, None) is not None and self.fair is not None:
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
        while (first := timers.peek()) is not None and first[0] <= now:
            when, seq, key = timers.pop()
            if due.get(key) != seq:
                continue  # stale: rescheduled or cancelled
            del due[key]
            score = self._priority(key, when) if self._priority is not None else -when
            if self.fair is not None:
                self.fair.push((-score, seq, key, when))
            else:
                self._ready.push((-score, seq, key, when))
            self._in_ready[key] = seq

    def waiting_set(self) -> Mapping[K, int]:
        """The keys due and not yet taken, each with its entry's sequence number (the
        scheduler's own table: read, never change)."""
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
            _, seq, key, due = ready.pop()
            if in_ready.get(key) == seq:  # else stale: cancelled, or due again as a newer one
                del in_ready[key]
                out.append((key, due))
        if not in_ready:  # a dict never shrinks: drop the table a burst of due polls grew
            self._in_ready = {}
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
        while (first := timers.peek()) is not None and due.get(first[2]) != first[1]:
            timers.pop()  # stale
        if first is None:
            return None
        return max(first[0], self.paused_until)
