"""at_least_once.Publisher's retry, shrink and give-up paths, against a scripted producer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, RequestTimedOutError

from bridge.core.events import OutputRecord
from bridge.shell.at_least_once import Publisher


class ScriptedProducer:
    """``send`` fails as scripted per value (at send time or at the ack), then succeeds."""

    def __init__(self, script: dict[bytes, list[BaseException | str]]) -> None:
        self.script = script
        self.acked: list[bytes] = []

    async def send(self, topic: str, *, value: bytes | None, key: Any, headers: Any) -> Any:
        steps = self.script.get(value or b"", [])
        step = steps.pop(0) if steps else "ok"
        if isinstance(step, BaseException):
            raise step
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if step == "ack-fails":
            future.set_exception(RequestTimedOutError())
        else:
            self.acked.append(value or b"")
            future.set_result(None)
        return future


def record(value: bytes) -> OutputRecord:
    return OutputRecord(topic="t", key=b"k", value=value, headers=[])


async def run(producer: ScriptedProducer, items: list[tuple[bytes, bytes | None]]) -> list[str]:
    errors: list[str] = []
    publisher = Publisher(
        producer,
        retry_delay=lambda attempt: 0.001 * attempt,
        on_error=lambda: errors.append("e"),
    )
    loop = asyncio.create_task(publisher.run())
    acked: list[str] = []

    def on_ack(value: bytes) -> Callable[[], None]:
        return lambda: acked.append(value.decode())

    def shrink(value: bytes | None) -> Callable[[], OutputRecord] | None:
        return None if value is None else lambda: record(value)

    try:
        for value, reduced in items:
            publisher.publish(record(value), on_ack(value), shrink(reduced))
        assert publisher.pending == len(items)
        await asyncio.wait_for(publisher.settled(), 5)
    finally:
        loop.cancel()
    assert publisher.pending == 0
    return [*acked, f"errors={len(errors)}"]


async def test_retriable_errors_retry_until_acknowledged() -> None:
    producer = ScriptedProducer(
        {b"a": [KafkaTimeoutError(), "ack-fails", KafkaTimeoutError()], b"b": []}
    )
    acked = await run(producer, [(b"a", None), (b"b", None)])
    assert sorted(acked[:-1]) == ["a", "b"] and acked[-1] == "errors=3"
    assert sorted(producer.acked) == [b"a", b"b"]


async def test_a_record_too_large_is_replaced_once_by_its_reduced_form() -> None:
    producer = ScriptedProducer({b"big": [MessageSizeTooLargeError()]})
    acked = await run(producer, [(b"big", b"small")])
    assert producer.acked == [b"small"]
    assert acked == ["big", "errors=1"]  # the input is accounted for by the reduced event


async def test_a_record_that_can_never_be_sent_is_given_up_not_retried_forever() -> None:
    producer = ScriptedProducer({b"x": [TypeError("bad header"), TypeError("bad header")]})
    acked = await run(producer, [(b"x", b"x")])
    assert producer.acked == []
    assert acked == ["x", "errors=2"]  # settled, so the partition's offsets move on


class HeldProducer:
    """Acknowledges a record only when the test says so."""

    def __init__(self) -> None:
        self.futures: dict[bytes, asyncio.Future[None]] = {}

    async def send(self, topic: str, *, value: bytes | None, key: Any, headers: Any) -> Any:
        future = self.futures[value or b""] = asyncio.get_running_loop().create_future()
        return future


async def test_settled_waits_for_the_records_published_before_it_not_after() -> None:
    producer = HeldProducer()
    publisher = Publisher(producer, retry_delay=lambda attempt: 0.001)
    loop = asyncio.create_task(publisher.run())
    acked: list[str] = []
    try:
        publisher.publish(record(b"a"), lambda: acked.append("a"))
        publisher.publish(record(b"b"), lambda: acked.append("b"))
        waiting = asyncio.create_task(publisher.settled())
        publisher.publish(record(b"c"), lambda: acked.append("c"))  # after: not waited for
        while len(producer.futures) < 3:
            await asyncio.sleep(0)
        producer.futures[b"b"].set_result(None)
        await asyncio.sleep(0.01)
        assert not waiting.done() and acked == ["b"]  # "a" is still out
        producer.futures[b"a"].set_result(None)
        await asyncio.wait_for(waiting, 5)
        assert acked == ["b", "a"] and publisher.pending == 1  # "c" is still out
    finally:
        loop.cancel()
