"""Awaits with the bridge's own time limit, for the rebalance listener and start-up; and
the loops' cancellation at shutdown, which must not hang on a cancel that was swallowed.

aiokafka runs the rebalance listener inside its join: a listener that hangs holds this
member out of the group, and the coordinator drops it once ``kafka.rebalance_timeout_ms``
passes, which starts another rebalance. So every await there has a limit of the bridge's
own, and when one expires the log says once what was waited for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
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


# How long a cancelled task is given before it is cancelled again.
RECANCEL_S = 1.0


async def cancel_all(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel ``tasks`` and wait until each is done. Python 3.11's ``wait_for`` returns its
    inner result instead of raising when the cancel comes as the inner task finishes; a
    loop that swallowed its cancel so would run on, and the shutdown would wait for ever
    (seen once in CI). A task still running after ``RECANCEL_S`` is cancelled again."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for t in tasks:  # what a loop failed with was the caller's to log: retrieved here
        if not t.cancelled():
            t.exception()


class StartupTimeout(Exception):
    """A start-up step did not complete within its limit: the process exits with 1."""


def startup_limit_s(config: KafkaConfig) -> float:
    """One start-up step against the brokers: a request's own timeout, and a margin."""
    return config.request_timeout_ms / 1000 + 5.0
