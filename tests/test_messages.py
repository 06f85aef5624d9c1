from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from bridge.core.messages import (
    TASK_ID_PATTERN,
    Rejected,
    TaskRequest,
    parse_task,
    parse_timestamp,
    task_path,
)
from bridge.edges.metrics import DEAD_LETTER_REASONS, Metrics


def parse(value: bytes | None) -> TaskRequest | Rejected:
    return parse_task(value, max_bytes=1000, max_timeout_s=3600)


def test_bare_id() -> None:
    assert parse(b"pred_abc123") == TaskRequest(task_id="pred_abc123")
    assert parse(b"  pred_abc123\n") == TaskRequest(task_id="pred_abc123")


def test_json_object_with_everything() -> None:
    value = json.dumps(
        {
            "id": "abc",
            "model": "wavespeed-ai/flux-dev",
            "timeout_s": 60,
            "created_at": "2024-01-01T12:00:00.000Z",
            "metadata": {"user": 7},
            "extra": "ignored",
        }
    ).encode()
    got = parse(value)
    assert got == TaskRequest(
        task_id="abc",
        model="wavespeed-ai/flux-dev",
        timeout_s=60.0,
        created_at=1704110400.0,
        metadata={"user": 7},
    )


def test_task_id_alias_and_forwarded_submit_envelope() -> None:
    assert parse(b'{"task_id": "t1"}') == TaskRequest(task_id="t1")
    envelope = {
        "code": 200,
        "message": "success",
        "data": {"id": "t2", "model": "m", "status": "created"},
    }
    assert parse(json.dumps(envelope).encode()) == TaskRequest(task_id="t2", model="m")
    assert parse(b'"t3"') == TaskRequest(task_id="t3")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b"\xff\xfe", "not_utf8"),
        (b"x" * 1001, "oversize"),
        (b"{", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"model": "m"}', "missing_id"),
        (b'{"id": 5}', "missing_id"),
        (b"../balance", "invalid_id"),
        (b"x?y=1", "invalid_id"),
        (b"a/b", "invalid_id"),
        (b"a b", "invalid_id"),
        (b"%2e%2e", "invalid_id"),
        (b"_leading", "invalid_id"),
        (b"a" * 129, "invalid_id"),
        (b'{"id": "../x"}', "invalid_id"),
        (b'{"id": "ok", "timeout_s": -1}', "invalid_field"),
        (b'{"id": "ok", "timeout_s": 99999}', "invalid_field"),
        (b'{"id": "ok", "timeout_s": true}', "invalid_field"),
        (b'{"id": "ok", "timeout_s": NaN}', "invalid_field"),
        (b'{"id": "ok", "metadata": [1]}', "invalid_field"),
        (b'{"id": "ok", "model": 3}', "invalid_field"),
    ],
)
def test_rejections(value: bytes | None, reason: str) -> None:
    got = parse(value)
    assert isinstance(got, Rejected)
    assert got.reason == reason


def test_deeply_nested_json_is_rejected_not_crashing() -> None:
    got = parse_task(b"{" + b'"a":[' * 50_000, max_bytes=10**6, max_timeout_s=1)
    assert isinstance(got, Rejected) and got.reason == "invalid_json"


@given(st.from_regex(TASK_ID_PATTERN, fullmatch=True))
def test_a_valid_task_id_is_its_own_percent_encoding(task_id: str) -> None:
    assert quote(task_id, safe="") == task_id
    assert task_path("/p/{id}", task_id) == "/p/" + quote(task_id, safe="")


def test_task_path_refuses_what_is_not_a_task_id() -> None:
    assert task_path("/api/v3/predictions/{id}", "pred_1") == "/api/v3/predictions/pred_1"
    assert task_path("/api/v3/predictions/{id}/result", "a-b") == "/api/v3/predictions/a-b/result"
    for bad in ("../balance", "x?y=1", "a/b", ""):
        with pytest.raises(ValueError):
            task_path("/api/v3/predictions/{id}", bad)


def test_parse_timestamp() -> None:
    assert parse_timestamp("2024-01-01T12:00:00.000Z") == 1704110400.0
    assert parse_timestamp("2024-01-01T12:00:00+00:00") == 1704110400.0
    assert parse_timestamp(1704110400) == 1704110400.0
    for bad in ("2024-01-01T12:00:00", "yesterday", "", True, None, float("nan"), -5, [1]):
        assert parse_timestamp(bad) is None


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"\xff\xfe",
        b"x" * 5000,
        b"../balance",
        b"{not json",
        b"[1]",
        b'{"model": "m"}',
        b'{"id": "a", "metadata": 3}',
        b'{"id": "a", "timeout_s": -1}',
    ],
)
def test_every_rejection_reason_is_exported_from_the_start(value: bytes | None) -> None:
    rejected = parse_task(value, max_bytes=4096, max_timeout_s=600)
    assert isinstance(rejected, Rejected)
    assert rejected.reason in DEAD_LETTER_REASONS
    exposition = generate_latest(Metrics().registry).decode()
    assert f'wavespeed_bridge_dead_letters_total{{reason="{rejected.reason}"}} 0.0' in exposition
