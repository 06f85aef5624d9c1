"""W3C trace context (``traceparent``, ``tracestate``) of an input record, kept with its task.
Pure.

A task keeps the context it came with in one integer (trace id, span id and flags packed:
about 60 bytes, against a few hundred for the parsed objects), plus the ``tracestate`` only
when there is one. The event carries it as the CloudEvents distributed-tracing extension
(``traceparent``, ``tracestate``: the trace that started the task); the shell's spans join
the same trace (``bridge.edges.tracing``).
"""

from __future__ import annotations

import re

from bridge.core.messages import Headers

# version 00: 2 hex, trace id 32 hex (not all zero), span id 16 hex (not all zero), flags 2 hex
_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEADERS = (("traceparent", "tracestate"), ("ce_traceparent", "ce_tracestate"))
MAX_TRACESTATE = 512  # the W3C limit

Trace = int | tuple[int, str]  # packed traceparent, and the tracestate when there is one


_RECORDED = 1 << 200  # above the trace id: the bridge makes spans for this task
_ID128 = (1 << 128) - 1
_ID64 = (1 << 64) - 1
_LOW200 = (1 << 200) - 1  # trace id, span id and flags, without the recorded bit


def pack(trace_id: int, span_id: int, flags: int) -> int:
    return (trace_id << 72) | (span_id << 8) | flags


def unpack(trace: Trace) -> tuple[int, int, int, str]:
    """(trace id, span id, flags, tracestate)"""
    packed, state = trace if isinstance(trace, tuple) else (trace, "")
    return (packed >> 72) & _ID128, (packed >> 8) & _ID64, packed & 0xFF, state


def sampled(trace: Trace) -> bool:
    """The context's sampled flag: someone records this trace."""
    packed = trace[0] if isinstance(trace, tuple) else trace
    return bool(packed & 1)


def recorded(trace: Trace | None) -> bool:
    """Whether the bridge decided to make spans for the task with this context (once, when
    the task was taken: every later span of the task follows that one decision)."""
    if trace is None:
        return False
    packed = trace[0] if isinstance(trace, tuple) else trace
    return bool(packed & _RECORDED)


def mark_recorded(trace: Trace) -> Trace:
    if isinstance(trace, tuple):
        return trace[0] | _RECORDED, trace[1]
    return trace | _RECORDED


def parse(value: bytes | None) -> int | None:
    """A ``traceparent`` value, packed; None when it is not one this version reads."""
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if trace_id == 0 or span_id == 0:
        return None  # all zero: invalid by the spec
    return pack(trace_id, span_id, int(match[3], 16))


def from_headers(headers: Headers) -> Trace | None:
    """The input's context: its ``traceparent`` header, or ``ce_traceparent`` when it is a
    binary-mode CloudEvent; with its ``tracestate`` when valid text."""
    if not headers:
        return None
    for parent_name, state_name in _HEADERS:
        found = {k.lower(): v for k, v in headers if k.lower() in (parent_name, state_name)}
        packed = parse(found.get(parent_name))
        if packed is None:
            continue
        state = _state(found.get(state_name))
        return (packed, state) if state else packed
    return None


def _state(value: bytes | None) -> str:
    if not value or len(value) > MAX_TRACESTATE:
        return ""
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return ""
    return text if text.isprintable() else ""


def _hex(trace: Trace) -> str:
    """Trace id, span id and flags as 50 hex digits: one format of the packed int (three
    formats cost each per-task log line and event twice as much)."""
    packed = trace[0] if isinstance(trace, tuple) else trace
    return f"{packed & _LOW200:050x}"


def traceparent(trace: Trace) -> str:
    h = _hex(trace)
    return f"00-{h[:32]}-{h[32:48]}-{h[48:]}"


def tracestate(trace: Trace) -> str:
    return trace[1] if isinstance(trace, tuple) else ""


def ids(trace: Trace) -> tuple[str, str]:
    """(trace id, span id) as hex, for log lines and exemplars."""
    h = _hex(trace)
    return h[:32], h[32:48]
