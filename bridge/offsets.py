"""Offsets for out-of-order completion: commit only up to the lowest unfinished offset.

Pure. Like the Kafka Parallel Consumer and Redpanda Connect's ``checkpoint_limit``:
records are registered in the order they are consumed and marked done in any order;
the committable position of a partition is one past the longest finished prefix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class PartitionOffsets:
    __slots__ = ("_done", "_next_commit", "_pending", "committed")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # consumed, in order, oldest first
        self._done: set[int] = set()  # finished but still behind an unfinished one
        self._next_commit: int | None = None  # offset to commit (last finished prefix + 1)
        self.committed: int | None = None  # what the group last stored for this partition

    def add(self, offset: int) -> None:
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} is not after {self._pending[-1]}")
        if not self._pending and self._next_commit is not None and offset < self._next_commit:
            raise ValueError(f"offset {offset} is before the committable {self._next_commit}")
        self._pending.append(offset)

    def done(self, offset: int) -> bool:
        """Mark ``offset`` finished; False if it is not pending here (e.g. after a revoke)."""
        pending = self._pending
        if not pending or offset < pending[0] or offset > pending[-1]:
            return False
        if offset == pending[0]:
            pending.popleft()
            self._next_commit = offset + 1
            done = self._done
            while pending and pending[0] in done:
                head = pending.popleft()
                done.discard(head)
                self._next_commit = head + 1
            return True
        if offset in self._done:
            return False
        self._done.add(offset)
        return True

    @property
    def committable(self) -> int | None:
        return self._next_commit

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._done)

    @property
    def done_ahead(self) -> int:
        """Finished records behind an unfinished one: not committable yet."""
        return len(self._done)

    @property
    def lowest_pending(self) -> int | None:
        return self._pending[0] if self._pending else None


class OffsetTracker(Generic[P]):
    """Per-partition :class:`PartitionOffsets`, keyed by any hashable partition id."""

    def __init__(self) -> None:
        self._parts: dict[P, PartitionOffsets] = {}

    def add(self, partition: P, offset: int) -> None:
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = PartitionOffsets()
        part.add(offset)

    def done(self, partition: P, offset: int) -> bool:
        part = self._parts.get(partition)
        return part.done(offset) if part is not None else False

    def committable(self, partition: P) -> int | None:
        part = self._parts.get(partition)
        return part.committable if part is not None else None

    def positions(self) -> Iterator[tuple[P, int]]:
        for partition, part in self._parts.items():
            if part.committable is not None:
                yield partition, part.committable

    def to_commit(self, only: set[P] | None = None) -> dict[P, int]:
        """Committable positions ahead of what was last committed (of ``only``, if given)."""
        return {
            partition: part.committable
            for partition, part in self._parts.items()
            if (only is None or partition in only)
            and part.committable is not None
            and part.committable > (part.committed if part.committed is not None else -1)
        }

    def mark_committed(self, positions: dict[P, int]) -> None:
        for partition, position in positions.items():
            part = self._parts.get(partition)
            if part is not None:
                part.committed = position

    def committed(self, partition: P) -> int | None:
        part = self._parts.get(partition)
        return part.committed if part is not None else None

    def in_flight(self, partition: P | None = None) -> int:
        if partition is not None:
            part = self._parts.get(partition)
            return part.in_flight if part is not None else 0
        return sum(p.in_flight for p in self._parts.values())

    def done_ahead(self, partition: P) -> int:
        part = self._parts.get(partition)
        return part.done_ahead if part is not None else 0

    def drop(self, partition: P) -> None:
        """Forget a partition (revoked); late ``done`` calls for it are ignored."""
        self._parts.pop(partition, None)

    def partitions(self) -> list[P]:
        return list(self._parts)
