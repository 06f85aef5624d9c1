"""JSON in and out of the hot path: orjson where it is installed (the ``fast`` extra), else
the standard library. Pure.

The standard library stays the reference: whatever orjson refuses (a lone surrogate, NaN
in input, an integer past 64 bits, a non-string key) goes through it instead, so both give
the same answers and orjson only makes them cheaper (measured in ``bench/throughput``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

try:
    import orjson
except ImportError:  # optional: everything works without it
    orjson = None  # type: ignore[assignment]

Backend = Literal["orjson", "stdlib"]
_use_orjson = orjson is not None


def use(backend: Backend | None) -> Backend:
    """Pick the backend (None: orjson when installed); returns the one in use."""
    global _use_orjson
    _use_orjson = orjson is not None and backend != "stdlib"
    return backend_in_use()


def backend_in_use() -> Backend:
    return "orjson" if _use_orjson else "stdlib"


def loads(data: bytes | str) -> Any:
    """``json.loads``: the same values and the same errors (a ``ValueError``)."""
    if _use_orjson:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # the standard library decides: it accepts some of what orjson refuses
    return json.loads(data)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, non-ASCII text as is. What cannot be written raises (a
    ``ValueError``, ``TypeError`` or ``RecursionError``): lone surrogates, and with the
    standard library NaN and infinities (orjson writes those as null, as the caller's
    fallback does)."""
    if _use_orjson:
        try:
            return orjson.dumps(obj)
        except orjson.JSONEncodeError:
            pass  # the standard library says why
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def dumps_text(obj: Any, default: Callable[[Any], Any] | None = None, **kw: Any) -> str:
    """A log line's JSON (structlog's serializer): ``default`` writes what JSON has no
    form for; ``kw`` go to the standard library's ``json.dumps``."""
    if _use_orjson:
        try:
            return orjson.dumps(obj, default=default).decode()
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, default=default, **kw)
