"""P4: verification under patient attack — wrong results accepted, when the ring is caught, compute per job.

    .venv/bin/python -m benchmarks.verification                      # every scenario, 1,000 jobs each
    .venv/bin/python -m benchmarks.verification --jobs 300 --only clean,ring

Side by side in one run: the clean steady state (no cheaters, measured after ``--clean-warmup`` jobs) and each
patient adversary at 30% of the workers (``--cheaters`` of ``--workers``): the sleeper honest for K = 15, 30, 45 jobs
then returning the ring's shared wrong output on every job; the smart ring that cheats only when every replica of a
job is a member, without and with cheating on 10% of the jobs it runs alone; the sybil, a sleeper (K = 15) that comes
back under a fresh key once the client flags it (``--sybil-new-address``: on a new address). Each scenario runs
``--jobs`` jobs (the trial's small MLP on fresh inputs, 2 in flight) through a client with adaptive replication and
compares every result it gathered with the truth (``p2pcompute.trial``).

Where: an **in-process cluster** (``p2pcompute.testing.jobs.cluster``): real libp2p hosts, real workers with real
executor children, one real client, all in one trio process, fresh for every scenario. Not a testnet of peer
processes because (1) the ring's oracle — the client's choice of replicas, which the harness sees and writes into the
ring's side channel — and the sybil's re-entry (stop a worker, start one with a new key) are direct calls here; (2) 10
workers with their executor and estimator children fit in ~5 GB where 10 node processes importing torch need more;
(3) the jobs, not process start-up, dominate the run. ``p2pcompute testnet --cheat-mode sleeper|ring|sybil`` runs the
same adversaries over real processes.

Compute per accepted job is (worker executions x the job's flops + the client's own checks: a hidden spot check's
execution, ``RunResult.check_flops``) / one honest execution's flops (``TrialReport.overhead``). Prints one table with
the goals and ratios to the clean run, then per scenario how the client verified the jobs and what each adversary did.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pcompute.trial import WORKLOADS, Adversary, TrialConfig, TrialReport, run_cluster_trial

GOAL_WRONG = 0.001  # at most 0.1% wrong results accepted
GOAL_COMPUTE = 1.3  # under attack
GOAL_CLEAN = 1.10  # with no cheaters


@dataclass(frozen=True)
class Scenario:
    key: str
    adversary: Adversary


def scenarios(cheaters: int, new_address: bool) -> list[Scenario]:
    return [
        Scenario("clean", Adversary()),
        Scenario("sleeper15", Adversary("sleeper", cheaters, honest_jobs=15)),
        Scenario("sleeper30", Adversary("sleeper", cheaters, honest_jobs=30)),
        Scenario("sleeper45", Adversary("sleeper", cheaters, honest_jobs=45)),
        Scenario("ring", Adversary("ring", cheaters)),
        Scenario("ring10", Adversary("ring", cheaters, unreplicated_rate=0.1)),
        Scenario("sybil", Adversary("sybil", cheaters, honest_jobs=15, new_address=new_address)),
    ]


def _run(scenario: Scenario, workers: int, jobs: int, warmup: int, seed: int, workload: str) -> TrialReport:
    warmup = warmup if not scenario.adversary.count else 0
    config = TrialConfig(jobs=jobs, warmup=warmup, seed=seed, workload=workload)
    with tempfile.TemporaryDirectory(prefix=f"p2pcompute-p4-{scenario.key}-") as base:
        return trio.run(run_cluster_trial, Path(base), workers, scenario.adversary, config)


def _range(values: Sequence[int | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return f"{min(known)}" if min(known) == max(known) else f"{min(known)}-{max(known)}"


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _row(key: str, label: str, report: TrialReport, clean: TrialReport | None) -> list[str]:
    adversaries = report.adversaries()
    a = next(iter(adversaries.values()), None)
    overall, second = report.overhead(), report.overhead(second_half=True)
    base = clean.overhead(second_half=True) if clean is not None else math.nan
    if a is None:
        caught, until = "-", "-"
    else:
        caught = f"{a['caught']}/{a['members']}"
        until = _range(a["jobs_until_detected"])
    return [
        label,
        f"{report.accepted}/{report.jobs}",
        f"{report.wrong_accepted} ({_pct(report.wrong_rate)})",
        f"{report.wrong_rate / GOAL_WRONG:.1f}x" if a is not None else "-",
        caught,
        until,
        f"{overall:.3f}",
        f"{second:.3f}",
        f"{second / base:.2f}x" if base == base and base > 0 else "-",
        f"{second / (GOAL_CLEAN if a is None else GOAL_COMPUTE):.2f}x",
        f"{report.elapsed_s:.0f} s",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=10, help="in-process workers [10]")
    parser.add_argument("--cheaters", type=int, default=3, help="of them cheating in each attack [3: 30%%]")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per scenario [1000]")
    parser.add_argument("--clean-warmup", type=int, default=200, help="clean run: jobs before measuring [200]")
    parser.add_argument("--seed", type=int, default=0, help="inputs of the trial jobs [0]")
    parser.add_argument("--sybil-new-address", action="store_true", help="a sybil returns on a new address")
    parser.add_argument("--only", default="", help="comma-separated scenario keys (clean, sleeper15, ..., sybil)")
    parser.add_argument("--json", type=Path, default=None, help="also write every trial report here")
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="demo",
        help="the trial job: demo (a tiny MLP, batch 4: a full check costs more than the job) or mlp512 (batch 128"
        " through a 3-layer 512-wide MLP: checks cost ~9%% of it) [demo]",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    for name in ("libp2p", "multiaddr"):  # the client's DHT logs every clean end of stream
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecation noise
    chosen = scenarios(args.cheaters, args.sybil_new_address)
    if args.only:
        keys = set(args.only.split(","))
        unknown = keys - {s.key for s in chosen}
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        chosen = [s for s in chosen if s.key in keys]
    print(
        f"P4: {args.workers} in-process workers, {args.cheaters} cheating in each attack, {args.jobs} jobs per "
        f"scenario (clean: after {args.clean_warmup} warm-up jobs), seed {args.seed}, workload {args.workload}",
        flush=True,
    )
    reports: dict[str, TrialReport] = {}
    labels: dict[str, str] = {}
    started = time.monotonic()
    for scenario in chosen:
        t0 = time.monotonic()
        report = _run(scenario, args.workers, args.jobs, args.clean_warmup, args.seed, args.workload)
        reports[scenario.key], labels[scenario.key] = report, scenario.adversary.label
        print(
            f"  {scenario.adversary.label:24} done in {time.monotonic() - t0:.0f} s: "
            f"{report.wrong_accepted} wrong of {report.accepted} accepted, compute {report.overhead():.3f}",
            flush=True,
        )
    clean = reports.get("clean")
    header = [
        "scenario",
        "accepted",
        "wrong accepted",
        "/ goal",
        "caught",
        "jobs to catch",
        "compute",
        "2nd half",
        "/ clean",
        "/ goal",
        "trial",
    ]
    rows = [header] + [_row(key, labels[key], report, clean) for key, report in reports.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"goals: wrong accepted <= {_pct(GOAL_WRONG)} under every attack at compute <= {GOAL_COMPUTE}x; "
        f"<= {GOAL_CLEAN}x clean. '/ goal' > 1 misses it. '/ clean': second-half compute over the clean run's."
    )
    if clean is not None:
        print(
            f"clean overhead: {clean.overhead():.3f}x overall, {clean.overhead(second_half=True):.3f}x in the second"
            f" half; by 100 jobs: {', '.join(f'{v:.2f}' for v in clean.compute_by_block())}"
        )
    for key, report in reports.items():
        for mode, a in report.adversaries().items():
            detail = (
                f"  {labels[key]}: {mode} x{a['members']} cheated {a['cheats']} times in {a['jobs']} results; "
                f"wrong accepted {a['wrong_accepted']}; caught after {_listed(a['jobs_until_detected'])} jobs"
            )
            if a["reentries"]:
                detail += (
                    f"; re-entered {a['reentries']}x, got work again after {_range(a['reentry_first_job_after'])} "
                    f"jobs, flagged again after {_listed(a['reentry_jobs_until_detected'])} of their jobs, "
                    f"{sum(1 for c in report.cheaters.values() if c['reentry'] and c['cheats'])} fresh key(s) "
                    f"cheated again ({a['cheats_after_reentry']} cheats, {a['wrong_accepted_after_reentry']} accepted)"
                )
            print(detail)
        if report.plans or report.check_bytes:
            print(
                f"  {labels[key]}: plans {dict(report.plans)}, checks {report.check_compute:.1f} runs' worth of flops, "
                f"{report.check_bytes / 2**20:.1f} MiB fetched"
            )
        if report.honest_flagged:
            print(f"  {labels[key]}: {len(report.honest_flagged)} honest worker(s) flagged")
        if report.failed:
            print(f"  {labels[key]}: {report.failed} job(s) failed {dict(report.failures)}")
    print(f"wall time: {time.monotonic() - started:.0f} s")
    if args.json is not None:
        data: dict[str, Any] = {key: {"label": labels[key], **r.to_json()} for key, r in reports.items()}
        args.json.write_text(json.dumps(data, indent=2))


def _listed(values: Sequence[int | None]) -> str:
    return "[" + ", ".join("-" if v is None else str(v) for v in values) + "]"


if __name__ == "__main__":
    main()
