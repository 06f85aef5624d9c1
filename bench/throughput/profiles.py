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


def summarize(raw: str, top: int = 20) -> dict[str, Any]:
    """Own and total time per function, and own time per library, from py-spy's raw output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    called: Counter[str] = Counter()  # where the bridge's own calls go, inclusive
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        leaf = frames[-1]
        own[_frame_func(leaf)] += count
        groups[_group(leaf)] += count
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
    }
