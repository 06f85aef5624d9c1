"""What replicas learn, shared between them and kept across restarts. Pure.

The poll policy learns per model how long tasks take (``adaptive``) and how webhook
deliveries come (``webhook_policy``). Each replica publishes, every
``cluster.state_interval_s`` and at shutdown, the models that learned something since, to
a compacted topic keyed by model (``cluster.state_topic``): Kafka keeps the newest record
per model, so the topic is bounded by the number of models. Every replica reads it whole
when it starts, and follows it while it runs; it takes a model's record where the record
has seen more than it has, so a new replica, or every replica after a rolling restart,
polls as a warm one would.

Records are versioned: one of another version, another binning or in a shape this release
does not read is refused, never half-trusted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

VERSION = 1
MAX_RECORD_BYTES = 64 * 1024  # a model's record is a few KB; anything larger is not ours
KEY_PREFIX = "model/"


class Learner(Protocol):
    """A poll policy that learns (``AdaptivePolicy``, ``WebhookAware``)."""

    def learned_models(self) -> set[str]: ...

    def learned(self, model: str) -> dict[str, Any] | None: ...

    def learn_from(self, model: str, data: Mapping[str, Any]) -> bool: ...


def learner(policy: object) -> Learner | None:
    """``policy`` if it learns anything worth sharing, else None (a fixed interval)."""
    needed = ("learned_models", "learned", "learn_from")
    if all(callable(getattr(policy, name, None)) for name in needed):
        return policy  # type: ignore[return-value]
    return None


@dataclass(frozen=True, slots=True)
class Learned:
    model: str
    data: dict[str, Any]
    replica: str
    at: float


def encode(learned: Learned) -> tuple[bytes, bytes]:
    body = {
        "v": VERSION,
        "model": learned.model,
        "replica": learned.replica,
        "at": learned.at,
        "data": learned.data,
    }
    return (KEY_PREFIX + learned.model).encode(), json.dumps(body, separators=(",", ":")).encode()


def decode(key: bytes | None, value: bytes | None) -> Learned | None:
    """A record of the state topic, or None: another version, too large, damaged, or a
    tombstone."""
    if not key or not value or len(value) > MAX_RECORD_BYTES:
        return None
    try:
        name = key.decode()
        body = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return None
    if not name.startswith(KEY_PREFIX) or not isinstance(body, dict):
        return None
    if body.get("v") != VERSION or body.get("model") != name[len(KEY_PREFIX) :]:
        return None
    data, replica, at = body.get("data"), body.get("replica"), body.get("at")
    if not isinstance(data, dict) or not isinstance(replica, str):
        return None
    if not isinstance(at, int | float) or isinstance(at, bool):
        return None
    return Learned(body["model"], data, replica, float(at))


def to_publish(policy: Learner, replica: str, at: float) -> list[Learned]:
    """The models that learned something since the last call, as records."""
    out = []
    for model in sorted(policy.learned_models()):
        data = policy.learned(model)
        if data is not None:
            out.append(Learned(model, data, replica, at))
    return out
