"""The README's main command: the local stack runs and every fed input is accounted for."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BROKER

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("demo_broker", ["tansu", "kafka"])
def test_demo_shows_events_and_where_metrics_are(tmp_path: Path, demo_broker: str) -> None:
    if demo_broker == "kafka" and BROKER != "kafka":
        pytest.skip("this run is on Tansu only")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            "demo",
            "--tasks",
            "5",
            "--config",
            str(ROOT / "config" / "local.yaml"),
            "--broker",
            demo_broker,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(
        rf"^broker +{'Apache Kafka' if demo_broker == 'kafka' else 'Tansu'} ", out, re.M
    )
    assert re.search(r"^metrics +http://127\.0\.0\.1:\d+/metrics", out, re.M), out
    # 5 tasks + an unknown id + one that times out + a malformed message.
    summary = re.search(r"^all 8 inputs accounted for in [\d.]+s: (.+)$", out, re.M)
    assert summary, out
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (\w+)", summary.group(1))}
    assert sum(counts.values()) == 8 and counts["dead_letter"] == 1, counts
    assert counts["timeout"] == 1 and counts["failed"] >= 1, counts  # the 404 at least
    events = re.findall(r"^  (completed|failed|timeout|dead-letter) ", out, re.M)
    assert len(events) == 8, out
    assert (tmp_path / ".demo" / "bridge.log").stat().st_size > 0
