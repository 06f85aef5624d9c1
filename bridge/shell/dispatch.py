"""The dispatch loop: due polls out as HTTP requests, their outcomes back into the core.

One short-lived coroutine per request in flight (at most ``api.max_concurrent_requests``),
never one per task: a task that is not being polled is just an entry in the scheduler's
queue. The loop sleeps until the next poll falls due or a request finishes.
"""

from __future__ import annotations

import asyncio

from bridge.core.book import SWEEP_INTERVAL_S, Core
from bridge.core.clock import Clock
from bridge.core.tasks import Task
from bridge.edges.api import ApiClient
from bridge.shell.delivery import Effects
from bridge.shell.telemetry import Telemetry


class Dispatcher:
    def __init__(
        self,
        *,
        core: Core,
        api: ApiClient,
        effects: Effects,
        telemetry: Telemetry,
        clock: Clock,
        max_requests: int,
    ) -> None:
        self._core, self._api, self._effects = core, api, effects
        self._telemetry, self._clock = telemetry, clock
        self._limit = max_requests
        self._requests = 0
        self._polls: set[asyncio.Task[None]] = set()
        self._waiter: asyncio.Future[None] | None = None
        telemetry.metrics.requests_in_flight.set_function(lambda: self._requests)
        self.running = True  # a cancel that asyncio.wait_for swallows must still end the loop

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = None if timeout is None else loop.call_later(max(0.0, timeout), self.wake)
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            self._waiter = None

    async def run(self) -> None:
        core, clock = self._core, self._clock
        lateness = self._telemetry.poll_lateness
        while self.running:
            now = clock.monotonic()
            for task, due in core.take_due(now, self._limit - self._requests):
                self._requests += 1
                lateness.observe(max(0.0, now - due))
                poll = asyncio.create_task(self._poll(task))
                self._polls.add(poll)  # removed by the poll itself: a done callback is a handle
            expired, waiting = core.expire_overdue(clock.read())
            self._effects.apply(expired)
            sweep = SWEEP_INTERVAL_S if waiting else None
            if self._requests >= self._limit:
                # A finishing request wakes us, and one always finishes within its limit:
                # no timer per wake-up (at the limit, that is one per request).
                await self._sleep(None)
                continue
            now = clock.monotonic()
            at = core.next_wakeup(now)
            if at is not None and sweep is not None:
                at = min(at, now + sweep)
            await self._sleep(None if at is None else at - now)

    async def _poll(self, task: Task) -> None:
        tracing = self._telemetry.tracing
        started = self._clock.monotonic()
        span = tracing.poll(task) if tracing.enabled else None
        try:
            limit = self._core.request_limit(task, started)
            outcome = await self._api.fetch(task.task_id, self._clock.time(), limit)
        finally:
            self._requests -= 1
            self._polls.discard(asyncio.current_task())
            self.wake()
        at = self._clock.read()
        if span is not None:
            tracing.polled(span, outcome)
        self._telemetry.request_done(outcome, at.mono - started)
        self._effects.apply(self._core.on_outcome(task, outcome, at))

    async def finish(self, timeout: float) -> None:
        """Let the requests under way land (their outcomes may still become events)."""
        if self._polls and timeout > 0:
            await asyncio.wait(list(self._polls), timeout=timeout)

    def cancel(self) -> None:
        for poll in self._polls:
            poll.cancel()
