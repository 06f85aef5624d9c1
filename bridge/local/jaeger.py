"""Jaeger v2, the tracing backend of the tests: OTLP/HTTP in, traces out of its query API.

The binary is built once from the Go module proxy by ``scripts/jaeger`` (cached in
``.cache/jaeger/<version>/``); here it runs with in-memory storage on free local ports.
``python -m bridge.local.jaeger`` runs one in the foreground and prints where it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bridge.local.broker import free_port

ROOT = Path(__file__).resolve().parents[2]

_CONFIG = """\
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: []
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{grpc}
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
"""


def binary() -> Path:
    """The Jaeger binary, built first if this machine has none (waits for a build under way)."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "jaeger")], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/jaeger failed: {done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass
class Jaeger:
    process: subprocess.Popen[bytes]
    otlp_port: int
    query_port: int
    log_path: Path

    @property
    def otlp_endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the SDK appends ``/v1/traces``)."""
        return f"http://127.0.0.1:{self.otlp_port}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.query_port}"

    async def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """The spans Jaeger holds for ``trace_id`` (none yet: empty), each with its
        service's name under ``serviceName``."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            r = await client.get(f"{self.query_url}/api/traces/{trace_id}")
        if r.status_code == 404:
            return []
        r.raise_for_status()
        data = r.json().get("data") or []
        spans: list[dict[str, Any]] = []
        for t in data:
            for span in t["spans"]:
                spans.append(
                    {**span, "serviceName": t["processes"][span["processID"]]["serviceName"]}
                )
        return spans

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def start_jaeger(directory: Path, timeout: float = 60.0) -> Jaeger:
    directory.mkdir(parents=True, exist_ok=True)
    path = await asyncio.to_thread(binary)
    otlp, query, grpc = free_port(), free_port(), free_port()
    config = directory / "jaeger.yaml"
    config.write_text(_CONFIG.format(otlp=otlp, query=query, grpc=grpc))
    log_path = directory / "jaeger.log"
    process = _spawn(path, config, log_path)
    jaeger = Jaeger(process, otlp, query, log_path)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"jaeger exited: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                services = await client.get(f"{jaeger.query_url}/api/services")
                ready = await _listening(otlp)
                if services.status_code == 200 and ready:
                    return jaeger
            if time.monotonic() > deadline:
                jaeger.close()
                raise TimeoutError(f"jaeger not ready in {timeout:g}s: {log_path}")
            await asyncio.sleep(0.2)


def _spawn(binary: Path, config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(binary), "--config", f"file:{config}"], stdout=log, stderr=subprocess.STDOUT
        )


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def _main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="jaeger-") as tmp:
        jaeger = await start_jaeger(Path(tmp))
        print(f"OTEL_EXPORTER_OTLP_ENDPOINT={jaeger.otlp_endpoint}", flush=True)
        print(f"query API: {jaeger.query_url}/api/traces/<trace id>", flush=True)
        try:
            await asyncio.to_thread(jaeger.process.wait)
        finally:
            jaeger.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
    sys.exit(0)
