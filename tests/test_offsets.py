from __future__ import annotations

import random

import pytest

from bridge.core.offsets import OffsetTracker, PartitionOffsets


def test_commits_only_the_finished_prefix() -> None:
    p = PartitionOffsets()
    for o in range(10, 15):
        p.add(o)
    assert p.committable is None
    p.done(12)
    p.done(11)
    assert p.committable is None  # 10 still in flight
    assert p.finished_above() == {11, 12}  # finished, but behind 10: in the offset map
    p.done(10)
    assert p.finished_above() == set()
    assert p.committable == 13
    assert p.in_flight == 2
    p.done(14)
    assert p.committable == 13
    p.done(13)
    assert p.committable == 15
    assert p.in_flight == 0


def test_gaps_in_offsets_are_fine() -> None:
    p = PartitionOffsets()
    for o in (3, 7, 20):
        p.add(o)
    p.done(7)
    p.done(3)
    assert p.committable == 8
    p.done(20)
    assert p.committable == 21


def test_unknown_and_repeated_done_are_ignored() -> None:
    p = PartitionOffsets()
    p.add(1)
    p.add(2)
    assert p.done(5) is False
    assert p.done(2) is True
    assert p.done(2) is False
    assert p.in_flight == 1
    assert p.committable is None


def test_offsets_must_increase() -> None:
    p = PartitionOffsets()
    p.add(5)
    with pytest.raises(ValueError):
        p.add(5)
    p.done(5)
    with pytest.raises(ValueError):
        p.add(3)


def test_random_completion_order_never_commits_ahead() -> None:
    rng = random.Random(4)
    for _ in range(200):
        p = PartitionOffsets()
        offsets = sorted(rng.sample(range(1000), 50))
        for o in offsets:
            p.add(o)
        finished: set[int] = set()
        for o in rng.sample(offsets, len(offsets)):
            p.done(o)
            finished.add(o)
            pos = p.committable
            if pos is not None:
                # Every offset below the committed position is finished.
                assert all(x in finished for x in offsets if x < pos)
                unfinished = [x for x in offsets if x not in finished]
                assert not unfinished or pos <= min(unfinished)
        assert p.committable == offsets[-1] + 1


def test_tracker_per_partition_and_drop() -> None:
    t: OffsetTracker[tuple[str, int]] = OffsetTracker()
    t.add(("a", 0), 0)
    t.add(("a", 1), 0)
    t.add(("a", 1), 1)
    t.done(("a", 1), 0)
    assert (t.committable(("a", 0)), t.committable(("a", 1))) == (None, 1)
    assert t.in_flight() == 2
    t.drop(("a", 1))
    assert t.done(("a", 1), 1) is False
    assert t.in_flight() == 1
