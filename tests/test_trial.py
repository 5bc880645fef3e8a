"""Short verification trials against an in-process cluster (p2pcompute.trial.run_cluster_trial), one per patient
adversary: real hosts, workers with real executor children, a real client, in one trio process.

They check the report's structure and that the adversary did what it is for (cheat, after its honest jobs; re-enter
under a new key) — not the verification goals, which benchmarks/verification.py measures at 1,000 jobs. Every job
goes to two workers (``redundancy=2``), so each worker gets work whatever the client's plan for unproven workers, and
four workers leave two honest ones however many cheaters are caught.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from p2pcompute.trial import Adversary, TrialConfig, TrialReport, run_cluster_trial

TRIAL_TIMEOUT_S = 300.0  # worker start-up dominates (executor children import torch on a loaded 2-core machine)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export's deprecation noise


async def _trial(tmp_path: Path, workers: int, adversary: Adversary, config: TrialConfig) -> TrialReport:
    with trio.fail_after(TRIAL_TIMEOUT_S):
        return await run_cluster_trial(tmp_path, workers, adversary, config)


def _structure(report: TrialReport, jobs: int) -> dict[str, Any]:
    data = report.to_json()
    assert data["jobs"] == jobs
    assert data["accepted"] + data["failed"] == jobs
    assert 0.0 <= data["wrong_accepted_rate"] <= 1.0
    assert data["compute_overhead"] >= 1.0
    assert len(data["compute_by_block"]) == 1  # fewer than 100 jobs: one block
    assert data["job_flops"] > 0
    assert report.lines()[0].startswith(f"jobs run {jobs}")
    (mode,) = data["adversaries"]
    adversary: dict[str, Any] = data["adversaries"][mode]
    for key in ("members", "caught", "ring_caught", "jobs_until_detected", "cheats", "wrong_accepted", "reentries"):
        assert key in adversary
    return adversary


async def test_sleeper_is_honest_for_its_first_jobs_then_cheats_and_is_caught(tmp_path: Path) -> None:
    honest_jobs = 3
    adversary = Adversary("sleeper", 1, honest_jobs=honest_jobs)
    # One job at a time: when the client flags it, every job the sleeper ran before has been counted.
    report = await _trial(tmp_path, 4, adversary, TrialConfig(jobs=20, redundancy=2, concurrency=1))
    sleeper = _structure(report, 20)
    assert sleeper["members"] == 1
    assert sleeper["cheats"] >= 1, report.lines()
    (key,) = report.cheaters.values()
    assert key["detected"], report.lines()
    # Caught on a cheat, and it cheats only after its honest jobs (no job was escalated before its first cheat, so
    # every job it ran until then was gathered and counted).
    assert key["jobs_until_detected"] >= honest_jobs + 1, report.lines()
    assert report.honest_flagged == []


async def test_ring_cheats_when_every_replica_is_a_member(tmp_path: Path) -> None:
    """Two ring members and two honest workers, every job on two of them: the ring cheats on the jobs it has alone.

    One job at a time, so each job's pair is drawn from all four workers (two jobs side by side on one-slot workers
    split them into two pairs that the next jobs keep: the room left decides)."""
    report = await _trial(tmp_path, 4, Adversary("ring", 2), TrialConfig(jobs=40, redundancy=2, concurrency=1))
    ring = _structure(report, 40)
    assert ring["members"] == 2
    assert ring["cheats"] >= 1, (
        report.lines()
    )  # a job both members had (1 in 6 expected): both cheat (the client may stop one)
    assert report.honest_flagged == []


async def test_sybil_comes_back_under_a_new_key_once_flagged(tmp_path: Path) -> None:
    adversary = Adversary("sybil", 1, honest_jobs=2, new_address=True)
    report = await _trial(tmp_path, 4, adversary, TrialConfig(jobs=20, redundancy=2, max_reentries=1))
    sybil = _structure(report, 20)
    assert sybil["members"] == 1
    assert sybil["reentries"] == report.reentries == 1, report.lines()
    first, fresh = sorted(report.cheaters.items(), key=lambda item: item[1]["reentry"])
    assert first[1]["detected"] and first[1]["cheats"] >= 1
    assert fresh[1]["reentry"] == 1 and fresh[1]["member"] == first[1]["member"]
    assert fresh[0] != first[0]  # a new peer id
