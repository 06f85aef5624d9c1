"""The bridge end to end, judged by software nobody on the project wrote.

- The official CloudEvents SDK (``cloudevents`` 2.x: its Kafka binding, and the 1.x API it
  still ships as ``cloudevents.v1.kafka``, which 1.13 calls ``cloudevents.kafka``) parses
  every event, in both content modes, whatever headers the input carried.
- librdkafka (``confluent-kafka``) produces the task ids, with keys, binary and null header
  values and each compression codec, and consumes the events.

On a broker that stores batches as they come (Apache Kafka) the codecs reach both the
bridge's consumer and librdkafka's; Tansu hands compressed batches back decompressed, so
there only the producers' side of each codec is exercised.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from cloudevents.core.bindings import kafka
from cloudevents.v1 import kafka as v1_kafka
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from bridge.core.events import CONTENT_TYPE, DEFAULT_DATASCHEMA
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    create_topics,
    make_config,
    metric_value,
    running_bridge,
    scrape,
    sim_create,
)

pytestmark = pytest.mark.integration

SOURCE = "urn:wavespeed-bridge:test"
TYPE = "ai.wavespeed.prediction."
Headers = list[tuple[str, bytes | None]]


@dataclass
class Rec:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


def _produce(
    bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes, Headers]], **conf: Any
) -> None:
    """librdkafka produces ``(key, value, headers)`` in one batch and waits for every ack."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 100, **conf})
    errors: list[object] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    for key, value, headers in items:
        sent: list[tuple[str, str | bytes | None]] = list(headers)
        producer.produce(topic, value=value, key=key, headers=sent, on_delivery=delivered)
    assert producer.flush(30) == 0 and not errors, errors


def _consume(bootstrap: str, topics: list[str], expect: int, timeout: float = 40.0) -> list[Rec]:
    """librdkafka reads ``topics`` from the start until ``expect`` records arrived."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(t, 0, OFFSET_BEGINNING) for t in topics])
    out: list[Rec] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                assert not err.fatal(), err
                continue
            raw = msg.headers() or []
            pairs = raw.items() if isinstance(raw, dict) else raw
            headers: Headers = [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]
            out.append(Rec(msg.topic() or "", msg.key(), msg.value(), headers))
    finally:
        consumer.close()
    return out


def _sdk_headers(headers: Headers) -> dict[str, bytes]:
    # The SDKs' KafkaMessage maps names to bytes: a null header value has no place in it.
    return {k: v for k, v in headers if v is not None}


def _parse(rec: Rec, mode: str) -> dict[str, Any]:
    """The event as each of the SDK's Kafka parsers reads it; they must agree."""
    assert rec.value is not None
    message = kafka.KafkaMessage(headers=_sdk_headers(rec.headers), key=rec.key, value=rec.value)
    legacy_message = v1_kafka.KafkaMessage(_sdk_headers(rec.headers), rec.key, rec.value)
    detected = kafka.from_kafka_event(message)  # mode detection from the headers
    if mode == "binary":
        explicit = kafka.from_binary_event(message)
        legacy = v1_kafka.from_binary(legacy_message)
    else:
        explicit = kafka.from_structured_event(message)
        legacy = v1_kafka.from_structured(legacy_message)
    seen = []
    for event in (detected, explicit):
        attrs = event.get_attributes()
        seen.append(
            {
                "id": attrs["id"],
                "source": attrs["source"],
                "type": attrs["type"],
                "subject": attrs["subject"],
                "datacontenttype": attrs["datacontenttype"],
                "dataschema": attrs["dataschema"],
                "data": event.get_data(),
            }
        )
    seen.append(
        {
            "id": legacy["id"],
            "source": legacy["source"],
            "type": legacy["type"],
            "subject": legacy["subject"],
            # 1.x takes the record's content-type header for it, in both modes.
            "datacontenttype": "application/json",
            "dataschema": legacy["dataschema"],
            "data": legacy.get_data(),
        }
    )
    assert seen[0] == seen[1] == seen[2], seen
    return seen[0]


def _expected_id(task_id: str, kind: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{SOURCE}#{task_id}#{TYPE}{kind}"))


# What an upstream producer may put on a task record: CloudEvents headers of its own, in any
# case, a content-type, a null value. (Values that are not UTF-8: see the librdkafka test.)
UPSTREAM: Headers = [
    ("ce_specversion", b"1.0"),
    ("ce_source", b"urn:upstream"),
    ("ce_time", b"2020-01-01T00:00:00Z"),
    ("CE_ID", b"upstream-1"),
    ("ce_type", b"com.example.submitted"),
    ("Content-Type", b"text/plain"),
    ("trace", b"abc"),
    ("nothing", None),
]
CARRIED: Headers = [("trace", b"abc"), ("nothing", None)]


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_every_event_parses_with_the_cloudevents_sdk(
    broker: Broker, sim: Simulator, names: Names, mode: str
) -> None:
    await create_topics(broker, names)
    specs: dict[str, dict[str, Any]] = {
        "done": {"duration_s": 0.2},
        "json": {"duration_s": 0.2},
        "failed": {"duration_s": 0.2, "outcome": "failed"},
        "cancelled": {"duration_s": 0.2, "outcome": "cancelled"},
        "timeout": {"duration_s": 0.2, "outcome": "timeout"},
        "deleted": {"duration_s": 0.2, "outcome": "deleted", "error": "removed by its owner"},
        "late": {"duration_s": 60},
    }
    created = await sim_create(
        sim, [{"model": "wavespeed-ai/flux-dev", **v} for v in specs.values()]
    )
    ids = dict(zip(specs, created, strict=True))
    ids["unknown"] = "pred_nobody_knows"
    json_value = {"id": ids["json"], "model": "wavespeed-ai/flux-dev", "metadata": {"order": 42}}
    inputs: list[tuple[bytes | None, bytes, Headers]] = [
        (b"user-1", ids["done"].encode(), UPSTREAM),
        (None, json.dumps(json_value).encode(), [("nothing", None)]),
        *((None, ids[k].encode(), []) for k in ("failed", "cancelled", "timeout", "deleted")),
        (None, ids["unknown"].encode(), []),
        (None, json.dumps({"id": ids["late"], "timeout_s": 1.5}).encode(), []),
        (b"k", b"not a task id!", UPSTREAM),
    ]
    config = make_config(broker, sim.base_url, names, events={"source": SOURCE, "mode": mode})
    async with running_bridge(config):
        await asyncio.to_thread(_produce, broker.bootstrap, names.input, inputs)
        got = await asyncio.to_thread(_consume, broker.bootstrap, names.outputs, len(inputs))
        # The same task again, after its event went out: a new event for the same outcome.
        await asyncio.to_thread(
            _produce, broker.bootstrap, names.input, [(b"user-1", ids["done"].encode(), [])]
        )
        again = await asyncio.to_thread(
            _consume,
            broker.bootstrap,
            [names.completed],
            3,  # done, json, done again
        )
    assert len(got) == len(inputs), [r.value for r in got]
    (dead,) = [r for r in got if r.topic == names.dead_letter]
    assert dead.headers[: len(UPSTREAM)] == UPSTREAM  # the original headers, unaltered
    events = {}
    for rec in got:
        if rec.topic == names.dead_letter:
            continue
        names_lower = [k.lower() for k, _ in rec.headers]
        assert names_lower.count("content-type") == 1
        if mode == "structured":
            assert not any(n.startswith("ce_") for n in names_lower), rec.headers
            assert rec.headers[-1] == ("content-type", CONTENT_TYPE)
        else:
            ce = sorted(n for n in names_lower if n.startswith("ce_"))
            assert ce == sorted(
                f"ce_{a}"
                for a in ("specversion", "id", "source", "type", "subject", "time", "dataschema")
            )
            assert rec.headers[-1] == ("content-type", b"application/json")
        parsed = _parse(rec, mode)
        assert rec.key is not None and parsed["subject"] == rec.key.decode()
        assert parsed["source"] == SOURCE and parsed["datacontenttype"] == "application/json"
        assert parsed["dataschema"] == DEFAULT_DATASCHEMA  # read back by the SDK, both modes
        events[parsed["subject"]] = (rec, parsed)
    # Every outcome, with the status the API reported kept on failures.
    expected = {
        "done": ("completed", "completed", None),
        "json": ("completed", "completed", None),
        "failed": ("failed", "failed", "simulated failure: GPU out of memory"),
        "cancelled": ("failed", "cancelled", "the API reports the task was cancelled"),
        "timeout": ("failed", "timeout", "the API reports the task timed out"),
        "deleted": ("failed", "deleted", "removed by its owner"),
        "unknown": ("failed", "failed", "unknown or expired task (HTTP 404)"),
        "late": ("timeout", "timeout", None),
    }
    assert set(events) == set(ids.values())
    for name, (kind, status, error) in expected.items():
        rec, parsed = events[ids[name]]
        data = parsed["data"]
        assert parsed["type"] == TYPE + kind, (name, parsed)
        assert parsed["id"] == _expected_id(ids[name], kind)
        assert data["status"] == status, (name, data)
        if error is not None:
            assert data["error"] == error, (name, data)
        assert rec.topic == (names.completed if kind == "completed" else names.failed)
    assert events[ids["late"]][1]["data"]["error"].startswith("deadline of 1.5s passed")
    assert events[ids["json"]][1]["data"]["metadata"] == {"order": 42}
    # The outputs' expiry: the API's created_at plus WaveSpeed's 7 days, on completed only.
    done = events[ids["done"]][1]["data"]
    born = datetime.fromisoformat(done["created_at"].replace("Z", "+00:00"))
    gone = datetime.fromisoformat(done["expires_at"].replace("Z", "+00:00"))
    assert gone - born == timedelta(days=7), done
    assert events[ids["failed"]][1]["data"]["expires_at"] is None
    # Input headers: the binding's dropped, the rest carried as they came, null included.
    assert events[ids["done"]][0].headers[:2] == CARRIED
    assert events[ids["json"]][0].headers[0] == ("nothing", None)
    # Re-published for the same outcome: the same id, so CloudEvents consumers drop it.
    first, second = [r for r in again if r.key == ids["done"].encode()]
    one, two = _parse(first, mode), _parse(second, mode)
    assert one["id"] == two["id"] == _expected_id(ids["done"], "completed")
    assert one["data"]["input"]["records"] != two["data"]["input"]["records"]


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_librdkafka_in_and_out_with_every_codec(
    broker: Broker, sim: Simulator, names: Names, codec: str
) -> None:
    """Keys, binary and null header values, compressed input; the bridge compresses its
    events with the same codec; librdkafka reads them back. A header value that is not
    UTF-8 is left off the event (the SDK could not read it) and kept on a dead letter."""
    await create_topics(broker, names)
    ids = await sim_create(sim, [{"model": "m", "duration_s": 0.1} for _ in range(5)])
    inputs: list[tuple[bytes | None, bytes, Headers]] = [
        (
            f"user-{i}".encode(),
            task_id.encode(),
            [("bin", bytes([0xFF, 0x00, i])), ("null", None), ("ce_type", b"x")],
        )
        for i, task_id in enumerate(ids)
    ]
    inputs.append((b"\xfe\xff", b"\xff not utf-8", [("bin", b"\x80")]))
    config = make_config(
        broker, sim.base_url, names, kafka={"compression_type": codec}, events={"source": SOURCE}
    )
    async with running_bridge(config):
        await asyncio.to_thread(
            _produce, broker.bootstrap, names.input, inputs, **{"compression.type": codec}
        )
        got = await asyncio.to_thread(
            _consume, broker.bootstrap, [names.completed, names.dead_letter], len(inputs)
        )
    assert len(got) == len(inputs)
    by_key = {r.key: r for r in got}
    for i, task_id in enumerate(ids):
        rec = by_key[task_id.encode()]
        assert rec.topic == names.completed
        assert rec.headers == [("null", None), ("content-type", CONTENT_TYPE)]
        parsed = _parse(rec, "structured")  # every parser of the SDK, 1.x and 2.x
        assert parsed["type"] == TYPE + "completed"
        assert parsed["data"]["input"]["key"] == {"text": f"user-{i}"}
    dead = by_key[b"\xfe\xff"]
    assert dead.topic == names.dead_letter and dead.value == b"\xff not utf-8"
    assert dead.headers[0] == ("bin", b"\x80")
    assert dict(dead.headers)["dlq.reason"] == b"not_utf8"


@pytest.mark.parametrize("mode", ["structured", "binary"])
@pytest.mark.parametrize("policy", ["drop", "keep"])
async def test_an_input_header_that_is_not_text_never_breaks_a_subscriber(
    broker: Broker, sim: Simulator, names: Names, mode: str, policy: str
) -> None:
    """The header policy (events.binary_headers), read with the official SDK, both content
    modes, both API generations: dropped (the default), every parser reads the event; kept
    (opt-in), the header arrives as it came and the parsers that decode headers fail, which
    is why it is not the default."""
    await create_topics(broker, names)
    (task,) = await sim_create(sim, [{"model": "m", "duration_s": 0.1, "outcome": "completed"}])
    headers: Headers = [("schema-id", b"\x00\x00\x00\x01\xff"), ("tenant", b"acme")]
    config = make_config(
        broker,
        sim.base_url,
        names,
        events={"source": SOURCE, "mode": mode, "binary_headers": policy},
    )
    async with running_bridge(config) as bridge:
        await asyncio.to_thread(
            _produce, broker.bootstrap, names.input, [(None, task.encode(), headers)]
        )
        (rec,) = await asyncio.to_thread(_consume, broker.bootstrap, [names.completed], 1)
        text = await scrape(bridge.server.port)
    carried = [(k, v) for k, v in rec.headers if k in ("schema-id", "tenant")]
    dropped = metric_value(text, "wavespeed_bridge_event_headers_dropped_total")
    if policy == "drop":
        assert carried == [("tenant", b"acme")] and dropped == 1
        assert _parse(rec, mode)["subject"] == task  # 2.x, both parsers, and 1.x agree
    else:
        assert carried == headers and dropped == 0
        with pytest.raises(UnicodeDecodeError):
            _parse(rec, mode)
