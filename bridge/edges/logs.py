"""structlog set-up: a processor pipeline ending in JSON lines or a console renderer.

:func:`trace_ids` turns a task's packed trace context into ``trace_id`` and ``span_id``.

:class:`Redactor` sits last before rendering and removes every configured secret from
every value, tracebacks included, so no log line can carry the API key or a password.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

from bridge.core import tracecontext

REDACTED = "[REDACTED]"


def trace_ids(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A task's packed trace context (``trace=``, from ``bridge.core.tracecontext``) as
    ``trace_id`` and ``span_id``: formatted only for lines that are written."""
    t = event_dict.pop("trace", None)
    if t is not None:
        event_dict["trace_id"], event_dict["span_id"] = tracecontext.ids(t)
    return event_dict


class Redactor:
    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._value(v) for v in value]
        if isinstance(value, bytes | bytearray):
            return self.scrub(bytes(value).decode("utf-8", "replace"))
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.scrub(repr(value))

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event_dict
        return {k: self._value(v) for k, v in event_dict.items()}


def configure(
    *,
    fmt: str = "json",
    level: str = "INFO",
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
) -> None:
    redactor = Redactor(secrets)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            trace_ids,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level)),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging: keep their warnings, routed to the same stream
    # and scrubbed the same way.
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
