"""WaveSpeed webhook deliveries: signature, replay window, body. Pure: time is passed in.

Which source this follows. None of WaveSpeed's official SDKs verifies webhooks: the Python
SDK (PyPI ``wavespeed`` 2.0.5, github.com/WaveSpeedAI/wavespeed-python) and the JavaScript,
Go and Java SDKs have no webhook code at all, and the older JavaScript client
(github.com/WaveSpeedAI/client-javascript) only appends ``?webhook=<url>`` to the submit
request. So this follows WaveSpeed's own documentation, "Verifying Webhooks"
(https://wavespeed.ai/docs/verify-webhooks, also /docs/docs-api/verifying_webhook):

- headers ``webhook-id``, ``webhook-timestamp`` (unix seconds) and
  ``webhook-signature: v3,<hex>``;
- the signature is HMAC-SHA256 over ``{webhook-id}.{webhook-timestamp}.{raw body}``;
- the key is the secret from ``GET /api/v3/webhook/secret`` with its ``whsec_`` prefix
  removed, "use only the remaining string as the HMAC key (do not base64 decode it)": its
  UTF-8 bytes, unlike Standard Webhooks (Svix), whose header names WaveSpeed borrows but
  whose ``whsec_`` secrets are base64;
- ``WebhookMaxAgeSeconds = 300``.

Where the page is silent, this accepts a superset that costs nothing: the header may list
several space-separated signatures (the Standard Webhooks convention, used during secret
rotation) and any ``v3`` one may match; the hex is compared as bytes, so its case does not
matter (the documented example is lowercase, as Go's ``hex.EncodeToString`` writes it).
Comparison is constant-time (:func:`hmac.compare_digest`).

The signature is checked before the timestamp, so ``stale`` and ``future`` count only
authentic deliveries (clock skew, or a sender that retried late); a forged one with an old
timestamp is ``bad_signature``. A timestamp is accepted within ``tolerance_s`` either way.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bridge.core.messages import valid_task_id
from bridge.core.outcomes import Outcome, outcome_from_data

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
SIGNATURE_VERSION = "v3"
MAX_AGE_S = 300.0  # the documented WebhookMaxAgeSeconds

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
# Added by the receiver to the webhook topic's records, and read back by every replica.
RECEIVED_AT_HEADER = "received-at"
RECEIVED_BY_HEADER = "received-by"
APPLIED_BY_HEADER = "applied-by"  # a replica acted on this task's delivery

# A webhook-id is echoed into logs and Kafka headers: visible ASCII only, bounded.
_WEBHOOK_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_MAX_SIGNATURES = 8  # more entries than any rotation needs: refused, bounding the work
_MAX_SIGNATURE_HEADER = 1024

Reason = Literal["unsigned", "bad_signature", "stale", "future", "malformed"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """An authentic delivery, signed within the tolerance window."""

    webhook_id: str
    timestamp: int  # unix seconds, as signed


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a delivery was refused. ``detail`` never carries a signature or the secret."""

    reason: Reason
    detail: str


Verdict = Accepted | Rejected


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    """The three headers of a delivery, well-formed (not yet verified)."""

    webhook_id: str
    timestamp: int
    timestamp_raw: str  # exactly as sent: it is part of the signed content
    signatures: tuple[str, ...]  # the hex of every v3 entry


def signing_key(secret: str) -> bytes:
    """The HMAC key: the secret without ``whsec_``, as UTF-8 (not base64-decoded)."""
    key = secret.strip().removeprefix(SECRET_PREFIX)
    if not key:
        # An empty key would let anyone sign: never verify with one.
        raise ValueError("the webhook secret is empty")
    return key.encode("utf-8")


def secret_forms(secret: str | None) -> tuple[str, ...]:
    """What the log redactor must scrub: the secret as given and its key (without
    ``whsec_``), which could appear on its own."""
    if not secret:
        return ()
    return (secret, secret.strip().removeprefix(SECRET_PREFIX))


def _digest(key: bytes, webhook_id: str, timestamp: str, body: bytes) -> bytes:
    content = f"{webhook_id}.{timestamp}.".encode() + body
    return hmac.new(key, content, hashlib.sha256).digest()


def sign(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``webhook-signature`` value WaveSpeed sends: ``v3,<lowercase hex>``."""
    digest = _digest(signing_key(secret), webhook_id, str(timestamp), body)
    return f"{SIGNATURE_VERSION},{digest.hex()}"


def signed_headers(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of a signed delivery (for the simulator and tests)."""
    return {
        ID_HEADER: webhook_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, webhook_id, timestamp, body),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict: look the name up case-insensitively
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def parse_headers(headers: Mapping[str, str]) -> SignedHeaders | Rejected:
    """The delivery's signing headers, or why they are unusable; the body is not needed,
    so a receiver can refuse before reading it."""
    signature = _header(headers, SIGNATURE_HEADER)
    if signature is None or not signature.strip():
        return Rejected("unsigned", "no webhook-signature header")
    webhook_id = _header(headers, ID_HEADER)
    timestamp = _header(headers, TIMESTAMP_HEADER)
    if webhook_id is None or timestamp is None:
        missing = ID_HEADER if webhook_id is None else TIMESTAMP_HEADER
        return Rejected("malformed", f"signed, but no {missing} header")
    if _WEBHOOK_ID.fullmatch(webhook_id) is None:
        return Rejected("malformed", f"webhook-id is not 1-256 visible ASCII ({len(webhook_id)})")
    if _TIMESTAMP.fullmatch(timestamp) is None:
        return Rejected("malformed", "webhook-timestamp is not unix seconds")
    if len(signature) > _MAX_SIGNATURE_HEADER:
        return Rejected("malformed", f"webhook-signature is longer than {_MAX_SIGNATURE_HEADER}")
    entries = signature.split()
    if len(entries) > _MAX_SIGNATURES:
        return Rejected("malformed", f"more than {_MAX_SIGNATURES} signatures")
    versions = [entry.partition(",") for entry in entries]
    if not any(sep and value for _version, sep, value in versions):
        return Rejected("malformed", "webhook-signature is not <version>,<signature>")
    v3 = tuple(value for version, _sep, value in versions if version == SIGNATURE_VERSION)
    return SignedHeaders(webhook_id, int(timestamp), timestamp, v3)


def check(
    signed: SignedHeaders, body: bytes, key: bytes, now: float, tolerance_s: float = MAX_AGE_S
) -> Verdict:
    """Verify ``signed`` over ``body`` with ``key`` (see :func:`signing_key`), then its age."""
    expected = _digest(key, signed.webhook_id, signed.timestamp_raw, body)
    matched = False
    for candidate in signed.signatures:
        try:
            given = bytes.fromhex(candidate)
        except ValueError:
            continue
        matched = hmac.compare_digest(expected, given) or matched
    if not matched:
        why = "no v3 signature" if not signed.signatures else "no v3 signature matches"
        return Rejected("bad_signature", why)
    age = now - signed.timestamp
    if age > tolerance_s:
        return Rejected("stale", f"signed {age:.0f}s ago (tolerance {tolerance_s:g}s)")
    if -age > tolerance_s:
        return Rejected("future", f"signed {-age:.0f}s ahead (tolerance {tolerance_s:g}s)")
    return Accepted(signed.webhook_id, signed.timestamp)


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
    now: float,
    tolerance_s: float = MAX_AGE_S,
) -> Verdict:
    """Whether a delivery is authentic and fresh, at unix time ``now``."""
    signed = parse_headers(headers)
    if isinstance(signed, Rejected):
        return signed
    return check(signed, body, signing_key(secret), now, tolerance_s)


class ReplayGuard:
    """The webhook-ids accepted within the window, so a replay is answered, not republished.

    A delivery's id and timestamp are signed together, so once its timestamp is older than
    the window it is refused as stale anyway: an id needs remembering only until
    ``timestamp + window_s``. Bounded: past ``max_ids`` the id closest to expiring is
    forgotten (``evicted`` counts them); a replay of it would be published once more,
    which the consumers of the webhook topic tolerate (deliveries are idempotent).
    """

    def __init__(self, window_s: float = MAX_AGE_S, max_ids: int = 100_000) -> None:
        if window_s <= 0 or max_ids <= 0:
            raise ValueError("window_s and max_ids must be > 0")
        self.window_s = window_s
        self.max_ids = max_ids
        self.evicted = 0
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, webhook_id: str, now: float) -> bool:
        self._expire(now)
        return webhook_id in self._expiry

    def remember(self, webhook_id: str, timestamp: float, now: float) -> None:
        self._expire(now)
        expires = timestamp + self.window_s
        if expires <= now:
            return  # it would be refused as stale anyway
        if webhook_id in self._expiry:
            if expires <= self._expiry[webhook_id]:
                return
        else:
            while len(self._expiry) >= self.max_ids:
                self._pop()
                self.evicted += 1
        self._expiry[webhook_id] = expires
        heapq.heappush(self._heap, (expires, webhook_id))
        if len(self._heap) > 2 * self.max_ids:  # superseded entries: rebuild
            self._heap = [(e, i) for i, e in self._expiry.items()]
            heapq.heapify(self._heap)

    def _pop(self) -> None:
        while self._heap:
            expires, webhook_id = heapq.heappop(self._heap)
            if self._expiry.get(webhook_id) == expires:
                del self._expiry[webhook_id]
                return

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires, webhook_id = heapq.heappop(self._heap)
            if self._expiry.get(webhook_id) == expires:
                del self._expiry[webhook_id]


# --- the body ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery's body: the prediction's ``data`` object, as the result API returns it."""

    task_id: str
    status: str
    outcome: Outcome  # Kind.COMPLETED / FAILED for terminal statuses; PENDING otherwise

    @property
    def model(self) -> str | None:
        return self.outcome.prediction.model if self.outcome.prediction else None


@dataclass(frozen=True, slots=True)
class BadDelivery:
    reason: Literal["not_json", "not_object", "missing_id", "invalid_id", "missing_status"]
    detail: str


def parse_delivery(body: bytes) -> Delivery | BadDelivery:
    """The task a delivery is about and what it says. Pure; never raises.

    WaveSpeed posts the ``data`` object itself (``id``, ``model``, ``status``, ``outputs``,
    ``timings``, ``error``, ...). The whole ``{"code", "message", "data"}`` envelope is
    accepted too, in case a sender wraps it.
    """
    try:
        obj: Any = json.loads(body)
    except (ValueError, RecursionError):
        return BadDelivery("not_json", "body is not JSON")
    if not isinstance(obj, dict):
        return BadDelivery("not_object", "body is not a JSON object")
    if "id" not in obj and isinstance(obj.get("data"), dict):
        obj = obj["data"]
    task_id = obj.get("id")
    if not isinstance(task_id, str) or not task_id:
        return BadDelivery("missing_id", "no string 'id'")
    if not valid_task_id(task_id):
        return BadDelivery("invalid_id", "'id' is not a valid task id")
    status = obj.get("status")
    if not isinstance(status, str) or not status:
        return BadDelivery("missing_status", "no string 'status'")
    outcome = outcome_from_data(obj)
    prediction = outcome.prediction
    return Delivery(task_id, (prediction.status if prediction else None) or status[:64], outcome)
