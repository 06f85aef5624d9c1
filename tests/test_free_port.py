"""``free_port``: a port outside the ephemeral range (no outgoing connection can take it
before the server binds it), bindable, and never handed out twice."""

from __future__ import annotations

import random
import socket

import pytest

from bridge.local import broker


def test_ports_are_bindable_distinct_and_below_the_ephemeral_range() -> None:
    low = broker._ephemeral_low()
    ports = [broker.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(broker._LOWEST_PORT <= p < max(low, broker._LOWEST_PORT + 1000) for p in ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        taken = listening.getsockname()[1]
        other = broker.free_port()
        broker._given.discard(other)
        picks = iter([taken, other])
        monkeypatch.setattr(random, "randrange", lambda a, b: next(picks))
        assert broker.free_port() == other  # the port in use was tried, and skipped
