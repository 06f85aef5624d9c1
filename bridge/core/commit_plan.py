"""What each commit carries: the position and the offset map as metadata. Pure.

The Kafka Parallel Consumer keeps this apart from the offsets themselves
(``OffsetMapCodecManager``): :class:`bridge.offsets.OffsetTracker` knows which records are
finished; this decides what to commit now, encodes the map (``bridge.offset_map``) within
the broker's limit, says which partitions must pause while their map is nearly full, and
turns maps off for a broker that drops commit metadata.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from bridge.core import offset_map
from bridge.core.offsets import OffsetTracker

P = TypeVar("P", bound=Hashable)

FULL = 0.75  # of the limit: a partition whose map is this large takes no more records
SMALLEST_LIMIT = 256


class CommitPlanner(Generic[P]):
    def __init__(self, offsets: OffsetTracker[P], limit: int) -> None:
        self._offsets = offsets
        self.limit = limit  # bytes of metadata the brokers accept per partition
        self.metadata_supported = True  # until a broker is seen dropping commit metadata
        self.map_bytes: dict[P, int] = {}  # offset map size per partition, when last planned

    def plan(self, only: set[P] | None = None) -> dict[P, tuple[int, str]]:
        """Each partition whose position moved or whose map changed: (position, metadata)."""
        out = {}
        for part in self._offsets.partitions():
            if only is None or part in only:
                planned = self.plan_with(part, ())
                if planned is not None:
                    out[part] = planned
        return out

    def plan_with(self, part: P, finished: Iterable[int]) -> tuple[int, str] | None:
        """The same for one partition as if ``finished`` (pending offsets) were done too,
        without changing anything: what a transaction carrying them commits."""
        offsets = self._offsets
        position, above = offsets.preview(part, finished)
        if position is None:
            return None
        metadata = self._metadata(part, position, above)
        if position == offsets.committed(part) and metadata == offsets.metadata(part):
            return None
        return position, metadata

    def full_partitions(self) -> set[P]:
        """Partitions whose map fills 75% of the limit: take no more records from them until
        it shrinks (the Parallel Consumer's rule), rather than lose the map."""
        return {part for part, size in self.map_bytes.items() if size >= FULL * self.limit}

    def shrink_limit(self) -> None:
        """The broker refused a map as too large: its limit is below the configured one."""
        self.limit = max(SMALLEST_LIMIT, self.limit // 2)

    def unsupported(self) -> None:
        """The broker drops commit metadata: commit positions alone from now on."""
        self.metadata_supported = False
        self.map_bytes.clear()

    def forget(self, part: P) -> None:
        self.map_bytes.pop(part, None)

    def committed_map(self, part: P) -> frozenset[int]:
        """The finished offsets the last commit's map lists (none without maps)."""
        committed = self._offsets.committed(part)
        if not self.metadata_supported or committed is None:
            return frozenset()
        return offset_map.decode(self._offsets.metadata(part), committed)

    def _metadata(self, part: P, position: int, above: set[int]) -> str:
        if not self.metadata_supported:
            return ""
        text, self.map_bytes[part] = offset_map.encode_sized(position, above, self.limit)
        return text
