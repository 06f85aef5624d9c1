"""structlog set-up: a processor pipeline ending in JSON lines or a console renderer.

:func:`trace_ids` turns a task's packed trace context into ``trace_id`` and ``span_id``.

:class:`Redactor` runs on the rendered line, tracebacks included, so no log line can carry
the API key or a password. :class:`LineSink` writes the lines: in batches, not one write
per line (issue 22: the write was a third of a line's cost).
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

from bridge.core import jsoncodec, tracecontext

REDACTED = "[REDACTED]"
FLUSH_INTERVAL_S = 0.1  # the longest a line waits in the buffer (warnings never wait)


def trace_ids(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A task's packed trace context (``trace=``, from ``bridge.core.tracecontext``) as
    ``trace_id`` and ``span_id``: formatted only for lines that are written."""
    t = event_dict.pop("trace", None)
    if t is not None:
        event_dict["trace_id"], event_dict["span_id"] = tracecontext.ids(t)
    return event_dict


class Stamper:
    """``timestamp``: UTC, RFC 3339 with microseconds (``2026-12-07T19:48:54.123456Z``).
    structlog's ISO stamper builds a ``datetime`` and formats all of it for every line;
    this formats the seconds once a second (~1 µs less a line: bench/results/hot_path.md)."""

    __slots__ = ("_clock", "_second", "_text")

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._second, self._text = -1, ""

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        second, us = divmod(self._clock() // 1000, 1_000_000)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._text}.{us:06d}Z"
        return event_dict


class Redactor:
    """Replaces every configured secret in text. On a rendered line a secret may appear
    escaped (JSON, or ``repr`` in the console renderer), so those forms are searched too."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        forms = set()
        for s in secrets:
            if s and len(s) >= 4:
                forms |= {
                    s,
                    json.dumps(s)[1:-1],
                    json.dumps(s, ensure_ascii=False)[1:-1],
                    repr(s)[1:-1],
                }
        self._secrets = sorted(forms, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def __call__(self, logger: Any, method: str, line: Any) -> Any:
        """The last processor: after the renderer, on the line (a ``str``) itself."""
        return self.scrub(line) if self._secrets else line


class LineSink:
    """The logger at the end of the pipeline (structlog calls its method named for the
    level). Lines are buffered and written every ``FLUSH_INTERVAL_S`` by a thread, at once
    for a warning or worse, and at exit: a crash that gives no chance to run Python (a
    SIGKILL) loses at most the last interval's lines."""

    def __init__(self, stream: TextIO, interval: float = FLUSH_INTERVAL_S) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._flush_every, args=(interval,), name="log-flush", daemon=True
        )
        self._thread.start()

    def _add(self, line: str) -> None:
        with self._lock:  # the flusher swaps the list: an append must not land in the old one
            self._lines.append(line)

    def _urgent(self, line: str) -> None:
        self._add(line)
        self.flush()

    # structlog calls the method named for the line's level with the rendered line.
    debug = info = _add
    warning = warn = error = exception = critical = fatal = msg = _urgent

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            if lines:
                try:
                    self._stream.write("\n".join(lines) + "\n")
                    self._stream.flush()
                except (OSError, ValueError):  # the stream is gone (closed at exit)
                    pass

    def _flush_every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()


_sink: LineSink | None = None


def flush() -> None:
    """Write out the lines still buffered (at exit, or before the process ends itself)."""
    if _sink is not None:
        _sink.flush()


atexit.register(flush)


def configure(
    *,
    fmt: str = "json",
    level: str = "INFO",
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
) -> None:
    global _sink
    redactor = Redactor(secrets)
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=jsoncodec.dumps_text)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    if _sink is not None:
        _sink.close()
    sink = _sink = LineSink(stream or sys.stderr)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            Stamper(),
            structlog.processors.format_exc_info,
            trace_ids,
            renderer,
            redactor,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging: keep their warnings, routed to the same stream
    # (after the buffered lines) and scrubbed the same way.
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_OncePerInterval())
    handler.addFilter(_ScrubFilter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # An exception nobody caught would otherwise be printed raw by Python's default hook.
    sys.excepthook = _log_uncaught


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    structlog.get_logger("wavespeed_bridge").critical(
        "uncaught exception", exc_info=(exc_type, exc, tb)
    )


class _OncePerInterval(logging.Filter):
    """A library line repeated on every retry (aiokafka's "Unable connect to ...") is let
    through once per ``interval`` seconds, with the count of those held back."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        seen = self._last.get(key)
        if seen is not None and record.created - seen[0] < self._interval:
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        if len(self._last) > 1000:  # bounded: message templates, not values
            self._last.clear()
        self._last[key] = (record.created, 0)
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} similar in the last {self._interval:g}s)"
        return True


class _ScrubFilter(logging.Filter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        flush()  # the buffered lines first, in order
        record.msg = self._redactor.scrub(record.getMessage())
        record.args = None
        if record.exc_info:
            import traceback

            record.msg += "\n" + self._redactor.scrub(
                "".join(traceback.format_exception(*record.exc_info))
            )
            record.exc_info = None
            record.exc_text = None
        return True
