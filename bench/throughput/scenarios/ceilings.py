"""Phase 1, HTTP ceilings: bare polling loops (``bench.naive bare``) on core 0 against the
simulator, one per client stack; requests per second and CPU per request."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from bench.procs import cpu_shares, sample_cpu
from bench.throughput.feeding import MIX
from bench.throughput.stack import API_KEY, BRIDGE_CORE, ROOT, Stack, say


async def ceilings(stack: Stack) -> dict[str, Any]:
    s, sim = stack.s, stack.sim
    created = await sim.create(MIX[0].model, [1e6] * 2000, [0.0] * 2000, "completed")
    ids = json.dumps([t for t, _ in created]).encode()
    out: dict[str, Any] = {}
    for client in s.bare_clients:
        proc = await asyncio.create_subprocess_exec(
            "taskset",
            "-c",
            str(BRIDGE_CORE),
            sys.executable,
            "-m",
            "bench.naive",
            "bare",
            "--client",
            client,
            "--concurrency",
            str(s.concurrency),
            "--base-url",
            sim.base_url,
            "--seconds",
            str(s.bare_seconds),
            "--warmup",
            "3.0",  # httpcore's pool takes seconds to reach its pace
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "WAVESPEED_API_KEY": API_KEY},
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(ids)
        proc.stdin.close()
        await asyncio.wait_for(proc.stdout.readline(), 60)  # "measuring"
        a = sample_cpu(stack.core1_pids())
        line = await asyncio.wait_for(proc.stdout.readline(), s.bare_seconds + 60)
        b = sample_cpu(stack.core1_pids())
        await proc.wait()
        result: dict[str, Any] = json.loads(line)
        result["core1"] = cpu_shares(a, b)
        out[client] = result
        say(
            f"  bare {client:<16} {result['rps']:8,.0f} req/s  "
            f"client CPU {result['cpu_share']:.0%}  "
            f"simulator CPU {result['core1'].get('simulator', 0):.0%}"
        )
    return out
