"""Adaptive polling end to end (issue 3): the daemon on the real broker and the simulator."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.core.adaptive import AdaptivePolicy
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    create_topics,
    make_config,
    metric_value,
    produce,
    read_all,
    running_bridge,
    scrape,
    scrape_until,
    sim_create,
)

pytestmark = pytest.mark.integration

MODEL = "acme/known-image"
DURATION_S = 3.0  # every task of MODEL completes 3 s after creation
WAVE = 10
GAUGE = "wavespeed_bridge_model_completion_seconds"


def _exported(text: str) -> tuple[float, float]:
    return (
        metric_value(text, GAUGE, model=MODEL, percentile="50"),
        metric_value(text, GAUGE, model=MODEL, percentile="90"),
    )


async def _waves(
    broker: Broker, sim: Simulator, names: Names, polling: dict[str, Any], waves: int
) -> tuple[list[list[int]], dict[str, tuple[float, float]], str]:
    """Polls per task, wave by wave (each wave submitted after the last one finished)."""
    await create_topics(broker, names)
    config = make_config(broker, sim.base_url, names, polling=polling)
    out: list[list[int]] = []
    stats: dict[str, tuple[float, float]] = {}
    async with running_bridge(config) as bridge:
        for n in range(1, waves + 1):
            ids = await sim_create(
                sim, [{"model": MODEL, "duration_s": DURATION_S, "outcome": "completed"}] * WAVE
            )
            await produce(broker.bootstrap, names.input, [{"id": i, "model": MODEL} for i in ids])
            got = await read_all(broker.bootstrap, [names.completed], expect=n * WAVE)
            done = {r.event["subject"] for r in got}
            assert set(ids) <= done
            out.append([sim.tasks[i].polls for i in ids])
        metrics = await scrape(bridge.server.port)
        if isinstance(bridge.policy, AdaptivePolicy):
            stats = bridge.policy.model_stats()
            learned = stats.get(MODEL)
            if learned is not None:
                # Gauges follow the commit loop: wait until it has exported what was learned.
                metrics = await scrape_until(
                    bridge.server.port,
                    lambda t: _exported(t) == pytest.approx(learned),
                )
    return out, stats, metrics


async def test_adaptive_uses_far_fewer_polls_than_fixed(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    # Same floor for both: the fixed policy polls every 0.2 s; the adaptive one may poll
    # 0.2 s apart, but starts from a prior that is wrong (median 1 s, not 3 s).
    fixed, _, _ = await _waves(broker, sim, names, {"policy": "fixed", "interval_s": 0.2}, 1)
    adaptive, stats, metrics = await _waves(
        broker,
        sim,
        Names(),
        {
            "policy": "adaptive",
            "model_classes": [
                {
                    "pattern": "*",
                    "min_interval_s": 0.2,
                    "max_interval_s": 5.0,
                    "median_s": 1.0,
                    "p90_s": 3.0,
                }
            ],
        },
        2,
    )
    fixed_mean = sum(fixed[0]) / WAVE
    learned_mean = sum(adaptive[1]) / WAVE  # the second wave, after learning from the first
    assert fixed_mean >= 10  # 3 s at 0.2 s
    assert learned_mean <= 0.3 * fixed_mean
    median, p90 = stats[MODEL]
    assert median == pytest.approx(DURATION_S, rel=0.15)
    # The learned distribution is exported per model.
    assert _exported(metrics) == pytest.approx((median, p90))
