"""The exactly-once delivery mode (bridge.shell.exactly_once) around fake transactional
producers: what it does when a transaction cannot commit, is fenced, or would belong to a
partition this member does not track. The partition decisions themselves are the core's
(tests/test_partitions.py); these check that the mode asks it and acts on the answer."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import IllegalOperation, MessageSizeTooLargeError, ProducerFenced

from bridge.config import Config, build_config
from bridge.core.book import Core, Partition
from bridge.core.clock import ManualClock
from bridge.core.facts import Publish
from bridge.core.messages import Record
from bridge.core.outcomes import Kind, Outcome, Prediction
from bridge.core.policy import FixedInterval
from bridge.edges.metrics import Metrics
from bridge.shell.delivery import Effects
from bridge.shell.exactly_once import ExactlyOnce, transactional_id
from bridge.shell.intake import Intake
from bridge.shell.telemetry import Telemetry

T = "in"
P: Partition = (T, 0)
DONE = Outcome(Kind.COMPLETED, 200, Prediction(status="completed", outputs=["u"]))


def config(interval_s: float = 1.0) -> Config:
    return build_config(
        {
            "kafka": {
                "input_topic": T,
                "session_timeout_ms": 300,
                "heartbeat_interval_ms": 100,
                "commit_interval_s": interval_s,
            },
            "polling": {"interval_s": 1.0, "jitter": 0.0, "default_timeout_s": 10},
            "delivery": "exactly_once",
        },
        env={},
    )


class Producer:
    """A transactional producer that commits, unless told how it fails."""

    def __init__(self, fail_offsets: BaseException | None = None) -> None:
        self.fail_offsets = fail_offsets
        self.aborted = self.committed = 0
        self.calls: list[str] = []  # what the mode asked, in order

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def begin_transaction(self) -> None:
        self.calls.append("begin")

    async def send(self, *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        if self.fail_offsets is not None:
            raise self.fail_offsets
        [(_, at)] = offsets.items()
        self.calls.append(f"offset {at.offset}")
        await asyncio.sleep(0)  # as aiokafka's: handed to its sender, then waits for it

    async def commit_transaction(self) -> None:
        self.calls.append("commit")
        self.committed += 1

    async def abort_transaction(self) -> None:
        self.aborted += 1


class SlowProducer(Producer):
    """Its commits wait until released."""

    def __init__(self) -> None:
        super().__init__()
        self.ending, self.release = asyncio.Event(), asyncio.Event()

    async def commit_transaction(self) -> None:
        self.ending.set()
        await self.release.wait()
        await super().commit_transaction()


class Setup:
    def __init__(self, producer: Producer, interval_s: float = 1.0) -> None:
        self.clock = ManualClock()
        self.config = config(interval_s)
        self.core = Core(
            self.config,
            policy=FixedInterval(1.0, jitter=0.0),
            rng=random.Random(1),
            now=self.clock.monotonic(),
        )
        self.metrics = Metrics()
        self.effects = Effects(Telemetry(self.metrics, self.core, now=self.clock.monotonic()))
        self.made: list[str] = []
        self.restarted: list[Partition] = []
        self.fences: list[tuple[Partition, int]] = []

        def make_producer(tid: str) -> Any:
            self.made.append(tid)
            return producer

        async def restart(part: Partition) -> None:
            self.restarted.append(part)

        self.mode = ExactlyOnce(
            None,  # the consumer only reads where partitions start (not here)
            core=self.core,
            effects=self.effects,
            clock=self.clock,
            config=self.config,
            metrics=self.metrics,
            restart=restart,
            fenced=lambda part, epoch: self.fences.append((part, epoch)),
            make_producer=make_producer,
        )
        self.effects.mode = self.mode

    def finished_task(self, offset: int, task_id: str) -> None:
        """A record of P taken and its task finished: its event goes into the transaction."""
        at = self.clock.read()
        self.effects.apply(
            self.core.on_record(Record(T, 0, offset, b"k", task_id.encode(), (), None), at)
        )
        self.effects.apply(self.core.on_outcome(self.core.polling()[task_id], DONE, at))

    async def commit_due(self) -> None:
        """The periodic commit, once the transaction's oldest event is due."""
        self.clock.now += self.config.kafka.commit_interval_s
        await self.mode.commit()

    def transactions(self, result: str) -> float:
        value: float = self.metrics.transactions.labels(result)._value.get()
        return value


async def test_a_transaction_commits_its_events_with_its_offset() -> None:
    s = Setup(producer := Producer())
    s.core.assign({P: (0, "")})
    s.finished_task(0, "t0")
    await s.commit_due()  # opens the lane (the id of an active partition), then commits
    assert s.made == [transactional_id(s.config, P)]
    assert producer.committed == 1 and s.transactions("committed") == 1
    assert s.core.publishing() == {} and s.core.open_records == 0
    s.mode.close()


class SizeLimitedProducer(Producer):
    """Refuses a record over ``limit`` bytes at ``send``, as aiokafka does past its
    ``max_request_size``; keeps the values it took."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.values: list[bytes] = []

    async def send(self, *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        if len(kwargs["value"]) > self.limit:
            raise MessageSizeTooLargeError()
        self.values.append(kwargs["value"])
        return await super().send(*args, **kwargs)


async def test_an_event_too_large_goes_out_reduced_and_one_that_fits_as_it_is() -> None:
    s = Setup(producer := SizeLimitedProducer(limit=2000))
    s.core.assign({P: (0, "")})
    at = s.clock.read()
    for offset, task_id, blob in [(0, "big", "x" * 3000), (1, "small", "y")]:
        value = json.dumps({"id": task_id, "metadata": {"blob": blob}}).encode()
        s.effects.apply(s.core.on_record(Record(T, 0, offset, b"k", value, (), None), at))
        s.effects.apply(s.core.on_outcome(s.core.polling()[task_id], DONE, at))
    await s.commit_due()
    sent = {e["subject"]: e["data"] for e in map(json.loads, producer.values)}
    assert sent["big"]["metadata"] is None  # the reduced form: what came from the input left
    assert sent["small"]["metadata"] == {"blob": "y"}  # fits: sent as built
    assert producer.committed == 1 and s.core.publishing() == {} and s.core.open_records == 0
    s.mode.close()


async def test_the_periodic_commit_leaves_a_transaction_with_events_to_its_deadline() -> None:
    s = Setup(producer := Producer())
    s.core.assign({P: (0, "")})
    s.finished_task(0, "t0")
    await s.mode.commit()  # the lane opens; its event is not due yet
    assert producer.committed == 0
    await s.commit_due()
    assert producer.committed == 1 and s.core.publishing() == {}
    s.mode.close()


async def test_a_transaction_closes_by_itself_when_its_oldest_event_is_due() -> None:
    s = Setup(producer := Producer(), interval_s=0.05)
    s.core.assign({P: (0, "")})
    await s.mode.commit()  # opens the lane (and commits where the partition starts)
    before = producer.committed
    s.finished_task(0, "t0")
    await asyncio.sleep(0.02)
    assert producer.committed == before
    for _ in range(200):  # due 50 ms after the event: no periodic commit needed
        await asyncio.sleep(0.01)
        if producer.committed > before:
            break
    assert producer.committed == before + 1 and s.core.publishing() == {}
    s.mode.close()


async def test_the_group_joins_each_transaction_with_the_offset_it_has_committed() -> None:
    """The commit then sends the new offset alone, with the end right behind it."""
    s = Setup(producer := Producer())
    s.core.assign({P: (0, "")})
    s.finished_task(0, "t0")
    await s.commit_due()
    assert producer.calls == ["begin", "offset 1", "commit"]
    producer.calls.clear()
    s.finished_task(1, "t1")
    await asyncio.sleep(0.01)  # sent into a new transaction, which the group joins at once
    assert producer.calls == ["begin", "offset 1"]
    await s.commit_due()
    assert producer.calls == ["begin", "offset 1", "offset 2", "commit"]
    assert s.core.committed_position(P) == 2
    s.mode.close()


async def test_a_transaction_the_group_could_not_join_is_aborted_not_ended() -> None:
    s = Setup(producer := Producer())
    s.core.assign({P: (0, "")})
    s.finished_task(0, "t0")
    await s.commit_due()
    producer.fail_offsets = IllegalOperation("Not in the middle of a transaction")
    s.finished_task(1, "t1")
    await s.commit_due()
    assert producer.committed == 1 and producer.aborted == 1 and s.restarted == [P]
    s.mode.close()


async def test_handing_over_commits_what_was_built_while_a_commit_was_under_way() -> None:
    s = Setup(producer := SlowProducer())
    s.core.assign({P: (0, "")})
    s.finished_task(0, "t0")
    committing = asyncio.create_task(s.commit_due())
    await producer.ending.wait()
    s.finished_task(1, "t1")  # built while its transaction commits: in the next one
    producer.release.set()
    await s.mode.hand_over({P}, timeout=5.0)
    await committing
    assert producer.committed == 2
    assert s.core.publishing() == {} and s.core.committed_position(P) == 2


async def test_no_transactional_id_is_opened_for_a_partition_not_tracked_here() -> None:
    s = Setup(Producer())
    s.core.assign({P: (0, "")})
    effects = s.core.on_record(Record(T, 0, 0, b"k", b"t1", (), None), s.clock.read())
    effects += s.core.on_outcome(s.core.polling()["t1"], DONE, s.clock.read())
    s.core.revoke({P})
    s.core.release({P}, "revoked")
    # An event for a partition that left (no lane, not tracked) waits; the commit does not
    # initialise that partition's id, which would fence its owner.
    s.mode.publish(next(e for e in effects if isinstance(e, Publish)))
    await s.mode.commit()
    assert s.made == []


async def test_a_transaction_the_producer_left_is_aborted_and_the_partition_restarts() -> None:
    s = Setup(producer := Producer(IllegalOperation("Not in the middle of a transaction")))
    s.core.assign({P: (0, "")})
    s.finished_task(0, "t1")
    await s.commit_due()
    assert s.transactions("aborted") == 1
    assert producer.aborted == 1 and s.restarted == [P]
    assert producer.committed == 0  # its offset refused: the transaction is never ended
    assert s.core.publishing() == {}  # its event is not counted as delivered: sent again later
    s.mode.close()


async def test_a_fenced_partition_is_left_to_its_new_owner() -> None:
    """Found on Apache Kafka (61 tasks without an event in 3,000): a member whose
    transaction was fenced kept taking the partition's records, so its next commit opened
    the transactional id again, fenced the owner back and committed past the records of
    the fenced transaction, which nobody fetched again."""
    s = Setup(Producer(ProducerFenced()))
    s.core.assign({P: (0, "")})
    epoch = s.core.epoch(P)
    s.finished_task(0, "t1")
    await s.commit_due()
    assert s.transactions("fenced") == 1 and s.fences == [(P, epoch)]
    # The member's consumer still lists the partition until its next heartbeat, and hands
    # over another record: it is not taken, and the id is not opened again.
    s.effects.apply(s.core.on_record(Record(T, 0, 1, b"k", b"t2", (), None), s.clock.read()))
    assert "t2" not in s.core.polling()
    await s.mode.commit()
    assert s.made == [transactional_id(s.config, P)]
    s.mode.close()


class Assigned:
    """A consumer whose assignment is all the recheck reads."""

    def __init__(self, *parts: Partition) -> None:
        self.parts = {TopicPartition(*p) for p in parts}

    def assignment(self) -> set[TopicPartition]:
        return self.parts


async def test_a_fenced_partition_still_held_after_a_quiet_grace_starts_again() -> None:
    """If no rebalance came and the consumer still holds the partition two session
    timeouts later, the fence came from a member that has since rejoined: the partition
    starts again from its commit. A rebalance in between leaves it to the assignment."""
    for rebalanced in (True, False):
        s = Setup(Producer(ProducerFenced()))
        intake = Intake(
            Assigned(P),
            core=s.core,
            effects=s.effects,
            mode=s.mode,
            config=s.config,
            clock=s.clock,
            metrics=s.metrics,
            wake_dispatch=lambda: None,
        )
        restarted: list[Partition] = []

        async def restart(part: Partition, into: list[Partition] = restarted) -> None:
            into.append(part)

        intake.restart = restart  # type: ignore[method-assign]
        s.core.assign({P: (0, "")})
        epoch = s.core.epoch(P)
        assert epoch is not None and s.core.fence(P, epoch)
        if rebalanced:
            s.core.revoke({P})
            s.core.release({P}, "revoked")
            s.core.assign({P: (0, "")})
        intake._recheck(P, epoch)  # what intake.fenced() schedules two sessions later
        await asyncio.gather(*intake._restarts)
        assert restarted == ([] if rebalanced else [P])
        intake.running = False
