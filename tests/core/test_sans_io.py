"""The sans-I/O rule: nothing under p2pcompute/core imports I/O, clocks or randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import p2pcompute.core

FORBIDDEN = {
    "trio",
    "libp2p",
    "torch",
    "time",
    "random",
    "socket",
    "asyncio",
    "os",
    "secrets",
    "datetime",
    "threading",
}
CORE = Path(p2pcompute.core.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_has_modules() -> None:
    assert len(list(CORE.glob("*.py"))) >= 7


def test_core_imports_no_io_clock_or_randomness() -> None:
    offenders = {str(p.relative_to(CORE)): sorted(_imports(p) & FORBIDDEN) for p in sorted(CORE.rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_would_catch_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom time import monotonic\nimport libp2p.host\n")
    assert _imports(bad) & FORBIDDEN == {"trio", "time", "libp2p"}
