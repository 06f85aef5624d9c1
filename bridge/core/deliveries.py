"""Webhook deliveries remembered for tasks not tracked here (yet). Pure; time passed in.

Every replica reads every delivery; one whose task id this replica does not track may be
for a record not consumed yet (the platform posts to Kafka after WaveSpeed finished), so it
is kept a while: at most ``limit`` of them, each for ``ttl`` seconds, oldest first out.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from bridge.core.outcomes import Outcome


@dataclass(slots=True)
class Remembered:
    outcome: Outcome
    webhook_id: str
    received: float  # unix seconds, when a replica's receiver took it
    mine: bool  # received by this replica's receiver
    expires: float  # monotonic


class DeliveryMemory:
    def __init__(self, limit: int, ttl: float) -> None:
        self._limit, self._ttl = limit, ttl
        self._by_task: collections.OrderedDict[str, Remembered] = collections.OrderedDict()

    def remember(
        self,
        task_id: str,
        outcome: Outcome,
        webhook_id: str,
        received: float,
        mine: bool,
        now: float,
    ) -> list[tuple[str, Remembered]]:
        """Keep a delivery (a newer one for the same task replaces it); returns those
        pushed out by the limit."""
        self._by_task.pop(task_id, None)
        self._by_task[task_id] = Remembered(outcome, webhook_id, received, mine, now + self._ttl)
        out = []
        while len(self._by_task) > self._limit:
            out.append(self._by_task.popitem(last=False))
        return out

    def take(self, task_id: str) -> Remembered | None:
        return self._by_task.pop(task_id, None) if self._by_task else None

    def expire(self, now: float) -> list[tuple[str, Remembered]]:
        """Those older than the ttl (insertion order is expiry order: one ttl for all)."""
        out = []
        while self._by_task:
            task_id, first = next(iter(self._by_task.items()))
            if first.expires > now:
                break
            del self._by_task[task_id]
            out.append((task_id, first))
        return out
