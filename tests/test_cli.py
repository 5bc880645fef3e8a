"""The p2pcompute command, run as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

import p2pcompute
from p2pcompute.cli import main
from p2pcompute.client import Job
from p2pcompute.core.jobspec import CompareMode, decode_bundle, decode_job


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


# --- job export and submit (in process: torch is imported once) ------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "testnet" / "examples" / "mlp.py"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("_mlp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_export_writes_a_bundle_that_runs_like_the_module(tmp_path: Path) -> None:
    out = tmp_path / "mlp.job"
    result = invoke("job", "export", f"{EXAMPLE}:model", "--out", str(out))
    assert result.exit_code == 0, result.output
    job = Job.from_bundle(out.read_bytes())  # checks every tensor against its hash, dry-runs the graph
    assert f"digest:     {job.digest.hex()}" in result.output
    assert job.outputs == (("float32", (32, 10)),)
    assert "outputs:    float32[32, 10]" in result.output
    assert "ops:        " in result.output and "tolerance (rtol 0.0001, atol 1e-05)" in result.output

    example = _load_example()
    with torch.no_grad():
        expected = example.model(*example.example_inputs())
    torch.testing.assert_close(job.run_locally()[0], expected)

    again = tmp_path / "again.job"
    assert invoke("job", "export", f"{EXAMPLE}:model", "--out", str(again)).exit_code == 0
    assert again.read_bytes() == out.read_bytes()  # fixed weights and inputs: the same bundle every time


def test_job_export_of_a_class_and_of_a_function(tmp_path: Path) -> None:
    exact = tmp_path / "class.job"
    result = invoke("job", "export", f"{EXAMPLE}:MLP", "--out", str(exact), "--compare", "exact")
    assert result.exit_code == 0, result.output
    assert decode_job(decode_bundle(exact.read_bytes())[0]).compare.mode is CompareMode.EXACT

    function = tmp_path / "affine.job"
    result = invoke(
        "job", "export", f"{EXAMPLE}:affine", "--inputs", "affine_inputs", "--out", str(function), "--atol", "0.5"
    )
    assert result.exit_code == 0, result.output
    job = Job.from_bundle(function.read_bytes())
    assert job.outputs == (("float32", (32, 16)),)
    assert decode_job(job.spec_bytes).compare.atol == 0.5
    x, w = _load_example().affine_inputs()
    torch.testing.assert_close(job.run_locally()[0], torch.relu(x @ w + 1.0))


def test_job_export_dotted_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "square_job.py").write_text(
        "import torch\n\ndef square(x):\n    return x * x\n\nexample_inputs = (torch.ones(3),)\n"
    )
    monkeypatch.chdir(tmp_path)  # MODULE is importable from the current directory, as with `python -m`
    result = invoke("job", "export", "square_job:square", "--out", "square.job")
    assert result.exit_code == 0, result.output
    assert Job.from_bundle((tmp_path / "square.job").read_bytes()).run_locally()[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("no-colon", (), "expected MODULE:NAME"),
        ("{dir}/missing.py:model", (), "no such file"),
        ("no_such_module_p2pc:model", (), "cannot import no_such_module_p2pc"),
        ("{example}:nothing", (), "has no attribute 'nothing'"),
        ("{example}:BATCH", (), "is of type int: expected an nn.Module"),
        ("{example}:model", ("--inputs", "missing_inputs"), "has no 'missing_inputs'"),
        ("{example}:model", ("--inputs", "IN_FEATURES"), "must be a tuple of tensors, not int"),
        ("{example}:affine", (), "[not_exportable]"),  # called with one input, the function takes two
        ("{dir}/broken.py:f", (), "importing {dir}/broken.py failed: ZeroDivisionError"),
    ],
)
def test_job_export_errors_are_one_line(tmp_path: Path, target: str, extra: tuple[str, ...], message: str) -> None:
    (tmp_path / "broken.py").write_text("1 / 0\n")
    fill = {"dir": str(tmp_path), "example": str(EXAMPLE)}
    out = tmp_path / "x.job"
    result = CliRunner().invoke(main, ["job", "export", target.format(**fill), "--out", str(out), *extra])
    assert result.exit_code == 1, result.output
    assert message.format(**fill) in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert not out.exists()


def test_submit_needs_a_bootstrap_and_a_valid_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("P2PCOMPUTE_BOOTSTRAP", raising=False)
    bundle = tmp_path / "mlp.job"
    assert invoke("job", "export", f"{EXAMPLE}:model", "--out", str(bundle)).exit_code == 0
    no_bootstrap = CliRunner().invoke(main, ["submit", str(bundle)])
    assert no_bootstrap.exit_code == 1
    assert "submit needs --bootstrap ADDR" in no_bootstrap.output

    addr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWBehrqEkFDQq79AD891NhBaGWBrwqb2FMJywLvSKXLvzb"
    garbage = tmp_path / "garbage.job"
    garbage.write_bytes(b"\x93not a bundle")
    bad = CliRunner().invoke(main, ["submit", str(garbage), "--bootstrap", addr])
    assert bad.exit_code == 1
    assert bad.output.startswith("Error: ") and bad.output.count("\n") == 1

    missing = CliRunner().invoke(main, ["submit", str(tmp_path / "none.job"), "--bootstrap", addr])
    assert missing.exit_code == 1
    assert "cannot read" in missing.output

    bad_price = CliRunner().invoke(main, ["submit", str(bundle), "--bootstrap", addr, "--max-price", "cheap"])
    assert bad_price.exit_code == 1
    assert "price 'cheap' is not a number" in bad_price.output
