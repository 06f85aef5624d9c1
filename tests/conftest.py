"""Session fixtures: the broker (Apache Kafka by default), the three-node cluster, the simulator.

``BRIDGE_TEST_BROKER=tansu`` runs the integration suite on Tansu instead. Tests marked
``tansu_too`` run on both, so the demo's broker stays proven in the default run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from bridge.local.apache_kafka import KafkaCluster, start_cluster
from bridge.local.broker import Broker
from bridge.local.simulator import Simulator
from bridge.local.tansu import TansuBroker, start_tansu
from tests.helpers import API_KEY, Names

BROKER = os.environ.get("BRIDGE_TEST_BROKER", "kafka")
if BROKER not in ("kafka", "tansu"):
    raise SystemExit(f"BRIDGE_TEST_BROKER must be kafka or tansu, not {BROKER!r}")


def pytest_report_header() -> str:
    from bridge.local import apache_kafka, tansu

    version = f"Apache Kafka {apache_kafka.VERSION}" if BROKER == "kafka" else "Tansu"
    return f"integration broker: {version} (tansu_too tests also on Tansu {tansu.VERSION})"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker" not in metafunc.fixturenames:
        return
    kinds = [BROKER]
    if metafunc.definition.get_closest_marker("tansu_too") and BROKER != "tansu":
        kinds.append("tansu")
    metafunc.parametrize("broker", kinds, indirect=True, scope="session")


async def _start(kind: str, directory: Path) -> KafkaCluster | TansuBroker:
    if kind == "tansu":
        return await start_tansu(directory / "tansu.log")
    return await start_cluster(1, directory=directory)


def _close(b: KafkaCluster | TansuBroker) -> None:
    if isinstance(b, KafkaCluster):
        b.close()
    else:
        b.stop()


@pytest.fixture(scope="session")
async def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Broker]:
    b = await _start(request.param, tmp_path_factory.mktemp(f"broker-{request.param}"))
    yield b
    _close(b)


@pytest.fixture(scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KafkaCluster]:
    """Three Kafka nodes (replication factor 3, min.insync.replicas 2), shared by the session.

    Tests that stop, kill or freeze a node bring it back before they end.
    """
    if BROKER == "tansu":
        pytest.skip("Tansu has no replication")
    c = await start_cluster(3, directory=tmp_path_factory.mktemp("cluster"))
    yield c
    c.close()


@pytest.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """A broker of this run's kind that a test may stop, freeze and restart."""
    started: list[KafkaCluster | TansuBroker] = []

    async def start(**options: Any) -> KafkaCluster | TansuBroker:
        if BROKER == "tansu":
            b: KafkaCluster | TansuBroker = await start_tansu(tmp_path / "own-tansu.log")
        else:
            b = await start_cluster(1, directory=tmp_path / f"own-{len(started)}", **options)
        started.append(b)
        return b

    yield start
    for b in started:
        with contextlib.suppress(Exception):
            _close(b)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    s = Simulator(api_key=API_KEY, seed=1)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def names() -> Names:
    return Names()


@pytest.fixture(scope="session")
def broker_kind() -> Iterator[str]:
    yield BROKER


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that configure logging: the process's set-up comes back afterwards."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
