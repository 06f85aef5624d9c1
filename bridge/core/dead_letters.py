"""Dead letters: the operator's selectors, what each dead letter is (replayed or skipped, and
why), the record a replay writes back, and the counts ``list`` and ``replay`` print. Pure.

A dead letter is what ``events.dead_letter_record`` wrote: the input's key, value and headers,
then a block of ``dlq.*`` headers (reason, detail, topic, partition, offset, and
``dlq.value_truncated`` when the value was cut). A replay writes the input back to its topic
with its own headers and one more, ``dlq.replayed_from: <dead-letter topic>/<partition>/<offset>``.
Dead letters keep the input's headers, so a replayed record that is dead-lettered again still
carries that header: such a record is not replayed again unless asked, and no loop forms.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from bridge.core.events import OutputRecord
from bridge.core.messages import DEAD_LETTER_REASONS, Headers, Record

# Every dlq.reason the bridge writes (defined beside the parser; tests/test_dead_letters.py
# also collects them from the source, so a new reason cannot be missed).
REASONS = DEAD_LETTER_REASONS
# The block dead_letter_record appends after the input's headers, in its order.
BLOCK = ("dlq.reason", "dlq.detail", "dlq.topic", "dlq.partition", "dlq.offset")
TRUNCATED = "dlq.value_truncated"
REPLAYED_FROM = "dlq.replayed_from"

Bucket = Literal["hour", "day"]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_OFFSETS = re.compile(r"(\d+):(\d+)(?:(-)(\d*))?")


class SelectorError(ValueError):
    """A selector the command cannot use; the message says which and why."""


class Cause(StrEnum):
    """Why a dead letter is not replayed."""

    # Not selected: outside what the selectors ask for.
    NOT_A_DEAD_LETTER = "not_a_dead_letter"  # no dlq.* block: the bridge did not write it
    REASON = "reason"
    SOURCE_TOPIC = "source_topic"
    OFFSETS = "offsets"
    TIME = "time"
    # Selected, but not replayable as it is.
    REPLAYED_BEFORE = "replayed_before"  # a replayed record dead-lettered again (no loops)
    TRUNCATED = "truncated"  # dlq.value_truncated: only the value's first bytes are here
    CONTENT_MISSING = "content_missing"  # undecodable, or the input's bytes were too large


NOT_SELECTED = frozenset(
    {Cause.NOT_A_DEAD_LETTER, Cause.REASON, Cause.SOURCE_TOPIC, Cause.OFFSETS, Cause.TIME}
)


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """Offsets ``first``..``last`` (inclusive; None: to the end) of one dead-letter partition."""

    partition: int
    first: int
    last: int | None

    def holds(self, partition: int, offset: int) -> bool:
        if partition != self.partition or offset < self.first:
            return False
        return self.last is None or offset <= self.last

    def __str__(self) -> str:
        if self.last == self.first:
            return f"{self.partition}:{self.first}"
        return f"{self.partition}:{self.first}-{'' if self.last is None else self.last}"


@dataclass(frozen=True, slots=True)
class Selection:
    """What to replay (or list). Empty sets select everything."""

    reasons: frozenset[str] = frozenset()
    since: float | None = None  # unix seconds, inclusive (the dead letter's timestamp)
    until: float | None = None  # exclusive
    offsets: tuple[OffsetRange, ...] = ()  # dead-letter partitions and offsets
    source_topics: frozenset[str] = frozenset()  # the inputs' topics (dlq.topic)
    include_replayed: bool = False
    to_topic: str | None = None  # every replayed record to this topic, not its own
    # The selectors as written, canonical: names the default group, so that the same
    # command run again resumes where it stopped ("--since 2h" stays "2h", not an instant).
    spec: str = ""

    @property
    def filters(self) -> bool:
        """Whether any selector narrows the choice (else every dead letter is selected)."""
        return bool(self.reasons or self.offsets or self.source_topics or self.since or self.until)

    def cause(self, letter: DeadLetter) -> Cause | None:
        """Why ``letter`` is not selected, or None when it is."""
        rec = letter.record
        if self.reasons and letter.reason not in self.reasons:
            return Cause.REASON
        if self.source_topics and letter.source_topic not in self.source_topics:
            return Cause.SOURCE_TOPIC
        if self.offsets and not any(r.holds(rec.partition, rec.offset) for r in self.offsets):
            return Cause.OFFSETS
        if self.since is not None or self.until is not None:
            if rec.timestamp_ms is None:
                return Cause.TIME
            at = rec.timestamp_ms / 1000.0
            if (self.since is not None and at < self.since) or (
                self.until is not None and at >= self.until
            ):
                return Cause.TIME
        return None


def parse_time(flag: str, text: str, now: float) -> float:
    """RFC 3339 (``2025-05-01T12:00:00Z``) or a duration before ``now`` (``30m``, ``2h``,
    ``7d``) → unix seconds."""
    text = text.strip()
    if match := _RELATIVE.fullmatch(text):
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        parsed = datetime.fromisoformat(iso)
    except ValueError:
        parsed = None
    if parsed is None or ("T" not in iso.upper() and " " not in iso):  # a date alone
        raise SelectorError(
            f"{flag} {text!r}: expected RFC 3339 (2025-05-01T12:00:00Z) or a duration ago"
            " (45s, 30m, 2h, 7d, 1w)"
        )
    if parsed.tzinfo is None:
        raise SelectorError(f"{flag} {text!r}: RFC 3339 needs a time zone (Z or +02:00)")
    return parsed.timestamp()


def parse_offsets(text: str) -> OffsetRange:
    """``P:FROM-TO`` (inclusive), ``P:FROM-`` (to the end) or ``P:N`` (one offset)."""
    match = _OFFSETS.fullmatch(text.strip())
    if match is None:
        raise SelectorError(
            f"--offsets {text!r}: expected PARTITION:FROM-TO (e.g. 0:100-199), P:FROM- or P:N"
        )
    partition, first = int(match.group(1)), int(match.group(2))
    if match.group(3) is None:
        return OffsetRange(partition, first, first)
    last = int(match.group(4)) if match.group(4) else None
    if last is not None and last < first:
        raise SelectorError(f"--offsets {text!r}: {first} comes after {last}")
    return OffsetRange(partition, first, last)


def parse_reasons(given: Iterable[str]) -> frozenset[str]:
    """Each ``--reason`` (repeatable, or comma-separated), checked against what the bridge
    writes: a misspelt reason would otherwise select nothing, silently."""
    out = set()
    for item in given:
        for reason in item.split(","):
            reason = reason.strip()
            if reason not in REASONS:
                raise SelectorError(
                    f"--reason {reason!r} is not a reason the bridge writes;"
                    f" valid reasons: {', '.join(REASONS)}"
                )
            out.add(reason)
    return frozenset(out)


def selection(
    *,
    reasons: Sequence[str] = (),
    since: str | None = None,
    until: str | None = None,
    offsets: Sequence[str] = (),
    source_topics: Sequence[str] = (),
    include_replayed: bool = False,
    to_topic: str | None = None,
    now: float,
) -> Selection:
    """The selectors as given on the command line, checked; SelectorError says what is wrong."""
    picked = parse_reasons(reasons)
    start = parse_time("--since", since, now) if since is not None else None
    end = parse_time("--until", until, now) if until is not None else None
    if start is not None and end is not None and start >= end:
        raise SelectorError(
            f"--since {since} ({_utc(start)}) must be before --until {until} ({_utc(end)})"
        )
    ranges = tuple(
        sorted({parse_offsets(o) for o in offsets}, key=lambda r: (r.partition, r.first, str(r)))
    )
    topics = frozenset(t.strip() for t in source_topics)
    if "" in topics:
        raise SelectorError("--source-topic: a topic name cannot be empty")
    if to_topic is not None and not to_topic.strip():
        raise SelectorError("--to: a topic name cannot be empty")
    spec = json.dumps(
        {
            "reasons": sorted(picked),
            "since": since.strip() if since else None,
            "until": until.strip() if until else None,
            "offsets": [str(r) for r in ranges],
            "source_topics": sorted(topics),
            "include_replayed": include_replayed,
            "to": to_topic,
        },
        sort_keys=True,
    )
    return Selection(picked, start, end, ranges, topics, include_replayed, to_topic, spec)


def default_group(group_id: str, dead_letter_topic: str, sel: Selection) -> str:
    """The replay's consumer group: the bridge's group id, and a short hash of the topic and
    the selectors, so that the same selection run again resumes and another starts afresh."""
    digest = hashlib.sha256(f"{dead_letter_topic}\n{sel.spec}".encode()).hexdigest()[:10]
    return f"{group_id}.dead-letters.{digest}"


def transactional_id(group: str) -> str:
    """Fixed per group: a rerun's producer fences a killed run's and aborts what it left open."""
    return f"{group}.replay"


# --- one dead letter -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record of the dead-letter topic, read back: the input as it was, and why."""

    record: Record  # as consumed from the dead-letter topic
    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    truncated: bool
    headers: Headers  # the input's own, without the bridge's block
    replayed_from: str | None  # set when the input was itself a replay


def read(rec: Record) -> DeadLetter | None:
    """``rec`` as a dead letter, or None when it does not end with the bridge's block.

    Only the trailing block is the bridge's: an input that carried ``dlq.*`` headers of its
    own (a record dead-lettered elsewhere) keeps them when replayed.
    """
    headers = rec.headers
    for truncated in (True, False):
        end = len(headers) - 1 if truncated else len(headers)
        if truncated and (end < 0 or headers[end][0] != TRUNCATED):
            continue
        if end < len(BLOCK) or tuple(k for k, _ in headers[end - len(BLOCK) : end]) != BLOCK:
            continue
        values = [v for _, v in headers[end - len(BLOCK) : end]]
        if any(v is None for v in values):
            return None
        reason, detail, topic, partition, offset = (
            v.decode("utf-8", "replace") for v in values if v is not None
        )
        if not (partition.isdigit() and offset.isdigit()):
            return None
        own = headers[: end - len(BLOCK)]
        replayed = [v for k, v in own if k == REPLAYED_FROM]
        return DeadLetter(
            record=rec,
            reason=reason,
            detail=detail,
            source_topic=topic,
            source_partition=int(partition),
            source_offset=int(offset),
            truncated=truncated,
            headers=own,
            replayed_from=(replayed[-1] or b"").decode("utf-8", "replace") if replayed else None,
        )
    return None


def replayed_from(dead_letter_topic: str, partition: int, offset: int) -> str:
    # Topic names cannot hold '/': the value splits back unambiguously.
    return f"{dead_letter_topic}/{partition}/{offset}"


def replay_record(letter: DeadLetter, to_topic: str | None = None) -> OutputRecord:
    """The input as it was (key, value, its own headers), to its topic, saying where from.

    An earlier ``dlq.replayed_from`` (a record replayed before, asked again) is replaced, so
    the header always names the dead letter this record came from.
    """
    rec = letter.record
    headers: list[tuple[str, bytes | None]] = [
        (k, v) for k, v in letter.headers if k != REPLAYED_FROM
    ]
    headers.append((REPLAYED_FROM, replayed_from(rec.topic, rec.partition, rec.offset).encode()))
    return OutputRecord(
        topic=to_topic or letter.source_topic, key=rec.key, value=rec.value, headers=headers
    )


def decide(rec: Record, sel: Selection) -> OutputRecord | Cause:
    """What a replay does with ``rec``: the record to write back, or why not."""
    letter = read(rec)
    if letter is None:
        return Cause.NOT_A_DEAD_LETTER
    if (cause := sel.cause(letter)) is not None:
        return cause
    if letter.replayed_from is not None and not sel.include_replayed:
        return Cause.REPLAYED_BEFORE
    if letter.truncated:
        return Cause.TRUNCATED
    # Only a tombstone is dead-lettered without a value: any other reason with none is an
    # undecodable record, or an input whose bytes did not fit the dead letter.
    if letter.reason == "undecodable" or (rec.value is None and letter.reason != "empty"):
        return Cause.CONTENT_MISSING
    return replay_record(letter, sel.to_topic)


# --- what a run did ------------------------------------------------------------------------


@dataclass
class Summary:
    """A replay's accounting. Every record read is replayed or skipped for one cause."""

    dry_run: bool = False
    read: int = 0
    replayed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    already_done: int = 0  # dead-letter offsets the group had passed before this run

    def count(self, verdict: OutputRecord | Cause) -> None:
        self.read += 1
        if isinstance(verdict, Cause):
            self.skipped[verdict.value] += 1
        else:
            self.replayed += 1

    @property
    def selected(self) -> int:
        return self.read - sum(n for c, n in self.skipped.items() if c in NOT_SELECTED)

    def unreplayable(self) -> dict[str, int]:
        return {c: n for c, n in sorted(self.skipped.items()) if c not in NOT_SELECTED}

    def not_selected(self) -> dict[str, int]:
        return {c: n for c, n in sorted(self.skipped.items()) if c in NOT_SELECTED}

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "read": self.read,
            "selected": self.selected,
            "replayed": self.replayed,
            "skipped": dict(sorted(self.skipped.items())),
            "already_done_before_this_run": self.already_done,
        }

    def lines(self) -> list[str]:
        verb = "would replay" if self.dry_run else "replayed"
        left = self.unreplayable()
        out = [
            f"read {self.read} dead letters; selected {self.selected}: {verb} {self.replayed},"
            f" skipped {sum(left.values())}{_causes(left)}",
        ]
        others = self.not_selected()
        out.append(f"not selected {sum(others.values())}{_causes(others)}")
        out.append(f"already done before this run: {self.already_done}")
        return out


def _causes(counts: dict[str, int]) -> str:
    return f" ({', '.join(f'{c} {n}' for c, n in counts.items())})" if counts else ""


def progress(done: int, total: int, replayed: int, dry_run: bool) -> str:
    """One line for a terminal: how far the replay is."""
    share = done / total if total else 1.0
    filled = int(share * 30)
    bar = "#" * filled + "." * (30 - filled)
    verb = "would replay" if dry_run else "replayed"
    return f"[{bar}] {share:4.0%} {done}/{total} read, {verb} {replayed}"


# --- list ----------------------------------------------------------------------------------


@dataclass
class _Span:
    first: int
    last: int
    count: int = 0


@dataclass
class Tally:
    """``list``'s counts: by reason, by input topic and partition, by time bucket (UTC)."""

    bucket: Bucket = "hour"
    total: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_topic: Counter[str] = field(default_factory=Counter)
    by_partition: Counter[str] = field(default_factory=Counter)  # "<input topic>/<partition>"
    by_time: Counter[str] = field(default_factory=Counter)
    spans: dict[int, _Span] = field(default_factory=dict)  # dead-letter partition → offsets
    flags: Counter[str] = field(default_factory=Counter)  # replayed before, truncated, ...

    def add(self, rec: Record) -> None:
        span = self.spans.setdefault(rec.partition, _Span(rec.offset, rec.offset))
        span.first, span.last = min(span.first, rec.offset), max(span.last, rec.offset)
        span.count += 1
        self.total += 1
        self.by_time[self._bucket(rec.timestamp_ms)] += 1
        letter = read(rec)
        if letter is None:
            self.flags[Cause.NOT_A_DEAD_LETTER.value] += 1
            return
        self.by_reason[letter.reason] += 1
        self.by_topic[letter.source_topic] += 1
        self.by_partition[f"{letter.source_topic}/{letter.source_partition}"] += 1
        if letter.replayed_from is not None:
            self.flags[Cause.REPLAYED_BEFORE.value] += 1
        if letter.truncated:
            self.flags[Cause.TRUNCATED.value] += 1

    def _bucket(self, timestamp_ms: int | None) -> str:
        if timestamp_ms is None:
            return "no timestamp"
        at = datetime.fromtimestamp(timestamp_ms / 1000.0, UTC)
        return at.strftime("%Y-%m-%dT%H:00Z" if self.bucket == "hour" else "%Y-%m-%d")

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason.most_common()),
            "by_topic": dict(self.by_topic.most_common()),
            "by_partition": dict(sorted(self.by_partition.items())),
            f"by_{self.bucket}": dict(sorted(self.by_time.items())),
            "dead_letter_offsets": {
                str(p): {"first": s.first, "last": s.last, "count": s.count}
                for p, s in sorted(self.spans.items())
            },
            "replayed_before": self.flags[Cause.REPLAYED_BEFORE.value],
            "truncated": self.flags[Cause.TRUNCATED.value],
            "not_a_dead_letter": self.flags[Cause.NOT_A_DEAD_LETTER.value],
        }

    def table(self) -> str:
        rows: list[tuple[str, str, int]] = [("total", "", self.total)]
        rows += [("reason", k, n) for k, n in self.by_reason.most_common()]
        rows += [("topic", k, n) for k, n in self.by_topic.most_common()]
        rows += [("partition", k, n) for k, n in sorted(self.by_partition.items())]
        rows += [(self.bucket, k, n) for k, n in sorted(self.by_time.items())]
        rows += [
            ("dlq offsets", f"{p}:{s.first}-{s.last}", s.count)
            for p, s in sorted(self.spans.items())
        ]
        rows += [(k.replace("_", " "), "", n) for k, n in sorted(self.flags.items()) if n]
        labels = [f"{group:<12}{key}" if key else group for group, key, _ in rows]
        width = max(len(label) for label in labels) + 2
        digits = max(len(str(n)) for _, _, n in rows)
        return "\n".join(
            f"{label:<{width}}{n:>{digits}}" for label, (_, _, n) in zip(labels, rows, strict=True)
        )


def _utc(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
