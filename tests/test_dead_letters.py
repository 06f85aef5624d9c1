"""The dead-letter command's pure core: selectors and their errors, what a dead letter is,
the record a replay writes, the loop rule, the summary and the list's counts."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.core import dead_letters as dl
from bridge.core.events import OutputRecord, dead_letter_record
from bridge.core.messages import Headers, Record

BRIDGE = Path(__file__).resolve().parents[1] / "bridge"
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC).timestamp()
DLQ = "wavespeed.dead-letter"


def _dead_letter(
    *,
    reason: str = "invalid_json",
    key: bytes | None = b"k1",
    value: bytes | None = b"{nope",
    headers: Headers = (("trace", b"t1"), ("empty", None)),
    source: str = "wavespeed.tasks",
    source_partition: int = 3,
    source_offset: int = 41,
    limit: int = 1_000_000,
    partition: int = 0,
    offset: int = 7,
    timestamp_ms: int | None = int(NOW * 1000),
) -> Record:
    """A record of the dead-letter topic as the bridge writes it (events.dead_letter_record)."""
    out = dead_letter_record(
        topic=DLQ,
        source_topic=source,
        partition=source_partition,
        offset=source_offset,
        key=key,
        value=value,
        headers=headers,
        reason=reason,
        detail="why",
        max_value_bytes=limit,
    )
    return Record(DLQ, partition, offset, out.key, out.value, tuple(out.headers), timestamp_ms)


def _as_input(out: OutputRecord, offset: int) -> Record:
    return Record(out.topic, 0, offset, out.key, out.value, tuple(out.headers), None)


# --- reasons -------------------------------------------------------------------------------


def _reasons_in_source() -> set[str]:
    found: set[str] = set()
    for name in ("core/messages.py", "core/book.py"):
        for node in ast.walk(ast.parse((BRIDGE / name).read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Rejected"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add(node.args[0].value)
    return found


def test_the_reasons_are_every_reason_the_bridge_writes() -> None:
    assert set(dl.REASONS) == _reasons_in_source()
    assert len(dl.REASONS) == len(set(dl.REASONS))


def test_reasons_repeatable_or_comma_separated() -> None:
    assert dl.parse_reasons(["invalid_id", "empty,missing_id"]) == {
        "invalid_id",
        "empty",
        "missing_id",
    }


def test_an_unknown_reason_names_the_valid_ones() -> None:
    with pytest.raises(dl.SelectorError) as caught:
        dl.parse_reasons(["invalid_jsn"])
    message = str(caught.value)
    assert "'invalid_jsn'" in message
    assert all(reason in message for reason in dl.REASONS)


# --- times and offsets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("45s", 45),
        ("30m", 1800),
        ("2h", 7200),
        ("7d", 7 * 86400),
        ("1w", 7 * 86400),
        ("1.5h", 5400),
    ],
)
def test_relative_times_count_back_from_now(text: str, ago: float) -> None:
    assert dl.parse_time("--since", text, NOW) == NOW - ago


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-05-01T10:00:00Z", datetime(2025, 5, 1, 10, tzinfo=UTC)),
        ("2025-05-01T12:30:00+02:00", datetime(2025, 5, 1, 10, 30, tzinfo=UTC)),
        ("2025-05-01 10:00:00.250z", datetime(2025, 5, 1, 10, 0, 0, 250000, tzinfo=UTC)),
    ],
)
def test_rfc3339_times(text: str, expected: datetime) -> None:
    assert dl.parse_time("--until", text, NOW) == expected.timestamp()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("yesterday", "RFC 3339"),
        ("2h ago", "RFC 3339"),
        ("-2h", "RFC 3339"),
        ("2025-05-01", "RFC 3339"),  # a date alone is not a time
        ("2025-05-01T10:00:00", "time zone"),
        ("2025-13-01T10:00:00Z", "RFC 3339"),
    ],
)
def test_bad_times_say_what_is_expected(text: str, says: str) -> None:
    with pytest.raises(dl.SelectorError, match=says) as caught:
        dl.parse_time("--since", text, NOW)
    assert str(caught.value).startswith("--since")


def test_since_after_until_is_an_error() -> None:
    with pytest.raises(dl.SelectorError, match="must be before --until"):
        dl.selection(since="1h", until="2h", now=NOW)
    sel = dl.selection(since="2h", until="1h", now=NOW)
    assert sel.since == NOW - 7200 and sel.until == NOW - 3600


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:100-199", dl.OffsetRange(0, 100, 199)),
        ("2:5", dl.OffsetRange(2, 5, 5)),
        ("1:40-", dl.OffsetRange(1, 40, None)),
        (" 3:0-0 ", dl.OffsetRange(3, 0, 0)),
    ],
)
def test_offset_ranges(text: str, expected: dl.OffsetRange) -> None:
    assert dl.parse_offsets(text) == expected


@pytest.mark.parametrize("text", ["0", "0:", ":5", "a:1-2", "0:1-2-3", "0:-5", "0:1..5", "-1:3"])
def test_bad_offset_syntax(text: str) -> None:
    with pytest.raises(dl.SelectorError, match="PARTITION:FROM-TO"):
        dl.parse_offsets(text)


def test_a_reversed_offset_range() -> None:
    with pytest.raises(dl.SelectorError, match="9 comes after 3"):
        dl.parse_offsets("0:9-3")


def test_empty_topic_names_are_refused() -> None:
    with pytest.raises(dl.SelectorError, match="--source-topic"):
        dl.selection(source_topics=[""], now=NOW)
    with pytest.raises(dl.SelectorError, match="--to"):
        dl.selection(to_topic=" ", now=NOW)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--reason", "bogus"], "valid reasons: empty, oversize"),
        (["--since", "1h", "--until", "3h"], "must be before --until"),
        (["--offsets", "0-10"], "PARTITION:FROM-TO"),
        (["--until", "last tuesday"], "RFC 3339"),
    ],
)
def test_the_command_exits_2_on_bad_selectors(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before the config is read or Kafka reached.
    for action in ("replay", "list"):
        assert main(["dead-letters", action, "--config", "/nonexistent.yaml", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("wavespeed-bridge dead-letters: ") and says in err


# --- groups --------------------------------------------------------------------------------


def test_the_default_group_is_stable_per_selection() -> None:
    def group(now: float, **given: object) -> str:
        return dl.default_group("bridge", DLQ, dl.selection(now=now, **given))  # type: ignore[arg-type]

    same = group(NOW, reasons=["invalid_id", "empty"], since="2h")
    # The same selectors in another order, later: the same group, so a rerun resumes.
    assert group(NOW + 600, reasons=["empty,invalid_id"], since="2h") == same
    assert same.startswith("bridge.dead-letters.")
    assert group(NOW, reasons=["empty"], since="2h") != same
    assert group(NOW, reasons=["invalid_id", "empty"], since="3h") != same
    assert group(NOW, reasons=["invalid_id", "empty"], since="2h", include_replayed=True) != same
    assert group(NOW, reasons=["invalid_id", "empty"], since="2h", to_topic="other") != same
    assert dl.default_group("bridge", "other-dlq", dl.selection(now=NOW)) != dl.default_group(
        "bridge", DLQ, dl.selection(now=NOW)
    )
    assert dl.transactional_id(same) == same + ".replay"


# --- one dead letter -----------------------------------------------------------------------


def test_a_dead_letter_read_back() -> None:
    letter = dl.read(_dead_letter())
    assert letter is not None
    assert (letter.reason, letter.detail, letter.source_topic) == (
        "invalid_json",
        "why",
        "wavespeed.tasks",
    )
    assert (letter.source_partition, letter.source_offset) == (3, 41)
    assert letter.headers == (("trace", b"t1"), ("empty", None))
    assert not letter.truncated and letter.replayed_from is None


def test_records_the_bridge_did_not_write_are_not_dead_letters() -> None:
    assert dl.read(Record(DLQ, 0, 0, b"k", b"v", (("dlq.reason", b"x"),), None)) is None
    assert dl.read(Record(DLQ, 0, 0, b"k", b"v", (), None)) is None
    block = tuple(_dead_letter().headers[-5:])
    bad_offset = (*block[:-1], ("dlq.offset", b"x"))
    assert dl.read(Record(DLQ, 0, 0, b"k", b"v", bad_offset, None)) is None
    assert (
        dl.decide(Record(DLQ, 0, 0, b"k", b"v", (), None), dl.Selection())
        is dl.Cause.NOT_A_DEAD_LETTER
    )


def test_the_replay_record_is_the_input_as_it_was() -> None:
    out = dl.decide(_dead_letter(partition=2, offset=99), dl.Selection())
    assert isinstance(out, OutputRecord)
    assert out.topic == "wavespeed.tasks"
    assert (out.key, out.value) == (b"k1", b"{nope")
    assert out.headers == [
        ("trace", b"t1"),
        ("empty", None),
        ("dlq.replayed_from", f"{DLQ}/2/99".encode()),
    ]
    to = dl.decide(_dead_letter(), dl.selection(to_topic="fixed", now=NOW))
    assert isinstance(to, OutputRecord) and to.topic == "fixed"


def test_only_the_trailing_block_is_the_bridges() -> None:
    # An input dead-lettered by another system keeps that system's dlq.* headers.
    theirs: Headers = (("dlq.reason", b"theirs"), ("dlq.topic", b"elsewhere"))
    out = dl.decide(_dead_letter(headers=theirs), dl.Selection())
    assert isinstance(out, OutputRecord)
    assert out.headers[:2] == list(theirs)
    assert [k for k, _ in out.headers] == ["dlq.reason", "dlq.topic", "dlq.replayed_from"]


def test_a_truncated_value_is_skipped() -> None:
    rec = _dead_letter(reason="oversize", value=b"x" * 50, limit=10)
    letter = dl.read(rec)
    assert letter is not None and letter.truncated and letter.reason == "oversize"
    assert dl.decide(rec, dl.Selection()) is dl.Cause.TRUNCATED


def test_dead_letters_without_the_inputs_bytes_are_skipped() -> None:
    undecodable = _dead_letter(reason="undecodable", key=None, value=None, headers=())
    assert dl.decide(undecodable, dl.Selection()) is dl.Cause.CONTENT_MISSING
    # Too large to publish whole: only the dlq.* block went out (book._dead_letter).
    stripped = _dead_letter(reason="invalid_json", key=None, value=None, headers=(), limit=0)
    assert dl.decide(stripped, dl.Selection()) is dl.Cause.CONTENT_MISSING
    # A tombstone is replayed as one (aiokafka needs a key or a value: the empty key).
    tombstone = dl.decide(_dead_letter(reason="empty", key=None, value=None), dl.Selection())
    assert isinstance(tombstone, OutputRecord)
    assert (tombstone.key, tombstone.value) == (b"", None)


def test_a_replayed_record_that_fails_again_is_not_replayed_again() -> None:
    first = dl.decide(_dead_letter(offset=7), dl.Selection())
    assert isinstance(first, OutputRecord)
    # The bridge dead-letters the replayed record again, keeping its headers.
    again = _dead_letter(headers=tuple(first.headers), offset=500)
    letter = dl.read(again)
    assert letter is not None and letter.replayed_from == f"{DLQ}/0/7"
    assert dl.decide(again, dl.Selection()) is dl.Cause.REPLAYED_BEFORE
    # Asked: replayed, naming the new dead letter only.
    out = dl.decide(again, dl.selection(include_replayed=True, now=NOW))
    assert isinstance(out, OutputRecord)
    assert [v for k, v in out.headers if k == dl.REPLAYED_FROM] == [f"{DLQ}/0/500".encode()]
    assert out.headers[:2] == [("trace", b"t1"), ("empty", None)]


def test_the_loop_rule_applies_to_selected_records_only() -> None:
    first = dl.decide(_dead_letter(), dl.Selection())
    assert isinstance(first, OutputRecord)
    again = _dead_letter(reason="missing_id", headers=tuple(first.headers))
    assert dl.decide(again, dl.selection(reasons=["invalid_id"], now=NOW)) is dl.Cause.REASON


# --- selection -----------------------------------------------------------------------------


def test_selectors_narrow_the_choice() -> None:
    rec = _dead_letter(partition=1, offset=50, timestamp_ms=int((NOW - 3600) * 1000))

    def verdict(**given: object) -> object:
        out = dl.decide(rec, dl.selection(now=NOW, **given))  # type: ignore[arg-type]
        return "replay" if isinstance(out, OutputRecord) else out

    assert verdict() == "replay"
    assert verdict(reasons=["invalid_json", "empty"]) == "replay"
    assert verdict(reasons=["invalid_id"]) is dl.Cause.REASON
    assert verdict(source_topics=["wavespeed.tasks"]) == "replay"
    assert verdict(source_topics=["other"]) is dl.Cause.SOURCE_TOPIC
    assert verdict(offsets=["1:50"]) == "replay"
    assert verdict(offsets=["0:0-", "1:40-49"]) is dl.Cause.OFFSETS
    assert verdict(offsets=["1:51-", "1:0-50"]) == "replay"
    assert verdict(since="2h") == "replay"
    assert verdict(since="30m") is dl.Cause.TIME
    assert verdict(until="30m") == "replay"
    assert verdict(until="1h") is dl.Cause.TIME  # until is exclusive
    assert verdict(since="1h") == "replay"  # since is inclusive
    untimed = _dead_letter(timestamp_ms=None)
    assert dl.decide(untimed, dl.selection(since="1d", now=NOW)) is dl.Cause.TIME
    assert not dl.selection(now=NOW).filters
    assert dl.selection(offsets=["0:1"], now=NOW).filters


# --- summary and list ----------------------------------------------------------------------


def test_the_summary_accounts_for_every_record() -> None:
    summary = dl.Summary(already_done=12)
    sel = dl.selection(reasons=["invalid_json", "oversize"], now=NOW)
    replayed = dl.decide(_dead_letter(), dl.Selection())
    assert isinstance(replayed, OutputRecord)
    records = [
        _dead_letter(),
        _dead_letter(),
        _dead_letter(reason="missing_id"),
        _dead_letter(reason="oversize", value=b"x" * 20, limit=5),
        _dead_letter(headers=tuple(replayed.headers)),
        Record(DLQ, 0, 0, None, b"x", (), None),
    ]
    for rec in records:
        summary.count(dl.decide(rec, sel))
    assert (summary.read, summary.selected, summary.replayed) == (6, 4, 2)
    assert summary.as_json() == {
        "dry_run": False,
        "read": 6,
        "selected": 4,
        "replayed": 2,
        "skipped": {"not_a_dead_letter": 1, "reason": 1, "replayed_before": 1, "truncated": 1},
        "already_done_before_this_run": 12,
    }
    assert summary.lines() == [
        "read 6 dead letters; selected 4: replayed 2, skipped 2 (replayed_before 1, truncated 1)",
        "not selected 2 (not_a_dead_letter 1, reason 1)",
        "already done before this run: 12",
    ]
    dry = dl.Summary(dry_run=True)
    dry.count(dl.decide(_dead_letter(), sel))
    assert dry.lines()[0] == "read 1 dead letters; selected 1: would replay 1, skipped 0"
    assert dl.progress(5, 10, 3, False).startswith("[" + "#" * 15 + "." * 15 + "]  50% 5/10")


def test_the_list_counts_by_reason_topic_partition_and_hour() -> None:
    hour = int(NOW * 1000)
    tally = dl.Tally("hour")
    for i in range(5):
        tally.add(_dead_letter(reason="invalid_id", offset=i, timestamp_ms=hour + i))
    for i in range(3):
        tally.add(
            _dead_letter(
                reason="missing_id",
                source="other",
                source_partition=1,
                partition=1,
                offset=10 + i,
                timestamp_ms=hour + 3_600_000,
            )
        )
    tally.add(Record(DLQ, 1, 20, None, b"x", (), None))
    report = tally.as_json()
    assert report["total"] == 9
    assert report["by_reason"] == {"invalid_id": 5, "missing_id": 3}
    assert report["by_topic"] == {"wavespeed.tasks": 5, "other": 3}
    assert report["by_partition"] == {"other/1": 3, "wavespeed.tasks/3": 5}
    assert report["by_hour"] == {"2025-05-01T12:00Z": 5, "2025-05-01T13:00Z": 3, "no timestamp": 1}
    assert report["dead_letter_offsets"] == {
        "0": {"first": 0, "last": 4, "count": 5},
        "1": {"first": 10, "last": 20, "count": 4},
    }
    assert report["not_a_dead_letter"] == 1
    json.dumps(report)
    table = tally.table().splitlines()
    assert table[0].split() == ["total", "9"]
    assert "reason      invalid_id" in table[1] and table[1].endswith(" 5")
    daily = dl.Tally("day")
    daily.add(_dead_letter())
    assert daily.as_json()["by_day"] == {"2025-05-01": 1}
