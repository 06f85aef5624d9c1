from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bridge.broker import LocalBroker
from bridge.simulator import Simulator
from tests.helpers import API_KEY, Names


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    import asyncio

    log = Path(tmp_path_factory.mktemp("broker")) / "tansu.log"
    b = LocalBroker(log_path=log)
    b.start()
    asyncio.run(b.wait_ready())
    yield b
    b.stop()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(api_key=API_KEY, seed=1)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def names() -> Names:
    return Names()
