"""The layout says which code is pure: nothing in ``bridge.core`` does I/O or imports an I/O
library, and the edges never reach into the shell. Checked on the source, and in a fresh
interpreter that imports every core module (so an indirect import counts too)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

BRIDGE = Path(__file__).resolve().parents[1] / "bridge"
IO_LIBRARIES = frozenset(
    {
        "aiohttp",
        "aiokafka",
        "asyncio",
        "http",
        "httpx",
        "logging",
        "prometheus_client",
        "selectors",
        "socket",
        "ssl",
        "structlog",
        "subprocess",
        "threading",
        "urllib.request",
        "yarl",
    }
)


# Loaded indirectly, the standard library's own helpers pull in socket and threading
# (email.utils does); what must never load is an event loop, a client or a log pipeline.
LOADED_NEVER = frozenset(
    {"aiohttp", "aiokafka", "asyncio", "httpx", "logging", "prometheus_client", "structlog"}
)


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _modules(package: str) -> list[Path]:
    return sorted((BRIDGE / package).glob("*.py"))


def _names(imports: set[str], roots: frozenset[str]) -> set[str]:
    return {i for i in imports if i in roots or i.split(".")[0] in roots}


def test_no_core_module_imports_an_io_library_or_the_shell() -> None:
    assert len(_modules("core")) > 10
    for path in _modules("core"):
        imports = _imports(path)
        assert not _names(imports, IO_LIBRARIES), f"{path.name}: {_names(imports, IO_LIBRARIES)}"
        outside = {i for i in imports if i.startswith(("bridge.shell", "bridge.edges"))}
        assert not outside, f"{path.name} imports {outside}"


def test_the_edges_never_import_the_shell() -> None:
    for path in _modules("edges"):
        shell = {i for i in _imports(path) if i.startswith("bridge.shell")}
        assert not shell, f"{path.name} imports {shell}"


def test_importing_the_whole_core_loads_no_io_library() -> None:
    modules = [f"bridge.core.{p.stem}" for p in _modules("core") if p.stem != "__init__"]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert "bridge.core.book" in loaded
    assert not _names(loaded, LOADED_NEVER), sorted(_names(loaded, LOADED_NEVER))
