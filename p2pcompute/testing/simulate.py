"""A deterministic simulation of the client's verification scheduler (``core.scheduler``) over many workers.

No network, no torch, no clock: each simulated worker answers at once, honestly or by one of the adversaries'
rules; a client check catches a result exactly when it covers a faked node; the real :class:`JobScheduler`,
:class:`Verifier` and :class:`Reputation` decide. It measures what the trial measures on a testnet — wrong results
accepted, when cheaters are caught, compute per accepted job (results gathered plus the client's check flops, in
units of one honest run) — for hundreds of workers and thousands of jobs in seconds, with a seed.

Adversaries (``Behaviour``): ``honest``; ``sleeper`` (honest for ``honest_jobs`` of its own jobs, then the ring's
shared wrong output on every job); ``ring`` (the shared wrong output only when every worker asked for the job is a
ring member, and on ``unreplicated_rate`` of the jobs where it is alone); ``sybil`` (a sleeper that, once flagged,
returns under a fresh key: in its old address group, or a new one with ``new_group``). A wrong result fakes one
node (the last, which a smart cheater prefers: everything before it is honest) and keeps its trace consistent
otherwise, so only a check that covers that node catches it.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from p2pcompute.core.envelope import Opened, open_envelope, seal
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.matching import Candidate
from p2pcompute.core.messages import Device, DeviceKind, GpuAdvert, JobResult, Software, Timings
from p2pcompute.core.reputation import Outcome, Reputation
from p2pcompute.core.scheduler import (
    Abandon,
    Accuse,
    Action,
    Bisect,
    Check,
    CheckOutcome,
    Done,
    JobScheduler,
    Launch,
    NeedCandidates,
    Record,
    ReputationTrust,
    SchedulerPolicy,
    Settle,
    TaskFacts,
)
from p2pcompute.core.tensors import TensorMeta, outputs_digest
from p2pcompute.core.verification import ComparisonMode, KnownAnswer, ResultClaim

__all__ = ["Behaviour", "SimConfig", "SimReport", "simulate"]

NOW = 1_800_000_000_000
_DEVICE = Device(
    kind=DeviceKind.CPU,
    name="simulated",
    memory_bytes=1 << 34,
    free_memory_bytes=1 << 34,
    tflops=1.0,
    compute_capability="",
    cores=8,
)
_SOFTWARE = Software(p2pcompute="0.1.0", torch="2.13.0", cuda="", python="3.11.7")
_CLIENT = KeyPair.from_seed(b"\xc1" * 32)


class Behaviour(StrEnum):
    HONEST = "honest"
    SLEEPER = "sleeper"
    RING = "ring"
    SYBIL = "sybil"


@dataclass(frozen=True, slots=True)
class SimConfig:
    workers: int = 10
    adversaries: int = 3
    behaviour: Behaviour = Behaviour.HONEST
    jobs: int = 1000
    seed: int = 0
    honest_jobs: int = 15  # sleeper / sybil: own jobs answered honestly before cheating
    unreplicated_rate: float = 0.0  # ring: also cheat on this share of the jobs where it is alone
    new_group: bool = False  # sybil: come back from another address group
    nodes: int = 6  # graph nodes of each job
    flops: int = 10**9
    trace_bytes: int = 1 << 20  # within the default check budget: every result is checked in full
    check_flops: int = 5 * 10**7  # a full check costs 5% of the job
    decline_rate: float = 0.0  # honest workers that decline a request (busy)
    fake_last_node: bool = True  # a wrong result fakes the last node; False: a node at random (downstream honest)
    policy: SchedulerPolicy = field(default_factory=SchedulerPolicy)


@dataclass
class SimReport:
    jobs: int = 0
    accepted: int = 0
    wrong_accepted: int = 0
    failed: int = 0
    results: int = 0
    check_flops: int = 0
    caught: dict[str, int] = field(default_factory=dict)  # adversary peer → its own jobs until flagged
    cheats: int = 0
    reentries: int = 0
    jobs_after_reentry: list[int] = field(default_factory=list)  # sybil: own jobs a fresh key got before flagged
    cheated_after_reentry: int = 0
    honest_flagged: int = 0
    per_job: list[float] = field(default_factory=list)
    plans: Counter[str] = field(default_factory=Counter)

    def compute(self, start: int = 0) -> float:
        values = self.per_job[start:]
        return sum(values) / len(values) if values else float("nan")

    @property
    def wrong_rate(self) -> float:
        return self.wrong_accepted / self.accepted if self.accepted else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "accepted": self.accepted,
            "wrong_accepted": self.wrong_accepted,
            "wrong_rate": round(self.wrong_rate, 5),
            "failed": self.failed,
            "cheats": self.cheats,
            "caught": len(self.caught),
            "jobs_until_caught": sorted(self.caught.values()),
            "reentries": self.reentries,
            "jobs_after_reentry": self.jobs_after_reentry,
            "cheated_after_reentry": self.cheated_after_reentry,
            "honest_flagged": self.honest_flagged,
            "compute": round(self.compute(), 4),
            "compute_second_half": round(self.compute(len(self.per_job) // 2), 4),
            "plans": dict(self.plans),
        }


@dataclass
class _Worker:
    pair: KeyPair
    group: str
    behaviour: Behaviour
    jobs: int = 0
    generation: int = 0

    @property
    def peer(self) -> PeerId:
        return self.pair.peer_id


_Trust = ReputationTrust  # the trust view the client uses, on the simulation's reputation table


def _advert(pair: KeyPair, group_ip: str) -> GpuAdvert:
    return GpuAdvert(
        id=b"\x0a" * 16,
        nonce=1,
        expires_at=NOW + 3_600_000,
        peer_id=pair.peer_id,
        seq=1,
        issued_at=NOW,
        addrs=(f"/ip4/{group_ip}/tcp/4001/p2p/{pair.peer_id}",),
        devices=(_DEVICE,),
        price_per_second=1000,
        slots_total=4,
        slots_free=4,
        software=_SOFTWARE,
    )


def _meta(value: bytes) -> tuple[TensorMeta, ...]:
    return (TensorMeta(digest=hashlib.sha256(value).digest(), dtype="float32", shape=(4, 8)),)


def _claim(worker: _Worker, job: bytes, value: bytes) -> ResultClaim:
    outs = _meta(value)
    message = JobResult(
        id=hashlib.sha256(worker.pair.public_key + job).digest()[:16],
        nonce=1,
        expires_at=NOW + 60_000,
        worker=worker.peer,
        client=_CLIENT.peer_id,
        accept_hash=hashlib.sha256(job + worker.pair.public_key).digest(),
        job_digest=job,
        output_digest=outputs_digest(outs),
        outputs=outs,
        hardware_class="sim|cpu",
        timings=Timings(queue_ms=0, load_ms=0, exec_ms=1, total_ms=1),
        trace_root=hashlib.sha256(b"trace" + value).digest(),
        trace_length=1,
    )
    opened: Opened[JobResult] = open_envelope(seal(worker.pair, message), expect=JobResult)
    return ResultClaim(opened, key=value)


def simulate(config: SimConfig) -> SimReport:
    """Run ``config.jobs`` jobs one after another through real schedulers; deterministic for a seed."""
    rng = random.Random(config.seed)
    reputation = Reputation()
    report = SimReport()
    workers: list[_Worker] = []
    for i in range(config.workers):
        behaviour = config.behaviour if i < config.adversaries else Behaviour.HONEST
        seed = hashlib.sha256(f"{config.seed}/{i}/0".encode()).digest()
        workers.append(_Worker(KeyPair.from_seed(seed), f"10.{i // 250}.{i % 250}.1", behaviour))
    adversary_ids = {w.peer for w in workers if w.behaviour is not Behaviour.HONEST}
    fresh_keys = 0
    ring_secret = b"ring"
    honest_flagged: set[PeerId] = set()

    def candidates() -> list[Candidate]:
        out = []
        for w in workers:
            advert = _advert(w.pair, w.group)
            out.append(
                Candidate(
                    peer=w.peer, advert=advert, device=_DEVICE, group=f"ip4:{w.group}", expected_ms=1000, price=1000
                )
            )
        return out

    for index in range(config.jobs):
        job = hashlib.sha256(f"job {config.seed} {index}".encode()).digest()
        truth = b"truth" + job
        wrong = hashlib.sha256(ring_secret + job).digest()
        facts = TaskFacts(
            digest=job,
            flops=config.flops,
            nodes=config.nodes,
            trace_bytes=config.trace_bytes,
            check_flops=config.check_flops,
            mode=ComparisonMode.EXACT,
        )
        by_peer = {w.peer: w for w in workers}
        answers: dict[PeerId, bytes] = {}
        faked_at: dict[PeerId, int] = {}
        launched: list[PeerId] = []

        def known() -> KnownAnswer:
            outs = _meta(truth)  # noqa: B023 - used within this job's loop iteration only
            return KnownAnswer(output_digest=outputs_digest(outs), outputs=outs, hardware_class="client", key=truth)  # noqa: B023

        scheduler = JobScheduler(
            facts=facts,
            policy=config.policy,
            trust=_Trust(reputation),
            rng=rng,
            agree=lambda a, b: a.key == b.key,
            known=known,
        )
        queue: list[Action] = list(scheduler.start(candidates()))
        spent = 0.0
        outcome_value: bytes | None = None
        while queue:
            action = queue.pop(0)
            if isinstance(action, Launch):
                launched.append(action.candidate.peer)
            elif isinstance(action, Check):
                w_peer = action.peer
                faked = answers[w_peer] != truth
                covered = action.nodes is None or faked_at.get(w_peer, -1) in action.nodes
                share = 1.0 if action.nodes is None else len(action.nodes) / config.nodes
                cost = int(config.check_flops * share)
                ok = not (faked and covered)
                queue.extend(
                    scheduler.on_check(
                        w_peer,
                        CheckOutcome(ok=ok, flops=cost, node=None if ok else config.nodes - 1, detail="simulated"),
                    )
                )
            elif isinstance(action, Bisect):
                a, b = answers[action.first], answers[action.second]
                for peer, value in ((action.first, a), (action.second, b)):
                    ok = value == truth
                    cost = config.check_flops // config.nodes
                    outcome = CheckOutcome(ok=ok, flops=cost, node=None if ok else config.nodes - 1, detail="bisected")
                    queue.extend(scheduler.on_check(peer, outcome))
            elif isinstance(action, NeedCandidates):
                queue.extend(scheduler.give_up())
            elif isinstance(action, Record):
                group = next((f"ip4:{w.group}" for w in workers if w.peer == action.peer), "")
                reputation.record(action.peer, action.outcome, NOW + index, flops=action.flops, group=group)
            elif isinstance(action, Done):
                report.accepted += 1
                report.plans[action.plan.level.value] += 1
                report.check_flops += action.check_flops
                verdict = action.verdict
                outcome_value = verdict.accepted.key if verdict.accepted is not None else truth  # type: ignore[assignment]
                spent += action.check_flops / config.flops
                if outcome_value != truth:
                    report.wrong_accepted += 1
            elif isinstance(action, Abandon):
                report.failed += 1
            elif isinstance(action, (Settle, Accuse)):
                pass
            # answers come right after launches (a real runner gathers them concurrently)
            if isinstance(action, Launch):
                worker = by_peer[action.candidate.peer]
                worker.jobs += 1
                if worker.behaviour is Behaviour.HONEST and rng.random() < config.decline_rate:
                    queue.extend(scheduler.on_failure(worker.peer, Outcome.DECLINED_AFTER_ACCEPT, after_accept=False))
                    continue
                value = truth
                cheating = False
                if worker.behaviour in (Behaviour.SLEEPER, Behaviour.SYBIL):
                    cheating = worker.jobs > config.honest_jobs
                elif worker.behaviour is Behaviour.RING:
                    # the oracle ring: it knows every worker asked so far for this job
                    all_ring = all(p in adversary_ids for p in launched)
                    alone = len(launched) == 1
                    cheating = (all_ring and not alone) or (alone and rng.random() < config.unreplicated_rate)
                    if alone and scheduler.plan is not None and scheduler.plan.quorum > 1:
                        cheating = False  # a partner is about to be launched: wait and see (smart)
                if cheating:
                    value = wrong
                    faked_at[worker.peer] = config.nodes - 1 if config.fake_last_node else rng.randrange(config.nodes)
                    report.cheats += 1
                    if worker.generation > 0:
                        report.cheated_after_reentry += 1
                answers[worker.peer] = value
                report.results += 1
                spent += 1.0
                queue.extend(scheduler.on_result(worker.peer, _claim(worker, job, value), traced=True))
        report.jobs += 1
        if outcome_value is not None:
            report.per_job.append(spent)
        # who got flagged; sybils come back under a fresh key
        for i, w in enumerate(workers):
            if w.behaviour is not Behaviour.HONEST and not reputation.eligible(w.peer):
                key = f"{w.peer}"
                if key not in report.caught:
                    report.caught[key] = w.jobs
                    if w.generation > 0:
                        report.jobs_after_reentry.append(w.jobs)
                if w.behaviour is Behaviour.SYBIL:
                    fresh_keys += 1
                    seed = hashlib.sha256(f"{config.seed}/{i}/{fresh_keys}".encode()).digest()
                    group = w.group if not config.new_group else f"172.{16 + fresh_keys // 250}.{fresh_keys % 250}.1"
                    workers[i] = _Worker(KeyPair.from_seed(seed), group, Behaviour.SYBIL, generation=w.generation + 1)
                    adversary_ids.add(workers[i].peer)
                    report.reentries += 1
            elif w.behaviour is Behaviour.HONEST and not reputation.eligible(w.peer):
                honest_flagged.add(w.peer)
    report.honest_flagged = len(honest_flagged)
    return report


def run_all(configs: Iterable[SimConfig]) -> list[dict[str, Any]]:
    return [{"behaviour": c.behaviour.value, **simulate(c).summary()} for c in configs]
