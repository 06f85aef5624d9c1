"""The finished offsets above a committed position, encoded into the commit's metadata. Pure.

Tasks finish out of order, so only the finished prefix of a partition can be committed; the
records finished above it would be processed again by whoever gets the partition next.
Like the Kafka Parallel Consumer, the bridge stores them in the commit's metadata string
and skips them on assignment. The encoding is the smaller of a bitset and run lengths
over ``[base, last finished]``, base64 behind a version byte, so a broker's
``offset.metadata.max.bytes`` (4,096 by default) holds tens of thousands of offsets:

    byte 0      version (1)
    byte 1      0: bitset (bit i set: base + i finished), 1: runs (varints, alternating
                unfinished and finished lengths, starting with unfinished)
    varint      base: the committed offset the map belongs to
    varint      span: offsets covered after base
    ...         the bitset or the runs

A map whose base is not the committed offset, or that does not parse, is ignored: a
metadata string another tool wrote, or one from an older commit.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

VERSION = 1
BITSET, RUNS = 0, 1
# The broker's default offset.metadata.max.bytes: a longer string fails the whole commit.
DEFAULT_MAX_BYTES = 4096


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _bitset(rel: list[int], span: int) -> bytes:
    bits = bytearray((span + 7) // 8)
    for r in rel:
        bits[r >> 3] |= 1 << (r & 7)
    return bytes(bits)


def _runs(rel: list[int]) -> bytes:
    out = bytearray()
    cursor = 0  # next relative offset not yet described
    i = 0
    while i < len(rel):
        j = i
        while j + 1 < len(rel) and rel[j + 1] == rel[j] + 1:
            j += 1
        out += _varint(rel[i] - cursor)  # unfinished run
        out += _varint(j - i + 1)  # finished run
        cursor = rel[j] + 1
        i = j + 1
    return bytes(out)


def _encode(base: int, rel: list[int]) -> str:
    span = rel[-1] + 1 if rel else 0
    head = _varint(base) + _varint(span)
    bitset, runs = _bitset(rel, span), _runs(rel)
    kind, body = (BITSET, bitset) if len(bitset) <= len(runs) else (RUNS, runs)
    return base64.b64encode(bytes([VERSION, kind]) + head + body).decode("ascii")


def encode(base: int, finished: Iterable[int], max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The map of ``finished`` offsets above ``base`` (the committed offset), as metadata.

    Offsets at or below ``base`` are dropped. If the map would be longer than ``max_bytes``,
    it keeps the longest prefix that fits: the offsets it leaves out are processed again by
    the next owner, as without a map, but none is skipped wrongly.
    """
    return encode_sized(base, finished, max_bytes)[0]


def encode_sized(
    base: int, finished: Iterable[int], max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[str, int]:
    """:func:`encode`, and the length of the untruncated map (encoded once)."""
    rel = sorted({o - base for o in finished if o > base})
    text = _encode(base, rel)
    if len(text) <= max_bytes:
        return text, len(text)
    lo, hi = 0, len(rel)  # the largest prefix that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_encode(base, rel[:mid])) <= max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return _encode(base, rel[:lo]), len(text)


def size(base: int, finished: Iterable[int]) -> int:
    """Length of the untruncated map, in bytes of metadata."""
    return len(_encode(base, sorted({o - base for o in finished if o > base})))


def decode(text: str | None, base: int) -> frozenset[int]:
    """The finished offsets above ``base`` in ``text``; empty if it is not a map for ``base``."""
    if not text:
        return frozenset()
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        if len(raw) < 2 or raw[0] != VERSION or raw[1] not in (BITSET, RUNS):
            return frozenset()
        map_base, pos = _read_varint(raw, 2)
        span, pos = _read_varint(raw, pos)
        if map_base != base:
            return frozenset()
        body = raw[pos:]
        if raw[1] == BITSET:
            if len(body) != (span + 7) // 8:
                return frozenset()
            return frozenset(base + i for i in range(span) if body[i >> 3] & (1 << (i & 7)))
        out: set[int] = set()
        cursor, pos = 0, 0
        while pos < len(body):
            gap, pos = _read_varint(body, pos)
            run, pos = _read_varint(body, pos)
            cursor += gap
            if run <= 0 or cursor + run > span:
                return frozenset()
            out.update(range(base + cursor, base + cursor + run))
            cursor += run
        return frozenset(out)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return frozenset()
