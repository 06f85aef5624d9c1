"""The official WaveSpeed Python SDK (``wavespeed`` 2.0.5) against the simulator.

The simulator claims to be faithful; the SDK is the judge. It is synchronous
(``requests``), so each call runs in a thread while the simulator serves on the loop.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import pytest
import wavespeed

from bridge.local.simulator import Simulator
from tests.helpers import API_KEY

MODEL = "wavespeed-ai/flux-dev"


def _client(sim: Simulator, key: str = API_KEY) -> Any:
    return wavespeed.Client(api_key=key, base_url=sim.base_url, max_connection_retries=0)


async def test_submit_and_wait(sim: Simulator) -> None:
    client = _client(sim)
    out = await asyncio.to_thread(
        client.run, MODEL, {"prompt": "a cat", "_sim": {"duration_s": 0.3}}, poll_interval=0.1
    )
    (task,) = sim.tasks.values()
    assert out == {"outputs": [f"https://cdn.example.invalid/generated/{task.id}.png"]}
    assert task.model == MODEL and task.polls >= 2  # it waited by polling .../result


async def test_sync_mode_answers_in_one_request(sim: Simulator) -> None:
    client = _client(sim)
    out = await asyncio.to_thread(
        client.run,
        MODEL,
        {"prompt": "a cat", "_sim": {"duration_s": 0.3}},
        enable_sync_mode=True,
    )
    (task,) = sim.tasks.values()
    assert out == {"outputs": [f"https://cdn.example.invalid/generated/{task.id}.png"]}
    assert sim.requests == 1 and task.polls == 0  # the submit itself waited


async def test_sync_mode_timeout_is_reported_as_still_processing(sim: Simulator) -> None:
    sim.sync_timeout_s = 0.2
    client = _client(sim)
    out = await asyncio.to_thread(
        client.run_no_throw,
        MODEL,
        {"prompt": "a cat", "_sim": {"duration_s": 30}},
        enable_sync_mode=True,
    )
    (task,) = sim.tasks.values()
    assert out["status"] == "processing" and out["task_id"] == task.id
    assert "Sync mode timed out" in out["error"]
    later = await asyncio.to_thread(client.get_result, task.id)
    assert later["data"]["status"] == "processing"


@pytest.mark.parametrize("status", ["failed", "cancelled", "timeout", "deleted"])
async def test_every_terminal_failure_ends_the_sdks_wait(sim: Simulator, status: str) -> None:
    client = _client(sim)
    body = {"prompt": "a cat", "_sim": {"duration_s": 0.2, "outcome": status}}
    with pytest.raises(RuntimeError, match=f"Prediction {status} "):
        await asyncio.to_thread(client.run, MODEL, body, poll_interval=0.1)
    (task,) = sim.tasks.values()
    assert task.first_terminal_poll is not None


async def test_upload_gets_a_ticket_not_a_task(sim: Simulator) -> None:
    client = _client(sim)
    url = await asyncio.to_thread(client.upload, io.BytesIO(b"\x89PNG fake image"))
    assert not sim.tasks  # not taken for a model called "media/uploads"
    async with httpx.AsyncClient() as http:
        got = await http.get(url)
    assert got.status_code == 200 and got.content == b"\x89PNG fake image"


async def test_a_wrong_key_is_refused(sim: Simulator) -> None:
    client = _client(sim, key="not-the-key")
    with pytest.raises(RuntimeError, match="HTTP 403"):
        await asyncio.to_thread(client.run, MODEL, {"prompt": "a cat"})
    assert not sim.tasks
