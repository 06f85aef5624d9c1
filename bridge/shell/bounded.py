"""Awaits with the bridge's own time limit, for the rebalance listener and start-up.

aiokafka runs the rebalance listener inside its join: a listener that hangs holds this
member out of the group, and the coordinator drops it once ``kafka.rebalance_timeout_ms``
passes, which starts another rebalance. So every await there has a limit of the bridge's
own, and when one expires the log says once what was waited for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import structlog

from bridge.config import KafkaConfig

log = structlog.get_logger("wavespeed_bridge")

T = TypeVar("T")


async def bounded(aw: Awaitable[T], seconds: float, what: str) -> T:
    """``await aw`` for at most ``seconds``; on expiry it is cancelled, the log names
    ``what``, and TimeoutError is raised for the caller's fallback."""
    try:
        return await asyncio.wait_for(aw, max(0.0, seconds))
    except TimeoutError:
        log.warning("gave up waiting", waited_for=what, limit_s=round(seconds, 3))
        raise


class StartupTimeout(Exception):
    """A start-up step did not complete within its limit: the process exits with 1."""


def startup_limit_s(config: KafkaConfig) -> float:
    """One start-up step against the brokers: a request's own timeout, and a margin."""
    return config.request_timeout_ms / 1000 + 5.0
