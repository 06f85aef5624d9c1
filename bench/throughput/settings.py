"""What one run measures and for how long: :class:`Settings`, from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Settings:
    policy: str = "fixed"
    # Fixed-policy intervals of the concurrent scenario, one run each; the first is the
    # headline and the naive comparison. 10 s offers 1,000 polls/s at 10,000 in flight,
    # about what the adaptive policy asks for this mix (~750/s measured); 5 s is
    # WaveSpeed's minimum for video, a stress point.
    intervals_s: tuple[float, ...] = (10.0, 5.0)
    transport: str = "aiohttp"
    compare_transports: tuple[str, ...] = ("httpx",)
    # Local brokers: the first serves every phase; the sustained scenario (with
    # ``transport``) also runs on each of the others.
    brokers: tuple[str, ...] = ("kafka", "tansu")
    kafka_heap_mb: int = 1024
    concurrency: int = 100  # api.max_concurrent_requests and the bare loops' connections
    concurrent: int = 10_000
    memory_sizes: tuple[int, ...] = (10_000, 100_000)
    bare_clients: tuple[str, ...] = (
        "aiohttp",
        "bridge-api",
        "httpx-aiohttp",
        "bridge-api-httpx",
        "httpx",
    )
    bare_seconds: float = 6.0
    sustained_warmup_s: float = 5.0
    sustained_seconds: float = 20.0
    compare_seconds: float = 12.0
    profile_seconds: float = 15.0
    concurrent_warmup_s: float = 20.0
    concurrent_seconds: float = 40.0
    naive_concurrent_seconds: float = 30.0
    phases: tuple[str, ...] = ("ceilings", "sustained", "naive", "concurrent", "memory")
    seed: int = 6

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}
