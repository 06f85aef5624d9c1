"""The JSON codec gives the same answers with orjson and with the standard library: orjson
only makes them cheaper (bench/results/cost.md), and the bridge runs the same without it."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core import events, jsoncodec
from bridge.core.messages import parse_task
from bridge.core.outcomes import interpret

pytest.importorskip("orjson")  # the dev extra brings it: both backends are compared here


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    yield
    jsoncodec.use(None)


def both(fn: Any, *args: Any) -> tuple[Any, Any]:
    jsoncodec.use("stdlib")
    try:
        slow: Any = fn(*args)
    except Exception as exc:  # compared by type: the same failure either way
        slow = type(exc)
    assert jsoncodec.use(None) == "orjson"
    try:
        fast: Any = fn(*args)
    except Exception as exc:
        fast = type(exc)
    return slow, fast


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(alphabet=st.characters(codec=None)),  # lone surrogates included
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_events_encode_the_same_bytes_either_way(value: Any) -> None:
    slow, fast = both(events.encode, {"data": value})
    assert json.loads(slow) == json.loads(fast)  # NaN and inf: null; surrogates: U+FFFD
    if not _has_float(value):  # float text may differ (1e16 vs 1e+16), never its value
        assert slow == fast


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),  # NaN, big ints, "\\ud800" escapes
        st.binary(max_size=40),
        st.sampled_from([b'{"a": NaN}', b'"\\ud800"', b"1" * 30, b'{"a":1,"a":2}', b"[1,]"]),
    )
)
def test_what_the_parsers_make_of_any_bytes_is_the_same(raw: bytes) -> None:
    slow, fast = both(lambda: repr(parse_task(raw, max_bytes=10_000, max_timeout_s=60.0)))
    assert slow == fast
    body = b'{"code":200,"data":' + raw + b"}"
    slow, fast = both(lambda: repr(interpret(200, None, body, 0.0)))
    assert slow == fast


def test_without_orjson_the_stdlib_is_used() -> None:
    assert jsoncodec.use("stdlib") == "stdlib" and jsoncodec.backend_in_use() == "stdlib"
    assert jsoncodec.loads(b'{"a": NaN}')["a"] != 0  # the standard library's own answer
    assert math.isnan(jsoncodec.loads(b'{"a": NaN}')["a"])
    assert jsoncodec.use(None) == "orjson"
    assert math.isnan(jsoncodec.loads(b'{"a": NaN}')["a"])  # orjson refuses; stdlib decides


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 2**38).map(float))
def test_rfc3339_writes_what_datetime_writes(unix: float) -> None:
    clamped = unix if 0.0 <= unix <= events._LAST_UNIX else None
    if clamped is None:
        clamped = events._LAST_UNIX if unix > events._LAST_UNIX else 0.0
    expected = datetime.fromtimestamp(clamped, UTC).isoformat(timespec="milliseconds")
    assert events.rfc3339(unix) == expected.replace("+00:00", "Z")


@given(st.text(max_size=40), st.text(max_size=40), st.sampled_from(["completed", "failed"]))
def test_outcome_id_is_uuid5(source: str, task_id: str, kind: str) -> None:
    try:
        name = f"{source}#{task_id}#{kind}"
        expected = str(uuid.uuid5(uuid.NAMESPACE_URL, name))
    except UnicodeEncodeError:  # a lone surrogate: neither can hash it
        with pytest.raises(UnicodeEncodeError):
            events.outcome_id(source, task_id, kind)
        return
    assert events.outcome_id(source, task_id, kind) == expected


def test_the_bridge_runs_without_the_fast_extra_installed() -> None:
    """An interpreter where ``import orjson`` and ``import murmurhash2`` fail (the ``fast``
    extra missing): the codec, events and logs still work, and the producer's partitioner
    falls back to aiokafka's with the same answers."""
    import subprocess
    import sys

    script = """
import io, sys
sys.modules["orjson"] = sys.modules["murmurhash2"] = None  # a missing package, to import
from aiokafka.partitioner import DefaultPartitioner
from bridge.core import events, jsoncodec
from bridge.edges import kafka, logs
partitioner = kafka.KeyPartitioner()
assert not partitioner.fast
parts = [0, 1, 2, 3, 4]
for n in range(200):
    key = bytes(range(n % 256))[:n]
    assert partitioner(key, parts, parts) == DefaultPartitioner()(key, parts, parts)
import structlog
assert jsoncodec.backend_in_use() == "stdlib" and jsoncodec.use(None) == "stdlib"
out = io.StringIO()
logs.configure(fmt="json", secrets=["s3cret-value"], stream=out)
structlog.get_logger("t").info("hello", key="s3cret-value")
logs.flush()
assert '"key":"[REDACTED]"' in out.getvalue().replace(" ", ""), out.getvalue()
print(events.encode({"a": float("nan"), "b": "\\ud800"}).decode("utf-8"))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"a": None, "b": "\ufffd"}
