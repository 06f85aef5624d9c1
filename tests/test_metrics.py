"""A live /metrics scrape passes `promtool check metrics`; health endpoints answer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from tests.helpers import (
    Names,
    create_topics,
    make_config,
    produce,
    read_all,
    running_bridge,
    scrape_until,
    sim_create,
)

pytestmark = pytest.mark.integration

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "bridge.yaml"


def _shipped_polling() -> dict[str, Any]:
    """The shipped configuration's polling section (the adaptive policy and its classes),
    with a deadline short enough for a test."""
    polling: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())["polling"]
    assert polling["policy"] == "adaptive"
    return {**polling, "default_timeout_s": 30}


async def test_live_scrape_passes_promtool_and_probes_answer(
    broker: Broker, sim: Simulator, names: Names
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/tools installs it when run as root)")
    await create_topics(broker, names)
    ids = await sim_create(
        sim,
        [
            {"model": "wavespeed-ai/flux-dev", "duration_s": 0.2},
            {"model": "m", "duration_s": 0.1, "outcome": "failed"},
        ],
    )
    config = make_config(broker, sim.base_url, names, polling=_shipped_polling())
    async with running_bridge(config) as bridge:
        await produce(broker.bootstrap, names.input, [*ids, "bad id!"])
        await read_all(broker.bootstrap, names.outputs, expect=3)
        # The learned completion times are exported at the next gauge update: wait for the
        # model asserted below, not for any model (the failed task's may come first).
        learned = 'wavespeed_bridge_model_completion_seconds{model="wavespeed-ai/flux-dev"'
        text = await scrape_until(bridge.server.port, lambda t: learned in t, timeout=10)
        async with httpx.AsyncClient() as client:
            base = f"http://127.0.0.1:{bridge.server.port}"
            assert (await client.get(f"{base}/healthz")).status_code == 200
            ready = await client.get(f"{base}/readyz")
            assert ready.status_code == 200 and ready.text.strip() == "ready"
    for name in (
        "wavespeed_bridge_tasks_finished_total",
        "wavespeed_bridge_inference_seconds",
        "wavespeed_bridge_end_to_end_latency_seconds",
        "wavespeed_bridge_polls_per_task",
        "wavespeed_bridge_dead_letters_total",
        "wavespeed_bridge_tasks_in_flight",
        'wavespeed_bridge_model_completion_seconds{model="wavespeed-ai/flux-dev",percentile="50"}',
    ):
        assert name in text
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
