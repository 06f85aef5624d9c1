"""Tenants: many customers' tasks on one input topic, each with a fair share. Pure.

A task's tenant is read from its input record (``tenants.key``: the record key, a header,
or a field of the JSON input); none configured means one tenant and the bridge behaves as
it did before tenants existed. A key that is missing or unreadable puts the task in
``tenants.default`` (counted).

Two things are shared between tenants by weight (``tenants.rules``, default 1), and both are
work-conserving, so an idle tenant's share goes to the others:

- the request budget: when it binds, due polls are taken by weighted fair queuing between
  tenants (``bridge.core.scheduler``), by likelihood of completion within one;
- the in-flight slots (``polling.max_in_flight``): a tenant's share is the cap weighed
  among the tenants that have tasks in flight or waiting. A tenant over its share keeps
  its further records *held*: registered (its offsets are not committed past them), not
  polled, until its share frees. Fetching pauses for everyone only when ``tenants.max_held``
  records wait.
"""

from __future__ import annotations

import sys

from bridge.config import TenantsConfig
from bridge.core.messages import Headers

MAX_TENANT_LENGTH = 128  # a longer key is cut: it is a label and a dictionary key


class TenantKey:
    """Where a record's tenant is read; ``of`` returns the tenant and whether it was found."""

    def __init__(self, config: TenantsConfig) -> None:
        self.default = sys.intern(config.default)
        spec = config.key or ""
        kind, _, where = spec.partition(":")
        self.kind = kind  # "" (no tenants), "key", "header" or "json"
        self.header = where if kind == "header" else None
        self.field: tuple[str, ...] | None = tuple(where.split(".")) if kind == "json" else None

    @property
    def enabled(self) -> bool:
        return self.kind != ""

    def of(self, key: bytes | None, headers: Headers, from_json: object) -> tuple[str, bool]:
        """The tenant of a record with this key and these headers, whose JSON input had
        ``from_json`` at the configured field (None when there was none)."""
        raw: object = None
        if self.kind == "key":
            raw = key
        elif self.kind == "header":
            raw = next((v for k, v in headers if k == self.header), None)
        elif self.kind == "json":
            raw = from_json
        else:
            return self.default, True
        text = _text(raw)
        if text is None:
            return self.default, False
        return sys.intern(text[:MAX_TENANT_LENGTH]), True


def _text(raw: object) -> str | None:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, str) and raw.strip() and raw.isprintable():
        return raw.strip()
    return None


class Weights:
    """Each tenant's weight and caps, from ``tenants.rules`` (the rest weigh 1)."""

    def __init__(self, config: TenantsConfig) -> None:
        self._weight = {r.tenant: r.weight for r in config.rules}
        self._rate = {r.tenant: r.requests_per_second for r in config.rules}
        self._in_flight = {r.tenant: r.max_in_flight for r in config.rules}

    def weight(self, tenant: str) -> float:
        return self._weight.get(tenant, 1.0)

    def rate_cap(self, tenant: str) -> float | None:
        return self._rate.get(tenant)

    def named(self) -> list[str]:
        return list(self._weight)

    def in_flight_share(self, tenant: str, cap: int, active_weight: float) -> int:
        """How many tasks ``tenant`` may have polled at once: its weight's part of ``cap``
        among the tenants with tasks in flight or held (``active_weight``: their weights
        summed, its own included), and never above its own cap. At least one: every
        tenant makes progress."""
        weight = self.weight(tenant)
        share = max(1, int(cap * weight / max(weight, active_weight)))
        own = self._in_flight.get(tenant)
        return min(share, own) if own is not None else share
