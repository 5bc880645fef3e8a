"""End to end: real peer processes started by `p2pcompute testnet`, and a node's status endpoint via the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

TESTNET_TIMEOUT_S = 240


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pcompute.cli", *args]


def test_testnet_of_five_converges(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        _cli("testnet", "--peers", "5", "--report", str(report), "--timeout", "90"),
        capture_output=True,
        text=True,
        timeout=TESTNET_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "converged" in result.stdout
    data = json.loads(report.read_text())
    assert data["peers"] == 5
    assert data["converged"] is True
    convergence = data["convergence_seconds"]  # a figure for the report, not a limit the test judges
    assert isinstance(convergence, float)
    assert len(data["peer_ids"]) == 5
    assert sorted(data["adverts_per_peer"].values()) == [5] * 5
    for peer_id in data["peer_ids"]:  # the table lists every peer (by the tail of its id)
        assert peer_id[-12:] in result.stdout


def test_testnet_map_runs_every_task_and_reports_utilisation(tmp_path: Path) -> None:
    """`testnet --peers 2 --map 12`: every task verified, paid and equal to local execution; the summary and the
    workers' slot counters (slot-time held during the map, time in their executors) in the output and the report."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        _cli("testnet", "--peers", "2", "--map", "12", "--report", str(report), "--timeout", "90"),
        capture_output=True,
        text=True,
        timeout=TESTNET_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for part in ("map: 12 tasks", "tasks:      12 done of 12, 0 failed", "workers:", "credits:", "wall time:",
                 "tasks/s", "utilisation: ", "check:      12 of 12 equal to local execution"):  # fmt: skip
        assert part in result.stdout, result.stdout
    data = json.loads(report.read_text())["map"]
    assert data["done"] == 12 and data["mismatches"] == 0 and data["ok"] is True
    assert data["slots"] == 2  # one slot each
    # a slot is held from admission to receipt, the executor's run inside it: what the utilisation is made of
    assert 0 < data["exec_seconds"] <= data["slot_busy_seconds"]
    assert data["utilisation"] > 0 and data["credits_micro"] > 0


def test_node_run_status_and_peers(tmp_path: Path) -> None:
    """`p2pcompute node run` prints its id and addresses; `status` and `peers` read its endpoint."""
    env = {**os.environ, "P2PCOMPUTE_HOME": str(tmp_path)}
    node = subprocess.Popen(
        _cli(
            "node", "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--status-port", "0", "--no-benchmark", "--json-events"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert node.stdout is not None
        lines = []
        for line in node.stdout:  # ends when the process exits; the test's own timeout bounds it
            lines.append(line)
            if line.startswith("{"):
                break
        ready = json.loads(lines[-1])
        assert ready["event"] == "ready"
        assert lines[0].startswith("peer id: 12D3KooW")
        assert any(line.startswith("listening: /ip4/127.0.0.1/tcp/") for line in lines)
        assert ready["addrs"][0].endswith("/p2p/" + ready["peer_id"])

        status = subprocess.run(
            _cli("status", "--json"), capture_output=True, text=True, env=env, timeout=60, check=True
        )  # the status URL comes from node.json in the data directory
        assert json.loads(status.stdout)["peer_id"] == ready["peer_id"]
        peers = subprocess.run(_cli("peers"), capture_output=True, text=True, env=env, timeout=60, check=True)
        assert ready["peer_id"][-12:] in peers.stdout
        assert "TFLOPS" in peers.stdout
    finally:
        node.send_signal(signal.SIGINT)
        out, err = node.communicate(timeout=60)
    assert node.returncode == 0, err
    assert '"stopped"' in out


def test_status_of_a_node_that_is_not_running(tmp_path: Path) -> None:
    result = subprocess.run(
        _cli("status", "--url", "http://127.0.0.1:9/status"), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "is `p2pcompute node run` up?" in result.stderr
