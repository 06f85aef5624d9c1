"""A tracked task keeps what it can derive apart (bridge.core.tasks): every field still reads
back as it was set, and a task in flight stays within its memory budget."""

from __future__ import annotations

import pytest

from bench.task_memory import measure
from bridge.core import facts
from bridge.core.clock import ManualClock
from bridge.core.events import rfc3339
from bridge.core.outcomes import Kind, Outcome, Prediction
from bridge.core.tasks import Task
from tests.test_core import make, published, rec

CREATED_WALL = 1_700_000_000.25
RAW = rfc3339(CREATED_WALL)


def task(**kw: object) -> Task:
    args: dict[str, object] = {
        "task_id": "pred_1",
        "model": "m",
        "created": 10.0,
        "created_wall": CREATED_WALL,
        "first_seen": 12.0,
        "timeout_s": 60.0,
    }
    return Task(**{**args, **kw})  # type: ignore[arg-type]


PREDICTIONS = [
    # What the simulator (and the API) answers for a task running: kept apart.
    Prediction("pred_1", "m", "processing", [], None, None, CREATED_WALL, RAW, []),
    Prediction(status="processing"),
    Prediction("pred_1", "m", "created", [], "", 0, CREATED_WALL, RAW, None),
    Prediction(id="pred_1", created_at=CREATED_WALL),  # no text for it
    Prediction(created_at_raw="not a time"),  # text the parser refused
    Prediction(
        "pred_1", "m", "processing", [], None, None, CREATED_WALL, "2023-11-14T22:13:20.25Z"
    ),
    # Kept as they are: fields that are not the task's, or not shared.
    Prediction("pred_2", "m", "processing", created_at=CREATED_WALL, created_at_raw=RAW),
    Prediction("pred_1", "other", "processing"),
    Prediction("pred_1", "m", "processing", created_at=CREATED_WALL + 1),
    Prediction("pred_1", "m", "completed", ["https://x/y.png"], None, 1200, None, None, [False]),
    Prediction("pred_1", "m", "failed", error="GPU out of memory"),
    None,
]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_reads_back_as_set(prediction: Prediction | None) -> None:
    t = task()
    t.prediction = prediction
    assert t.prediction == prediction
    if prediction is not None:  # a new object each read: changing one changes nothing kept
        t.prediction.outputs.append("x")  # type: ignore[union-attr]
        assert t.prediction == prediction


def test_an_earlier_creation_time_keeps_the_last_answer() -> None:
    t = task()
    p = PREDICTIONS[0]
    t.prediction = p
    t.learn_created(5.0, CREATED_WALL - 5.0)
    assert (t.created, t.created_wall, t.deadline) == (5.0, CREATED_WALL - 5.0, 65.0)
    assert t.prediction == p


def test_deadline_is_derived() -> None:
    assert task().deadline == 70.0
    assert task(created=-100.0).deadline == 12.0  # a backlog: its first sight
    t = task()
    t.learn_created(0.0, CREATED_WALL - 10)
    assert t.deadline == 60.0


@pytest.mark.parametrize("key", [b"pred_1", b"other", b"", None])
def test_key_reads_back(key: bytes | None) -> None:
    assert task(key=key).key == key


def test_origins() -> None:
    t = task(origin=("in", 3, 1000))
    assert t.origins == (("in", 3, 1000),) and t.partitions() == {("in", 3)}
    t.add_origin(("in", 1, 7))
    assert list(t.origins) == [("in", 3, 1000), ("in", 1, 7)]
    assert t.partitions() == {("in", 3), ("in", 1)}
    t.origins = [("in", 1, 7)]
    assert t.origins == (("in", 1, 7),)
    t.origins = []
    assert t.origins == () and t.partitions() == set()
    assert task().origins == ()


def test_a_timeout_event_carries_the_last_pending_answer() -> None:
    clock = ManualClock()
    core = make(clock)
    core.on_record(rec(0, {"id": "pred_1", "model": "m"}), clock.read())
    clock.advance(1.0)
    ((t, _),) = core.take_due(clock.monotonic(), 10)
    wall = clock.time() - 5.0  # earlier than the record: the task adopts it
    pending = Prediction("pred_1", "m", "processing", [], "", 0, wall, rfc3339(wall), [])
    assert core.on_outcome(t, Outcome(Kind.PENDING, 200, pending), clock.read()) == []
    assert t.prediction == pending
    clock.advance(3600)
    effects = core.on_outcome(t, Outcome(Kind.PENDING, 200, pending), clock.read())
    (finished,) = [e for e in effects if isinstance(e, facts.Finished)]
    assert finished.kind == "timeout"
    (event,) = [p.record for p in published(effects)]
    assert event.value is not None
    data = event.value.decode()
    assert f'"created_at":"{rfc3339(wall)}"' in data and '"has_nsfw_contents":[]' in data
    assert '"key":{"text":"k"}' in data


def test_a_task_in_flight_stays_within_its_budget() -> None:
    # bench/task_memory.py, small: 1 KiB per task in flight is the RSS target (issue 22).
    m = measure(3000)
    assert m.traced / m.n < 800, m.traced / m.n
