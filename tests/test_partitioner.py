"""The producer's partitioner puts every key where aiokafka's default (the Java client's
murmur2) puts it: the ``murmurhash2`` package only makes it cheaper. Without the package
(tests/test_jsoncodec.py runs the bridge without the ``fast`` extra) aiokafka's is used."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from bridge.edges.kafka import MURMUR2_SEED, KeyPartitioner

pytest.importorskip("murmurhash2")  # the dev extra brings it


@given(key=st.binary(max_size=300), count=st.integers(min_value=1, max_value=500))
def test_a_key_goes_where_the_default_partitioner_puts_it(key: bytes, count: int) -> None:
    partitions = list(range(count))
    available = partitions[::2] or partitions  # a key ignores availability, as in Java
    ours = KeyPartitioner()
    assert ours.fast
    assert ours(key, partitions, available) == DefaultPartitioner()(key, partitions, available)


@given(key=st.binary(max_size=300))
def test_the_hash_is_the_java_clients_murmur2(key: bytes) -> None:
    from murmurhash2 import murmurhash2

    assert murmurhash2(key, MURMUR2_SEED) == murmur2(key)


def test_no_key_goes_to_an_available_partition() -> None:
    ours = KeyPartitioner()
    assert {ours(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)} == {1, 3}
