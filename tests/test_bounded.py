"""The loops' cancellation at shutdown (``bridge.shell.bounded.cancel_all``): a loop that
swallowed its cancel is cancelled again, so the shutdown does not wait for ever."""

from __future__ import annotations

import asyncio
import sys

import pytest

from bridge.shell import bounded


async def _swallowing_loop(inner: asyncio.Future[int], cancels: list[int]) -> None:
    """A loop without a flag of its own, whose first await is a ``wait_for``."""
    try:
        await asyncio.wait_for(inner, 10.0)
        while True:
            await asyncio.sleep(0.01)
    except asyncio.CancelledError:
        cancels.append(1)
        raise


async def test_a_swallowed_cancel_is_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bounded, "RECANCEL_S", 0.2)
    loop = asyncio.get_running_loop()
    inner: asyncio.Future[int] = loop.create_future()
    cancels: list[int] = []
    task = asyncio.create_task(_swallowing_loop(inner, cancels))
    await asyncio.sleep(0)  # the loop waits in wait_for
    # The race of CI's hang: the awaited result, and in the same turn the shutdown's cancel
    # (cancel_all cancels before its first await).
    inner.set_result(1)
    started = loop.time()
    async with asyncio.timeout(5.0):  # a single cancel, awaited as before, waits for ever
        await bounded.cancel_all([task])
    assert task.cancelled()
    assert cancels == [1]
    if sys.version_info < (3, 12):  # 3.11's wait_for returned the result: a second round
        assert loop.time() - started >= 0.2


async def test_tasks_that_end_on_their_cancel_and_tasks_already_done() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async def finished() -> str:
        return "done"

    done = asyncio.create_task(finished())
    await done
    waiting = [asyncio.create_task(forever()) for _ in range(3)]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await bounded.cancel_all([done, *waiting])
    assert all(t.cancelled() for t in waiting)
    assert done.result() == "done"
    assert loop.time() - started < bounded.RECANCEL_S  # no second round: all ended at once


async def test_a_loop_that_fails_on_its_cancel_is_waited_for() -> None:
    async def failing() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    await bounded.cancel_all([task])
    assert isinstance(task.exception(), RuntimeError)
