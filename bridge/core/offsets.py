"""Offsets for out-of-order completion: commit only up to the lowest unfinished offset.

Pure. Like the Kafka Parallel Consumer and Redpanda Connect's ``checkpoint_limit``:
records are registered in the order they are consumed and marked done in any order;
the committable position of a partition is one past the longest finished prefix. The
offsets finished above it travel in the commit's metadata (``bridge.offset_map``): a
partition started from such a commit knows them, and their records are skipped when
they are fetched again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class PartitionOffsets:
    __slots__ = ("_done", "_known", "_next_commit", "_pending", "committed", "metadata")

    def __init__(self, committed: int | None = None, finished: Iterable[int] = ()) -> None:
        self._pending: deque[int] = deque()  # consumed, in order, oldest first
        self._done: set[int] = set()  # finished but still behind an unfinished one
        self._next_commit = committed  # offset to commit (last finished prefix + 1)
        self.committed = committed  # what the group last stored for this partition
        self.metadata = ""  # the offset map stored with it
        # Finished before this partition was assigned here (from the commit's map or a
        # previous stay on this member), not fetched again yet.
        self._known: set[int] = {o for o in finished if committed is None or o >= committed}

    def add(self, offset: int) -> bool:
        """Register a consumed record; True if it is already finished (skip it)."""
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} is not after {self._pending[-1]}")
        if not self._pending and self._next_commit is not None and offset < self._next_commit:
            raise ValueError(f"offset {offset} is before the committable {self._next_commit}")
        self._pending.append(offset)
        if offset in self._known:
            self._known.discard(offset)
            self.done(offset)
            return True
        return False

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

    def finished_above(self) -> set[int]:
        """Every offset known finished above the committable position (the offset map)."""
        floor = self._next_commit if self._next_commit is not None else -1
        return {o for o in self._done | self._known if o >= floor}

    def finished(self) -> set[int]:
        """Everything known finished from the last commit on: the finished prefix after it
        and the offsets finished above (kept when the partition leaves, for a comeback)."""
        out = self.finished_above()
        if self.committed is not None and self._next_commit is not None:
            out.update(range(self.committed, self._next_commit))
        return out

    def preview(self, extra: Iterable[int]) -> tuple[int | None, set[int]]:
        """The committable position and the finished offsets above it, were ``extra``
        (pending offsets) finished too; nothing changes."""
        finished = self._done | set(extra)
        position = self._next_commit
        for offset in self._pending:
            if offset not in finished:
                break
            position = offset + 1
        floor = position if position is not None else -1
        return position, {o for o in finished | self._known if o >= floor}


class OffsetTracker(Generic[P]):
    """Per-partition :class:`PartitionOffsets`, keyed by any hashable partition id.

    A partition that leaves is kept aside (``release``): if it comes back, what finished
    during its stay here is not done again.
    """

    def __init__(self) -> None:
        self._parts: dict[P, PartitionOffsets] = {}
        self._released: dict[P, PartitionOffsets] = {}

    def start(self, partition: P, committed: int | None, finished: Iterable[int] = ()) -> int:
        """Begin ``partition`` at the group's ``committed`` offset, knowing ``finished``;
        merged with what this member finished there before. Returns how many are known."""
        known = set(finished)
        before = self._released.pop(partition, None)
        if before is not None:
            known |= before.finished()
        part = self._parts[partition] = PartitionOffsets(committed, known)
        return len(part._known)

    def add(self, partition: P, offset: int) -> bool:
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = PartitionOffsets()
        return part.add(offset)

    def done(self, partition: P, offset: int) -> bool:
        part = self._parts.get(partition) or self._released.get(partition)
        return part.done(offset) if part is not None else False

    def committable(self, partition: P) -> int | None:
        part = self._parts.get(partition)
        return part.committable if part is not None else None

    def mark_committed(self, positions: dict[P, int], metadata: dict[P, str] | None = None) -> None:
        for partition, position in positions.items():
            part = self._parts.get(partition)
            if part is not None:
                part.committed = position
                if metadata is not None:
                    part.metadata = metadata.get(partition, "")

    def committed(self, partition: P) -> int | None:
        part = self._parts.get(partition)
        return part.committed if part is not None else None

    def metadata(self, partition: P) -> str:
        part = self._parts.get(partition)
        return part.metadata if part is not None else ""

    def finished_above(self, partition: P) -> set[int]:
        part = self._parts.get(partition)
        return part.finished_above() if part is not None else set()

    def preview(self, partition: P, extra: Iterable[int]) -> tuple[int | None, set[int]]:
        part = self._parts.get(partition)
        return part.preview(extra) if part is not None else (None, set())

    def in_flight(self, partition: P | None = None) -> int:
        if partition is not None:
            part = self._parts.get(partition)
            return part.in_flight if part is not None else 0
        return sum(p.in_flight for p in self._parts.values())

    def drop(self, partition: P) -> None:
        """Forget a partition; late ``done`` calls for it are ignored."""
        self._parts.pop(partition, None)

    def release(self, partition: P) -> None:
        """Set a partition aside (revoked): late acknowledgements still count, and if it
        comes back, ``start`` knows what finished here."""
        part = self._parts.pop(partition, None)
        if part is not None:
            self._released[partition] = part

    def forget_released(self, keep: set[P]) -> None:
        """Partitions assigned elsewhere: their history here no longer matters."""
        for partition in list(self._released):
            if partition not in keep:
                del self._released[partition]

    def partitions(self) -> list[P]:
        return list(self._parts)
