"""Group membership changes: what happens when partitions leave this member or arrive.

Revoked: their records stop being taken, the core parks their tasks, events under way
get up to 5 s to be acknowledged (each one saves a duplicate), the finished prefix is
committed with its offset map (in exactly-once mode: the partitions' last transactions),
then the partitions are set aside.
Assigned: the committed offsets and their maps are read, the core starts each partition
from them (and from what finished here if it is coming back) and hands parked tasks of
partitions that went elsewhere to their new owner; fetching starts at the committed offset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from bridge.commits import Committer
from bridge.core import Core
from bridge.intake import Intake
from bridge.outbox import AnyOutbox

SETTLE_ON_REVOKE_S = 5.0


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        *,
        core: Core,
        intake: Intake,
        outbox: AnyOutbox,
        committer: Committer,
        on_assigned: Callable[[], None] = lambda: None,
    ) -> None:
        self._core, self._intake, self._outbox = core, intake, outbox
        self._committer = committer
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Any) -> None:
        gone = {(tp.topic, tp.partition) for tp in revoked}
        if not gone:
            return
        # aiokafka still hands over their records while this runs: they belong to the next
        # owner (a task taken now would outlive the partition here and be published twice).
        self._intake.forget(gone)
        self._core.park(gone)
        await self._outbox.settled(SETTLE_ON_REVOKE_S)
        await self._committer.commit(only=gone, timeout=SETTLE_ON_REVOKE_S)
        # Closing waits for a transaction still committing: it must plan its offsets from
        # the partition's state, so the core sets the partition aside only afterwards.
        await self._outbox.close(gone)
        self._outbox.apply(self._core.release(gone, "revoked"))
        self._intake.forget(gone)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        tps: set[TopicPartition] = set(assigned)
        # Exactly once: each partition's transactional id is initialised first, which fences
        # its previous owner and settles what it left open before the offsets are read.
        await self._outbox.open({(tp.topic, tp.partition) for tp in tps})
        starts = await self._intake.start_offsets(tps)
        self._outbox.apply(self._core.assign(starts))
        self._intake.seek(starts)
        self._on_assigned()
