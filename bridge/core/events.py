"""Output events (CloudEvents 1.0 over the Kafka protocol binding) and dead-letter records. Pure.

Two content modes of the binding: ``structured`` (the whole event as one JSON object,
``content-type: application/cloudevents+json``) and ``binary`` (attributes as ``ce_*``
headers, ``content-type: application/json``, the event's ``data`` as the value). The schema
of the structured event is ``bridge/schemas/event.schema.json``; in binary mode the value
follows its ``data`` part.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
import uuid
from typing import Any, Literal

from bridge.core import jsoncodec, tracecontext
from bridge.core.messages import Headers, safe_text
from bridge.core.outcomes import FAILED_STATUSES, Prediction
from bridge.core.tracecontext import Trace
from bridge.core.value import value

EventType = Literal["completed", "failed", "timeout"]
EventMode = Literal["structured", "binary"]
TYPE_PREFIX = "ai.wavespeed.prediction."
CONTENT_TYPE = b"application/cloudevents+json; charset=utf-8"
DATA_CONTENT_TYPE = "application/json"
# The event schema's version: part of its $id, so a subscriber (or a registry) can tell two
# shapes apart. A change to the shape changes it (tests/test_events.py holds a fingerprint).
SCHEMA_VERSION = 2
SCHEMA_ID = f"https://wavespeed-bridge.github.io/schemas/prediction-event/v{SCHEMA_VERSION}.json"
# The schema of ``data`` alone (its $anchor): what CloudEvents' dataschema identifies.
DEFAULT_DATASCHEMA = SCHEMA_ID + "#data"
# Context attributes written as ce_* headers in binary mode (datacontenttype is content-type).
BINARY_ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time", "dataschema")
TRACE_ATTRIBUTES = ("traceparent", "tracestate")


@value
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes
_VARIANT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}  # a hex digit, as 10xx


def outcome_id(source: str, task_id: str, event_type: str) -> str:
    """The same for every event reporting this task's outcome: a re-published event is a
    duplicate by CloudEvents' rule (same ``source`` + ``id``). Task ids and types hold no
    ``#``, so the name is unambiguous whatever the source.

    ``uuid.uuid5(NAMESPACE_URL, name)`` written out (tests check they agree): building a
    ``UUID`` object to print it cost three times the hash, once per event.
    """
    name = f"{source}#{task_id}#{event_type}".encode()
    h = hashlib.sha1(_URL_NAMESPACE + name, usedforsecurity=False).hexdigest()
    # Version 5 in the 13th digit, the RFC 4122 variant in the top bits of the 17th.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


# The range RFC 3339 (four-digit years) and ``datetime`` can write.
_FIRST_UNIX = 0.0
_LAST_UNIX = 253402300799.999
_MAX_DEPTH = 64
# The seconds' text of recent calls: an event writes its observation time (the same second
# as the one before it, mostly) and its outputs' expiry (a week after its creation).
_SECONDS: dict[int, str] = {}
_MAX_SECONDS = 4096


def rfc3339(unix: float) -> str:
    """Unix seconds as ``2024-01-01T12:00:00.000Z``; clamped to 1970..9999 (NaN: the epoch).

    What ``datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")`` writes
    (the same rounding to microseconds; tests check they agree), the seconds' text kept.
    """
    if not _FIRST_UNIX <= unix <= _LAST_UNIX:  # also true for NaN
        unix = _LAST_UNIX if unix > _LAST_UNIX else _FIRST_UNIX
    frac, whole = math.modf(unix)
    us = round(frac * 1e6)
    second = int(whole)
    if us >= 1_000_000:
        second, us = second + 1, us - 1_000_000
    text = _SECONDS.get(second)
    if text is None:
        if len(_SECONDS) >= _MAX_SECONDS:
            _SECONDS.clear()
        text = _SECONDS[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{text}.{us // 1000:03d}Z"


def _rfc3339_or_none(unix: float | None) -> str | None:
    """A time that came from outside (input or API): None unless it is a plausible one."""
    if unix is None or not _FIRST_UNIX < unix <= _LAST_UNIX:
        return None
    return rfc3339(unix)


def _text_or_b64(raw: bytes | None) -> dict[str, str] | None:
    if raw is None:
        return None
    try:
        return {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode("ascii")}


def build_event(
    *,
    kind: EventType,
    task_id: str,
    model: str | None,
    prediction: Prediction | None,
    reason: str | None,
    created_at: float | None,
    observed_at: float,
    polls: int,
    metadata: dict[str, Any] | None,
    source: str,
    input_key: bytes | None,
    origins: list[tuple[str, int, int]],
    event_id: str | None = None,
    trace: Trace | None = None,
    dataschema: str = DEFAULT_DATASCHEMA,
    retention_s: float = 7 * 86_400.0,
) -> dict[str, Any]:
    """The CloudEvent for a task that reached ``kind``; ``*_at`` are unix seconds.

    ``retention_s``: how long after its creation WaveSpeed keeps a prediction's outputs; a
    completed event says when they go (``expires_at``), from the API's ``created_at`` or,
    without one, the bridge's estimate of it.
    """
    p = prediction or Prediction()
    observed = rfc3339(observed_at)
    # A failure keeps the status the API reported (cancelled, timeout, deleted, failed).
    status = p.status if kind == "failed" and p.status in FAILED_STATUSES else kind
    created = p.created_at if p.created_at is not None else created_at
    expires = None
    if kind == "completed" and created is not None:
        expires = _rfc3339_or_none(created + retention_s)
    data: dict[str, Any] = {
        "task_id": task_id,
        "model": p.model or model,
        "status": status,
        "outputs": p.outputs if kind == "completed" else [],
        "error": None if kind == "completed" else (p.error or reason or kind),
        "inference_time_s": p.inference_ms / 1000.0 if p.inference_ms is not None else None,
        "has_nsfw_contents": p.has_nsfw_contents,
        "created_at": p.created_at_raw or _rfc3339_or_none(created_at),
        "observed_at": observed,
        "expires_at": expires,
        "polls": polls,
        "metadata": metadata,
        "input": {
            "key": _text_or_b64(input_key),
            "records": [{"topic": t, "partition": pa, "offset": o} for t, pa, o in origins],
        },
    }
    event_type = TYPE_PREFIX + kind
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id or outcome_id(source, task_id, event_type),
        "source": source,
        "type": event_type,
        "subject": task_id,
        "time": observed,
        "datacontenttype": DATA_CONTENT_TYPE,
        "dataschema": dataschema,
    }
    if trace is not None:  # the distributed-tracing extension: the trace the task started
        event["traceparent"] = tracecontext.traceparent(trace)
        if state := tracecontext.tracestate(trace):
            event["tracestate"] = state
    event["data"] = data
    return event


def encode(obj: dict[str, Any]) -> bytes:
    """Strict JSON (RFC 8259) in UTF-8, whatever the values: an event that cannot be written
    would strand its task. Lone surrogates become U+FFFD, NaN and infinities null, and
    nesting past a limit a marker string; the fast path pays for none of that."""
    try:
        return jsoncodec.dumps(obj)
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return jsoncodec.dumps(_strict(obj, 0))


def _strict(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict | list | tuple) and depth >= _MAX_DEPTH:
        return "[nested too deep]"
    if isinstance(value, dict):
        return {safe_text(str(k)): _strict(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v, depth + 1) for v in value]
    return value


def _binding_header(name: str) -> bool:
    """Headers the CloudEvents Kafka binding reads: ``ce_*`` attributes and content-type."""
    lower = name.lower()
    return lower.startswith("ce_") or lower == "content-type"


def carried_headers(headers: Headers, keep_binary: bool) -> tuple[Headers, int]:
    """The input's headers an event may carry, and how many were left out: a value that is
    not UTF-8 text breaks the official CloudEvents SDK, which decodes every header (the
    1.x API and the 2.x binding), so such a header is dropped unless ``keep_binary``. A null
    value stays null. Dead letters keep every header as it came."""
    if keep_binary:
        return headers, 0
    kept = tuple((k, v) for k, v in headers if v is None or _text(v))
    return kept, len(headers) - len(kept)


def _text(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def event_record(
    topic: str, event: dict[str, Any], headers: Headers, mode: EventMode = "structured"
) -> OutputRecord:
    """The Kafka record for ``event``, carrying the input's headers.

    Input headers the binding reads are dropped whatever their case: a ``ce_*`` header next
    to a structured event makes SDKs read it as binary mode, and in binary mode it would
    override one of this event's attributes.
    """
    carried: list[tuple[str, bytes | None]] = [(k, v) for k, v in headers if not _binding_header(k)]
    key = event["subject"].encode("utf-8")
    if mode == "binary":
        for name in BINARY_ATTRIBUTES:
            carried.append((f"ce_{name}", str(event[name]).encode("utf-8")))
        for name in TRACE_ATTRIBUTES:
            if name in event:
                carried.append((f"ce_{name}", event[name].encode("ascii")))
        carried.append(("content-type", event["datacontenttype"].encode("utf-8")))
        return OutputRecord(topic=topic, key=key, value=encode(event["data"]), headers=carried)
    carried.append(("content-type", CONTENT_TYPE))
    return OutputRecord(topic=topic, key=key, value=encode(event), headers=carried)


def dead_letter_record(
    *,
    topic: str,
    source_topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    reason: str,
    detail: str,
    max_value_bytes: int,
) -> OutputRecord:
    """Kafka Connect style: the original key, value and headers, plus why and where from.

    A value over ``max_value_bytes`` (the oversize case) keeps its first ``max_value_bytes``
    and says so in ``dlq.value_truncated``: the record must still fit the producer's limit.
    A record with neither key nor value (legal in Kafka) gets an empty key: aiokafka's
    producer refuses to send one with neither, which would strand the input's offset.
    """
    if key is None and value is None:
        key = b""
    extra = [
        ("dlq.reason", reason.encode()),
        ("dlq.detail", detail.encode("utf-8", "replace")),
        ("dlq.topic", source_topic.encode("utf-8", "replace")),
        ("dlq.partition", str(partition).encode()),
        ("dlq.offset", str(offset).encode()),
    ]
    if value is not None and len(value) > max_value_bytes:
        extra.append(("dlq.value_truncated", str(len(value)).encode()))
        value = value[:max_value_bytes]
    return OutputRecord(topic=topic, key=key, value=value, headers=[*headers, *extra])
