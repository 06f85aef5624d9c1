"""Group membership changes: what happens when partitions leave this member or arrive.

Revoked: the core parks their tasks, events under way get up to 5 s to be acknowledged
(each one saves a duplicate), the finished prefix is committed, then the partitions are
released. Assigned: the core starts them clean and hands parked tasks of partitions that
went elsewhere to their new owner; the intake decides where fetching starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from bridge.commits import Committer
from bridge.core import Core
from bridge.intake import Intake
from bridge.outbox import Outbox

SETTLE_ON_REVOKE_S = 5.0


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        *,
        core: Core,
        intake: Intake,
        outbox: Outbox,
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
        self._core.park(gone)
        await self._outbox.settled(SETTLE_ON_REVOKE_S)
        await self._committer.commit(only=gone, timeout=SETTLE_ON_REVOKE_S)
        self._outbox.apply(self._core.release(gone, "revoked"))
        self._intake.forget(gone)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        tps: set[TopicPartition] = set(assigned)
        self._outbox.apply(self._core.assign({(tp.topic, tp.partition) for tp in tps}))
        await self._intake.start_partitions(tps)
        self._on_assigned()
