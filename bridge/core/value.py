"""``@value``: an immutable record type, as ``@dataclass(frozen=True, slots=True)`` is to
the type checker, without what frozen costs at run time.

A frozen dataclass sets each field through ``object.__setattr__`` (its own ``__setattr__``
refuses): ~0.1 µs a field on every instance. The records a task goes through (a consumed
record, clock readings, facts, the event's record) are made a dozen times per task, ~3 µs
of the ~190 µs a task costs (issue 22). mypy reads ``@value`` as frozen (PEP 681's
``frozen_default``) and rejects any assignment to a field; at run time the class is a
plain slotted dataclass, hashable by its fields as a frozen one is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def value(cls: type[T]) -> type[T]:
    return dataclass(slots=True, unsafe_hash=True)(cls)
