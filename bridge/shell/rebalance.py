"""Group membership changes: what happens when partitions leave this member or arrive.

Revoked: their records stop being taken, the core parks their tasks, events under way
get up to 5 s to be acknowledged (each one saves a duplicate), the finished prefix is
committed with its offset map (in exactly-once mode: the partitions' last transactions),
then the partitions are set aside.
Assigned: the committed offsets and their maps are read, the core starts each partition
from them (and from what finished here if it is coming back) and hands parked tasks of
partitions that went elsewhere to their new owner; fetching starts at the committed offset.

aiokafka runs these inside its join, so each step has a limit of its own (at most ~30 s
to revoke, ~20 s to assign), well inside ``kafka.rebalance_timeout_ms`` (60 s): a member
still in its listener when that runs out is dropped from the group and starts another
rebalance when it rejoins.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from bridge.core.book import Core
from bridge.shell.bounded import bounded
from bridge.shell.commits import Committer
from bridge.shell.intake import Intake
from bridge.shell.outbox import AnyOutbox

SETTLE_ON_REVOKE_S = 5.0
COMMIT_ON_REVOKE_S = 10.0  # the commit's own request limit is 5 s; reading one back, 10 s


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        *,
        core: Core,
        intake: Intake,
        outbox: AnyOutbox,
        committer: Committer,
        on_revoked: Callable[[], None] = lambda: None,
        on_assigned: Callable[[], None] = lambda: None,
    ) -> None:
        self._core, self._intake, self._outbox = core, intake, outbox
        self._committer = committer
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
        self._intake.rebalancing()
        gone = {(tp.topic, tp.partition) for tp in revoked}
        if not gone:
            return
        # aiokafka still hands over their records while this runs: they belong to the next
        # owner (a task taken now would outlive the partition here and be published twice).
        self._intake.forget(gone)
        self._core.park(gone)
        await self._outbox.settled(SETTLE_ON_REVOKE_S)
        with contextlib.suppress(TimeoutError):  # the next owner repeats what is uncommitted
            await bounded(
                self._committer.commit(only=gone, timeout=SETTLE_ON_REVOKE_S),
                COMMIT_ON_REVOKE_S,
                "the last commit of the revoked partitions",
            )
        # Closing waits for a transaction still committing (bounded there): it must plan its
        # offsets from the partition's state, so the core sets the partition aside after.
        await self._outbox.close(gone)
        self._outbox.apply(self._core.release(gone, "revoked"))
        self._intake.forget(gone)  # again: what was fetched meanwhile waits as "early"

    async def _assigned(self, assigned: Any) -> None:
        tps: set[TopicPartition] = set(assigned)
        # Exactly once: each partition's transactional id is initialised first, which fences
        # its previous owner and settles what it left open before the offsets are read.
        await self._outbox.open({(tp.topic, tp.partition) for tp in tps})
        starts = await self._intake.start_offsets(tps)
        self._outbox.apply(self._core.assign(starts))
        self._intake.seek(starts)
        self._on_assigned()
