"""Core 0: the pollers under test, each under ``taskset -c 0``: the daemon
(``python -m bridge run``, :class:`BridgeProc`, with :func:`bridge_config`) and the naive
implementation (``bench.naive naive``, :func:`start_naive`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.procs import Scrape
from bench.throughput.settings import Settings
from bench.throughput.stack import API_KEY, BRIDGE_CORE, ROOT, RunningBroker, Topics, terminate
from bridge.local.broker import free_port


class BridgeProc:
    """``taskset -c 0 python -m bridge run --config X.yaml``."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        config: dict[str, Any],
        *,
        cwd: Path = ROOT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``cwd``: where ``python -m bridge`` runs (another checkout there, with
        ``PYTHONPATH`` in ``env``, runs that checkout's bridge); ``env``: added to this
        process's environment."""
        self.name = name
        self.port = int(config["server"]["port"])
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                "taskset",
                "-c",
                str(BRIDGE_CORE),
                sys.executable,
                "-m",
                "bridge",
                "run",
                "--config",
                str(self.config_path),
            ],
            cwd=cwd,
            stdout=log,
            stderr=log,
            env={**os.environ, "WAVESPEED_API_KEY": API_KEY, **(env or {})},
            start_new_session=True,
        )
        log.close()
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=30.0)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bridge exited; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"bridge not ready; see {self.log_path}")

    async def scrape(self) -> Scrape:
        r = await self.http.get("/metrics")
        r.raise_for_status()
        return Scrape(r.text)

    async def stop(self) -> None:
        await self.http.aclose()
        await asyncio.to_thread(terminate, self.process, 30.0)


def bridge_config(
    s: Settings,
    broker: RunningBroker,
    base_url: str,
    topics: Topics,
    *,
    interval_s: float,
    max_in_flight: int,
    transport: str | None = None,
    policy: str | None = None,
) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "group_id": topics.group,
            "input_topic": topics.input,
            "completed_topic": topics.completed,
            "failed_topic": topics.failed,
            "dead_letter_topic": topics.dead_letter,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            # Tansu has no idempotent producer (InitProducerId); Apache Kafka has.
            "enable_idempotence": broker.broker.features.idempotence,
        },
        "api": {
            "base_url": base_url,
            "transport": transport or s.transport,
            "max_concurrent_requests": s.concurrency,
        },
        "polling": {
            "policy": policy or s.policy,
            "interval_s": interval_s,
            "jitter": 0.0,  # so the schedule can be reconstructed from the poll times
            "max_in_flight": max_in_flight,
            "default_timeout_s": 7200,
        },
        "server": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"format": "json", "level": "INFO"},
        "shutdown_grace_s": 5,
    }


def start_naive(
    workdir: Path,
    name: str,
    bootstrap: str,
    base_url: str,
    topics: Topics,
    interval_s: float,
    seconds: float,
) -> subprocess.Popen[bytes]:
    out = (workdir / f"{name}.out").open("ab")
    process = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(BRIDGE_CORE),
            sys.executable,
            "-m",
            "bench.naive",
            "naive",
            "--bootstrap",
            bootstrap,
            "--input-topic",
            topics.input,
            "--output-topic",
            topics.completed,
            "--group",
            topics.group,
            "--interval",
            str(interval_s),
            "--base-url",
            base_url,
            "--seconds",
            str(seconds),
        ],
        cwd=ROOT,
        stdout=out,
        stderr=out,
        env={**os.environ, "WAVESPEED_API_KEY": API_KEY},
        start_new_session=True,
    )
    out.close()
    return process
