"""When an exactly-once transaction closes (bridge.core.cadence), with times passed in."""

from __future__ import annotations

import pytest

from bridge.core.cadence import TransactionCadence
from bridge.core.clock import ManualClock


def test_with_no_commit_seen_a_transaction_closes_one_interval_after_its_oldest_event() -> None:
    cadence = TransactionCadence(1.0)
    assert cadence.expected() == 0.0
    assert cadence.due(10.0) == 11.0


def test_a_transaction_closes_early_by_what_its_recent_commits_took() -> None:
    clock = ManualClock(start=100.0)
    cadence = TransactionCadence(1.0)
    oldest = clock.monotonic()
    due = cadence.due(oldest)
    clock.now = due + 0.2  # acknowledged 200 ms after it was due (a busy event loop)
    cadence.committed(due, clock.monotonic())
    assert cadence.expected() == pytest.approx(0.2)
    # The next transaction's oldest event is acknowledged one interval after it was built.
    assert cadence.due(clock.monotonic()) == pytest.approx(clock.monotonic() + 0.8)


def test_the_longest_of_the_recent_commits_counts_until_it_is_forgotten() -> None:
    cadence = TransactionCadence(1.0, recent=3)
    for took in (0.1, 0.3, 0.05):
        cadence.committed(0.0, took)
    assert cadence.expected() == 0.3
    cadence.committed(0.0, 0.05)
    cadence.committed(0.0, 0.05)
    assert cadence.expected() == 0.05  # 0.3 was three commits ago


def test_a_slow_broker_shortens_transactions_to_half_the_interval_and_no_further() -> None:
    cadence = TransactionCadence(1.0)
    cadence.committed(0.0, 3.0)
    assert cadence.due(5.0) == 5.5


def test_a_commit_acknowledged_before_it_was_due_took_nothing() -> None:
    cadence = TransactionCadence(2.0)
    cadence.committed(10.0, 9.5)  # started early (a partition handed over)
    assert cadence.expected() == 0.0
    assert cadence.due(1.0) == 3.0
