from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiokafka import ConsumerRecord
from cloudevents.core.bindings import kafka
from cloudevents.v1 import kafka as v1_kafka
from referencing import Registry, Resource

from bridge.core.events import (
    CONTENT_TYPE,
    DEFAULT_DATASCHEMA,
    SCHEMA_ID,
    SCHEMA_VERSION,
    OutputRecord,
    build_event,
    dead_letter_record,
    event_record,
)
from bridge.core.outcomes import Prediction
from bridge.edges.kafka import to_record

SCHEMA = Path(__file__).resolve().parents[1] / "bridge" / "schemas" / "event.schema.json"


def _event(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        kind="completed",
        task_id="pred_1",
        model=None,
        prediction=Prediction(
            id="pred_1",
            model="wavespeed-ai/flux-dev",
            status="completed",
            outputs=["https://cdn/x.png"],
            inference_ms=2500,
            created_at=1704110400.0,
            created_at_raw="2024-01-01T12:00:00.000Z",
        ),
        reason=None,
        created_at=1704110400.0,
        observed_at=1704110403.5,
        polls=3,
        metadata={"user": "u1"},
        source="urn:test",
        input_key=b"\xffkey",
        origins=[("in", 2, 41)],
        event_id="e-1",
    )
    args.update(overrides)
    return build_event(**args)


def test_completed_event_shape() -> None:
    e = _event()
    assert e["specversion"] == "1.0"
    assert e["type"] == "ai.wavespeed.prediction.completed"
    assert e["subject"] == "pred_1"
    assert e["time"] == "2024-01-01T12:00:03.500Z"
    d = e["data"]
    assert d["outputs"] == ["https://cdn/x.png"]
    assert d["inference_time_s"] == 2.5
    assert d["error"] is None
    assert d["created_at"] == "2024-01-01T12:00:00.000Z"
    assert d["observed_at"] == "2024-01-01T12:00:03.500Z"
    assert d["polls"] == 3 and d["metadata"] == {"user": "u1"}
    assert d["input"] == {
        "key": {"base64": "/2tleQ=="},
        "records": [{"topic": "in", "partition": 2, "offset": 41}],
    }


def test_timeout_event_carries_reason_and_no_outputs() -> None:
    e = _event(kind="timeout", prediction=None, model="m", reason="deadline of 5s passed")
    assert e["type"] == "ai.wavespeed.prediction.timeout"
    assert e["data"]["outputs"] == [] and e["data"]["error"] == "deadline of 5s passed"
    assert e["data"]["model"] == "m"
    assert e["data"]["created_at"] == "2024-01-01T12:00:00.000Z"


def test_event_record_key_headers_and_json() -> None:
    rec = event_record("out", _event(), (("trace", b"1"), ("content-type", b"text/plain")))
    assert rec.key == b"pred_1"
    assert rec.headers == [
        ("trace", b"1"),
        ("content-type", b"application/cloudevents+json; charset=utf-8"),
    ]
    assert rec.value is not None
    assert json.loads(rec.value)["id"] == "e-1"


def test_dead_letter_keeps_original_and_truncates_oversize() -> None:
    rec = dead_letter_record(
        topic="dlq",
        source_topic="in",
        partition=1,
        offset=9,
        key=b"k",
        value=b"x" * 10,
        headers=(("h", b"v"),),
        reason="oversize",
        detail="too big",
        max_value_bytes=4,
    )
    assert rec.value == b"xxxx" and rec.key == b"k"
    h = dict(rec.headers)
    assert h["h"] == b"v" and h["dlq.reason"] == b"oversize" and h["dlq.offset"] == b"9"
    assert h["dlq.topic"] == b"in" and h["dlq.partition"] == b"1"
    assert h["dlq.value_truncated"] == b"10"


def test_events_match_the_shipped_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    for kind in ("completed", "failed", "timeout"):
        validator.validate(_event(kind=kind))
    validator.validate(_event(prediction=None, input_key=None, metadata=None, created_at=None))
    broken = _event()
    broken["data"]["polls"] = "3"
    assert not validator.is_valid(broken)


def test_data_validates_against_the_schema_dataschema_names() -> None:
    """dataschema names the schema of data alone (the $anchor), which binary mode's value
    follows: resolved through the schema's own $id, it accepts data and rejects a broken one."""
    schema = json.loads(SCHEMA.read_text())
    uri, _, anchor = DEFAULT_DATASCHEMA.partition("#")
    assert uri == schema["$id"] == SCHEMA_ID and anchor == "data"
    assert schema["$defs"]["data"]["$anchor"] == anchor
    registry = Registry().with_resource(SCHEMA_ID, Resource.from_contents(schema))
    validator = jsonschema.Draft202012Validator({"$ref": DEFAULT_DATASCHEMA}, registry=registry)
    for kind in ("completed", "failed", "timeout"):
        e = _event(kind=kind)
        assert e["dataschema"] == DEFAULT_DATASCHEMA
        validator.validate(e["data"])
    assert not validator.is_valid({**_event()["data"], "polls": -1})
    assert _event(dataschema="https://registry.example/s/9")["dataschema"] == (
        "https://registry.example/s/9"
    )


def test_expires_at_is_the_creation_plus_the_retention_on_completed_events_only() -> None:
    week = _event()["data"]
    assert week["created_at"] == "2024-01-01T12:00:00.000Z"
    assert week["expires_at"] == "2024-01-08T12:00:00.000Z"  # WaveSpeed's 7 days, the default
    assert _event(retention_s=3600.0)["data"]["expires_at"] == "2024-01-01T13:00:00.000Z"
    # No creation time from the API: the bridge's estimate of it.
    estimated = _event(prediction=Prediction(status="completed"), created_at=1704114000.0)
    assert estimated["data"]["expires_at"] == "2024-01-08T13:00:00.000Z"
    assert _event(prediction=None, created_at=None)["data"]["expires_at"] is None
    for kind in ("failed", "timeout"):
        assert _event(kind=kind)["data"]["expires_at"] is None


# The event schema's shape (types, names, required, enums; not its prose) as of its version:
# a change to the shape must change SCHEMA_VERSION (and with it $id and dataschema).
SHAPES = {2: "59494fe9480a"}


def _shape(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in sorted(node.items()) if k not in ("description", "$id")}
    if isinstance(node, list):
        return [_shape(v) for v in node]
    return node


def test_a_change_to_the_event_shape_changes_the_schema_version() -> None:
    import hashlib

    schema = json.loads(SCHEMA.read_text())
    assert schema["$id"] == SCHEMA_ID and SCHEMA_ID.endswith(f"/v{SCHEMA_VERSION}.json")
    digest = hashlib.sha256(json.dumps(_shape(schema), sort_keys=True).encode()).hexdigest()
    assert digest[:12] == SHAPES.get(SCHEMA_VERSION), (
        f"bridge/schemas/event.schema.json changed shape ({digest[:12]}): raise"
        " bridge.core.events.SCHEMA_VERSION and record the new shape here"
    )


# --- the CloudEvents Kafka protocol binding ------------------------------------------------

# What a producer upstream may have put on the task record: CloudEvents headers of its own
# (any case), a content-type, a null value and bytes that are not UTF-8.
INPUT_HEADERS: tuple[tuple[str, bytes | None], ...] = (
    ("ce_specversion", b"1.0"),
    ("ce_source", b"urn:upstream"),
    ("CE_Time", b"2020-01-01T00:00:00Z"),
    ("ce_id", b"upstream-1"),
    ("ce_type", b"com.example.submitted"),
    ("Content-Type", b"text/plain"),
    ("trace", b"abc"),
    ("nothing", None),
    ("raw", b"\xff\xfe"),
)
CARRIED = [("trace", b"abc"), ("nothing", None), ("raw", b"\xff\xfe")]
# The SDKs decode every header of a binary-mode record (2.x) or of any record (1.x's
# structured parser) as UTF-8: a header that is not makes them fail, whatever the bridge does.
UTF8_INPUT = INPUT_HEADERS[:-1]


def _sdk_headers(headers: list[tuple[str, bytes | None]]) -> dict[str, bytes]:
    # The SDKs' KafkaMessage takes str -> bytes; a null header has no place in it.
    return {k: v for k, v in headers if v is not None}


def test_structured_record_drops_every_binding_header_of_the_input() -> None:
    event = _event()
    rec = event_record("out", event, INPUT_HEADERS)
    assert rec.headers == [*CARRIED, ("content-type", CONTENT_TYPE)]
    # The official SDK's mode detection reads any ce_* header as binary mode: it must
    # find none, and get the event back.
    assert rec.value is not None
    message = kafka.KafkaMessage(headers=_sdk_headers(rec.headers), key=rec.key, value=rec.value)
    parsed = kafka.from_kafka_event(message)
    assert parsed.get_id() == "e-1" and parsed.get_type() == event["type"]
    assert parsed.get_source() == "urn:test" and parsed.get_data() == event["data"]


def test_binary_record_puts_attributes_in_headers_and_data_in_the_value() -> None:
    event = _event()
    rec = event_record("out", event, UTF8_INPUT, "binary")
    assert rec.key == b"pred_1"
    assert rec.headers == [
        *CARRIED[:-1],
        ("ce_specversion", b"1.0"),
        ("ce_id", b"e-1"),
        ("ce_source", b"urn:test"),
        ("ce_type", b"ai.wavespeed.prediction.completed"),
        ("ce_subject", b"pred_1"),
        ("ce_time", b"2024-01-01T12:00:03.500Z"),
        ("ce_dataschema", DEFAULT_DATASCHEMA.encode()),
        ("content-type", b"application/json"),
    ]
    assert rec.value is not None and json.loads(rec.value) == event["data"]
    message = kafka.KafkaMessage(headers=_sdk_headers(rec.headers), key=rec.key, value=rec.value)
    for parsed in (kafka.from_kafka_event(message), kafka.from_binary_event(message)):
        assert parsed.get_id() == "e-1" and parsed.get_subject() == "pred_1"
        assert parsed.get_type() == event["type"] and parsed.get_source() == "urn:test"
        assert parsed.get_datacontenttype() == "application/json"
        assert parsed.get_data() == event["data"]
    # The 1.x API (cloudevents.kafka in 1.13, cloudevents.v1.kafka in 2.x) agrees.
    legacy = v1_kafka.from_binary(
        v1_kafka.KafkaMessage(_sdk_headers(rec.headers), rec.key, rec.value)
    )
    assert legacy["id"] == "e-1" and legacy["type"] == event["type"]
    assert legacy.get_data() == event["data"]


def test_both_modes_carry_the_same_attributes() -> None:
    event = _event(kind="failed", prediction=None, reason="unknown or expired task (HTTP 404)")
    structured = event_record("out", event, ())
    binary = event_record("out", event, (), "binary")
    fields = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype")

    def attributes(rec: OutputRecord) -> dict[str, Any]:
        assert rec.value is not None
        message = kafka.KafkaMessage(
            headers=_sdk_headers(rec.headers), key=rec.key, value=rec.value
        )
        parsed = kafka.from_kafka_event(message).get_attributes()
        time = parsed["time"]
        parsed["time"] = time.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {k: parsed[k] for k in fields}

    assert attributes(structured) == attributes(binary) == {k: event[k] for k in fields}


def test_event_id_is_a_name_based_uuid_of_source_task_and_type() -> None:
    args: dict[str, Any] = {"event_id": None}
    first = _event(**args)
    again = _event(**args, observed_at=1704110999.0, polls=9, origins=[("in", 0, 7)])
    assert first["id"] == again["id"]  # a re-published outcome is a duplicate by id
    assert first["id"] == str(
        uuid.uuid5(uuid.NAMESPACE_URL, "urn:test#pred_1#ai.wavespeed.prediction.completed")
    )
    assert uuid.UUID(first["id"]).version == 5
    others = {
        _event(**args, kind="failed")["id"],
        _event(**args, kind="timeout")["id"],
        _event(**args, task_id="pred_2")["id"],
        _event(**args, source="urn:other")["id"],
    }
    assert len(others) == 4 and first["id"] not in others


def test_null_header_values_are_carried_as_null() -> None:
    headers: tuple[tuple[str, bytes | None], ...] = (("a", None), ("b", b""), ("c", b"x"))
    assert event_record("out", _event(), headers).headers[:3] == list(headers)
    dlq = dead_letter_record(
        topic="dlq",
        source_topic="in",
        partition=0,
        offset=1,
        key=None,
        value=b"?",
        headers=headers,
        reason="invalid_id",
        detail="d",
        max_value_bytes=100,
    )
    assert dlq.headers[:3] == list(headers)


def test_to_record_keeps_null_header_values() -> None:
    msg: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic="in",
        partition=2,
        offset=5,
        timestamp=1704110400000,
        timestamp_type=0,
        key=b"k",
        value=b"pred_1",
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=6,
        headers=[("a", None), ("b", b""), ("c", b"\xff")],
    )
    rec = to_record(msg)
    assert rec.headers == (("a", None), ("b", b""), ("c", b"\xff"))
    assert rec.timestamp_ms == 1704110400000 and rec.key == b"k"


@pytest.mark.parametrize("status", ["failed", "cancelled", "timeout", "deleted"])
def test_failed_event_keeps_the_status_the_api_reported(status: str) -> None:
    prediction = Prediction(id="pred_1", model="m", status=status, error=None)
    e = _event(kind="failed", prediction=prediction, reason=f"the API says {status}")
    assert e["type"] == "ai.wavespeed.prediction.failed"
    assert e["data"]["status"] == status and e["data"]["error"] == f"the API says {status}"
    assert e["data"]["outputs"] == []
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator(schema).validate(e)


def test_a_404_after_pending_polls_is_reported_as_failed() -> None:
    pending = Prediction(id="pred_1", status="processing")
    e = _event(kind="failed", prediction=pending, reason="unknown or expired task (HTTP 404)")
    assert e["data"]["status"] == "failed"
    assert e["data"]["error"] == "unknown or expired task (HTTP 404)"
