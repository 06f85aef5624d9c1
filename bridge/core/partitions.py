"""Each input partition's life in this member, in one place. Pure.

A partition is assigned (``STARTING``: where it starts is being read, and records aiokafka
fetches meanwhile are only noted), then ``ACTIVE`` (its records are taken), and leaves by
a revocation (``REVOKING``: its records belong to the next owner) or a fence
(``FENCED``: another member initialised its transactional id). Every assignment and
restart opens a new **epoch**: work begun for an older one (a transaction committing, a
commit under way, a fenced partition's recheck) carries its epoch, and its result is
dropped here when the epoch has moved on, as the Kafka Parallel Consumer stamps work
with ``partitionsAssignmentEpochs``.

It also owns what the offsets (``bridge.core.offsets``) and the commits
(``bridge.core.commit_plan``) know: the shell asks for a commit plan and reports it done,
instead of keeping copies of its own.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from bridge.core import offset_map
from bridge.core.commit_plan import CommitPlanner
from bridge.core.offsets import OffsetTracker

P = TypeVar("P", bound=Hashable)


class Phase(enum.Enum):
    STARTING = "starting"
    ACTIVE = "active"
    REVOKING = "revoking"
    FENCED = "fenced"


class Take(enum.Enum):
    """What to do with a record fetched for a partition."""

    NEW = "new"  # take it
    FINISHED = "finished"  # its event went out before (the commit's offset map): skip it
    NOT_OURS = "not_ours"  # not assigned here, leaving, or fenced: the owner takes it
    EARLY = "early"  # fetched before the partition's start was read: fetched again after
    BEHIND = "behind"  # below what is tracked (a seek back): already handled here


# Offsets are known and commits planned from the start until the partition is released.
_TRACKED = frozenset({Phase.ACTIVE, Phase.REVOKING})


@dataclass(slots=True)
class _State:
    epoch: int
    phase: Phase
    early: int | None = None  # lowest offset fetched while STARTING
    next_offset: int | None = None  # after the last record taken, or where fetching starts


@dataclass(frozen=True, slots=True)
class Planned:
    """One partition's commit: the position, the offset map as metadata, and the epoch it
    was planned in (a commit that completes in a later epoch changes nothing)."""

    position: int
    metadata: str
    epoch: int


class Partitions(Generic[P]):
    def __init__(self, metadata_limit: int) -> None:
        self._states: dict[P, _State] = {}
        self._epochs = itertools.count(1)
        self._offsets: OffsetTracker[P] = OffsetTracker()
        self._commits: CommitPlanner[P] = CommitPlanner(self._offsets, metadata_limit)

    # --- the lifecycle -------------------------------------------------------------------

    def starting(self, parts: Iterable[P]) -> None:
        """Assigned (or restarted): a new epoch; records fetched now are only noted."""
        for part in parts:
            self._states[part] = _State(next(self._epochs), Phase.STARTING)

    def start(self, part: P, committed: int | None, metadata: str) -> int:
        """Take ``part``'s records from the group's ``committed`` offset, knowing the offsets
        its map lists as finished (and what finished here, if it is coming back). Returns
        how many finished offsets are known above the commit."""
        state = self._states.get(part)
        if state is None or state.phase is not Phase.STARTING:
            state = self._states[part] = _State(next(self._epochs), Phase.STARTING)
        finished = offset_map.decode(metadata, committed) if committed is not None else ()
        known = self._offsets.start(part, committed, finished)
        if committed is not None:
            self._offsets.mark_committed({part: committed}, {part: metadata})
        state.phase = Phase.ACTIVE
        # Unknown start: aiokafka's own reset applies, from what it fetched early if anything.
        state.next_offset = committed if committed is not None else state.early
        state.early = None
        return known

    def fetch_from(self, part: P) -> int | None:
        """Where fetching must begin for an active partition (None: aiokafka decides)."""
        state = self._states.get(part)
        return state.next_offset if state is not None and state.phase is Phase.ACTIVE else None

    def revoking(self, parts: Iterable[P]) -> None:
        """Leaving this member: its records are the next owner's from now on."""
        for part in parts:
            state = self._states.get(part)
            if state is not None:
                state.phase = Phase.REVOKING

    def release(self, parts: Iterable[P]) -> int:
        """Set ``parts`` aside after their last commit: if one comes back, what finished here
        is known. Returns the records the next owner will process again (finished above
        the commit but not in its offset map)."""
        again = 0
        for part in parts:
            again += len(self._offsets.finished_above(part) - self._commits.committed_map(part))
            self._offsets.release(part)
            self._commits.forget(part)
            self._states.pop(part, None)
        return again

    def keep_released(self, assigned: set[P]) -> None:
        """A complete assignment: what finished here on partitions gone elsewhere is moot."""
        self._offsets.forget_released(assigned)

    def fence(self, part: P, epoch: int) -> bool:
        """Another member initialised ``part``'s transactional id during ``epoch``: forget
        what is not committed and take no more of its records. False if the epoch moved on
        (the fence is about an assignment already gone)."""
        state = self._states.get(part)
        if state is None or state.epoch != epoch:
            return False
        self._drop(part)
        state.phase = Phase.FENCED
        return True

    def restart(self, part: P, epoch: int) -> bool:
        """``part``'s transaction failed during ``epoch``: forget what is not committed and
        start it again (a new epoch), from its commit. False if the epoch moved on."""
        state = self._states.get(part)
        if state is None or state.epoch != epoch:
            return False
        self._drop(part)
        self._states[part] = _State(next(self._epochs), Phase.STARTING)
        return True

    def _drop(self, part: P) -> None:
        self._offsets.drop(part)
        self._commits.forget(part)

    def epoch(self, part: P) -> int | None:
        state = self._states.get(part)
        return state.epoch if state is not None else None

    def phase(self, part: P) -> Phase | None:
        state = self._states.get(part)
        return state.phase if state is not None else None

    def active(self) -> dict[P, int]:
        """The partitions whose records are taken here, with their epochs."""
        return {p: s.epoch for p, s in self._states.items() if s.phase is Phase.ACTIVE}

    def _tracked(self) -> dict[P, int]:
        return {p: s.epoch for p, s in self._states.items() if s.phase in _TRACKED}

    def held(self) -> set[P]:
        """Partitions whose records are held back: their offset map is nearly full."""
        return self._commits.full_partitions()

    # --- records -------------------------------------------------------------------------

    def take(self, part: P, offset: int) -> Take:
        state = self._states.get(part)
        if state is None or state.phase in (Phase.REVOKING, Phase.FENCED):
            return Take.NOT_OURS
        if state.phase is Phase.STARTING:
            state.early = offset if state.early is None else min(state.early, offset)
            return Take.EARLY
        try:
            finished = self._offsets.add(part, offset)
        except ValueError:
            return Take.BEHIND
        state.next_offset = offset + 1
        return Take.FINISHED if finished else Take.NEW

    def done(self, part: P, offset: int) -> None:
        """The record's answer is acknowledged (also for a partition set aside meanwhile)."""
        self._offsets.done(part, offset)

    def next_offset(self, part: P) -> int | None:
        """The record after the last one taken (or the start): where to read again from."""
        state = self._states.get(part)
        return state.next_offset if state is not None and state.phase is Phase.ACTIVE else None

    def in_flight(self) -> int:
        return self._offsets.in_flight()

    # --- commits -------------------------------------------------------------------------

    def plan(self, only: set[P] | None = None) -> dict[P, Planned]:
        """Each partition tracked here (active, or revoking until its last commit) whose
        position moved or whose map changed."""
        out = {}
        for part, epoch in self._tracked().items():
            if only is None or part in only:
                planned = self._commits.plan_with(part, ())
                if planned is not None:
                    out[part] = Planned(*planned, epoch)
        return out

    def plan_with(self, part: P, finished: Iterable[int]) -> Planned | None:
        """The commit of one partition as if ``finished`` (pending offsets) were done too,
        without changing anything: what a transaction carrying them commits."""
        state = self._states.get(part)
        if state is None or state.phase not in _TRACKED:
            return None
        planned = self._commits.plan_with(part, finished)
        return Planned(*planned, state.epoch) if planned is not None else None

    def committed(self, plan: dict[P, Planned]) -> None:
        """The broker stored ``plan``: what it planned in an older epoch changes nothing."""
        for part, p in plan.items():
            if self.epoch(part) == p.epoch:
                self._offsets.mark_committed({part: p.position}, {part: p.metadata})

    def metadata_refused(self) -> int:
        """The broker refused a map as too large: halve the limit; returns the new one."""
        self._commits.shrink_limit()
        return self._commits.limit

    def metadata_dropped(self) -> None:
        """The broker drops commit metadata (Tansu): positions alone from now on."""
        self._commits.unsupported()

    def map_sizes(self) -> dict[P, int]:
        return dict(self._commits.map_bytes)

    def committed_position(self, part: P) -> int | None:
        """What the group has stored for ``part``, else how far this member got."""
        committed = self._offsets.committed(part)
        return committed if committed is not None else self._offsets.committable(part)
