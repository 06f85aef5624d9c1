"""``dead-letters replay`` on Apache Kafka: killed (SIGKILL) at a random point and run again,
every selected dead letter comes back exactly once; a dry run writes nothing; a replayed
record that is dead-lettered again is not replayed again unless asked. The dead letters are
the bridge's own: bad input records consumed by the real daemon."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TypeAlias

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from bridge.config import build_config
from bridge.core import dead_letters as dl
from bridge.edges.kafka import partitions_of
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import Names, committed, config_data, running_bridge

pytestmark = pytest.mark.integration

Raw: TypeAlias = "ConsumerRecord[bytes, bytes]"
SELECTED = ("invalid_json", "missing_id")


def _bad_input(i: int) -> tuple[str, bytes]:
    """Three reasons, in turn."""
    if i % 3 == 0:
        return "invalid_id", f"not an id {i}".encode()
    if i % 3 == 1:
        return "invalid_json", f"{{broken json {i}".encode()
    return "missing_id", json.dumps({"n": i}).encode()


async def _topics(broker: Broker, names: Names) -> None:
    if not broker.features.transactions:
        pytest.skip(f"{broker.name} has no transactions: the replay needs them")
    await broker.create_topics([names.input, names.completed, names.failed])
    await broker.create_topics([names.dead_letter], partitions=2)


async def _produce_bad(broker: Broker, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        futures = []
        for i in range(count):
            _, value = _bad_input(i)
            headers = [("n", str(i).encode()), ("origin", b"test")]
            futures.append(await producer.send(topic, value, key=f"k{i}".encode(), headers=headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _read(
    bootstrap: str,
    topic: str,
    *,
    expect: int = 0,
    timeout: float = 60.0,
    committed_only: bool = True,
) -> list[Raw]:
    """Every record of ``topic`` up to its end offsets (read_committed: the last stable
    offsets), read again until there are at least ``expect``."""
    deadline = time.monotonic() + timeout
    level = "read_committed" if committed_only else "read_uncommitted"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, isolation_level=level)
    await consumer.start()
    try:
        found = await partitions_of(consumer, topic)
        parts = [TopicPartition(topic, p) for p in sorted(found or ())]

        consumer.assign(parts)
        while True:
            end = await consumer.end_offsets(parts)
            # seek, not seek_to_beginning: that one can take the result of the reset to the
            # latest offset still in flight from the assignment (aiokafka 0.14).
            for tp, offset in (await consumer.beginning_offsets(parts)).items():
                consumer.seek(tp, offset)
            out: list[Raw] = []
            while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
                batch = await consumer.getmany(timeout_ms=200)
                out += [m for tp, msgs in batch.items() for m in msgs if m.offset < end[tp]]
            if len(out) >= expect:
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(out)} records in {topic}, expected {expect}")
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()


def _header(m: Raw, name: str) -> bytes | None:
    values = [v for k, v in (m.headers or ()) if k == name]
    assert len(values) <= 1, f"{name} {len(values)} times"
    return values[0] if values else None


def _replays(records: list[Raw]) -> list[Raw]:
    return [m for m in records if _header(m, dl.REPLAYED_FROM) is not None]


def _where(m: Raw) -> str:
    return dl.replayed_from(m.topic, m.partition, m.offset)


async def _spawn(path: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "dead-letters",
        *args,
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _run(path: Path, *args: str) -> tuple[int, str, str]:
    proc = await _spawn(path, *args)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _replay(path: Path, *args: str) -> dict[str, Any]:
    code, out, err = await _run(path, "replay", "--json", *args)
    assert code == 0, err
    summary: dict[str, Any] = json.loads(out)
    return summary


def _write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _dead_letters_from_the_bridge(
    broker: Broker, sim: Simulator, names: Names, data: dict[str, Any], count: int, total: int
) -> list[Raw]:
    """``count`` bad records through the real daemon; the dead-letter topic once it holds
    ``total``."""
    await _produce_bad(broker, names.input, count)
    async with running_bridge(build_config(data, env={})):
        return await _read(broker.bootstrap, names.dead_letter, expect=total)


async def test_replay_killed_and_run_again_sends_each_selected_record_once(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await _topics(broker, names)
    # Small batches: one transaction per 10 dead letters, so the kill can land anywhere.
    data = config_data(broker, sim.base_url, names, kafka={"fetch_max_records": 10})
    path = _write_config(tmp_path, data)
    letters = await _dead_letters_from_the_bridge(broker, sim, names, data, 1000, 1000)
    assert len(letters) == 1000
    reasons = Counter((_header(m, "dlq.reason") or b"").decode() for m in letters)
    assert reasons == {"invalid_id": 334, "invalid_json": 333, "missing_id": 333}
    expected = {
        _where(m) for m in letters if _header(m, "dlq.reason") in {r.encode() for r in SELECTED}
    }
    by_place = {_where(m): m for m in letters}

    # list: counts by reason, topic, partition and hour.
    code, table, err = await _run(path, "list")
    assert code == 0, err
    print(f"\n$ wavespeed-bridge dead-letters list --config {path.name}\n{table}")
    code, out, err = await _run(path, "list", "--json", "--by", "day")
    listed = json.loads(out)
    assert listed["total"] == 1000 and listed["by_reason"] == dict(reasons)
    assert listed["by_topic"] == {names.input: 1000}
    assert sum(s["count"] for s in listed["dead_letter_offsets"].values()) == 1000

    # Bad selectors: exit 2, a clear message, nothing read.
    code, _, err = await _run(path, "replay", "--reason", "invalid_jsn")
    assert code == 2 and "'invalid_jsn' is not a reason the bridge writes" in err
    assert "valid reasons: empty, oversize, not_utf8, invalid_id" in err
    code, _, err = await _run(path, "replay", "--offsets", "0:9-3")
    assert code == 2 and "--offsets '0:9-3': 9 comes after 3" in err

    # A dry run counts what a replay would do and writes nothing: no record, no offset.
    inputs_before = await _read(broker.bootstrap, names.input, committed_only=False)
    dry = await _replay(path, "--dry-run", "--reason", "invalid_id")
    assert (dry["read"], dry["selected"], dry["replayed"]) == (1000, 334, 334)
    assert dry["skipped"] == {"reason": 666} and dry["dry_run"]
    assert await _read(broker.bootstrap, names.input, committed_only=False) == inputs_before
    assert await committed(broker.bootstrap, dry["group"], names.dead_letter, 2) == [0, 0]

    # The replay, killed once some replayed records are out (committed or not).
    seed = random.randrange(1 << 30)
    # Up to two thirds: the rest (over 200 records) leaves the watcher time to kill.
    threshold = random.Random(seed).randint(1, len(expected) * 2 // 3)
    argv = ["replay", "--reason", SELECTED[0], "--reason", SELECTED[1], "--json"]
    proc = await _spawn(path, *argv)
    seen = await _watch(broker.bootstrap, names.input, threshold, proc)
    proc.kill()
    await proc.wait()
    assert proc.returncode == -9, "the kill should land before the replay ends"
    assert proc.stderr is not None
    group = (await proc.stderr.read()).decode().split(" as group ")[1].split()[0]
    at_kill = await committed(broker.bootstrap, group, names.dead_letter, 2)
    committed_at_kill = len(_replays(await _read(broker.bootstrap, names.input)))

    started = time.monotonic()
    rerun = await _replay(path, *argv[1:])
    took = time.monotonic() - started
    assert rerun["group"] == group and rerun["complete"]
    assert rerun["already_done_before_this_run"] == sum(at_kill)
    assert rerun["read"] + sum(at_kill) == 1000

    replayed = _replays(await _read(broker.bootstrap, names.input, expect=1000 + len(expected)))
    counts = Counter((_header(m, dl.REPLAYED_FROM) or b"").decode() for m in replayed)
    duplicates = sum(n - 1 for n in counts.values())
    assert set(counts) == expected  # every selected record, nothing else
    assert duplicates == 0
    assert committed_at_kill + rerun["replayed"] == len(expected)
    for m in replayed:  # as it was: key, value, the input's headers, then where from
        letter = by_place[(_header(m, dl.REPLAYED_FROM) or b"").decode()]
        assert (m.key, m.value) == (letter.key, letter.value)
        assert list(m.headers)[:-1] == list(letter.headers)[:-5]
        assert [k for k, _ in letter.headers][-5:] == list(dl.BLOCK)

    again = await _replay(path, *argv[1:])  # the same command once more: nothing left
    assert (again["read"], again["replayed"], again["already_done_before_this_run"]) == (0, 0, 1000)
    print(
        f"kill-and-rerun (seed {seed}): {len(letters)} dead letters, {len(expected)} selected"
        f" ({', '.join(SELECTED)}); killed after {seen} replayed records were seen"
        f" (threshold {threshold}), {committed_at_kill} of them committed, group offsets"
        f" {at_kill}; rerun replayed {rerun['replayed']}, skipped {rerun['skipped']},"
        f" already done {rerun['already_done_before_this_run']}; total replayed"
        f" {len(replayed)}, duplicates {duplicates}, missing {len(expected - set(counts))};"
        f" the rerun took {took:.1f} s"
    )


async def _watch(
    bootstrap: str, topic: str, threshold: int, proc: asyncio.subprocess.Process
) -> int:
    """Replayed records in ``topic`` as they are sent (read_uncommitted: a transaction still
    open counts), until ``threshold``; the count."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        isolation_level="read_uncommitted",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    seen = 0
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek(TopicPartition(topic, 0), 0)
        deadline = time.monotonic() + 60
        while seen < threshold:
            assert proc.returncode is None, "the replay ended before the kill"
            assert time.monotonic() < deadline, f"only {seen} replayed records seen"
            batch = await consumer.getmany(timeout_ms=20)
            seen += len(_replays([m for msgs in batch.values() for m in msgs]))
    finally:
        await consumer.stop()
    return seen


async def test_a_replayed_record_dead_lettered_again_is_not_replayed_again(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    await _topics(broker, names)
    data = config_data(broker, sim.base_url, names)
    # Dead letters written in transactions: the replay reads past their markers.
    data["delivery"] = "exactly_once"
    path = _write_config(tmp_path, data)
    letters = await _dead_letters_from_the_bridge(broker, sim, names, data, 30, 30)
    selected = {_where(m) for m in letters if _header(m, "dlq.reason") == b"invalid_json"}
    first = await _replay(path, "--reason", "invalid_json")
    assert first["replayed"] == len(selected) == 10

    # The bridge reads the replayed records, still invalid: dead letters again, with the
    # replayed-from header kept among the input's.
    async with running_bridge(build_config(data, env={})):
        everything = await _read(broker.bootstrap, names.dead_letter, expect=40)
    again = [m for m in everything if _header(m, dl.REPLAYED_FROM) is not None]
    assert len(again) == 10
    assert {(_header(m, dl.REPLAYED_FROM) or b"").decode() for m in again} == selected

    # The same command resumes after its first run and replays none of them.
    second = await _replay(path, "--reason", "invalid_json")
    assert (second["read"], second["replayed"]) == (10, 0)
    assert second["skipped"] == {"replayed_before": 10}
    assert len(_replays(await _read(broker.bootstrap, names.input))) == 10

    # Asked for, they are replayed, each naming its newest dead letter only.
    ranges = [f"{m.partition}:{m.offset}" for m in again]
    args = ["--reason", "invalid_json", "--include-replayed"]
    third = await _replay(path, *args, *(x for r in ranges for x in ("--offsets", r)))
    assert (third["replayed"], third["selected"]) == (10, 10)
    replayed = _replays(await _read(broker.bootstrap, names.input, expect=50))
    assert len(replayed) == 20
    newest = {(_header(m, dl.REPLAYED_FROM) or b"").decode() for m in replayed[10:]}
    assert newest == {_where(m) for m in again}
