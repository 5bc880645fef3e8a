"""End to end: jobs through real peer processes (`testnet --demo`, `node run` + `job export` + `submit`)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

DEMO_TIMEOUT_S = 150  # 3 peers, each with a warm executor child, then the job (about 45 s on 2 shared cores)
EXAMPLE = Path(__file__).resolve().parents[2] / "testnet" / "examples" / "mlp.py"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pcompute.cli", *args]


def test_testnet_demo_runs_a_job_through_the_network(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        _cli("testnet", "--peers", "3", "--demo", "--report", str(report), "--timeout", "60"),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["converged"] is True
    demo = data["demo"]
    assert demo["ok"] is True, demo
    assert demo["worker"] in data["peer_ids"]
    assert demo["error"] is None
    assert demo["check"] in ("exact", "tolerance")
    if demo["check"] == "exact":  # a CPU worker: bit for bit the same as local execution
        assert demo["max_abs_diff"] == 0.0
    assert set(demo["agreeing"]) <= set(data["peer_ids"])
    assert demo["outputs"] == [{"dtype": "float32", "shape": [32, 10]}]
    assert set(demo["timings"]) == {"queue", "load", "exec", "total"}
    assert float(demo["price"]) <= 0.01
    assert "OK, equal to local execution" in result.stdout
    assert demo["worker"] in result.stdout


def test_export_then_submit_to_a_running_node(tmp_path: Path) -> None:
    """`job export` writes a bundle; `submit` runs it on a `node run` worker and saves the outputs."""
    env = {**os.environ, "P2PCOMPUTE_HOME": str(tmp_path / "home")}
    bundle = tmp_path / "mlp.job"
    exported = subprocess.run(
        _cli("job", "export", f"{EXAMPLE}:model", "--out", str(bundle)),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    node = subprocess.Popen(
        _cli(
            "node",
            "run",
            "--data-dir",
            str(tmp_path / "worker"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--status-port",
            "0",
            "--no-benchmark",
            "--json-events",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert node.stdout is not None
        ready: dict[str, object] = {}
        for line in node.stdout:  # ends when the process exits; the test's own timeout bounds it
            if line.startswith("{"):
                ready = json.loads(line)
                break
        assert ready.get("event") == "ready"
        addrs = ready["addrs"]
        assert isinstance(addrs, list)
        outputs = tmp_path / "outputs"
        submitted = subprocess.run(
            _cli(
                "submit",
                str(bundle),
                "--bootstrap",
                addrs[0],
                "--redundancy",
                "1",
                "--json",
                "--save-outputs",
                str(outputs),
                "--data-dir",
                str(tmp_path / "client"),
            ),
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    summary = json.loads(submitted.stdout)
    assert summary["worker"] == ready["peer_id"]
    assert summary["outputs"] == [{"dtype": "float32", "shape": [32, 10]}]
    assert json.loads((outputs / "summary.json").read_text()) == summary
    output = torch.load(outputs / "output-0.pt", weights_only=True)

    spec = importlib.util.spec_from_file_location("_mlp_example", EXAMPLE)  # the script `job export` ran
    assert spec is not None and spec.loader is not None
    mlp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mlp)
    with torch.no_grad():
        expected = mlp.model(*mlp.example_inputs())
    torch.testing.assert_close(output, expected)


ADVERSARY_TIMEOUT_S = 240  # 5 peers start (about 30 s on 2 shared cores), then 8 jobs, some waiting for workers


def test_testnet_trial_with_a_cheater_and_killed_workers(tmp_path: Path) -> None:
    """Workers SIGKILLed mid-job are never blamed as cheaters, and no wrong result is ever accepted."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        _cli(
            "testnet", "--peers", "5", "--jobs", "8", "--cheaters", "1", "--cheat-mode", "zeros",
            "--kill-rate", "1", "--report", str(report), "--timeout", "60",
        ),
        capture_output=True,
        text=True,
        timeout=ADVERSARY_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    trial = json.loads(report.read_text())["trial"]
    assert trial["jobs"] == 8
    assert trial["wrong_accepted"] == 0
    assert trial["honest_flagged"] == []
    # kill-rate 1: a worker dies in every job until two are left alive (the trial never kills the last two)
    assert len(trial["killed"]) == 3
    assert len(set(trial["killed"])) == 3
    assert trial["accepted"] + trial["failed"] == 8
    assert "wrong results accepted: 0" in result.stdout
