"""Compressed input and output on the real broker, and records the client cannot decode.

Apache Kafka hands compressed batches back compressed, so the bridge needs every codec a
producer may use; a batch it cannot decode (a codec really missing, a corrupt batch) is
dead-lettered by offset and the partition goes on.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from bridge.local.apache_kafka import KafkaCluster
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    Received,
    StartBroker,
    config_data,
    create_topics,
    make_config,
    metric_value,
    read_all,
    running_bridge,
    scrape,
    sim_create,
    spawn_daemon,
    wait_for_commits,
)

pytestmark = pytest.mark.integration

CODECS = ["gzip", "snappy", "lz4", "zstd"]


async def _send_batch(
    bootstrap: str, topic: str, partition: int, values: list[bytes], codec: str | None
) -> None:
    """``values`` as one record batch (compressed as a whole when ``codec`` is set)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type=codec)
    await producer.start()
    try:
        batch = producer.create_batch()
        for v in values:
            assert batch.append(key=None, value=v, timestamp=None) is not None
        await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()


def _by_kind(got: list[Received], names: Names) -> dict[str, list[Received]]:
    out: dict[str, list[Received]] = {"completed": [], "dead_letter": []}
    for r in got:
        out["dead_letter" if r.topic == names.dead_letter else "completed"].append(r)
    return out


@pytest.mark.parametrize("codec", CODECS)
async def test_compressed_input_and_output_with_every_codec(
    broker: Broker, sim: Simulator, names: Names, codec: str
) -> None:
    await create_topics(broker, names)
    ids = await sim_create(sim, [{"model": "m", "duration_s": 0.05} for _ in range(6)])
    config = make_config(broker, sim.base_url, names, kafka={"compression_type": codec})
    async with running_bridge(config):
        await _send_batch(broker.bootstrap, names.input, 0, [i.encode() for i in ids], codec)
        got = await read_all(broker.bootstrap, [names.completed], expect=6, timeout=30)
        positions = await wait_for_commits(broker.bootstrap, names.group, names.input, 1, total=6)
    assert sorted(r.event["subject"] for r in got) == sorted(ids)
    assert positions == [6]


async def test_a_codec_the_client_lacks_dead_letters_the_batch_and_the_partition_goes_on(
    broker: Broker, sim: Simulator, names: Names, tmp_path: Path
) -> None:
    if not broker.features.persistent:
        pytest.skip("Tansu hands compressed batches back decompressed")
    await create_topics(broker, names, partitions=2)
    good = await sim_create(sim, [{"model": "m", "duration_s": 0.05} for _ in range(4)])
    lz4 = await sim_create(sim, [{"model": "m", "duration_s": 0.05} for _ in range(3)])
    # Partition 0: a good record, an lz4 batch of three, a good record; partition 1: two good.
    await _send_batch(broker.bootstrap, names.input, 0, [good[0].encode()], None)
    await _send_batch(broker.bootstrap, names.input, 0, [i.encode() for i in lz4], "lz4")
    await _send_batch(broker.bootstrap, names.input, 0, [good[1].encode()], None)
    await _send_batch(broker.bootstrap, names.input, 1, [g.encode() for g in good[2:]], None)
    # The daemon runs where the codec library (cramjam) cannot be imported.
    shim = tmp_path / "no-codecs"
    shim.mkdir()
    (shim / "cramjam.py").write_text("raise ImportError('cramjam is hidden by this test')\n")
    env = {"PYTHONPATH": f"{shim}:{Path.cwd()}"}
    data = config_data(broker, sim.base_url, names)
    refused = _check_config_with(tmp_path, data, "lz4", env)
    assert refused.returncode == 2
    assert "kafka.compression_type" in refused.stderr and "lz4" in refused.stderr
    daemon = spawn_daemon(data, tmp_path, env=env)
    try:
        got = await read_all(
            broker.bootstrap,
            [names.completed, names.dead_letter],
            expect=7,
            timeout=40,
        )
        positions = await wait_for_commits(broker.bootstrap, names.group, names.input, 2, total=7)
        metrics = await scrape(data["server"]["port"])
        alive = daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
    kinds = _by_kind(got, names)
    assert sorted(r.event["subject"] for r in kinds["completed"]) == sorted(good)
    dead = kinds["dead_letter"]
    assert sorted(int(r.headers["dlq.offset"]) for r in dead) == [1, 2, 3]
    assert {r.headers["dlq.reason"] for r in dead} == {b"undecodable"}
    assert all(b"lz4" in r.headers["dlq.detail"] for r in dead)
    assert Counter(r.headers["dlq.partition"] for r in dead) == Counter({b"0": 3})
    assert positions == [5, 2]
    assert alive
    assert metric_value(metrics, "wavespeed_bridge_dead_letters_total", reason="undecodable") == 3


def _check_config_with(
    tmp: Path, data: dict[str, object], codec: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    import os

    import yaml

    kafka = dict(data["kafka"])  # type: ignore[call-overload]
    path = tmp / "lz4.yaml"
    path.write_text(yaml.safe_dump({**data, "kafka": {**kafka, "compression_type": codec}}))
    return subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )


def _corrupt_first_gzip_batch(segment: Path) -> None:
    """Flip one byte inside the first gzip batch of a log segment: its CRC no longer holds."""
    raw = bytearray(segment.read_bytes())
    pos = 0
    while pos + 61 <= len(raw):
        (length,) = struct.unpack_from(">i", raw, pos + 8)
        (attributes,) = struct.unpack_from(">h", raw, pos + 21)
        if attributes & 0x7 == 1:  # gzip
            raw[pos + 12 + length - 5] ^= 0xFF
            segment.write_bytes(bytes(raw))
            return
        pos += 12 + length
    raise AssertionError(f"no gzip batch in {segment}")


async def test_a_corrupt_batch_on_disk_is_dead_lettered_and_the_partition_goes_on(
    sim: Simulator, own_broker: StartBroker
) -> None:
    own = await own_broker()
    if not isinstance(own, KafkaCluster):
        pytest.skip("needs a broker with a log on disk")
    names = Names()
    await create_topics(own, names)
    good = await sim_create(sim, [{"model": "m", "duration_s": 0.05} for _ in range(2)])
    bad = await sim_create(sim, [{"model": "m", "duration_s": 0.05} for _ in range(3)])
    await _send_batch(own.bootstrap, names.input, 0, [good[0].encode()], None)
    await _send_batch(own.bootstrap, names.input, 0, [b.encode() for b in bad], "gzip")
    await _send_batch(own.bootstrap, names.input, 0, [good[1].encode()], None)
    own.stop()  # a clean shutdown: the log is not re-validated on start
    _corrupt_first_gzip_batch(own.node(1).directory / "data" / f"{names.input}-0" / f"{0:020d}.log")
    own.start()
    await own.wait_ready()
    config = make_config(own, sim.base_url, names)
    async with running_bridge(config) as bridge:
        got = await read_all(
            own.bootstrap, [names.completed, names.dead_letter], expect=5, timeout=30
        )
        positions = await wait_for_commits(own.bootstrap, names.group, names.input, 1, total=5)
        ready = bridge.readiness()[0]
    kinds = _by_kind(got, names)
    assert sorted(r.event["subject"] for r in kinds["completed"]) == sorted(good)
    dead = kinds["dead_letter"]
    assert sorted(int(r.headers["dlq.offset"]) for r in dead) == [1, 2, 3]
    assert all(b"CorruptRecord" in r.headers["dlq.detail"] for r in dead)
    assert positions == [5]
    assert ready
