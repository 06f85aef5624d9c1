"""A partition being revoked, in exactly-once mode (found on Apache Kafka under load: 52
duplicates in 3,000 tasks as replicas joined and left):

- aiokafka keeps handing over its records while the listener awaits its commits: a task
  taken then outlived the partition here, next to the new owner's;
- a last transaction still committing when the core set the partition aside planned no
  offsets: its events went out, their input offsets were not committed with them;
- a member must never initialise the transactional id of a partition it does not track:
  that fences the partition's owner and commits behind its back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import IllegalOperation, ProducerFenced
from aiokafka.structs import ConsumerRecord

from bridge.config import Config, build_config
from bridge.core.book import Core, Partition
from bridge.core.clock import ManualClock
from bridge.core.facts import Effect, Publish
from bridge.core.messages import Record
from bridge.core.outcomes import Kind, Outcome, Prediction
from bridge.core.policy import FixedInterval
from bridge.edges.metrics import Metrics
from bridge.shell.intake import Intake
from bridge.shell.rebalance import Rebalance
from bridge.shell.telemetry import Telemetry
from bridge.shell.transactions import TransactionalOutbox

T = "in"
P: Partition = (T, 0)


def config(**kafka: Any) -> Config:
    return build_config(
        {
            "kafka": {"input_topic": T, **kafka},
            "polling": {"interval_s": 1.0, "jitter": 0.0, "default_timeout_s": 10},
            "delivery": "exactly_once",
        },
        env={},
    )


def core_for(cfg: Config, clock: ManualClock) -> Core:
    policy = FixedInterval(1.0, jitter=0.0)
    return Core(cfg, policy=policy, rng=random.Random(1), now=clock.monotonic())


def message(offset: int, task_id: str) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(T, 0, offset, 0, 0, b"k", task_id.encode(), None, 1, len(task_id), ())


class FakeConsumer:
    """Only what the intake's seek and pause bookkeeping touch."""

    def __init__(self) -> None:
        self.assigned = {TopicPartition(*P)}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass


class RecordingOutbox:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.effects: list[Effect] = []
        self.listeners: list[Callable[[Effect], None]] = []
        self.tracked_at_close: set[Partition] | None = None

    def apply(self, effects: Iterable[Effect]) -> None:
        self.effects += effects

    async def settled(self, timeout: float) -> None:
        pass

    async def open(self, partitions: set[Partition]) -> None:
        pass

    async def close(self, partitions: set[Partition]) -> None:
        # A transaction still committing plans its offsets now: they must still be known.
        self.tracked_at_close = set(self.core.offsets.partitions())

    def cancel(self) -> None:
        pass


class CommitterTakingARecord:
    """While the revoke's commit is awaited, the fetch loop hands over one more record of
    the partition, as aiokafka does."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    async def commit(self, *, only: set[Partition] | None = None, timeout: float = 10.0) -> None:
        self.intake._take(message(7, "late_task"))


async def test_records_handed_over_during_a_revocation_are_left_to_the_next_owner() -> None:
    clock = ManualClock()
    cfg = config()
    core = core_for(cfg, clock)
    outbox = RecordingOutbox(core)
    intake = Intake(
        FakeConsumer(),
        core=core,
        outbox=outbox,
        config=cfg,
        clock=clock,
        metrics=Metrics(),
        wake_dispatch=lambda: None,
    )
    outbox.apply(core.assign({P: (0, "")}))
    intake.seek({P: (0, "")})
    intake._take(message(0, "early_task"))
    assert "early_task" in core.polling()
    listener = Rebalance(
        core=core,
        intake=intake,
        outbox=outbox,
        committer=CommitterTakingARecord(intake),  # type: ignore[arg-type]
    )
    await listener.on_partitions_revoked({TopicPartition(*P)})
    assert "late_task" not in core.polling()  # its record is the next owner's
    # The last transaction was planned from the partition's offsets, set aside only after.
    assert outbox.tracked_at_close == {P}
    assert P not in set(core.offsets.partitions())  # nothing here tracks the partition


class NoProducers:
    made: list[str]

    def __init__(self) -> None:
        self.made = []

    def __call__(self, transactional_id: str) -> Any:
        self.made.append(transactional_id)
        raise AssertionError(f"no producer for {transactional_id}: the partition is not ours")


async def test_a_transaction_is_never_opened_for_a_partition_this_member_does_not_track() -> None:
    clock = ManualClock()
    cfg = config()
    core = core_for(cfg, clock)
    factory = NoProducers()

    async def restart(part: Partition) -> None:
        raise AssertionError("no restart expected")

    outbox = TransactionalOutbox(
        core=core,
        telemetry=Telemetry(Metrics(), core, now=clock.monotonic()),
        clock=clock,
        config=cfg,
        restart=restart,
        make_producer=factory,
    )
    # An event for a partition not assigned here (no lane, not tracked) waits, and the
    # commit does not initialise that partition's transactional id (which would fence the
    # partition's owner).
    core.assign({P: (0, "")})
    effects = core.on_record(Record(T, 0, 0, b"k", b"t1", (), None), clock.read())
    task = core.polling()["t1"]
    done = Outcome(Kind.COMPLETED, 200, Prediction(status="completed", outputs=["u"]))
    effects += core.on_outcome(task, done, clock.read())
    core.release({P}, "revoked")
    outbox.apply(e for e in effects if isinstance(e, Publish))
    await outbox.commit()
    assert factory.made == []


class LeftTheTransaction:
    """A transactional producer whose transaction ended under it (aiokafka moves to an
    error state after a failed send): adding the offsets is refused."""

    def __init__(self) -> None:
        self.aborted = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def begin_transaction(self) -> None:
        pass

    async def send(self, *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        raise IllegalOperation("Not in the middle of a transaction")

    async def abort_transaction(self) -> None:
        self.aborted += 1


async def test_a_transaction_the_producer_left_is_aborted_and_the_partition_restarts() -> None:
    clock = ManualClock()
    cfg = config()
    core = core_for(cfg, clock)
    metrics = Metrics()
    producer = LeftTheTransaction()
    restarted: list[Partition] = []

    async def restart(part: Partition) -> None:
        restarted.append(part)

    outbox = TransactionalOutbox(
        core=core,
        telemetry=Telemetry(metrics, core, now=clock.monotonic()),
        clock=clock,
        config=cfg,
        restart=restart,
        make_producer=lambda tid: producer,
    )
    await outbox.open({P})
    outbox.apply(core.assign({P: (0, "")}))
    effects = core.on_record(Record(T, 0, 0, b"k", b"t1", (), None), clock.read())
    done = Outcome(Kind.COMPLETED, 200, Prediction(status="completed", outputs=["u"]))
    outbox.apply([*effects, *core.on_outcome(core.polling()["t1"], done, clock.read())])
    await outbox.commit()
    assert metrics.transactions.labels("aborted")._value.get() == 1
    assert producer.aborted == 1 and restarted == [P]
    assert core.publishing() == {}  # its event is not counted as delivered: sent again later
    outbox.cancel()


class FencedProducer(LeftTheTransaction):
    """Another member initialised this partition's transactional id since this one did."""

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        raise ProducerFenced()


async def test_a_fenced_partition_is_left_to_its_new_owner() -> None:
    """Found on Apache Kafka (61 tasks without an event in 3,000): a member whose
    transaction was fenced kept taking the partition's records, so its next commit opened
    the transactional id again, fenced the owner back and committed past the records of
    the fenced transaction, which nobody fetched again."""
    clock = ManualClock()
    cfg = config()
    core = core_for(cfg, clock)
    metrics = Metrics()
    made: list[str] = []

    def factory(tid: str) -> Any:
        made.append(tid)
        return FencedProducer()

    async def restart(part: Partition) -> None:
        raise AssertionError("a fenced partition is not restarted here at once")

    intake: Intake | None = None
    outbox = TransactionalOutbox(
        core=core,
        telemetry=Telemetry(metrics, core, now=clock.monotonic()),
        clock=clock,
        config=cfg,
        restart=restart,
        fenced=lambda part: intake.fenced(part) if intake is not None else None,
        make_producer=factory,
    )
    consumer = FakeConsumer()
    intake = Intake(
        consumer,
        core=core,
        outbox=outbox,
        config=cfg,
        clock=clock,
        metrics=metrics,
        wake_dispatch=lambda: None,
    )
    await outbox.open({P})
    outbox.apply(core.assign({P: (0, "")}))
    intake.seek({P: (0, "")})
    intake._take(message(0, "t1"))
    done = Outcome(Kind.COMPLETED, 200, Prediction(status="completed", outputs=["u"]))
    outbox.apply(core.on_outcome(core.polling()["t1"], done, clock.read()))
    await outbox.commit()
    assert metrics.transactions.labels("fenced")._value.get() == 1
    # The member's consumer still lists the partition (it learns of the rebalance at its
    # next heartbeat), and hands over another record: it is not taken.
    intake._take(message(1, "t2"))
    assert "t2" not in core.polling()
    assert P not in set(core.offsets.partitions())
    await outbox.commit()  # nothing to commit: the partition's id is not opened again
    assert made == [f"{cfg.kafka.group_id}-{T}-0"]
    intake.running = False  # the recheck scheduled by the fence does nothing after the test


async def test_a_fenced_partition_still_assigned_after_a_quiet_grace_starts_again() -> None:
    """If no rebalance came and the consumer still holds the partition, the fence came
    from a member that has since rejoined: the partition starts again from its commit. A
    rebalance in between (the usual case) leaves it to the group's assignment."""
    clock = ManualClock()
    cfg = config()
    core = core_for(cfg, clock)
    intake = Intake(
        FakeConsumer(),
        core=core,
        outbox=RecordingOutbox(core),
        config=cfg,
        clock=clock,
        metrics=Metrics(),
        wake_dispatch=lambda: None,
    )
    restarted: list[Partition] = []

    async def restart(part: Partition) -> None:
        restarted.append(part)

    intake.restart = restart  # type: ignore[method-assign]
    intake.seek({P: (0, "")})
    intake.fenced(P)
    epoch = intake.epoch
    intake._recheck(P, epoch - 1)  # a rebalance came in between: nothing
    await asyncio.sleep(0)
    assert restarted == []
    intake._recheck(P, epoch)
    await asyncio.gather(*intake._rechecks)
    assert restarted == [P]
    intake.running = False
