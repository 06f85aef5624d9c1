"""``wavespeed-bridge dead-letters list | replay``: the dead-letter topic read to the end
offsets taken at the start, and selected dead letters written back exactly once.

The replay consumes under its own group and produces with a transactional producer whose id
is fixed per group: each batch's replayed records and the batch's dead-letter offsets commit
in one transaction (``send_offsets_to_transaction``), so a run killed halfway and run again
sends no record twice and skips none. Starting the producer fences a killed run of the same
group and aborts the transaction it left open, before the group's offsets are read. The
partitions are assigned by hand (the group is never joined): aiokafka's TxnOffsetCommit
carries no generation, which the broker accepts for a group without members.

What each record becomes (replayed, or skipped and why) is decided in
``bridge.core.dead_letters``; this module only moves records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from bridge.config import Config
from bridge.core import dead_letters as dl
from bridge.core.events import OutputRecord
from bridge.edges import kafka as kafka_io

# The progress line is redrawn at most this often.
_PROGRESS_EVERY_S = 0.2
_FETCH_WAIT_MS = 500


class CommandError(Exception):
    """The command cannot go on (a missing topic, the broker refusing); said as a sentence."""


Offsets = dict[TopicPartition, int]


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    try:
        found = await kafka_io.partitions_of(consumer, topic)
    except Exception as exc:
        raise CommandError(f"cannot read metadata: {kafka_io.describe_error(exc)}") from exc
    if not found:
        raise CommandError(f"the dead-letter topic {topic!r} does not exist")
    return [TopicPartition(topic, p) for p in sorted(found)]


async def _batches(
    consumer: AIOKafkaConsumer, start: Offsets, end: Offsets, max_records: int
) -> AsyncIterator[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]:
    """Batches of the records from ``start`` up to (not including) ``end``, per partition.

    Records written after the end offsets were taken are left for the next run; a partition
    is paused once its position reaches its end (a read_committed position moves past
    transaction markers and aborted records as well)."""
    for tp, offset in start.items():
        consumer.seek(tp, offset)
    waiting = {tp for tp in start if start[tp] < end[tp]}
    consumer.pause(*(set(start) - waiting))
    while waiting:
        fetched = await consumer.getmany(
            *waiting, timeout_ms=_FETCH_WAIT_MS, max_records=max_records
        )
        batch = {
            tp: [m for m in msgs if m.offset < end[tp]] for tp, msgs in fetched.items() if msgs
        }
        for tp in list(waiting):
            if await consumer.position(tp) >= end[tp]:
                waiting.discard(tp)
                consumer.pause(tp)
        yield {tp: msgs for tp, msgs in batch.items() if msgs}


async def _offsets(
    consumer: AIOKafkaConsumer, parts: list[TopicPartition]
) -> tuple[Offsets, Offsets]:
    try:
        begin = await consumer.beginning_offsets(parts)
        end = await consumer.end_offsets(parts)  # read_committed: the last stable offsets
    except Exception as exc:
        why = kafka_io.describe_error(exc)
        raise CommandError(f"cannot read the offsets of {parts[0].topic}: {why}") from exc
    return begin, end


async def list_dead_letters(config: Config, sel: dl.Selection, bucket: dl.Bucket) -> dl.Tally:
    """The dead-letter topic from the beginning to its end offsets at the start, counted."""
    topic = config.kafka.dead_letter_topic
    consumer = kafka_io.make_reader(config.kafka)
    tally = dl.Tally(bucket)
    try:
        await _start(consumer, config)
        parts = await _partitions(consumer, topic)
        consumer.assign(parts)
        begin, end = await _offsets(consumer, parts)
        async for batch in _batches(consumer, begin, end, config.kafka.fetch_max_records):
            for msgs in batch.values():
                for msg in msgs:
                    rec = kafka_io.to_record(msg)
                    if sel.filters:
                        letter = dl.read(rec)
                        if letter is None or sel.cause(letter) is not None:
                            continue
                    tally.add(rec)
    finally:
        await consumer.stop()
    return tally


async def _start(client: AIOKafkaConsumer | AIOKafkaProducer, config: Config) -> None:
    try:
        await client.start()
    except Exception as exc:
        _, why = await kafka_io.diagnose(config.kafka)
        raise CommandError(f"cannot reach Kafka: {kafka_io.describe_error(exc)}; {why}") from exc


async def replay(
    config: Config,
    sel: dl.Selection,
    *,
    group: str,
    dry_run: bool,
    stop: asyncio.Event,
    progress: Callable[[str], None] | None = None,
) -> tuple[dl.Summary, bool]:
    """Replay the selected dead letters; the summary, and whether the run reached the end
    offsets taken at its start (False: stopped by a signal, run it again to go on)."""
    topic = config.kafka.dead_letter_topic
    summary = dl.Summary(dry_run=dry_run)
    producer: AIOKafkaProducer | None = None
    consumer = kafka_io.make_reader(config.kafka, group_id=group)
    try:
        if not dry_run:
            # Transactions need the idempotent producer, whatever the daemon's setting.
            settings = config.kafka.model_copy(update={"enable_idempotence": True})
            producer = kafka_io.make_producer(settings, transactional_id=dl.transactional_id(group))
            # First: initialising the id fences a killed run and aborts its open
            # transaction, so the group's offsets read below are final.
            await _start(producer, config)
        await _start(consumer, config)
        parts = await _partitions(consumer, topic)
        consumer.assign(parts)
        begin, end = await _offsets(consumer, parts)
        start: Offsets = {}
        for tp in parts:
            committed = await consumer.committed(tp) or 0
            start[tp] = min(max(committed, begin[tp]), max(end[tp], begin[tp]))
            summary.already_done += max(0, min(committed, end[tp]) - begin[tp])
        # Progress in offsets (markers of transactions included), not records.
        reached, total = dict(start), sum(max(0, end[tp] - start[tp]) for tp in parts)
        drawn = 0.0

        def draw(done: int) -> None:
            if progress is not None:
                progress(dl.progress(done, total, summary.replayed, dry_run))

        async for batch in _batches(consumer, start, end, config.kafka.fetch_max_records):
            records: list[OutputRecord] = []
            for msgs in batch.values():
                for msg in msgs:
                    verdict = dl.decide(kafka_io.to_record(msg), sel)
                    summary.count(verdict)
                    if not isinstance(verdict, dl.Cause):
                        records.append(verdict)
            # Skipped records' offsets commit too: the next run starts after them.
            offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batch.items()}
            if producer is not None and batch:
                await _transaction(producer, records, offsets, group)
            reached.update(offsets)
            if time.monotonic() - drawn >= _PROGRESS_EVERY_S:
                drawn = time.monotonic()
                draw(sum(reached[tp] - start[tp] for tp in parts))
            if stop.is_set():
                return summary, False
        draw(total)
        return summary, True
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()


async def _transaction(
    producer: AIOKafkaProducer, records: list[OutputRecord], offsets: Offsets, group: str
) -> None:
    """One batch: its replayed records and its dead-letter offsets, committed together."""
    await producer.begin_transaction()
    try:
        futures: list[asyncio.Future[Any]] = []
        for out in records:
            futures.append(
                await producer.send(out.topic, key=out.key, value=out.value, headers=out.headers)
            )
        await producer.send_offsets_to_transaction(offsets, group)
        await producer.commit_transaction()
        for future in futures:
            future.result()  # a failed send fails the commit first; surfaced here all the same
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await producer.abort_transaction()
        if isinstance(exc, Exception):
            raise CommandError(f"transaction failed: {kafka_io.describe_error(exc)}") from exc
        raise


# --- the command -------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    action: Literal["list", "replay"]
    json: bool = False
    bucket: dl.Bucket = "hour"
    group: str | None = None
    dry_run: bool = False


def _draw(line: str) -> None:
    sys.stderr.write(f"\r{line}\x1b[K")
    sys.stderr.flush()


async def command(config: Config, sel: dl.Selection, options: Options) -> int:
    """``dead-letters list`` or ``replay``: its output, and its exit code (1: Kafka failed or
    a signal stopped the replay before the end)."""
    topic = config.kafka.dead_letter_topic
    say = sys.stderr if options.json else sys.stdout  # under --json, stdout has the JSON alone
    try:
        if options.action == "list":
            tally = await list_dead_letters(config, sel, options.bucket)
            if options.json:
                print(json.dumps({"topic": topic, **tally.as_json()}, indent=2))
            else:
                print(f"dead letters in {topic}\n{tally.table()}")
            return 0
        group = options.group or dl.default_group(config.kafka.group_id, topic, sel)
        writes = (
            "dry run: nothing is written"
            if options.dry_run
            else f"transactional id {dl.transactional_id(group)}"
        )
        print(f"replaying {topic} as group {group} ({writes})", file=say, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)  # ends after the batch in its transaction
        terminal = sys.stderr.isatty()
        summary, complete = await replay(
            config,
            sel,
            group=group,
            dry_run=options.dry_run,
            stop=stop,
            progress=_draw if terminal else None,
        )
    except (CommandError, KafkaError) as exc:
        why = exc if isinstance(exc, CommandError) else kafka_io.describe_error(exc)
        print(f"\nwavespeed-bridge dead-letters: {why}", file=sys.stderr)
        return 1
    if terminal:
        sys.stderr.write("\n")
    if options.json:
        print(json.dumps({"group": group, "complete": complete, **summary.as_json()}, indent=2))
    else:
        print("\n".join(summary.lines()), flush=True)
    if not complete:
        print("stopped before the end; the same command goes on from here", file=sys.stderr)
        return 1
    return 0
