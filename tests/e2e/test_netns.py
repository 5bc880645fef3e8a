"""End to end: `p2pcompute testnet --netns`, peers in network namespaces (root, ``ip``, ``nft`` and ``tc`` needed;
skipped without them, with the reason).

One small testnet, a real run of the command (the module stays near a minute on 2 cores), checked for two things: a
worker behind NAT serves a client in another namespace over the relay, and over links with 20% segment loss and
50 ms one-way delay no wrong result is accepted and no job is paid twice. The long runs (R4, R5 with a cheater at
scale, the NAT figures with a hole-punched worker, the 10-minute churn) are ``benchmarks/faults.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RUN_TIMEOUT_S = 240


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nft", "tc") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install iproute2 nftables)"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")


def _testnet(tmp_path: Path, scenario: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    path = tmp_path / "scenario.toml"
    path.write_text(scenario)
    report = tmp_path / "report.json"
    args = ["testnet", "--scenario", str(path), "--report", str(report), "--dir", str(tmp_path / "net")]
    result = subprocess.run(
        [sys.executable, "-m", "p2pcompute.cli", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    data = json.loads(report.read_text()) if report.exists() else {}
    return result, data


def _logs(tmp_path: Path) -> str:
    """The tail of every peer's log, for a failure message."""
    parts = []
    for log in sorted((tmp_path / "net").glob("*/*.log")):
        lines = log.read_text(errors="replace").splitlines()[-15:]
        parts.append(f"--- {log.relative_to(tmp_path)}\n" + "\n".join(lines))
    return "\n".join(parts)


def test_not_root_is_refused_in_one_line() -> None:
    """The command run as nobody: one line, exit 1, nothing built."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", sys.executable]
    env = {**os.environ, "HOME": "/tmp"}
    probe = subprocess.run([*nobody, "-c", "import p2pcompute.cli"], capture_output=True, timeout=60, env=env)
    if probe.returncode != 0:
        pytest.skip("user nobody cannot run this checkout's interpreter (the in-process test covers the check)")
    result = subprocess.run(
        [*nobody, "-m", "p2pcompute.cli", "testnet", "--netns", "--jobs", "1"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: network namespaces need root; run as root or drop --netns [bad_config]"
    ]


SCENARIO = """
jobs = 6

[netns]
each_worker = true
public_subnet = "11.77.0.0/24"  # a global "internet": the client never dials the NAT worker's private address

[netns.faults]
delay_ms = 50
loss = 0.2
seed = 11

[[netns.peer]]
name = "relay"
role = "relay"

[[netns.peer]]
name = "nat-w"
nat_router = "home"
hole_punch = false
egress = ["relay"]

[[netns.peer]]
name = "pub-w"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    """One testnet (the CI budget holds one): a relay; a worker behind a NAT router that can reach only the relay
    (no direct path to it can exist); a public worker; a client in its own namespace; 20% segment loss and 50 ms
    one-way delay on every link. The client sends each worker three jobs in turn."""
    tmp_path = tmp_path_factory.mktemp("netns")
    result, report = _testnet(tmp_path, SCENARIO)
    return result, report, tmp_path


def test_a_worker_behind_nat_serves_a_client_in_another_namespace(run: Any) -> None:
    """The worker behind NAT serves verified jobs over the relayed connection; the public one over a direct one."""
    result, report, tmp_path = run
    assert report, result.stdout + result.stderr + _logs(tmp_path)
    peers = {p["name"]: p for p in report["peers"]}
    jobs = report["client"]["jobs"]
    for name, relayed in (("nat-w", True), ("pub-w", False)):
        mine = [job for job in jobs if job["only"] == peers[name]["peer_id"]]
        accepted = [job for job in mine if job["accepted"]]
        assert len(mine) == 3 and len(accepted) >= 2, mine  # a job may run out of time on such links
        assert all(job["worker"] == peers[name]["peer_id"] and not job["wrong"] for job in accepted), mine
        assert all(job["relayed"] is relayed for job in accepted), mine
    reach = peers["nat-w"]["reach"]  # behind its NAT, it knows it, and holds a slot on the relay
    assert peers["nat-w"]["router"] and reach["reachability"] == "private", reach
    assert any(peers["relay"]["peer_id"] in a and "/p2p-circuit/" in a for a in reach["relayed_addrs"]), reach
    assert "relayed:    " in result.stdout and "direct:     " in result.stdout, result.stdout


def test_faulty_links_accept_no_wrong_result_and_pay_no_job_twice(run: Any) -> None:
    """Every accepted result equals local execution, and the client's and the workers' ledgers agree receipt for
    receipt (none lost, none twice, none unknown, every accepted job paid). (Cheaters under these faults: the R5
    figure of benchmarks/faults.py.)"""
    result, report, tmp_path = run
    assert result.returncode == 0, result.stdout + result.stderr + _logs(tmp_path)
    summary, ledger = report["summary"], report["ledger"]
    assert summary["jobs"] == 6 and summary["wrong_accepted"] == 0
    assert summary["accepted"] >= 5, report["client"]["jobs"]
    assert ledger["ok"], ledger
    assert not ledger["double"] and not ledger["lost"] and not ledger["unknown"] and not ledger["unpaid"]
    assert ledger["client_receipts"] == ledger["worker_receipts"] == summary["accepted"]
    # The faults were there: every relayed byte crossed the relay's proxy (a connection crosses the proxy of the peer
    # it was dialled to: the public worker's may see none, when it dialled the client first).
    proxies = {p["name"]: p["proxy"] for p in report["peers"]}
    assert proxies["relay"]["segments_lost"] > 0, proxies
    assert sum(p["segments_lost"] for p in proxies.values() if p) > proxies["relay"]["segments_lost"], proxies
