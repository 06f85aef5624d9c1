"""Webhook verification, the replay window and delivery bodies (issue 13): pure, no I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.outcomes import Kind
from bridge.core.webhook_signature import (
    Accepted,
    BadDelivery,
    Delivery,
    Rejected,
    ReplayGuard,
    parse_delivery,
    parse_headers,
    sign,
    signed_headers,
    signing_key,
    verify,
)

# A vector computed with OpenSSL, not with this code:
#   printf '%s' 'msg_2Lh7.1758798328.{"id":"pred_abc123","status":"completed"}' \
#     | openssl dgst -sha256 -hmac 'c2VjcmV0LWtleS1ub3QtYmFzZTY0'
# The secret's remainder is itself valid base64 ("secret-key-not-base64"): WaveSpeed's docs
# say to use the string as it is, so the base64-decoded key must NOT verify.
SECRET = "whsec_c2VjcmV0LWtleS1ub3QtYmFzZTY0"
WEBHOOK_ID = "msg_2Lh7"
TS = 1758798328
BODY = b'{"id":"pred_abc123","status":"completed"}'
EXPECTED_HEX = "2c17484b3701a571b564af5e2ef9fe11cc6a6882ff14663fba524eb7b2dea201"
# The same content under the base64-decoded key (Standard Webhooks' convention), by OpenSSL.
DECODED_KEY_HEX = "aa4d430905647dbf5805d86052f510b2a7f172d304ed802437a7393accc99acd"


def headers(signature: str | None = None, **overrides: str | None) -> dict[str, str]:
    h: dict[str, str | None] = {
        "webhook-id": WEBHOOK_ID,
        "webhook-timestamp": str(TS),
        "webhook-signature": signature if signature is not None else f"v3,{EXPECTED_HEX}",
    }
    h.update(overrides)
    return {k: v for k, v in h.items() if v is not None}


def reason(verdict: object) -> str:
    assert isinstance(verdict, Rejected), verdict
    return verdict.reason


def test_sign_matches_an_independent_vector() -> None:
    assert sign(SECRET, WEBHOOK_ID, TS, BODY) == f"v3,{EXPECTED_HEX}"
    assert signed_headers(SECRET, WEBHOOK_ID, TS, BODY) == headers()
    assert verify(headers(), BODY, SECRET, now=TS + 1) == Accepted(WEBHOOK_ID, TS)


def test_the_key_is_the_remaining_string_not_base64_decoded() -> None:
    assert signing_key(SECRET) == b"c2VjcmV0LWtleS1ub3QtYmFzZTY0"
    decoded = base64.b64decode(SECRET.removeprefix("whsec_"))
    content = f"{WEBHOOK_ID}.{TS}.".encode() + BODY
    assert hmac.new(decoded, content, hashlib.sha256).hexdigest() == DECODED_KEY_HEX
    assert reason(verify(headers(f"v3,{DECODED_KEY_HEX}"), BODY, SECRET, now=TS)) == (
        "bad_signature"
    )
    # A secret given without its prefix is the same key.
    assert verify(headers(), BODY, SECRET.removeprefix("whsec_"), now=TS) == Accepted(
        WEBHOOK_ID, TS
    )


def test_an_empty_secret_never_verifies() -> None:
    for secret in ("", "whsec_", "  "):
        with pytest.raises(ValueError, match="empty"):
            verify(headers(), BODY, secret, now=TS)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"webhook-signature": None}, "unsigned"),
        ({"webhook-signature": "   "}, "unsigned"),
        ({"webhook-id": None}, "malformed"),
        ({"webhook-timestamp": None}, "malformed"),
        ({"webhook-timestamp": "1758798328.5"}, "malformed"),
        ({"webhook-timestamp": "-1"}, "malformed"),
        ({"webhook-timestamp": "١٧٥٨٧٩٨٣٢٨"}, "malformed"),  # Arabic-Indic digits
        ({"webhook-timestamp": "9" * 13}, "malformed"),
        ({"webhook-id": "has space"}, "malformed"),
        ({"webhook-id": "x" * 257}, "malformed"),
        ({"webhook-id": "line\nbreak"}, "malformed"),
        ({"webhook-signature": "nocomma"}, "malformed"),
        ({"webhook-signature": "v3,"}, "malformed"),
        ({"webhook-signature": " ".join(["v3,aa"] * 9)}, "malformed"),
        ({"webhook-signature": "v3," + "a" * 2000}, "malformed"),
        ({"webhook-signature": f"v1,{EXPECTED_HEX}"}, "bad_signature"),
        ({"webhook-signature": "v3,not-hex"}, "bad_signature"),
        ({"webhook-signature": f"v3,{EXPECTED_HEX[:-2]}"}, "bad_signature"),
        ({"webhook-signature": f"v3,{'0' * 64}"}, "bad_signature"),
        ({"webhook-id": "msg_other"}, "bad_signature"),
        ({"webhook-timestamp": str(TS + 1)}, "bad_signature"),
        ({"webhook-timestamp": f"0{TS}"}, "bad_signature"),  # the raw text is signed
    ],
)
def test_rejections(change: dict[str, str | None], expected: str) -> None:
    assert reason(verify(headers(**change), BODY, SECRET, now=TS)) == expected


def test_a_tampered_body_or_another_secret_is_a_bad_signature() -> None:
    assert reason(verify(headers(), BODY + b" ", SECRET, now=TS)) == "bad_signature"
    assert reason(verify(headers(), BODY, "whsec_another", now=TS)) == "bad_signature"


def test_several_signatures_any_v3_may_match_and_hex_case_does_not_matter() -> None:
    listed = f"v1,abc v3,{'0' * 64} v3,{EXPECTED_HEX}"
    assert isinstance(verify(headers(listed), BODY, SECRET, now=TS), Accepted)
    upper = f"v3,{EXPECTED_HEX.upper()}"
    assert isinstance(verify(headers(upper), BODY, SECRET, now=TS), Accepted)


def test_header_names_are_case_insensitive() -> None:
    mixed = {k.title(): v for k, v in headers().items()}
    assert isinstance(verify(mixed, BODY, SECRET, now=TS), Accepted)


def test_the_tolerance_window_both_ways() -> None:
    assert isinstance(verify(headers(), BODY, SECRET, now=TS + 300), Accepted)
    assert isinstance(verify(headers(), BODY, SECRET, now=TS - 300), Accepted)
    stale = verify(headers(), BODY, SECRET, now=TS + 301)
    assert reason(stale) == "stale" and "301s ago" in stale.detail  # type: ignore[union-attr]
    assert reason(verify(headers(), BODY, SECRET, now=TS - 301)) == "future"
    assert isinstance(verify(headers(), BODY, SECRET, now=TS + 900, tolerance_s=1000), Accepted)


def test_a_forged_stale_delivery_is_a_bad_signature_not_stale() -> None:
    forged = headers(f"v3,{'1' * 64}")
    assert reason(verify(forged, BODY, SECRET, now=TS + 10_000)) == "bad_signature"


def test_rejection_details_never_carry_the_signature_or_the_secret() -> None:
    for sig in (f"v3,{DECODED_KEY_HEX}", f"v9,{DECODED_KEY_HEX}", "v3,zz" + DECODED_KEY_HEX):
        verdict = verify(headers(sig), BODY, SECRET, now=TS)
        assert isinstance(verdict, Rejected)
        assert DECODED_KEY_HEX not in verdict.detail
        assert "c2VjcmV0" not in verdict.detail


def test_parse_headers_needs_no_body() -> None:
    parsed = parse_headers(headers())
    assert not isinstance(parsed, Rejected)
    assert (parsed.webhook_id, parsed.timestamp, parsed.signatures) == (
        WEBHOOK_ID,
        TS,
        (EXPECTED_HEX,),
    )


_text = st.text(max_size=80)


@settings(max_examples=300, deadline=None)
@given(
    wid=st.one_of(st.none(), _text),
    ts=st.one_of(st.none(), _text, st.integers(-(10**15), 10**15).map(str)),
    sig=st.one_of(st.none(), _text, st.lists(_text, max_size=12).map(" ".join)),
    body=st.binary(max_size=200),
    now=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
)
def test_any_input_gives_a_verdict_never_an_exception(
    wid: str | None, ts: str | None, sig: str | None, body: bytes, now: float
) -> None:
    h = {
        k: v
        for k, v in (("webhook-id", wid), ("webhook-timestamp", ts), ("webhook-signature", sig))
        if v is not None
    }
    verdict = verify(h, body, SECRET, now=now)
    assert isinstance(verdict, Accepted | Rejected)
    if isinstance(verdict, Accepted):  # only with the right signature
        assert sig is not None and wid is not None and ts is not None
        assert sign(SECRET, wid, ts, body).split(",")[1] in sig.lower()


# --- replay guard -----------------------------------------------------------------------


def test_replay_guard_remembers_ids_until_their_timestamp_leaves_the_window() -> None:
    guard = ReplayGuard(window_s=300)
    assert not guard.seen("a", now=1000)
    guard.remember("a", timestamp=1000, now=1000)
    assert guard.seen("a", now=1001)
    assert guard.seen("a", now=1299.9)
    assert not guard.seen("a", now=1300)  # its signature is stale from here on
    assert len(guard) == 0


def test_replay_guard_keeps_a_future_timestamp_until_it_would_be_stale() -> None:
    guard = ReplayGuard(window_s=300)
    guard.remember("f", timestamp=1200, now=1000)  # signed 200 s ahead (clock skew)
    assert guard.seen("f", now=1450)
    assert not guard.seen("f", now=1500)


def test_replay_guard_ignores_already_stale_ids_and_extends_on_a_later_timestamp() -> None:
    guard = ReplayGuard(window_s=300)
    guard.remember("old", timestamp=0, now=1000)
    assert len(guard) == 0
    guard.remember("x", timestamp=1000, now=1000)
    guard.remember("x", timestamp=1100, now=1050)  # the sender retried, re-signed
    guard.remember("x", timestamp=900, now=1060)  # an earlier one changes nothing
    assert guard.seen("x", now=1350) and not guard.seen("x", now=1400)


def test_replay_guard_is_bounded_and_forgets_the_id_closest_to_expiry() -> None:
    guard = ReplayGuard(window_s=300, max_ids=3)
    for i, ts in enumerate((1003, 1001, 1002, 1004)):
        guard.remember(f"id{i}", timestamp=ts, now=1000)
    assert len(guard) == 3 and guard.evicted == 1
    assert not guard.seen("id1", now=1000)  # timestamp 1001: the first to expire
    assert all(guard.seen(f"id{i}", now=1000) for i in (0, 2, 3))


def test_replay_guard_memory_stays_bounded_under_churn() -> None:
    guard = ReplayGuard(window_s=10, max_ids=100)
    for i in range(20_000):
        now = i * 0.01
        guard.remember(f"id{i}", timestamp=now, now=now)
        guard.remember(f"id{i}", timestamp=now + 1, now=now)  # superseded heap entries
    assert len(guard) <= 100 and len(guard._heap) <= 200


# --- delivery bodies --------------------------------------------------------------------


def test_parse_a_completed_delivery() -> None:
    body = json.dumps(
        {
            "id": "pred_abc123",
            "model": "wavespeed-ai/flux-dev",
            "input": {"prompt": "octopus"},
            "outputs": ["https://cdn.example/x.png"],
            "urls": {"get": "https://api.wavespeed.ai/api/v3/predictions/pred_abc123/result"},
            "has_nsfw_contents": [False],
            "status": "completed",
            "created_at": "2024-01-01T12:00:00.000Z",
            "timings": {"inference": 2500},
            "error": "",
        }
    ).encode()
    delivery = parse_delivery(body)
    assert isinstance(delivery, Delivery)
    assert (delivery.task_id, delivery.status, delivery.model) == (
        "pred_abc123",
        "completed",
        "wavespeed-ai/flux-dev",
    )
    assert delivery.outcome.kind is Kind.COMPLETED and delivery.outcome.status_code is None
    p = delivery.outcome.prediction
    assert p is not None and p.outputs == ["https://cdn.example/x.png"]
    assert p.inference_ms == 2500 and p.created_at == 1704110400.0


def test_parse_failed_pending_unknown_and_enveloped_deliveries() -> None:
    failed = parse_delivery(b'{"id":"t1","status":"failed","error":"GPU out of memory"}')
    assert isinstance(failed, Delivery) and failed.outcome.kind is Kind.FAILED
    assert failed.outcome.reason == "GPU out of memory"
    cancelled = parse_delivery(b'{"id":"t1","status":"cancelled"}')
    assert isinstance(cancelled, Delivery) and cancelled.outcome.kind is Kind.FAILED
    pending = parse_delivery(b'{"id":"t1","status":"processing"}')
    assert isinstance(pending, Delivery) and pending.outcome.kind is Kind.PENDING
    odd = parse_delivery(b'{"id":"t1","status":"queued_for_gpu"}')
    assert isinstance(odd, Delivery) and odd.outcome.kind is Kind.PENDING
    assert "unknown status" in odd.outcome.reason
    wrapped = parse_delivery(
        b'{"code":200,"message":"success","data":{"id":"t2","status":"completed"}}'
    )
    assert isinstance(wrapped, Delivery) and wrapped.task_id == "t2"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"{", "not_json"),
        (b"[" * 100_000, "not_json"),
        (b"[]", "not_object"),
        (b'"pred_1"', "not_object"),
        (b'{"status":"completed"}', "missing_id"),
        (b'{"id":42,"status":"completed"}', "missing_id"),
        (b'{"id":"../balance","status":"completed"}', "invalid_id"),
        (b'{"id":"a?b=1","status":"completed"}', "invalid_id"),
        (b'{"id":"pred_1"}', "missing_status"),
        (b'{"id":"pred_1","status":7}', "missing_status"),
    ],
)
def test_bad_delivery_bodies(body: bytes, why: str) -> None:
    bad = parse_delivery(body)
    assert isinstance(bad, BadDelivery) and bad.reason == why


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["id", "status", "outputs", "timings", "data", "x"]),
                    children,
                    max_size=5,
                )
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_any_body_parses_or_is_refused_never_raises(body: bytes) -> None:
    assert isinstance(parse_delivery(body), Delivery | BadDelivery)


def test_the_redactor_scrubs_the_secret_and_its_bare_key() -> None:
    from bridge.core.webhook_signature import secret_forms
    from bridge.edges.logs import REDACTED, Redactor

    redactor = Redactor(secret_forms(SECRET))
    key = SECRET.removeprefix("whsec_")
    assert redactor.scrub(f"a {SECRET} b {key} c") == f"a {REDACTED} b {REDACTED} c"
    assert secret_forms(None) == () and secret_forms("") == ()
