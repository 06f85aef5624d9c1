"""The finished-offset map in commit metadata: exact round trips, the smaller encoding,
truncation to the broker's limit, and anything else ignored."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from bridge.core import offset_map


@given(
    base=st.integers(0, 2**40),
    rel=st.sets(st.integers(1, 20_000), max_size=300),
)
def test_round_trip(base: int, rel: set[int]) -> None:
    finished = {base + r for r in rel}
    text = offset_map.encode(base, finished | {base, base - 1})  # at or below base: dropped
    assert text.isascii() and len(text) <= offset_map.DEFAULT_MAX_BYTES
    assert offset_map.decode(text, base) == frozenset(finished)


def test_the_smaller_encoding_is_chosen() -> None:
    dense = set(range(101, 5101, 2))  # every other offset: a bitset wins
    sparse = {101, 50_000, 90_000}  # far apart: run lengths win
    long_run = set(range(101, 30_101))  # one run: run lengths win by far
    kinds = {}
    for name, finished in (("dense", dense), ("sparse", sparse), ("run", long_run)):
        raw = base64.b64decode(offset_map.encode(100, finished))
        kinds[name] = raw[1]
        assert offset_map.decode(offset_map.encode(100, finished), 100) == finished
    assert kinds == {"dense": 0, "sparse": 1, "run": 1}
    assert len(offset_map.encode(100, long_run)) < 20


def test_a_map_too_large_keeps_the_longest_prefix_that_fits() -> None:
    finished = set(range(1, 200_000, 2))  # alternating: 25 kB as a bitset
    assert offset_map.size(0, finished) > 4096
    text = offset_map.encode(0, finished, max_bytes=4096)
    assert len(text) <= 4096
    kept = offset_map.decode(text, 0)
    assert kept and kept <= finished
    assert kept == {o for o in finished if o <= max(kept)}  # a prefix, nothing skipped wrongly
    assert len(kept) > 10_000


def test_anything_else_is_ignored() -> None:
    good = offset_map.encode(10, {12, 13})
    assert offset_map.decode(good, 11) == frozenset()  # another commit's map
    for text in ("", None, "hello", "not base64!", base64.b64encode(b"\x02\x00").decode(), "é"):
        assert offset_map.decode(text, 10) == frozenset()
    truncated = base64.b64encode(base64.b64decode(good)[:-1]).decode()
    assert offset_map.decode(truncated, 10) == frozenset()


def test_an_empty_map_is_still_a_map() -> None:
    text = offset_map.encode(7, [])
    assert text and offset_map.decode(text, 7) == frozenset()


def test_the_planner_commits_moves_and_map_changes_and_pauses_a_full_map() -> None:
    from bridge.core.commit_plan import CommitPlanner
    from bridge.core.offsets import OffsetTracker

    offsets: OffsetTracker[str] = OffsetTracker()
    planner = CommitPlanner(offsets, limit=400)
    offsets.start("p", 0)
    for o in range(0, 2000):
        offsets.add("p", o)
    for o in range(1, 2000, 2):  # every other one finished behind offset 0
        offsets.done("p", o)
    ((position, metadata),) = planner.plan().values()
    assert position == 0 and offset_map.decode(metadata, 0) == set(range(1, 2000, 2))
    assert 300 <= len(metadata) <= 400
    assert planner.full_partitions() == {"p"}  # 1,000 alternating offsets: past 75% of 400
    offsets.mark_committed({"p": position}, {"p": metadata})
    assert planner.plan() == {}  # nothing moved, the same map
    offsets.done("p", 0)
    ((position, _),) = planner.plan().values()
    assert position == 2  # the finished prefix moved
    planner.shrink_limit()
    assert planner.limit == 256  # halved, not below the floor
    planner.unsupported()
    assert planner.plan()["p"][1] == "" and planner.full_partitions() == set()
