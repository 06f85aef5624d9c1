"""Input messages: parse a Kafka record's value into a task request, or say why not.

Pure. Accepted values:

- a bare task id: ``pred_abc123``;
- a JSON object with ``id`` (or ``task_id``) and optional ``model``, ``timeout_s``,
  ``created_at`` and a free-form ``metadata`` object. Unknown keys are ignored, so the
  ``data`` object of WaveSpeed's submit response (or the whole envelope) can be forwarded
  as is.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from bridge.core import jsoncodec
from bridge.core.value import value

MAX_TASK_ID_LENGTH = 128
# Conservative on purpose: no '/', '?', '#', '%', '.' or spaces can reach a URL path.
TASK_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"
_TASK_ID = re.compile(TASK_ID_PATTERN)
MAX_MODEL_LENGTH = 200
# Every Rejected.reason a dead letter can carry (its dlq.reason header): the parser's, and
# "undecodable" for a record the Kafka client could not decode (book.Core.on_undecodable).
DEAD_LETTER_REASONS = (
    "empty",
    "oversize",
    "not_utf8",
    "invalid_id",
    "invalid_json",
    "missing_id",
    "invalid_field",
    "undecodable",
)


# Kafka header values may be null (librdkafka and aiokafka keep None); carried as they came.
Headers = tuple[tuple[str, bytes | None], ...]


@value
class Record:
    """A consumed Kafka record, reduced to what the bridge needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None


@value
class TaskRequest:
    task_id: str
    model: str | None = None
    timeout_s: float | None = None
    created_at: float | None = None  # unix seconds, when the producer knew it
    metadata: dict[str, Any] | None = None
    tenant: object = None  # what the JSON input had at tenants.key's field, if asked


@value
class Rejected:
    reason: str  # a short machine-friendly code
    detail: str


def valid_task_id(task_id: str) -> bool:
    return _TASK_ID.fullmatch(task_id) is not None


def task_path(template: str, task_id: str) -> str:
    """The result path for ``task_id``, refused unless it is a valid id. A valid id holds
    only characters RFC 3986 leaves unreserved, so it is its own percent-encoding
    (``tests/test_messages.py`` checks ``quote`` agrees): ~0.4 µs a poll saved."""
    if not valid_task_id(task_id):
        raise ValueError("invalid task id")
    return template.replace("{id}", task_id)


# What RFC 3339 can write: after the epoch, before the year 10000.
_LAST_UNIX = 253402300799.999
_MAX_METADATA_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float; None for bools, non-numbers, NaN, infinities and ints too
    large for a float (JSON allows ``1`` followed by 4000 zeros)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def safe_text(text: str) -> str:
    """``text`` with lone surrogates (a JSON ``"\\ud800"`` escape decodes to one) replaced by
    U+FFFD, so that it can be encoded as UTF-8."""
    if text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def parse_timestamp(value: Any) -> float | None:
    """ISO-8601 (``2024-01-01T12:00:00.000Z``) or unix seconds → unix seconds, else None.

    Only times after the epoch and before the year 10000 count: anything else is garbage, and
    could not be written back as RFC 3339.
    """
    if isinstance(value, int | float):
        number = finite_number(value)
        return number if number is not None and 0 < number <= _LAST_UNIX else None
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None  # WaveSpeed always sends UTC with a zone; refuse to guess
    try:
        unix = parsed.timestamp()
    except (OverflowError, ValueError):
        return None
    return unix if 0 < unix <= _LAST_UNIX else None


def _json_problem(value: Any) -> str | None:
    """Why ``value`` (decoded JSON) could not be written back as strict JSON, or None.

    Python's decoder accepts ``NaN``/``Infinity`` and lone surrogate escapes; neither can go
    into an event that consumers in other languages must read. Deep nesting is refused too:
    the event puts the value a few levels deeper than it arrived.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_METADATA_DEPTH:
            return f"nested deeper than {_MAX_METADATA_DEPTH} levels"
        if isinstance(item, str):
            if safe_text(item) != item:
                return "contains a lone surrogate escape"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "contains NaN or Infinity"
        elif isinstance(item, dict):
            stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return None


def parse_task(
    value: bytes | None,
    *,
    max_bytes: int,
    max_timeout_s: float,
    tenant_field: tuple[str, ...] | None = None,
) -> TaskRequest | Rejected:
    """The task a record asks for, or why not; ``tenant_field``: where the tenant is in a
    JSON input (its value, unchecked, is the request's ``tenant``)."""
    if value is None:
        return Rejected("empty", "message has no value (tombstone)")
    if len(value) > max_bytes:
        return Rejected("oversize", f"value is {len(value)} bytes, limit {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("not_utf8", f"value is not UTF-8 (byte {exc.start})")
    stripped = text.strip()
    if not stripped:
        return Rejected("empty", "value is empty")
    if stripped[0] in '{["':
        return _parse_json(stripped, max_timeout_s, tenant_field)
    return _check_id(stripped) or TaskRequest(task_id=stripped)


def _check_id(task_id: str) -> Rejected | None:
    if len(task_id) > MAX_TASK_ID_LENGTH:
        return Rejected("invalid_id", f"task id longer than {MAX_TASK_ID_LENGTH} characters")
    if not valid_task_id(task_id):
        return Rejected(
            "invalid_id",
            "task id must match [A-Za-z0-9][A-Za-z0-9_-]* (got a disallowed character)",
        )
    return None


def _parse_json(
    text: str, max_timeout_s: float, tenant_field: tuple[str, ...] | None
) -> TaskRequest | Rejected:
    try:
        obj = jsoncodec.loads(text)
    except (ValueError, RecursionError) as exc:
        return Rejected("invalid_json", f"not valid JSON: {str(exc)[:120]}")
    if isinstance(obj, str):
        return _check_id(obj) or TaskRequest(task_id=obj)
    if not isinstance(obj, dict):
        return Rejected("invalid_json", "JSON value must be an object or a string")
    if "id" not in obj and "task_id" not in obj and isinstance(obj.get("data"), dict):
        obj = obj["data"]  # a forwarded submit-response envelope
    task_id = obj.get("id", obj.get("task_id"))
    if not isinstance(task_id, str):
        return Rejected("missing_id", "object has no string 'id' or 'task_id'")
    if problem := _check_id(task_id):
        return problem
    model = obj.get("model")
    if model is not None and (
        not isinstance(model, str) or len(model) > MAX_MODEL_LENGTH or safe_text(model) != model
    ):
        return Rejected(
            "invalid_field",
            f"'model' must be a string of at most {MAX_MODEL_LENGTH} characters"
            " (no lone surrogates)",
        )
    raw_timeout = obj.get("timeout_s")
    timeout = None
    if raw_timeout is not None:
        timeout = finite_number(raw_timeout)
        if timeout is None or not 0 < timeout <= max_timeout_s:
            return Rejected(
                "invalid_field", f"'timeout_s' must be a number in (0, {max_timeout_s}]"
            )
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        return Rejected("invalid_field", "'metadata' must be an object")
    if metadata is not None and (why := _json_problem(metadata)):
        return Rejected("invalid_field", f"'metadata' {why}")
    return TaskRequest(
        task_id=task_id,
        model=model or None,
        timeout_s=timeout,
        created_at=parse_timestamp(obj.get("created_at")),
        metadata=metadata,
        tenant=_field(obj, tenant_field) if tenant_field else None,
    )


def _field(obj: dict[str, Any], path: tuple[str, ...]) -> object:
    node: object = obj
    for name in path:
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    return node
