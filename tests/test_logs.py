"""Log lines: the timestamp (what structlog's ISO stamper wrote, cheaper) and the per-task
lines an SRE searches."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.clock import ManualClock
from bridge.core.facts import Publish
from bridge.core.messages import Record
from bridge.edges import logs
from bridge.edges.logs import Stamper
from bridge.edges.metrics import Metrics
from bridge.shell.telemetry import Telemetry
from tests.test_core import T, completed, make, poll_all

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(st.lists(st.integers(min_value=0, max_value=4_102_444_800 * 10**9), min_size=1))
def test_the_timestamp_is_rfc3339_utc_with_microseconds(times_ns: list[int]) -> None:
    clock = iter(sorted(times_ns))
    stamp = Stamper(lambda: next(clock))
    for ns in sorted(times_ns):
        written = stamp(None, "info", {})["timestamp"]
        expected = EPOCH + timedelta(microseconds=ns // 1000)
        assert written == expected.isoformat(timespec="microseconds").replace("+00:00", "Z")
        assert datetime.fromisoformat(written) == expected


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    logs.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_fetch_is_one_tasks_consumed_line_per_partition_and_each_task_ends_in_its_own(
    level: str, restore_logging: None
) -> None:
    """The audit trail: every task id and offset taken is in a ``tasks consumed`` line of
    its partition (one per fetch, not one per task: issue 22), and each task has its own
    ``task finished`` line; DEBUG adds a ``task consumed`` line per task."""
    stream = io.StringIO()
    logs.configure(fmt="json", level=level, stream=stream)
    clock = ManualClock()
    core = make(clock)
    telemetry = Telemetry(Metrics(), core, now=0.0)
    for partition, offset in [(0, 10), (1, 7), (0, 11), (0, 12)]:
        value = json.dumps({"id": f"t-{partition}-{offset}"}).encode()
        record = Record(T, partition, offset, None, value, (), None)
        telemetry.observe(
            [e for e in core.on_record(record, clock.read()) if not isinstance(e, Publish)]
        )
    assert not [x for x in lines(stream) if x["event"] == "tasks consumed"]  # said per fetch
    telemetry.intake_batch_done()
    said = {x["partition"]: x for x in lines(stream) if x["event"] == "tasks consumed"}
    assert said[0]["task_ids"] == ["t-0-10", "t-0-11", "t-0-12"]
    assert (said[0]["offsets"], said[0]["count"]) == ([10, 12], 3)
    assert (said[1]["task_ids"], said[1]["offsets"]) == (["t-1-7"], [7, 7])
    each = [x for x in lines(stream) if x["event"] == "task consumed"]
    assert len(each) == (4 if level == "DEBUG" else 0)
    telemetry.intake_batch_done()  # nothing new: nothing said again
    assert len([x for x in lines(stream) if x["event"] == "tasks consumed"]) == 2
    clock.advance(5.0)  # every first poll due
    for e in poll_all(core, clock, completed()):
        if not isinstance(e, Publish):
            telemetry.observe([e])
    finished = {x["task_id"]: x for x in lines(stream) if x["event"] == "task finished"}
    assert finished["t-0-11"]["partition"] == 0 and finished["t-0-11"]["offset"] == 11
    assert set(finished) == {"t-0-10", "t-0-11", "t-0-12", "t-1-7"}
