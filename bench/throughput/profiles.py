"""py-spy profiles of the bridge: record one, and summarize it by function and library."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any


async def record(pid: int, raw: Path, seconds: float) -> dict[str, Any]:
    """Sample ``pid`` at 200 Hz for ``seconds`` into ``raw``; the summary, or an error."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    proc = await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(raw),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(proc.wait(), seconds + 60)
    if not raw.exists():
        return {"error": f"py-spy failed (exit {proc.returncode})"}
    return summarize(raw.read_text())


_GROUPS = (
    ("httpx_aiohttp/", "httpx-aiohttp"),
    ("httpx/", "httpx"),
    ("httpcore/", "httpcore"),
    ("aiohttp/", "aiohttp"),
    ("yarl/", "aiohttp"),
    ("multidict/", "aiohttp"),
    ("aiokafka/", "aiokafka"),
    ("kafka/", "aiokafka"),
    ("structlog/", "structlog + logging"),
    ("logging/", "structlog + logging"),
    ("prometheus_client/", "prometheus_client"),
    ("json/", "json"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("bridge/", "bridge"),
)


_TRANSPARENT = ("contextlib.py", "functools.py", "abc.py", "<frozen abc>")


def _frame_file(frame: str) -> str:
    head, _, rest = frame.rpartition(" (")
    return rest.rsplit(":", 1)[0] if head else frame


def _frame_func(frame: str) -> str:
    head, _, rest = frame.rpartition(" (")
    if not head:
        return frame
    return f"{head} ({rest.rsplit(':', 1)[0]})"


def _group(frame: str) -> str:
    path = _frame_file(frame)
    for needle, name in _GROUPS:
        if needle in path:
            return name
    return "other: " + path.rsplit("/", 1)[-1]


# A task's stages (issue 22), by the module of the deepest bridge frame on the stack: the
# library work below it is done for that stage. Checked in order; first match wins.
STAGES = (
    ("telemetry", ("shell/telemetry.py", "edges/metrics.py", "edges/logs.py", "edges/tracing.py")),
    ("core", ("bridge/core/",)),
    ("HTTP", ("edges/api.py", "shell/dispatch.py")),
    ("publish", ("shell/at_least_once.py", "shell/exactly_once.py", "shell/delivery.py")),
    ("commit", ("shell/commits.py",)),
    ("intake", ("shell/intake.py", "shell/rebalance.py", "edges/kafka.py")),
)
# Samples with no bridge frame: the clients' own tasks and callbacks, and the loop itself.
_OUTSIDE = {
    "aiokafka": "Kafka client's own tasks (fetch, send)",
    "aiohttp": "HTTP",
    "asyncio event loop": "event loop",
}


_ENTRY = ("bridge/__main__.py", "bridge/cli.py")  # below them: the event loop, every task


def stage(frames: list[str]) -> str:
    """The stage a sample's CPU is spent for (see :data:`STAGES`)."""
    for frame in reversed(frames):
        path = _frame_file(frame)
        if "bridge/" not in path or path.endswith(_ENTRY):
            continue
        for name, needles in STAGES:
            if any(n in path for n in needles):
                return name
        return "other bridge loops"
    return _OUTSIDE.get(_group(frames[-1]), "other")


# A helper thread waiting with a timeout (the log flusher, the span exporter) is sampled as
# if running: py-spy cannot tell a timed wait from work. Not CPU, so not counted.
_IDLE_LEAVES = ("Condition.wait (threading.py", "Event.wait (threading.py")


def _idle(leaf: str) -> bool:
    return leaf.startswith(_IDLE_LEAVES)


def summarize(raw: str, top: int = 20) -> dict[str, Any]:
    """Own and total time per function, and own time per library, from py-spy's raw output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    called: Counter[str] = Counter()  # where the bridge's own calls go, inclusive
    stages: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames or _idle(frames[-1]):
            continue
        samples += count
        leaf = frames[-1]
        own[_frame_func(leaf)] += count
        groups[_group(leaf)] += count
        stages[stage(frames)] += count
        for func in {_frame_func(f) for f in frames}:
            total[func] += count
        # Inclusive cost of what bridge code calls: the first frame below the deepest
        # bridge frame (looking through wrappers like contextlib) names the library doing
        # the work on the bridge's behalf.
        deepest = max(
            (i for i, f in enumerate(frames) if "bridge/" in _frame_file(f)), default=None
        )
        if deepest is None:
            called["(outside bridge code) " + _group(frames[min(len(frames) - 1, 5)])] += count
        elif deepest == len(frames) - 1:
            called["bridge code itself"] += count
        else:
            callee = deepest + 1
            while callee < len(frames) - 1 and _frame_file(frames[callee]).endswith(_TRANSPARENT):
                callee += 1
            owner = _frame_func(frames[deepest]).split(" (")[0]
            called[f"{owner} -> {_group(frames[callee])}"] += count

    def pct(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, v / samples) for k, v in c.most_common(n)]

    skip = (
        "run_forever",
        "run_until_complete",
        "_run_once",
        "<module>",
        "_run_code",
        "_run_module_as_main",
        "main (",
        "run (",
        "Runner.run",
        "_run (",
    )
    totals = [(k, v) for k, v in pct(total, 200) if not k.startswith(skip) and v < 0.97]
    return {
        "samples": samples,
        "own": pct(own, top),
        "total": totals[:top],
        "groups": pct(groups, 15),
        "called": pct(called, top),
        "stages": pct(stages, 20),
    }
