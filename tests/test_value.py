"""``bridge.core.value.value``: frozen to the type checker, a plain slotted dataclass at
run time (no ``object.__setattr__`` per field)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mypy import api as mypy_api

from bridge.core.clock import Instant
from bridge.core.messages import Record


def test_a_value_is_equal_and_hashed_by_its_fields_and_has_no_dict() -> None:
    a = Record("t", 0, 5, b"k", b"v", (("h", b"1"),), 7)
    b = Record("t", 0, 5, b"k", b"v", (("h", b"1"),), 7)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Record("t", 0, 6, b"k", b"v", (("h", b"1"),), 7)
    assert not hasattr(a, "__dict__")
    match Instant(1.0, 2.0):
        case Instant(mono, wall):
            assert (mono, wall) == (1.0, 2.0)


def test_mypy_refuses_an_assignment_to_a_field(tmp_path: Path) -> None:
    def check(body: str) -> tuple[str, int]:
        source = tmp_path / "snippet.py"
        source.write_text("from bridge.core.clock import Instant\n\n" + textwrap.dedent(body))
        out, _, status = mypy_api.run(
            ["--strict", "--no-incremental", "--follow-imports=silent", str(source)]
        )
        return out, status

    out, status = check("i = Instant(1.0, 2.0)\nprint(i.mono + i.wall)\n")
    assert status == 0, out
    out, status = check("i = Instant(1.0, 2.0)\ni.mono = 3.0\n")
    assert status == 1 and 'Property "mono" defined in "Instant" is read-only' in out, out
