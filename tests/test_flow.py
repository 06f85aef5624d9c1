"""End to end on the real broker and the simulator over real sockets (issue: the foundation)."""

from __future__ import annotations

import pytest

from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    committed,
    create_topics,
    make_config,
    metric_value,
    produce,
    read_all,
    running_bridge,
    scrape,
    sim_create,
    wait_for_commits,
)

pytestmark = [pytest.mark.integration, pytest.mark.tansu_too]


async def test_tasks_in_events_out(broker: Broker, sim: Simulator, names: Names) -> None:
    await create_topics(broker, names, partitions=3)
    ok = await sim_create(
        sim, [{"model": "m/image", "duration_s": 0.3 + i * 0.05} for i in range(12)]
    )
    bad = await sim_create(
        sim,
        [{"model": "m/image", "duration_s": 0.2, "outcome": "failed", "error": "nsfw rejected"}],
    )
    slow = await sim_create(sim, [{"model": "m/slow", "duration_s": 600}])
    config = make_config(broker, sim.base_url, names)
    async with running_bridge(config) as bridge:
        await produce(
            broker.bootstrap,
            names.input,
            [{"id": i, "model": "m/image", "metadata": {"n": n}} for n, i in enumerate(ok)],
            headers=[("trace-id", b"abc")],
            key=b"user-1",
        )
        await produce(broker.bootstrap, names.input, [bad[0], "pred_unknown_404"])
        await produce(broker.bootstrap, names.input, [{"id": slow[0], "timeout_s": 1.5}])
        got = await read_all(broker.bootstrap, names.outputs, expect=15, settle=0.5)
        # Offsets are committed after the acknowledgements that the counters follow.
        positions = await wait_for_commits(broker.bootstrap, names.group, names.input, 3, total=15)
        text = await scrape(bridge.server.port)
        assert len(bridge.tasks) == 0
    by_topic: dict[str, list[str]] = {}
    for r in got:
        by_topic.setdefault(r.topic, []).append(r.event["subject"])
    assert sorted(by_topic[names.completed]) == sorted(ok)
    assert sorted(by_topic[names.failed]) == sorted([bad[0], "pred_unknown_404", slow[0]])
    assert names.dead_letter not in by_topic
    events = {r.event["subject"]: r for r in got}
    first = events[ok[0]]
    e = first.event
    assert e["specversion"] == "1.0"
    assert e["type"] == "ai.wavespeed.prediction.completed"
    assert first.key == ok[0].encode()
    assert first.headers["trace-id"] == b"abc"
    assert first.headers["content-type"].startswith(b"application/cloudevents+json")
    d = e["data"]
    assert d["status"] == "completed" and d["model"] == "m/image"
    assert d["outputs"] == [f"https://cdn.example.invalid/generated/{ok[0]}.png"]
    assert d["metadata"] == {"n": 0}
    assert d["input"]["key"] == {"text": "user-1"}
    assert d["polls"] >= 1 and d["inference_time_s"] > 0 and d["created_at"].endswith("Z")
    failed = events[bad[0]].event
    assert failed["type"] == "ai.wavespeed.prediction.failed"
    assert failed["data"]["error"] == "nsfw rejected"
    missing = events["pred_unknown_404"].event
    assert missing["type"] == "ai.wavespeed.prediction.failed"
    assert "404" in missing["data"]["error"]
    timeout = events[slow[0]].event
    assert timeout["type"] == "ai.wavespeed.prediction.timeout"
    assert "deadline of 1.5s passed" in timeout["data"]["error"]
    # Every input offset committed; the counters agree with what arrived.
    assert sum(positions) == 15
    assert metric_value(text, "wavespeed_bridge_tasks_finished_total", outcome="completed") == 12
    assert metric_value(text, "wavespeed_bridge_tasks_finished_total", outcome="failed") == 2
    assert metric_value(text, "wavespeed_bridge_tasks_finished_total", outcome="timeout") == 1


async def test_malformed_messages_dead_lettered_and_daemon_goes_on(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    await create_topics(broker, names)
    good = await sim_create(sim, [{"model": "m", "duration_s": 0.1} for _ in range(2)])
    poison: list[bytes] = [
        b"\xff\xfe not utf8",
        b"{not json",
        b'{"model": "x"}',
        b"../balance",
        b"x?y=1",
        b"a/b",
        b"",
        b"x" * 5000,
    ]
    config = make_config(broker, sim.base_url, names, kafka={"max_message_bytes": 4000})
    async with running_bridge(config):
        await produce(
            broker.bootstrap, names.input, [good[0], *poison, good[1]], headers=[("h", b"1")]
        )
        got = await read_all(broker.bootstrap, names.outputs, expect=10, settle=0.5)
    dlq = [r for r in got if r.topic == names.dead_letter]
    done = [r for r in got if r.topic == names.completed]
    assert sorted(r.event["subject"] for r in done) == sorted(good)
    assert [r.value for r in dlq] == [*poison[:-1], poison[-1][:4000]]
    assert dlq[-1].headers["dlq.value_truncated"] == b"5000"
    reasons = [r.headers["dlq.reason"] for r in dlq]
    assert reasons == [
        b"not_utf8",
        b"invalid_json",
        b"missing_id",
        b"invalid_id",
        b"invalid_id",
        b"invalid_id",
        b"empty",
        b"oversize",
    ]
    assert all(r.headers["h"] == b"1" for r in dlq)
    assert [int(r.headers["dlq.offset"]) for r in dlq] == list(range(1, 9))
    assert all(r.headers["dlq.topic"] == names.input.encode() for r in dlq)
    assert sim.stats()["responses"].get("404", 0) == 0  # no bad id ever reached the API
    assert await committed(broker.bootstrap, names.group, names.input) == [10]
