"""The p2pcompute command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import p2pcompute


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pcompute.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert p2pcompute.__version__ in result.stdout


def test_keys_new_show_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    created = run("keys", "new", "--path", str(path))
    assert created.returncode == 0, created.stderr
    assert (path.stat().st_mode & 0o777) == 0o600
    peer_id = created.stdout.split("peer id:")[1].strip()

    shown = run("keys", "show", "--path", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info == {"peer_id": peer_id, "public_key": info["public_key"], "path": str(path)}
    assert len(bytes.fromhex(info["public_key"])) == 32

    again = run("keys", "new", "--path", str(path))
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert json.loads(run("keys", "show", "--path", str(path), "--json").stdout)["peer_id"] == peer_id

    forced = run("keys", "new", "--path", str(path), "--force")
    assert forced.returncode == 0
    assert json.loads(run("keys", "show", "--path", str(path), "--json").stdout)["peer_id"] != peer_id


def test_default_path_comes_from_p2pcompute_home(tmp_path: Path) -> None:
    env = {"P2PCOMPUTE_HOME": str(tmp_path)}
    assert run("keys", "new", env=env).returncode == 0
    shown = run("keys", "show", env=env)
    assert shown.returncode == 0
    assert str(tmp_path / "identity.key") in shown.stdout
    assert "peer_id:" in shown.stdout


def test_helpful_errors(tmp_path: Path) -> None:
    missing = run("keys", "show", "--path", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert "p2pcompute keys new" in missing.stderr
    assert "[key_file_missing]" in missing.stderr

    path = tmp_path / "k"
    assert run("keys", "new", "--path", str(path)).returncode == 0
    path.chmod(0o644)
    unsafe = run("keys", "show", "--path", str(path))
    assert unsafe.returncode == 1
    assert "chmod 600" in unsafe.stderr
    assert "Traceback" not in unsafe.stderr
