"""A verification trial: many jobs through a network with cheating and dying workers, and what it cost.

``p2pcompute testnet --peers N --jobs J --cheaters C --cheat-mode MODE [--kill-rate R]`` runs this from the
testnet process after the network converged (real peer processes); :func:`run_cluster_trial` runs it against an
in-process cluster (real hosts and executors in one trio process, ``p2pcompute.testing.jobs.cluster``), which the
P4 benchmark uses. A client runs ``J`` jobs (the same small MLP on fresh inputs) with adaptive replication, compares
every result it gathered with the truth computed locally, kills a random worker mid-job with probability ``R`` per
job, brings a flagged ``sybil`` back under a fresh key, and reports:

- jobs run, results accepted, **wrong results accepted** (count and %), jobs failed;
- per adversary (mode): wrong results accepted because of it, how often its members cheated, whether and when each
  was caught (jobs until flagged in the client's reputation), the re-entries of sybils (how many jobs each fresh key
  waited for work, got before it was flagged again, and cheated);
- honest workers wrongly flagged;
- **compute per accepted job** in units of one honest execution: (worker executions x the job's flops + the
  client's own checks: a hidden spot check's execution, ``RunResult.check_flops``) / the job's flops, overall, over
  the second half (steady state, once trust is earned) and per block of 100 jobs; how jobs were verified (the
  client's plans) and the bytes its checks fetched.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from p2pcompute.client import Client, Job, ProgressEvent, RunResult
from p2pcompute.core.identity import PeerId
from p2pcompute.errors import P2PComputeError

if TYPE_CHECKING:
    import torch

    from p2pcompute.net.negotiate import WorkerResult
    from p2pcompute.testing.adversary import RingChannel
    from p2pcompute.testing.jobs import WorkerPeer

__all__ = [
    "Adversary",
    "TrialConfig",
    "TrialPeer",
    "TrialReport",
    "assign_modes",
    "run_cluster_trial",
    "run_trial",
]

log = logging.getLogger(__name__)

JOB_DEADLINE_S = 60.0
JOB_MAX_PRICE = "0.01"
TRUTH_RTOL = 1e-4
TRUTH_ATOL = 1e-5
MAX_FAILURE_DETAILS = 5
MAX_REENTRIES = 50  # sybil re-entries in one trial (each starts a worker: seconds)
BLOCK = 100  # jobs per block of the compute-by-block figures
GROUP_MODES = ("collude", "sleeper", "ring", "sybil")  # = p2pcompute.testing.adversary.GROUP_MODES
LONE_MODES = ("random", "zeros", "stale", "lazy")
CLUSTER_CLIENT_IP = "127.0.0.200"
REENTRY_IP_BASE = 100  # a sybil on a new address: 127.0.0.(100 + n) for its n-th re-entry (n <= MAX_REENTRIES)


def assign_modes(peers: int, cheaters: int, cheat_mode: str) -> list[str]:
    """The cheat mode of each of ``peers`` workers ("" = honest): cheaters spread over workers 1 .. N-1, never
    worker 0 (the bootstrap peer). ``mixed``: the first half of the cheaters (at least 2) take the group modes in turn
    (collude, sleeper, ring, sybil: they share one wrong output, so they agree), the rest the lone modes."""
    modes = [""] * peers
    groups = max(2, cheaters // 2)
    for k in range(cheaters):
        if cheat_mode == "mixed":
            mode = GROUP_MODES[k % len(GROUP_MODES)] if k < groups else LONE_MODES[(k - groups) % len(LONE_MODES)]
        else:
            mode = cheat_mode
        modes[1 + (k * (peers - 1)) // cheaters] = mode
    return modes


class TrialPeer(Protocol):
    """A worker of the network as the trial sees it."""

    @property
    def peer_id(self) -> str:
        """Its current identity (a sybil changes it when it re-enters)."""

    @property
    def cheat_mode(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    async def kill(self) -> None: ...

    async def reenter(self) -> None:
        """Stop, and come back under a fresh key (a sybil flagged by the client); :attr:`peer_id` is the new one."""


@dataclass(frozen=True, slots=True)
class TrialConfig:
    jobs: int = 100
    kill_rate: float = 0.0
    concurrency: int = 2  # jobs in flight at once
    seed: int = 0
    redundancy: int | None = None  # None: adaptive replication
    warmup: int = 0  # jobs run first and not counted (trust is earned): measures the steady state
    max_reentries: int = MAX_REENTRIES  # sybils coming back with a fresh key, in all
    workload: str = "demo"  # the job: "demo" (a tiny MLP, batch 4, 32 -> 64 -> 8) or "mlp512" (WORKLOADS)


WORKLOADS: dict[str, tuple[int, tuple[int, ...]]] = {
    "demo": (4, (32, 64, 8)),  # a toy: every check costs as much as the job (matrix-vector products)
    "mlp512": (128, (512, 512, 512, 10)),  # a batch of 128 through a 3-layer 512-wide MLP: 136 MFLOP
}
"""Trial jobs: batch size and layer widths of an MLP (Linear, ReLU, ..., Linear)."""


@dataclass
class _Identity:
    """One key of one worker: what it did and when the client caught it."""

    peer_id: str
    mode: str
    member: int  # which worker (a sybil's keys share it)
    reentry: int  # 0: the worker's first key; n: its n-th fresh key
    started_after: int  # jobs finished in the trial before this key was up
    jobs: int = 0  # results of it the client gathered
    cheats: int = 0  # of them wrong (compared with the truth)
    wrong_accepted: int = 0  # accepted wrong results it was among the agreeing workers of
    first_job_after: int | None = None  # jobs finished in the trial from its start until its first result
    jobs_until_detected: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "member": self.member,
            "reentry": self.reentry,
            "jobs": self.jobs,
            "cheats": self.cheats,
            "wrong_accepted": self.wrong_accepted,
            "detected": self.jobs_until_detected is not None,
            "jobs_until_detected": self.jobs_until_detected,
            "first_job_after": self.first_job_after,
        }


@dataclass
class TrialReport:
    jobs: int = 0
    accepted: int = 0
    wrong_accepted: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failure_details: list[str] = field(default_factory=list)  # the first few, for diagnosis
    warmup: int = 0
    results_gathered: int = 0  # worker executions behind the accepted jobs
    spot_checks: int = 0
    check_compute: float = 0.0  # the client's own checks, in honest executions (spot checks and check flops)
    check_bytes: int = 0  # intermediates the client fetched for its checks
    plans: Counter[str] = field(default_factory=Counter)  # how accepted jobs were verified ("full", "sample")
    job_flops: int = 0  # one honest execution of a trial job (the dry run's count)
    killed: list[str] = field(default_factory=list)
    trust: dict[str, float] = field(default_factory=dict)  # honest workers' streaks and replication at the end
    per_job: dict[int, float] = field(default_factory=dict)  # job index -> compute spent, in honest executions
    cheaters: dict[str, dict[str, Any]] = field(default_factory=dict)  # per key of a cheating worker
    wrong_by_mode: Counter[str] = field(default_factory=Counter)  # wrong accepted results per adversary mode
    reentries: int = 0
    honest_flagged: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def overhead(self, second_half: bool = False) -> float:
        """Compute spent per accepted job, in units of one honest execution (workers' runs + the client's checks)."""
        start = self.jobs // 2 if second_half else 0
        spent = [v for k, v in self.per_job.items() if k >= start]
        return sum(spent) / len(spent) if spent else math.nan

    def compute_by_block(self, block: int = BLOCK) -> list[float]:
        """Compute spent per accepted job in consecutive blocks of ``block`` jobs: how the overhead settles."""
        out = []
        for start in range(0, max(self.per_job, default=-1) + 1, block):
            spent = [v for k, v in self.per_job.items() if start <= k < start + block]
            out.append(round(sum(spent) / len(spent), 3) if spent else math.nan)
        return out

    @property
    def wrong_rate(self) -> float:
        return self.wrong_accepted / self.accepted if self.accepted else 0.0

    def adversaries(self) -> dict[str, dict[str, Any]]:
        """Per cheat mode: its workers, whether and when each was caught, its sybils' re-entries."""
        out: dict[str, dict[str, Any]] = {}
        for mode in sorted({c["mode"] for c in self.cheaters.values()}):
            keys = [c for c in self.cheaters.values() if c["mode"] == mode]
            first = sorted((c for c in keys if c["reentry"] == 0), key=lambda c: c["member"])
            again = [c for c in keys if c["reentry"] > 0]
            caught = [c for c in first if c["detected"]]
            out[mode] = {
                "members": len(first),
                "caught": len(caught),
                "ring_caught": bool(first) and len(caught) == len(first),
                "jobs_until_detected": [c["jobs_until_detected"] for c in first],
                "jobs": sum(c["jobs"] for c in keys),
                "cheats": sum(c["cheats"] for c in keys),
                "wrong_accepted": self.wrong_by_mode[mode],
                "wrong_accepted_rate": self.wrong_by_mode[mode] / self.accepted if self.accepted else 0.0,
                "reentries": len(again),
                "reentry_first_job_after": [c["first_job_after"] for c in again],
                "reentry_jobs_until_detected": [c["jobs_until_detected"] for c in again],
                "reentry_jobs": sum(c["jobs"] for c in again),
                "cheats_after_reentry": sum(c["cheats"] for c in again),
                "wrong_accepted_after_reentry": sum(c["wrong_accepted"] for c in again),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "accepted": self.accepted,
            "wrong_accepted": self.wrong_accepted,
            "wrong_accepted_rate": self.wrong_rate,
            "failed": self.failed,
            "failures": dict(self.failures),
            "failure_details": self.failure_details,
            "warmup_jobs": self.warmup,
            "results_gathered": self.results_gathered,
            "spot_checks": self.spot_checks,
            "check_compute": round(self.check_compute, 4),
            "check_bytes": self.check_bytes,
            "plans": dict(self.plans),
            "job_flops": self.job_flops,
            "compute_overhead": round(self.overhead(), 4),
            "compute_overhead_second_half": round(self.overhead(second_half=True), 4),
            "compute_by_block": self.compute_by_block(),
            "killed": self.killed,
            "trust": self.trust,
            "cheaters": self.cheaters,
            "cheaters_detected": sum(1 for c in self.cheaters.values() if c["detected"]),
            "adversaries": self.adversaries(),
            "reentries": self.reentries,
            "honest_flagged": self.honest_flagged,
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def lines(self) -> list[str]:
        """The human summary the testnet prints."""
        detected = [c for c in self.cheaters.values() if c["detected"]]
        out = [
            f"jobs run {self.jobs}, accepted {self.accepted}, failed {self.failed} {dict(self.failures) or ''}".strip(),
            f"wrong results accepted: {self.wrong_accepted} ({100 * self.wrong_rate:.2f}%)",
            f"cheaters detected: {len(detected)}/{len(self.cheaters)}"
            + (
                " after " + ", ".join(f"{c['jobs_until_detected']} ({c['mode']})" for c in detected) + " of their jobs"
                if detected
                else ""
            ),
        ]
        for mode, a in self.adversaries().items():
            line = (
                f"  {mode}: {a['members']} worker(s), cheated {a['cheats']} times in {a['jobs']} results, "
                f"{a['wrong_accepted']} wrong accepted ({100 * a['wrong_accepted_rate']:.2f}%), "
                f"caught {a['caught']}/{a['members']}"
                + (f" after {_listed([j for j in a['jobs_until_detected'] if j is not None])}" if a["caught"] else "")
            )
            if a["reentries"]:
                line += (
                    f"; re-entered {a['reentries']}x, got work again after {_listed(a['reentry_first_job_after'])} "
                    f"jobs, flagged again after {_listed(a['reentry_jobs_until_detected'])} of their jobs, "
                    f"cheated {a['cheats_after_reentry']} times after re-entry"
                )
            out.append(line)
        out += [
            f"honest workers wrongly flagged: {len(self.honest_flagged)}",
            f"compute per accepted job / one honest run: {self.overhead():.3f} overall, "
            f"{self.overhead(second_half=True):.3f} in the second half (steady state); "
            f"by {BLOCK} jobs: {', '.join(f'{v:.2f}' for v in self.compute_by_block())}",
            f"workers killed mid-job: {len(self.killed)}",
            f"elapsed: {self.elapsed_s:.1f} s",
        ]
        return out


def _listed(values: Sequence[int | None]) -> str:
    return "[" + ", ".join("-" if v is None else str(v) for v in values) + "]"


def _model(seed: int, widths: tuple[int, ...]) -> Any:
    import torch

    torch.manual_seed(seed)
    layers: list[Any] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


def _demo_model(seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()


def _wrong(answer: WorkerResult, truth: torch.Tensor) -> bool:
    """Is a worker's result (its first output) not the truth?"""
    import torch

    from p2pcompute.compute.interpreter import blob_to_tensor

    metas = answer.result.message.outputs
    try:
        output = blob_to_tensor(metas[0], answer.outputs[metas[0].digest])
    except (P2PComputeError, KeyError, IndexError):
        return True
    return output.shape != truth.shape or not torch.allclose(output, truth, rtol=TRUTH_RTOL, atol=TRUTH_ATOL)


def _compute(result: RunResult, job_flops: int) -> tuple[int, float]:
    """(worker executions, the client's own checks in honest executions) behind one accepted result: every result
    gathered; one execution per hidden spot check plus ``check_flops`` / the job's flops (``RunResult.compute``)."""
    flops = result.job_flops or job_flops
    return len(result.workers), int(result.spot_check) + (result.check_flops / flops if flops else 0.0)


async def run_trial(
    client: Client,
    peers: Sequence[TrialPeer],
    config: TrialConfig,
    *,
    oracle: RingChannel | None = None,
) -> TrialReport:
    """Run ``config.jobs`` jobs through ``client`` and measure verification against the known truth.

    ``oracle``: the ring's side channel; the trial writes each job's replicas there as the client asks them (a
    harness that sees the client's choices), so a ``ring`` cheats exactly when every replica is a member.
    """
    import torch

    from p2pcompute.compute.export import export_job

    rng = random.Random(config.seed)
    batch, widths = WORKLOADS[config.workload]
    model = _model(config.seed, widths)
    template = export_job(model, (torch.zeros(batch, widths[0]),))
    report = TrialReport(warmup=config.warmup)
    report.job_flops = Job.from_exported(template).requirements.flops
    by_peer = {p.peer_id: p for p in peers}
    identities: dict[str, _Identity] = {}
    for member, p in enumerate(peers):
        if p.cheat_mode:
            identities[p.peer_id] = _Identity(p.peer_id, p.cheat_mode, member, 0, 0)
    member_of = {p.peer_id: m for m, p in enumerate(peers)}
    jobs_seen: Counter[str] = Counter()
    finished = 0  # jobs finished (warm-up included), the trial's clock for re-entries
    started = trio.current_time()
    limiter = trio.CapacityLimiter(max(1, config.concurrency))
    doomed: set[str] = set()
    reentering: set[int] = set()

    async def reenter(peer: TrialPeer, identity: _Identity) -> None:
        try:
            await peer.reenter()
        except (P2PComputeError, OSError, trio.TooSlowError) as exc:
            log.warning("sybil %s could not re-enter: %s", identity.peer_id[-8:], exc)
            return
        finally:
            reentering.discard(identity.member)
        report.reentries += 1
        fresh = _Identity(peer.peer_id, identity.mode, identity.member, identity.reentry + 1, finished)
        identities[peer.peer_id] = fresh
        by_peer[peer.peer_id] = peer
        member_of[peer.peer_id] = identity.member
        log.info("sybil %s re-entered as %s", identity.peer_id[-8:], peer.peer_id[-8:])

    def note_participants(result: RunResult | None, truth: torch.Tensor, nursery: trio.Nursery) -> None:
        if result is not None:
            for answer in result.workers:
                peer_id = str(answer.worker)
                jobs_seen[peer_id] += 1
                identity = identities.get(peer_id)
                if identity is not None:
                    identity.jobs += 1
                    identity.cheats += _wrong(answer, truth)
                    if identity.first_job_after is None:
                        identity.first_job_after = finished - identity.started_after
        reputation = client.node.reputation
        for identity in list(identities.values()):
            if identity.jobs_until_detected is None and not reputation.eligible(PeerId.from_base58(identity.peer_id)):
                identity.jobs_until_detected = jobs_seen[identity.peer_id]
                peer = by_peer.get(identity.peer_id)
                if (
                    peer is not None
                    and identity.mode == "sybil"
                    and peer.peer_id == identity.peer_id
                    and identity.member not in reentering
                    and report.reentries + len(reentering) < config.max_reentries
                ):
                    reentering.add(identity.member)
                    nursery.start_soon(reenter, peer, identity)

    async def one(index: int, x: torch.Tensor, nursery: trio.Nursery) -> None:
        nonlocal finished
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

            def progress(event: ProgressEvent) -> None:
                if oracle is not None and event.worker is not None:
                    oracle.assign(job.digest, str(event.worker))

            result: RunResult | None = None
            async with trio.open_nursery() as killing:
                if killer is not None:
                    victim = killer

                    async def kill_soon() -> None:
                        await trio.sleep(rng.uniform(0.0, 0.2))  # somewhere inside the job
                        await victim.kill()
                        report.killed.append(victim.peer_id)

                    killing.start_soon(kill_soon)
                try:
                    result = await client.run(
                        job,
                        max_price=JOB_MAX_PRICE,
                        deadline=JOB_DEADLINE_S,
                        redundancy=config.redundancy,
                        progress=progress,
                    )
                except (P2PComputeError, trio.TooSlowError) as exc:  # TooSlowError: the job's deadline passed
                    if index >= config.warmup:
                        report.failed += 1
                        report.failures[exc.reason.value if isinstance(exc, P2PComputeError) else "deadline"] += 1
                        if len(report.failure_details) < MAX_FAILURE_DETAILS:
                            report.failure_details.append(str(exc)[:600] or type(exc).__name__)
                    log.info("trial job %d failed: %r", index, exc)
            note_participants(result, truth, nursery)
            finished += 1
            if index < config.warmup:
                return
            report.jobs += 1
            if result is None:
                return
            report.accepted += 1
            executions, checks = _compute(result, report.job_flops)
            report.results_gathered += executions
            report.spot_checks += int(result.spot_check)
            report.check_compute += checks
            report.check_bytes += result.check_bytes
            if result.plan:
                report.plans[result.plan] += 1
            report.per_job[index - config.warmup] = executions + checks
            if not torch.allclose(result.outputs[0], truth, rtol=TRUTH_RTOL, atol=TRUTH_ATOL):
                report.wrong_accepted += 1
                agreeing = [identities[str(p)] for p in result.agreeing if str(p) in identities]
                for identity in agreeing:
                    identity.wrong_accepted += 1
                for mode in {i.mode for i in agreeing} or {"unattributed"}:
                    report.wrong_by_mode[mode] += 1
                log.warning("trial job %d: a wrong result was accepted (workers %s)", index, result.agreeing)

    with torch.no_grad():
        # Sybil re-entries run beside the jobs; one still starting when the jobs are done finishes (bounded by the
        # worker start timeout) and is counted.
        async with trio.open_nursery() as background, trio.open_nursery() as nursery:
            for index in range(config.warmup + config.jobs):
                seed = config.seed * 100_003 + index
                x = torch.randn(batch, widths[0], generator=torch.Generator().manual_seed(seed))
                nursery.start_soon(one, index, x, background)  # the limiter keeps `concurrency` of them running
    report.elapsed_s = trio.current_time() - started
    for peer_id, identity in identities.items():
        report.cheaters[peer_id] = identity.to_json()
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


# --- an in-process cluster (the P4 benchmark, tests) ---


@dataclass(frozen=True, slots=True)
class Adversary:
    """Who cheats in a trial and how (``p2pcompute.testing.adversary``)."""

    mode: str = ""  # a cheat mode, or "mixed"; "" = no cheaters
    count: int = 0  # cheating workers
    honest_jobs: int = 0  # K: honest jobs before cheating (sleeper, sybil)
    unreplicated_rate: float = 0.0  # ring: chance of cheating on a job it runs alone
    new_address: bool = False  # sybil: come back on a new address (else its old one, a new port)
    oracle: bool = True  # ring: the harness tells the ring each job's replicas (else the window rule)

    @property
    def label(self) -> str:
        if not self.count or not self.mode:
            return "clean"
        label = self.mode
        if self.mode in ("sleeper", "sybil") or self.honest_jobs:
            label += f" K={self.honest_jobs}"
        if self.mode == "ring" and self.unreplicated_rate:
            label += f" +{100 * self.unreplicated_rate:g}% alone"
        if self.mode == "ring" and not self.oracle:
            label += " (window)"
        if self.mode == "sybil":
            label += " new addr" if self.new_address else " same addr"
        return label


@dataclass
class _ClusterPeer:
    """An in-process worker as the trial sees it; a sybil re-enters with a new data directory (a new key)."""

    worker: WorkerPeer
    cheat_mode: str
    nursery: trio.Nursery
    base: Path
    bootstrap: str
    new_address: bool
    counter: list[int]  # re-entries so far in the cluster (shared: new addresses are not reused)
    alive: bool = True

    @property
    def peer_id(self) -> str:
        return self.worker.info.peer_id

    async def kill(self) -> None:
        self.alive = False
        await self.worker.stop()

    async def reenter(self) -> None:
        from p2pcompute.testing.jobs import start_worker, write_hardware_cache

        await self.worker.stop()
        self.counter[0] += 1
        n = self.counter[0]
        old = self.worker.config
        ip = f"127.0.0.{REENTRY_IP_BASE + n}" if self.new_address else old.listen[0].split("/")[2]
        config = replace(
            old,
            data_dir=self.base / f"w{self.worker.index}-key{n}",
            listen=(f"/ip4/{ip}/tcp/0",),
            bootstrap=(self.bootstrap,),
        ).validate()
        await trio.to_thread.run_sync(write_hardware_cache, [config.data_dir])
        self.worker = await start_worker(self.nursery, self.worker.index, config, cheat=self.worker.cheat)
        self.alive = True


@contextlib.asynccontextmanager
async def _cluster_peers(base: Path, workers: int, adversary: Adversary) -> AsyncIterator[list[_ClusterPeer]]:
    from p2pcompute.testing.adversary import CheatSettings
    from p2pcompute.testing.jobs import cluster

    modes = assign_modes(workers, adversary.count, adversary.mode) if adversary.count else [""] * workers
    ring_dir = base / "ring"
    cheats = {
        index: CheatSettings(
            mode=mode,
            honest_jobs=adversary.honest_jobs,
            ring_dir=ring_dir if mode in GROUP_MODES else None,
            unreplicated_rate=adversary.unreplicated_rate if mode == "ring" else 0.0,
        )
        for index, mode in enumerate(modes)
        if mode
    }

    async with trio.open_nursery() as nursery, cluster(base, workers, cheats=cheats) as started:
        counter = [0]
        peers = [
            _ClusterPeer(w, modes[w.index], nursery, base, started[0].addr, adversary.new_address, counter)
            for w in started
        ]
        try:
            yield peers
        finally:
            nursery.cancel_scope.cancel()


async def run_cluster_trial(
    base: Path, workers: int, adversary: Adversary, config: TrialConfig, *, market_timeout_s: float = 60.0
) -> TrialReport:
    """A trial against ``workers`` in-process workers (real hosts and executors, one trio process) under ``base``.

    The ring's side channel is the directory ``base/ring``; with ``adversary.oracle`` the trial writes each job's
    replicas there. A flagged sybil is stopped and started again under a new data directory (a fresh key).
    """
    from p2pcompute.client import open_client
    from p2pcompute.testing.adversary import DirectoryRing

    async with (
        _cluster_peers(base, workers, adversary) as peers,
        open_client(
            [peers[0].worker.addr], data_dir=base / "client", listen=(f"/ip4/{CLUSTER_CLIENT_IP}/tcp/0",)
        ) as client,
    ):
        with trio.fail_after(market_timeout_s):
            await client.node.wait_for(lambda: len(client.node.market) >= workers)
        ring = adversary.count and adversary.mode in ("ring", "mixed")
        oracle = DirectoryRing(base / "ring") if adversary.oracle and ring else None
        return await run_trial(client, peers, config, oracle=oracle)
