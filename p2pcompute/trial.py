"""A verification trial: many jobs through a testnet with cheating and dying workers, and what it cost.

``p2pcompute testnet --peers N --jobs J --cheaters C --cheat-mode MODE [--kill-rate R]`` runs this from the
testnet process after the network converged: a client runs ``J`` jobs (the same small MLP on fresh inputs)
with adaptive replication, compares every accepted result with the truth computed locally, kills a random
worker mid-job with probability ``R`` per job, and reports:

- jobs run, results accepted, **wrong results accepted**, jobs failed;
- cheaters detected (flagged in the client's reputation) and after how many of their jobs;
- honest workers wrongly flagged;
- compute spent / compute of one honest run (results gathered + local spot checks, per accepted job), overall
  and over the second half of the run (steady state, once trust is earned).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from p2pcompute.client import Client, Job, RunResult
from p2pcompute.core.identity import PeerId
from p2pcompute.errors import P2PComputeError

__all__ = ["TrialConfig", "TrialPeer", "TrialReport", "run_trial"]

log = logging.getLogger(__name__)

JOB_DEADLINE_S = 60.0
JOB_MAX_PRICE = "0.01"
TRUTH_RTOL = 1e-4
TRUTH_ATOL = 1e-5
MAX_FAILURE_DETAILS = 5


class TrialPeer(Protocol):
    """A worker of the testnet as the trial sees it."""

    @property
    def peer_id(self) -> str: ...

    @property
    def cheat_mode(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    async def kill(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TrialConfig:
    jobs: int = 100
    kill_rate: float = 0.0
    concurrency: int = 2  # jobs in flight at once
    seed: int = 0
    redundancy: int | None = None  # None: adaptive replication
    warmup: int = 0  # jobs run first and not counted (trust is earned): measures the steady state


@dataclass
class TrialReport:
    jobs: int = 0
    accepted: int = 0
    wrong_accepted: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failure_details: list[str] = field(default_factory=list)  # the first few, for diagnosis
    warmup: int = 0
    results_gathered: int = 0
    spot_checks: int = 0
    second_half_results: int = 0
    second_half_spot_checks: int = 0
    second_half_accepted: int = 0
    killed: list[str] = field(default_factory=list)
    trust: dict[str, float] = field(default_factory=dict)  # honest workers' streaks and replication at the end
    per_job: dict[int, int] = field(default_factory=dict)  # job index -> compute spent (results + spot check)
    cheaters: dict[str, dict[str, Any]] = field(default_factory=dict)
    honest_flagged: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def overhead(self, second_half: bool = False) -> float:
        """Compute spent per accepted job, in units of one honest run (results gathered + local spot checks)."""
        if second_half:
            done, spent = self.second_half_accepted, self.second_half_results + self.second_half_spot_checks
        else:
            done, spent = self.accepted, self.results_gathered + self.spot_checks
        return spent / done if done else math.nan

    def compute_by_block(self, block: int = 100) -> list[float]:
        """Compute spent per accepted job in consecutive blocks of ``block`` jobs: how the overhead settles."""
        out = []
        for start in range(0, max(self.per_job, default=-1) + 1, block):
            spent = [v for k, v in self.per_job.items() if start <= k < start + block]
            out.append(round(sum(spent) / len(spent), 3) if spent else math.nan)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "accepted": self.accepted,
            "wrong_accepted": self.wrong_accepted,
            "wrong_accepted_rate": self.wrong_accepted / self.accepted if self.accepted else 0.0,
            "failed": self.failed,
            "failures": dict(self.failures),
            "failure_details": self.failure_details,
            "warmup_jobs": self.warmup,
            "results_gathered": self.results_gathered,
            "spot_checks": self.spot_checks,
            "compute_overhead": round(self.overhead(), 4),
            "compute_overhead_second_half": round(self.overhead(second_half=True), 4),
            "killed": self.killed,
            "trust": self.trust,
            "compute_by_block": self.compute_by_block(),
            "cheaters": self.cheaters,
            "cheaters_detected": sum(1 for c in self.cheaters.values() if c["detected"]),
            "honest_flagged": self.honest_flagged,
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def lines(self) -> list[str]:
        """The human summary the testnet prints."""
        detected = [c for c in self.cheaters.values() if c["detected"]]
        out = [
            f"jobs run {self.jobs}, accepted {self.accepted}, failed {self.failed} {dict(self.failures) or ''}".strip(),
            f"wrong results accepted: {self.wrong_accepted} ({100 * self.wrong_accepted / max(1, self.accepted):.2f}%)",
            f"cheaters detected: {len(detected)}/{len(self.cheaters)}"
            + (
                " after " + ", ".join(f"{c['jobs_until_detected']} ({c['mode']})" for c in detected) + " of their jobs"
                if detected
                else ""
            ),
            f"honest workers wrongly flagged: {len(self.honest_flagged)}",
            f"compute spent / one honest run: {self.overhead():.3f} overall, "
            f"{self.overhead(second_half=True):.3f} in the second half (steady state)",
            f"workers killed mid-job: {len(self.killed)}",
            f"elapsed: {self.elapsed_s:.1f} s",
        ]
        return out


def _demo_model(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()


async def run_trial(client: Client, peers: Sequence[TrialPeer], config: TrialConfig) -> TrialReport:
    """Run ``config.jobs`` jobs through ``client`` and measure verification against the known truth."""
    import torch

    from p2pcompute.compute.export import export_job

    rng = random.Random(config.seed)
    model = _demo_model(config.seed)
    template = export_job(model, (torch.zeros(4, 32),))
    report = TrialReport(warmup=config.warmup)
    cheaters = {p.peer_id: p for p in peers if p.cheat_mode}
    jobs_seen: Counter[str] = Counter()
    detected_after: dict[str, int] = {}
    started = trio.current_time()
    limiter = trio.CapacityLimiter(max(1, config.concurrency))
    doomed: set[str] = set()

    def note_participants(result: RunResult | None, job_index: int) -> None:
        if result is None:
            return
        for worker in result.workers:
            jobs_seen[str(worker.worker)] += 1
        for peer_id in cheaters:
            if peer_id not in detected_after and not client.node.reputation.eligible(PeerId.from_base58(peer_id)):
                detected_after[peer_id] = jobs_seen[peer_id]

    async def one(index: int, x: torch.Tensor) -> None:
        async with limiter:
            job = Job.from_exported(template.with_inputs(x))
            truth = model(x)
            killer = None
            if config.kill_rate and rng.random() < config.kill_rate:
                # Chosen now, killed a moment later: reserve the victim at once, so that jobs running side by side
                # never leave fewer than two workers alive between them.
                alive = [p for p in peers if p.alive and p.peer_id not in doomed]
                killer = rng.choice(alive) if len(alive) > 2 else None
                if killer is not None:
                    doomed.add(killer.peer_id)
            result: RunResult | None = None
            async with trio.open_nursery() as nursery:
                if killer is not None:
                    victim = killer

                    async def kill_soon() -> None:
                        await trio.sleep(rng.uniform(0.0, 0.2))  # somewhere inside the job
                        await victim.kill()
                        report.killed.append(victim.peer_id)

                    nursery.start_soon(kill_soon)
                try:
                    result = await client.run(
                        job,
                        max_price=JOB_MAX_PRICE,
                        deadline=JOB_DEADLINE_S,
                        redundancy=config.redundancy,
                    )
                except P2PComputeError as exc:
                    if index >= config.warmup:
                        report.failed += 1
                        report.failures[exc.reason.value] += 1
                        if len(report.failure_details) < MAX_FAILURE_DETAILS:
                            report.failure_details.append(str(exc)[:600])
                    log.info("trial job %d failed: %s", index, exc)
            note_participants(result, index)
            if index < config.warmup:
                return
            report.jobs += 1
            second_half = index - config.warmup >= config.jobs // 2
            if result is not None:
                report.accepted += 1
                report.results_gathered += len(result.workers)
                report.spot_checks += int(result.spot_check)
                report.per_job[index - config.warmup] = len(result.workers) + int(result.spot_check)
                if second_half:
                    report.second_half_accepted += 1
                    report.second_half_results += len(result.workers)
                    report.second_half_spot_checks += int(result.spot_check)
                if not torch.allclose(result.outputs[0], truth, rtol=TRUTH_RTOL, atol=TRUTH_ATOL):
                    report.wrong_accepted += 1
                    log.warning("trial job %d: a wrong result was accepted (workers %s)", index, result.agreeing)

    with torch.no_grad():
        async with trio.open_nursery() as nursery:
            for index in range(config.warmup + config.jobs):
                x = torch.randn(4, 32, generator=torch.Generator().manual_seed(config.seed * 100_003 + index))
                nursery.start_soon(one, index, x)  # the limiter keeps `concurrency` of them running
    report.elapsed_s = trio.current_time() - started
    for peer_id, peer in cheaters.items():
        report.cheaters[peer_id] = {
            "mode": peer.cheat_mode,
            "jobs": jobs_seen[peer_id],
            "detected": peer_id in detected_after,
            "jobs_until_detected": detected_after.get(peer_id),
        }
    reputation = client.node.reputation
    honest = [PeerId.from_base58(p.peer_id) for p in peers if not p.cheat_mode]
    report.honest_flagged = [str(p) for p in honest if not reputation.eligible(p)]
    streaks = sorted(reputation.get(p).streak for p in honest)
    if streaks:
        report.trust = {
            "streak_min": streaks[0],
            "streak_median": streaks[len(streaks) // 2],
            "streak_max": streaks[-1],
            "replication_probability_mean": round(
                sum(reputation.replication_probability(p) for p in honest) / len(honest), 4
            ),
            "timeouts": sum(reputation.get(p).timeout for p in honest),
            "declined_after_accept": sum(reputation.get(p).declined_after_accept for p in honest),
        }
    return report
