"""The testnet's cheating peer (``python -m p2pcompute.testing.peer``), and a production path that cannot cheat.

Cheat modes live only in ``p2pcompute.testing``: the production modules never import it, ``node run`` has no cheat
options, and ``serve`` takes a generic ``wrap_executor`` hook that only harnesses fill in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import p2pcompute
from p2pcompute.cli import main
from p2pcompute.testing import peer
from p2pcompute.testing.adversary import CheatSettings

PACKAGE = Path(p2pcompute.__file__).parent
PRODUCTION = ("node.py", "cli.py", "config.py", "worker.py")  # what `p2pcompute node run` runs


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, anywhere in it (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _reaches_testing(path: Path) -> list[str]:
    return sorted(m for m in _imported_modules(path) if f"{m}.".startswith("p2pcompute.testing."))


@pytest.mark.parametrize("name", PRODUCTION)
def test_the_production_path_does_not_import_the_testing_package(name: str) -> None:
    assert _reaches_testing(PACKAGE / name) == []


def test_the_check_would_catch_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def serve():\n    from p2pcompute.testing.adversary import CheatingExecutor\n"
        "from p2pcompute import testing\nimport p2pcompute.testing.jobs\n"
    )
    assert _reaches_testing(bad) == [
        "p2pcompute.testing",
        "p2pcompute.testing.adversary",
        "p2pcompute.testing.adversary.CheatingExecutor",
        "p2pcompute.testing.jobs",
    ]


def test_importing_the_node_loads_nothing_of_the_testing_package() -> None:
    code = (
        "import sys, p2pcompute.cli, p2pcompute.node, p2pcompute.worker, p2pcompute.config\n"
        "print(sorted(m for m in sys.modules if m.startswith('p2pcompute.testing')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_node_run_has_no_cheat_options(tmp_path: Path) -> None:
    args = ["node", "run", "--data-dir", str(tmp_path), "--cheat-mode", "zeros"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "No such option: --cheat-mode" in result.stderr or "No such option '--cheat-mode'" in result.stderr


def test_the_peer_runs_node_run_with_its_options_and_the_adversary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str | None, dict[str, Any]]] = []
    monkeypatch.setattr(peer, "run_node", lambda log_level, **options: calls.append((log_level, options)))
    args = [
        "--log-level", "debug", "--cheat-mode", "ring", "--cheat-honest-jobs", "3",
        "--cheat-ring-dir", str(tmp_path / "ring"), "--cheat-unreplicated-rate", "0.25",
        "--", "--data-dir", str(tmp_path / "data"), "--slots", "2", "--json-events",
    ]  # fmt: skip
    result = CliRunner().invoke(peer.main, args)
    assert result.exit_code == 0, result.output
    [(log_level, options)] = calls
    assert log_level == "debug"
    assert (options["data_dir"], options["slots"], options["json_events"]) == (tmp_path / "data", 2, True)
    wrap = options.pop("wrap_executor")
    assert wrap.__self__ == CheatSettings("ring", honest_jobs=3, ring_dir=tmp_path / "ring", unreplicated_rate=0.25)
    assert wrap.__func__ is CheatSettings.wrap_executor


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--cheat-mode", "ring", "--", "--data-dir", "{dir}"], 1, "cheat_mode ring needs cheat_ring_dir"),
        (["--cheat-mode", "sleeper", "--cheat-honest-jobs", "-1", "--"], 1, "cheat_honest_jobs must be >= 0"),
        (["--cheat-mode", "nope", "--"], 2, "Invalid value for '--cheat-mode'"),
        (["--", "--data-dir", "{dir}"], 2, "Missing option '--cheat-mode'"),
        (["--cheat-mode", "zeros", "--", "--no-such-option"], 2, "No such option"),
    ],
)
def test_the_peer_refuses_bad_options(tmp_path: Path, args: list[str], code: int, expected: str) -> None:
    result = CliRunner().invoke(peer.main, [a.format(dir=tmp_path) for a in args])
    assert result.exit_code == code, result.output
    assert expected in result.stderr
    if code == 1:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
