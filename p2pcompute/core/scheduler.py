"""The client's verification scheduler for one job: a sans-I/O machine (specs/verification.md §Scheduling).

The runner (``client.py``) feeds it candidates (workers eligible in the market view), answers (a worker's signed
result, or its failure) and check outcomes (the client's own checks of a result's committed trace); the scheduler
answers with :class:`Action` s: launch a worker, check a result, bisect two disagreeing results, settle (pay or
reject) a worker, record an outcome in the reputation table, accuse a worker, and finally :class:`Done` or
:class:`Abandon`. Time and randomness are arguments; nothing here does I/O.

How a job is verified (the plan, chosen once at :meth:`JobScheduler.start`):

``full``
    The job's trace (every node's output) fits the client's check budget: one worker, and its result is checked
    node by node against its committed trace (Freivalds for matrix products, recomputation for the rest) before
    it is paid. A faked node is caught whatever the worker's reputation; a new identity gains nothing by
    waiting. This is the plan for every job within budget (default 64 MiB of intermediates).
``sample``
    Over budget: replicated by the worker's trust (BOINC-style adaptive replication), each result also checked
    at a few sampled nodes; disagreeing results are *bisected* (their committed traces compared to the first
    divergent node, which is checked on both: Verde's referee) before anyone escalates to a majority.
    Unchecked work is bounded by proven work: a worker gets an unreplicated job only when its checked FLOPs
    reach ``probation_factor`` times the job's, and never from an address group that held a flagged peer; a
    probation worker serves as the extra replica of a job checked anyway.

Only checked results earn trust (:class:`Record` with ``flops`` > 0): a full check passed, agreement with another
worker's result, or a spot check earn the job's FLOPs; a sampled check earns the sampled share of them; a lone
result nobody checked is paid but earns nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from p2pcompute.core.identity import PeerId
from p2pcompute.core.matching import Candidate, Rng, choose, default_weight
from p2pcompute.core.reputation import Outcome, Reputation
from p2pcompute.core.trace import TRACE_BYTES_BUDGET
from p2pcompute.core.verification import (
    Accepted,
    Accusation,
    AgreeFn,
    ComparisonMode,
    Failed,
    KnownAnswer,
    NeedMore,
    QuorumPolicy,
    ResultClaim,
    Status,
    Verdict,
    Verifier,
)
from p2pcompute.errors import ConfigError, LocalProtocolError, NoWorkersError, P2PComputeError, Reason

__all__ = [
    "Abandon",
    "Accuse",
    "Action",
    "Bisect",
    "Check",
    "CheckLevel",
    "CheckOutcome",
    "Done",
    "JobScheduler",
    "Launch",
    "NeedCandidates",
    "Plan",
    "Record",
    "ReputationTrust",
    "SchedulerPolicy",
    "Settle",
    "TaskFacts",
    "TrustView",
]


class CheckLevel(StrEnum):
    FULL = "full"
    SAMPLE = "sample"


@dataclass(frozen=True, slots=True)
class TaskFacts:
    """What the client knows of a job from its own dry run."""

    digest: bytes
    flops: int
    nodes: int
    trace_bytes: int  # bytes of every node's outputs: what a full check may fetch
    check_flops: int  # flops of a full check (Freivalds for products, recomputation for the rest)
    mode: ComparisonMode


@dataclass(frozen=True, slots=True)
class SchedulerPolicy:
    """Parameters (defaults in specs/verification.md §Scheduling)."""

    check_bytes_budget: int = TRACE_BYTES_BUDGET  # most intermediate bytes fetched to check one result fully (what
    # every worker keeps: a full check never asks for more than an honest worker has)
    check_flops_ratio: float = 1.0  # a full check may cost this times the job's flops ...
    check_flops_slack: int = 50_000_000  # ... plus this (tiny jobs are always checked)
    sample_nodes: int = 4  # nodes checked per result when a full check is over budget
    max_workers: int = 5  # results gathered for one job, escalation included
    max_attempts: int = 8  # workers asked for one job
    probation_factor: float = 4.0  # unchecked work needs this many times the job's flops checked before
    spot_check_rate: float = 0.05  # unreplicated unchecked jobs the client also computes itself

    def __post_init__(self) -> None:
        if self.check_bytes_budget < 0 or self.check_flops_ratio < 0 or self.check_flops_slack < 0:
            raise ConfigError("check budgets must not be negative")
        if self.sample_nodes < 1 or self.max_workers < 1 or self.max_attempts < self.max_workers:
            raise ConfigError("need sample_nodes >= 1, max_workers >= 1 and max_attempts >= max_workers")
        if self.probation_factor < 0 or not 0.0 <= self.spot_check_rate <= 1.0:
            raise ConfigError("probation_factor must not be negative and spot_check_rate is a probability")


class TrustView(Protocol):
    """What the scheduler asks of the client's reputation table (the runner adapts :class:`Reputation`)."""

    def eligible(self, peer: PeerId) -> bool: ...

    def replication_probability(self, peer: PeerId) -> float: ...

    def checked_flops(self, peer: PeerId) -> int: ...

    def group_flagged(self, group: str) -> bool: ...

    def weight(self, candidate: Candidate) -> float: ...


class ReputationTrust:
    """The :class:`TrustView` of a :class:`Reputation` table, with a matching weight (``default_weight`` unless
    given): what the client and the simulation hand the scheduler."""

    def __init__(self, reputation: Reputation, weight: Callable[[Candidate], float] = default_weight) -> None:
        self.reputation = reputation
        self._weight = weight
        self.flagged = reputation.flagged_groups()

    def eligible(self, peer: PeerId) -> bool:
        return self.reputation.eligible(peer)

    def replication_probability(self, peer: PeerId) -> float:
        return self.reputation.replication_probability(peer)

    def checked_flops(self, peer: PeerId) -> int:
        return self.reputation.checked_flops(peer)

    def group_flagged(self, group: str) -> bool:
        return group in self.flagged

    def weight(self, candidate: Candidate) -> float:
        return self._weight(candidate)


@dataclass(frozen=True, slots=True)
class Plan:
    level: CheckLevel
    quorum: int
    spot_check: bool


# --- actions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Launch:
    """Open a session with this worker and run the job there."""

    candidate: Candidate


@dataclass(frozen=True, slots=True)
class Check:
    """Fetch this worker's committed trace and check ``nodes`` (all nodes when ``None``); answer with
    :meth:`JobScheduler.on_check`."""

    peer: PeerId
    nodes: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class Bisect:
    """Two results disagree: fetch both traces' leaves, find the first divergent node, check it on both; answer
    with :meth:`JobScheduler.on_check` for each (a worker whose trace does not cover it: ``ok=False``)."""

    first: PeerId
    second: PeerId


@dataclass(frozen=True, slots=True)
class Settle:
    """Pay (receipt) or reject (signed rejection) this worker's result; abort its session if it has none."""

    peer: PeerId
    pay: bool
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    """A verified outcome for the reputation table; ``flops`` is checked work (0: no trust earned)."""

    peer: PeerId
    outcome: Outcome
    flops: int = 0


@dataclass(frozen=True, slots=True)
class Accuse:
    """Evidence to publish: a quorum accusation, or a failed check (``check`` carries the runner's draft)."""

    peer: PeerId
    accusation: Accusation | None = None
    check: Hashable | None = None


@dataclass(frozen=True, slots=True)
class NeedCandidates:
    """No eligible worker is left to ask: call :meth:`JobScheduler.offer` with fresh candidates (after waiting
    a little for adverts), or :meth:`JobScheduler.give_up`."""

    count: int


@dataclass(frozen=True, slots=True)
class Done:
    verdict: Verdict
    plan: Plan
    check_flops: int
    check_bytes: int


@dataclass(frozen=True, slots=True)
class Abandon:
    error: P2PComputeError


Action = Launch | Check | Bisect | Settle | Record | Accuse | NeedCandidates | Done | Abandon


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """The client's check of a worker's result: ``ok``, or the node that failed and the runner's evidence draft.

    ``refused``: the worker did not deliver the trace it committed to (no proof a third party can check: the
    result is rejected and the worker asked no more, but no evidence is published)."""

    ok: bool
    flops: int = 0
    bytes: int = 0
    node: int | None = None
    detail: str = ""
    evidence: Hashable | None = None
    refused: bool = False
    covered: int | None = None  # nodes a passing check covered (None: all it was asked to)


@dataclass
class _Slot:
    candidate: Candidate
    claim: ResultClaim | None = None
    checked: float = 0.0  # the share of its result's nodes a client check passed (1.0: a full check)
    sampled: tuple[int, ...] | None = None
    settled: bool = False
    failed: bool = False
    awaiting_check: bool = False


@dataclass
class JobScheduler:
    """Verification of one job. Drive with :meth:`start`, :meth:`on_result`, :meth:`on_failure`,
    :meth:`on_check`, :meth:`offer` / :meth:`give_up`; each returns the actions to carry out, in order."""

    facts: TaskFacts
    policy: SchedulerPolicy
    trust: TrustView
    rng: Rng
    agree: AgreeFn
    known: Callable[[], KnownAnswer] | None = None  # the client's own answer, computed only for a spot check
    redundancy: int | None = None  # a fixed quorum asked by the caller (None: adaptive)
    plan: Plan | None = None
    _slots: dict[PeerId, _Slot] = field(default_factory=dict)
    _groups: list[str] = field(default_factory=list)
    _verifier: Verifier | None = None
    _finished: bool = False
    _check_flops: int = 0
    _check_bytes: int = 0
    _bisected: set[frozenset[PeerId]] = field(default_factory=set)
    _candidates: list[Candidate] = field(default_factory=list)

    # -- public ------------------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def asked(self) -> tuple[PeerId, ...]:
        return tuple(self._slots)

    def level(self) -> CheckLevel:
        f, p = self.facts, self.policy
        within = f.trace_bytes <= p.check_bytes_budget
        cheap = f.check_flops <= p.check_flops_ratio * f.flops + p.check_flops_slack
        return CheckLevel.FULL if within and cheap else CheckLevel.SAMPLE

    def start(self, candidates: Sequence[Candidate]) -> list[Action]:
        """Choose the plan and the first workers among ``candidates``."""
        if self.plan is not None:
            raise LocalProtocolError(Reason.BAD_TRANSITION, "the scheduler already started")
        self._candidates = [c for c in candidates if self.trust.eligible(c.peer)]
        level = self.level()
        first = self._choose(1, primary=level is CheckLevel.SAMPLE)
        if not first:
            self.plan = Plan(level, 1, False)
            return self._abandon(NoWorkersError(Reason.NO_WORKERS, f"no eligible worker for job {self._job()}"))
        primary = first[0]
        if self.redundancy is not None:
            quorum = max(1, self.redundancy)
        elif level is CheckLevel.FULL:
            quorum = 1
        else:
            trusted = self._proven(primary) and self.rng.random() >= self.trust.replication_probability(primary.peer)
            quorum = 1 if trusted else 2
        spot = (
            level is CheckLevel.SAMPLE
            and quorum == 1
            and self.redundancy is None
            and self.known is not None
            and self.rng.random() < self.policy.spot_check_rate
        )
        self.plan = Plan(level, quorum, spot)
        known = self.known() if spot and self.known is not None else None
        self._verifier = Verifier(
            QuorumPolicy(
                quorum=quorum,
                max_workers=max(quorum, self.policy.max_workers),
                max_attempts=max(quorum, self.policy.max_workers, self.policy.max_attempts),
            ),
            job_digest=self.facts.digest,
            mode=self.facts.mode,
            agree=self.agree,
            known=known,
        )
        actions: list[Action] = [self._launch(primary)]
        if quorum > 1:
            # the extra replicas: probation workers first (their results are compared with a proven one's)
            for extra in self._choose(quorum - 1, primary=False, prefer_probation=True):
                actions.append(self._launch(extra))
        return actions

    def offer(self, candidates: Sequence[Candidate]) -> list[Action]:
        """Fresh candidates after a :class:`NeedCandidates`."""
        self._candidates = [c for c in candidates if self.trust.eligible(c.peer)]
        return self._advance(self._status())

    def give_up(self) -> list[Action]:
        """No more candidates will come."""
        if self._finished:
            return []
        status = self._status()
        detail = f"job {self._job()}: no further eligible worker ({self._tried()})"
        if isinstance(status, Failed):
            return self._abandon(status.error())
        return self._abandon(NoWorkersError(Reason.ALL_ATTEMPTS_FAILED, detail))

    def on_result(self, peer: PeerId, claim: ResultClaim, *, traced: bool) -> list[Action]:
        """A worker's signed result arrived (its outputs checked against its metas by the runner).

        ``traced``: the result commits to a trace of every node (``trace_length`` = the job's node count)."""
        slot = self._slot(peer)
        if self._finished:
            return [Settle(peer, pay=False, reason="not_needed", detail="the job was already decided")]
        slot.claim = claim
        assert self.plan is not None and self._verifier is not None
        if self.plan.level is CheckLevel.FULL or (self.plan.level is CheckLevel.SAMPLE and traced):
            if not traced:
                return self._refused(peer, "the result commits to no trace")
            slot.awaiting_check = True
            nodes = None if self.plan.level is CheckLevel.FULL else self._sample()
            slot.sampled = nodes
            return [Check(peer, nodes)]
        return self._admit(peer)

    def on_failure(self, peer: PeerId, outcome: Outcome, *, after_accept: bool) -> list[Action]:
        """A worker gave no result: declined (``after_accept`` False: costs it nothing), timed out, walked away,
        or sent something that broke the protocol (``invalid``)."""
        slot = self._slot(peer)
        slot.failed = True
        actions: list[Action] = []
        if after_accept:
            actions.append(Record(peer, outcome))
        if self._finished:
            return actions
        assert self._verifier is not None
        verifier_outcome = outcome if outcome in _VERIFIER_FAILURES else Outcome.DECLINED_AFTER_ACCEPT
        return actions + self._advance(self._verifier.add_failure(peer, verifier_outcome))

    def on_busy(self, peer: PeerId) -> list[Action]:
        """``peer`` declined before it accepted because it had no free slot: not a failure of the job. The worker
        is forgotten for this job (it may be asked again once it has room) and another one is chosen, or
        :class:`NeedCandidates` asks the runner for workers with room."""
        slot = self._slot(peer)
        if self._finished or slot.claim is not None or slot.failed:
            return []
        del self._slots[peer]
        self._groups.remove(slot.candidate.group)
        assert self._verifier is not None
        self._verifier.unassign(peer)
        self._candidates = [c for c in self._candidates if c.peer != peer]
        return self._advance(self._status())

    def on_check(self, peer: PeerId, outcome: CheckOutcome) -> list[Action]:
        """The client's check of ``peer``'s result (from a :class:`Check` or a :class:`Bisect`)."""
        slot = self._slot(peer)
        self._check_flops += outcome.flops
        self._check_bytes += outcome.bytes
        if self._finished:
            return []
        slot.awaiting_check = False
        assert self.plan is not None and self._verifier is not None
        if outcome.refused:
            return self._refused(peer, outcome.detail or "the trace it committed to was not delivered")
        if not outcome.ok:
            return self._caught(peer, outcome)
        asked = self.facts.nodes if slot.sampled is None else len(slot.sampled)
        covered = asked if outcome.covered is None else min(asked, outcome.covered)
        share = covered / max(1, self.facts.nodes)
        slot.checked = max(slot.checked, share)
        if self.plan.level is CheckLevel.FULL and self.plan.quorum == 1 and slot.claim is not None:
            return self._accept_checked(peer)
        if slot.claim is not None and not self._verifier.has_claim(peer):
            return self._admit(peer)
        return self._advance(self._verifier.status())

    # -- decisions ---------------------------------------------------------------------------------------------

    def _admit(self, peer: PeerId) -> list[Action]:
        assert self._verifier is not None
        slot = self._slots[peer]
        assert slot.claim is not None
        try:
            status = self._verifier.add_claim(slot.claim)
        except P2PComputeError:  # a result for another job, or whose digest does not match its outputs
            slot.failed = slot.settled = True
            actions: list[Action] = [
                Settle(peer, pay=False, reason="inconsistent", detail="the result contradicts itself"),
                Record(peer, Outcome.INVALID),
            ]
            return actions + self._advance(self._verifier.add_failure(peer, Outcome.INVALID))
        return self._advance(status)

    def _accept_checked(self, peer: PeerId) -> list[Action]:
        """A fully checked result is the job's answer: pay it, and settle everyone else."""
        slot = self._slots[peer]
        assert slot.claim is not None and self.plan is not None
        verdict = Verdict(
            job_digest=self.facts.digest,
            output_digest=slot.claim.output_digest,
            accepted=slot.claim,
            agreeing=(slot.claim,),
            disagreeing=(),
            failures=tuple((p, Outcome.INVALID) for p, s in self._slots.items() if s.failed),
            accusations=(),
            known_answer=False,
        )
        actions: list[Action] = [Record(peer, Outcome.VALID, self.facts.flops)]
        return actions + self._finish(verdict, pay={peer})

    def _caught(self, peer: PeerId, outcome: CheckOutcome) -> list[Action]:
        """A result failed the client's check: reject, record, accuse, and go on without it."""
        assert self._verifier is not None
        slot = self._slots[peer]
        slot.failed = True
        detail = f"node {outcome.node}: {outcome.detail}" if outcome.node is not None else outcome.detail
        actions: list[Action] = [
            Settle(peer, pay=False, reason="check_failed", detail=detail[:512]),
            Record(peer, Outcome.INVALID),
            Accuse(peer, check=outcome.evidence),
        ]
        slot.settled = True
        if self._verifier.has_claim(peer):
            status = self._verifier.retract(peer, Outcome.INVALID)
        else:
            status = self._verifier.add_failure(peer, Outcome.INVALID)
        return actions + self._advance(status)

    def _refused(self, peer: PeerId, detail: str) -> list[Action]:
        assert self._verifier is not None
        slot = self._slots[peer]
        slot.failed = True
        slot.settled = True
        actions: list[Action] = [
            Settle(peer, pay=False, reason="trace_refused", detail=detail[:512]),
            Record(peer, Outcome.DECLINED_AFTER_ACCEPT),
        ]
        if self._verifier.has_claim(peer):
            status = self._verifier.retract(peer, Outcome.DECLINED_AFTER_ACCEPT)
        else:
            status = self._verifier.add_failure(peer, Outcome.DECLINED_AFTER_ACCEPT)
        return actions + self._advance(status)

    def _advance(self, status: Status) -> list[Action]:
        if self._finished:
            return []
        assert self._verifier is not None and self.plan is not None
        if isinstance(status, Accepted):
            if any(s.awaiting_check for s in self._slots.values()):
                return []  # a sampled check is still running: a result may yet be retracted
            return self._accepted(status.verdict)
        if isinstance(status, Failed):
            return self._abandon(status.error(), failures=status.outcomes())
        # NeedMore: first, can two disagreeing traced results be told apart by a check?
        if status.count and len(self._verifier.clusters) > 1:
            bisect = self._bisect()
            if bisect is not None:
                return [bisect]
        if any(s.awaiting_check for s in self._slots.values()):
            return []
        if not status.count:
            return []
        # an unreplicated job over the check budget goes only to a proven worker (when there is one)
        alone = self.plan.level is CheckLevel.SAMPLE and self.plan.quorum == 1
        chosen = self._choose(status.count, primary=alone)
        if chosen:
            return [self._launch(c) for c in chosen]
        if status.waiting:
            return []
        return [NeedCandidates(status.count)]

    def _bisect(self) -> Bisect | None:
        assert self._verifier is not None
        clusters = self._verifier.clusters
        first, second = clusters[0].claims[0].worker, clusters[1].claims[0].worker
        pair = frozenset({first, second})
        if pair in self._bisected:
            return None
        self._bisected.add(pair)
        self._slots[first].awaiting_check = True
        self._slots[second].awaiting_check = True
        return Bisect(first, second)

    def _accepted(self, verdict: Verdict) -> list[Action]:
        """A quorum (or a spot check) decided: record only checked results as valid, pay the agreeing ones."""
        actions: list[Action] = []
        agreeing = set(verdict.agreeing_workers)
        corroborated = len(agreeing) >= 2 or verdict.known_answer
        for claim in verdict.agreeing:
            share = 1.0 if corroborated else self._slots[claim.worker].checked
            actions.append(Record(claim.worker, Outcome.VALID, int(self.facts.flops * share)))
        for claim in verdict.disagreeing:
            actions.append(Record(claim.worker, Outcome.INVALID))
        for accusation in verdict.accusations:
            actions.append(Accuse(accusation.accused.worker, accusation=accusation))
        return actions + self._finish(verdict, pay=agreeing)

    def _finish(self, verdict: Verdict, *, pay: set[PeerId]) -> list[Action]:
        assert self.plan is not None
        self._finished = True
        actions: list[Action] = []
        for peer, slot in self._slots.items():
            if slot.settled:
                continue
            slot.settled = True
            if peer in pay:
                actions.append(Settle(peer, pay=True))
            elif slot.claim is not None and not slot.failed:
                in_verdict = peer in verdict.disagreeing_workers
                reason = "verification_failed" if in_verdict else "not_needed"
                detail = "result outside the accepted cluster" if in_verdict else "the job was decided without it"
                actions.append(Settle(peer, pay=False, reason=reason, detail=detail))
            else:
                actions.append(Settle(peer, pay=False, reason="cancelled", detail="not needed any more"))
        actions.append(Done(verdict, self.plan, self._check_flops, self._check_bytes))
        return actions

    def _abandon(self, error: P2PComputeError, *, failures: dict[PeerId, Outcome] | None = None) -> list[Action]:
        self._finished = True
        actions: list[Action] = []
        for peer, slot in self._slots.items():
            if not slot.settled:
                slot.settled = True
                reason = Reason.NO_QUORUM.value if slot.claim is not None else "cancelled"
                actions.append(Settle(peer, pay=False, reason=reason, detail="no verdict"))
        actions.append(Abandon(error))
        return actions

    # -- choosing workers --------------------------------------------------------------------------------------

    def _proven(self, candidate: Candidate) -> bool:
        """May this worker run unchecked work of this size? Proven checked work, and not from a flagged group."""
        if self.trust.group_flagged(candidate.group):
            return False
        return self.trust.checked_flops(candidate.peer) >= self.policy.probation_factor * max(1, self.facts.flops)

    def _choose(self, count: int, *, primary: bool, prefer_probation: bool = False) -> list[Candidate]:
        asked = set(self._slots)
        pool = [c for c in self._candidates if c.peer not in asked]
        if primary:
            proven = [c for c in pool if self._proven(c)]
            pool = proven or pool  # nobody proven: the job will be replicated (quorum 2)
        elif prefer_probation:
            probation = [c for c in pool if not self._proven(c)]
            chosen = choose(probation, count, self.rng, weight=self.trust.weight, taken_groups=self._groups)
            if len(chosen) >= count:
                return chosen
            taken = [*self._groups, *(c.group for c in chosen)]
            rest = [c for c in pool if c not in chosen]
            return chosen + choose(rest, count - len(chosen), self.rng, weight=self.trust.weight, taken_groups=taken)
        return choose(pool, count, self.rng, weight=self.trust.weight, taken_groups=self._groups)

    def _launch(self, candidate: Candidate) -> Launch:
        assert self._verifier is not None or self.plan is None
        self._slots[candidate.peer] = _Slot(candidate)
        self._groups.append(candidate.group)
        if self._verifier is not None:
            self._verifier.assign(candidate.peer)
        return Launch(candidate)

    def _sample(self) -> tuple[int, ...]:
        """``sample_nodes`` distinct node indices, uniformly (always including the last node: the output)."""
        n = self.facts.nodes
        if n <= self.policy.sample_nodes:
            return tuple(range(n))
        picked = {n - 1}
        while len(picked) < self.policy.sample_nodes:
            picked.add(min(n - 1, int(self.rng.random() * n)))
        return tuple(sorted(picked))

    # -- helpers -----------------------------------------------------------------------------------------------

    def _slot(self, peer: PeerId) -> _Slot:
        slot = self._slots.get(peer)
        if slot is None:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"worker {peer} was not asked for this job")
        return slot

    def _status(self) -> Status:
        if self._verifier is None:
            return NeedMore(count=1, waiting=0)
        return self._verifier.status()

    def _job(self) -> str:
        return self.facts.digest.hex()[:16]

    def _tried(self) -> str:
        return ", ".join(str(p)[-8:] for p in self._slots) or "none tried"


_VERIFIER_FAILURES = frozenset({Outcome.TIMEOUT, Outcome.DECLINED_AFTER_ACCEPT, Outcome.INVALID})
