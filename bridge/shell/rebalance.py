"""Group membership changes: what happens when partitions leave this member or arrive.

Revoked: the core stops taking their records and parks their tasks, then the delivery
mode hands them over (at least once: events under way get a few seconds to be
acknowledged, each one saving a duplicate, and the finished prefix is committed with its
offset map; exactly once: the partitions' last transactions), then the core sets them
aside.
Assigned: the core notes records fetched before their start is known; the delivery mode
says where each starts (exactly once: after fencing the previous owner), the core starts
them (with what finished here if they are coming back) and hands parked tasks of
partitions that went elsewhere to their new owner; fetching starts where the core says.

aiokafka runs these inside its join, so each step has a limit of its own (at most ~25 s
to revoke, ~20 s to assign), well inside ``kafka.rebalance_timeout_ms`` (60 s): a member
still in its listener when that runs out is dropped from the group and starts another
rebalance when it rejoins.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiokafka.abc import ConsumerRebalanceListener

from bridge.core.book import Core
from bridge.shell.bounded import bounded
from bridge.shell.delivery import DeliveryMode, Effects
from bridge.shell.intake import Intake

# At least once: acknowledgements <= 5 s, then the commit <= 5 s; exactly once: the last
# transactions <= 10 s, then the producers stop.
HAND_OVER_S = 10.0


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        *,
        core: Core,
        intake: Intake,
        mode: DeliveryMode,
        effects: Effects,
        on_revoked: Callable[[], None] = lambda: None,
        on_assigned: Callable[[], None] = lambda: None,
    ) -> None:
        self._core, self._intake, self._mode, self._effects = core, intake, mode, effects
        self._on_revoked, self._on_assigned = on_revoked, on_assigned
        self._lock = asyncio.Lock()  # a listener and the shutdown take turns
        self._closed = False

    async def close(self, timeout: float) -> None:
        """At shutdown: wait for a listener under way, and run none after it (shutdown
        commits and releases every partition itself; an assignment completed behind it
        would open transactional ids nobody closes, fencing the partitions' next owner)."""
        with contextlib.suppress(TimeoutError):
            await bounded(self._lock.acquire(), timeout, "the rebalance listener to finish")
            self._lock.release()
        self._closed = True

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self._lock:
            if not self._closed:
                await self._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        async with self._lock:
            if not self._closed:
                await self._assigned(assigned)

    async def _revoked(self, revoked: Any) -> None:
        self._on_revoked()  # every rebalance starts here, even with nothing to give up
        gone = {(tp.topic, tp.partition) for tp in revoked}
        if not gone:
            return
        # aiokafka still hands over their records while this runs: they belong to the next
        # owner (a task taken now would outlive the partition here and be published twice).
        self._core.revoke(gone)
        # A transaction still committing plans its offsets from the partition's state:
        # the core sets the partitions aside only once the mode has handed them over.
        await self._mode.hand_over(gone, HAND_OVER_S)
        self._effects.apply(self._core.release(gone, "revoked"))

    async def _assigned(self, assigned: Any) -> None:
        parts = {(tp.topic, tp.partition) for tp in assigned}
        self._core.starting(parts)
        starts = await self._mode.start(parts)
        self._effects.apply(self._core.assign(starts))
        self._intake.seek(parts)
        self._on_assigned()
