"""The dispatch loop, driven with a real core and a client over a fake transport: no network.

The core's clock is a :class:`ManualClock`, so a poll falls due only when a test moves it;
the loop itself sleeps in real time, and every wait here is for an observed result.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.config import build_config
from bridge.core.book import Core, Partition
from bridge.core.clock import ManualClock
from bridge.core.facts import Publish
from bridge.core.messages import Record
from bridge.core.outcomes import ErrorKind
from bridge.core.policy import FixedInterval
from bridge.edges.api import ApiClient, MockResponse, MockTransport, TransportError
from bridge.edges.metrics import API_ERROR_KINDS, Metrics
from bridge.shell.delivery import Effects, Start
from bridge.shell.dispatch import Dispatcher
from bridge.shell.telemetry import Telemetry

T = "in"  # the input topic
PATH = "/api/v3/predictions/"
Handler = Callable[[str], Awaitable[MockResponse]]


def answer(status: str) -> MockResponse:
    data = {"id": "p", "status": status, "outputs": ["u"] if status == "completed" else []}
    return MockResponse(200, json.dumps({"code": 200, "data": data}).encode())


class Recorded:
    """The delivery mode, reduced to what the dispatch loop reaches: records to publish."""

    def __init__(self) -> None:
        self.published: list[Publish] = []

    async def start(self, partitions: set[Partition]) -> dict[Partition, Start]:
        raise AssertionError("not the dispatch loop's")

    def publish(self, p: Publish) -> None:
        self.published.append(p)

    async def commit(self) -> None:
        raise AssertionError("not the dispatch loop's")

    async def hand_over(self, partitions: set[Partition], timeout: float) -> None:
        raise AssertionError("not the dispatch loop's")

    def hold_topics(self, missing: frozenset[str]) -> None:
        raise AssertionError("not the dispatch loop's")

    def close(self) -> None:
        raise AssertionError("not the dispatch loop's")


class Rig:
    """A core holding ``tasks`` (due at 1.0 on the manual clock), a dispatcher over ``handler``."""

    def __init__(
        self, tasks: list[str], handler: Handler, *, max_requests: int = 10, **polling: Any
    ) -> None:
        self.clock = ManualClock()
        config = build_config(
            {
                "kafka": {"input_topic": T},
                "polling": {"interval_s": 1.0, "jitter": 0.0, "default_timeout_s": 60, **polling},
            },
            env={},
        )
        self.core = Core(
            config,
            policy=FixedInterval(1.0, jitter=0.0),
            rng=random.Random(1),
            now=self.clock.monotonic(),
        )
        self.metrics = Metrics()
        self.telemetry = Telemetry(self.metrics, self.core, now=self.clock.monotonic())
        self.effects = Effects(self.telemetry)
        self.mode = Recorded()
        self.effects.mode = self.mode
        self.core.assign({(T, 0): (0, "")})
        for offset, task_id in enumerate(tasks):
            raw = json.dumps({"id": task_id}).encode()
            record = Record(T, 0, offset, task_id.encode(), raw, (), None)
            self.effects.apply(self.core.on_record(record, self.clock.read()))
        assert self.core.polling().keys() == set(tasks)
        self.asked: list[str] = []

        async def asking(path: str) -> MockResponse:
            self.asked.append(path.removeprefix(PATH))
            return await handler(path)

        self.api = ApiClient(MockTransport(asking), total_timeout_s=5.0)
        self.dispatcher = Dispatcher(
            core=self.core,
            api=self.api,
            effects=self.effects,
            telemetry=self.telemetry,
            clock=self.clock,
            max_requests=max_requests,
        )
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self.dispatcher.run())

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.dispatcher.wake()

    async def until(self, check: Callable[[], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                assert self._loop is not None and not self._loop.done(), "the loop ended"
                await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.dispatcher.running = False
        self.dispatcher.wake()
        self.dispatcher.cancel()
        if self._loop is not None:
            await asyncio.wait_for(self._loop, 2)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"wavespeed_bridge_{name}", labels)
        assert value is not None, (name, labels)
        return value

    def errors(self) -> dict[str, float]:
        return {k: self.sample("api_errors_total", kind=k) for k in API_ERROR_KINDS}

    def events(self) -> dict[str, str]:
        """Subject -> event type of every record handed to the delivery mode."""
        out = {}
        for p in self.mode.published:
            event = json.loads(p.record.value or b"")
            out[event["subject"]] = event["type"]
        return out


NO_ERRORS = dict.fromkeys(API_ERROR_KINDS, 0.0)


async def test_a_due_task_is_polled_once_and_its_answer_handed_to_the_delivery_mode() -> None:
    async def done(path: str) -> MockResponse:
        return answer("completed")

    rig = Rig(["pred_a"], done)
    rig.start()
    try:
        await asyncio.sleep(0.05)
        assert rig.asked == []  # not due yet: created at 0, first poll at 1
        rig.advance(1.0)
        await rig.until(lambda: len(rig.mode.published) == 1)
        await asyncio.sleep(0.05)  # time for a second poll, were one wrongly sent
    finally:
        await rig.stop()
    assert rig.asked == ["pred_a"]
    assert rig.events() == {"pred_a": "ai.wavespeed.prediction.completed"}
    assert rig.core.polling() == {} and rig.core.publishing().keys() == {"pred_a"}
    assert rig.sample("api_responses_total", status_class="2xx") == 1
    assert rig.errors() == NO_ERRORS
    assert rig.sample("api_requests_in_flight") == 0


async def test_max_requests_caps_the_requests_in_flight() -> None:
    gate = asyncio.Event()
    now_in, most = 0, 0

    async def held(path: str) -> MockResponse:
        nonlocal now_in, most
        now_in += 1
        most = max(most, now_in)
        try:
            await gate.wait()
        finally:
            now_in -= 1
        return answer("completed")

    tasks = [f"pred_{i}" for i in range(5)]
    rig = Rig(tasks, held, max_requests=2)
    rig.clock.advance(1.0)  # all five due at once
    rig.start()
    try:
        await rig.until(lambda: now_in == 2)
        await asyncio.sleep(0.3)  # past a sweep: a third request, were one wrongly sent
        assert (len(rig.asked), now_in) == (2, 2)
        assert rig.sample("api_requests_in_flight") == 2
        gate.set()
        await rig.until(lambda: len(rig.mode.published) == 5)
    finally:
        await rig.stop()
    assert most == 2
    assert sorted(rig.asked) == tasks
    assert set(rig.events()) == set(tasks)


async def test_a_429_with_retry_after_pauses_every_poll() -> None:
    answers = [MockResponse(429, headers={"Retry-After": "5"})]

    async def limited_once(path: str) -> MockResponse:
        return answers.pop() if answers else answer("completed")

    rig = Rig(["pred_a", "pred_b", "pred_c"], limited_once, max_requests=1)
    rig.clock.advance(1.0)
    rig.start()
    try:
        await rig.until(lambda: rig.sample("api_rate_limited_total") == 1)
        await asyncio.sleep(0.3)  # past a sweep: the other two are due, and must wait
        assert len(rig.asked) == 1 and rig.mode.published == []
        assert rig.sample("api_pause_seconds_total", reason="rate_limited") == 5.0
        assert rig.errors() == {**NO_ERRORS, "rate_limited": 1.0}
        rig.advance(4.9)
        await asyncio.sleep(0.05)
        assert len(rig.asked) == 1  # still paused
        rig.advance(0.1)  # the pause is over: all three are polled, the first again
        await rig.until(lambda: len(rig.mode.published) == 3)
    finally:
        await rig.stop()
    assert len(rig.asked) == 4 and rig.asked.count(rig.asked[0]) == 2
    assert set(rig.events().values()) == {"ai.wavespeed.prediction.completed"}


async def test_a_transport_error_counts_as_a_network_error_and_is_retried() -> None:
    refusals = [TransportError(ErrorKind.NETWORK, "ClientConnectorError")]

    async def refused_once(path: str) -> MockResponse:
        if refusals:
            raise refusals.pop()
        return answer("completed")

    rig = Rig(["pred_a"], refused_once, backoff_base_s=0.5, backoff_max_s=0.5)
    rig.clock.advance(1.0)
    rig.start()
    try:
        await rig.until(lambda: rig.sample("api_errors_total", kind="network") == 1)
        assert rig.errors() == {**NO_ERRORS, "network": 1.0}
        assert rig.sample("api_responses_total", status_class="error") == 1
        assert rig.sample("api_up") == 0
        assert rig.mode.published == [] and rig.core.polling().keys() == {"pred_a"}
        assert rig.core.polling()["pred_a"].last_error == "network error (ClientConnectorError)"
        rig.advance(0.5)  # the backoff
        await rig.until(lambda: len(rig.mode.published) == 1)
    finally:
        await rig.stop()
    assert rig.asked == ["pred_a", "pred_a"]
    assert rig.events() == {"pred_a": "ai.wavespeed.prediction.completed"}
    assert rig.sample("api_up") == 1
    assert rig.errors() == {**NO_ERRORS, "network": 1.0}
