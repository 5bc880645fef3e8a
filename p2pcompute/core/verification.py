"""Redundant-result verification: quorum verdicts, escalation, and evidence of cheating (specs/verification.md).

Pure and sans-I/O. A client feeds a :class:`Verifier` the signed results (:class:`ResultClaim`) and failures of
the workers it asked, one at a time, and reads :meth:`Verifier.status`: :class:`NeedMore`, :class:`Accepted` or
:class:`Failed`. Comparing tensors within a tolerance needs torch, so it is injected as an ``agree`` callback
(``p2pcompute.compute.compare`` builds one).

A worker outside the accepted cluster is reported with :class:`CheatingEvidence` (:func:`make_evidence`);
a receiving peer checks it with :func:`check_evidence` (or :class:`EvidenceInbox`, which also stops replays).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import cast

from p2pcompute.core.envelope import Opened, open_envelope, seal
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.jobspec import JobSpec, decode_job, node_refs
from p2pcompute.core.messages import (
    MAX_EVIDENCE_RESULTS,
    CheatingEvidence,
    CheckEvidence,
    ComparisonMode,
    JobResult,
    Message,
)
from p2pcompute.core.replay import SeenCache, replay_key
from p2pcompute.core.reputation import Outcome
from p2pcompute.core.tensors import TensorMeta, check_blob, outputs_digest
from p2pcompute.core.trace import TraceLeaf, leaf_hash, meta_of, verify_proof
from p2pcompute.errors import (
    ConfigError,
    DecodeError,
    JobFormatError,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
    ReplayError,
    SchemaError,
    SignatureError,
    TraceError,
    VerificationError,
)

__all__ = [
    "DEFAULT_EVIDENCE_TTL_MS",
    "MAX_EVIDENCE_SIZE",
    "MIN_AGREEING",
    "Accepted",
    "Accusation",
    "AgreeFn",
    "Cluster",
    "ComparisonMode",
    "EvidenceInbox",
    "EvidenceStrength",
    "Failed",
    "KnownAnswer",
    "NeedMore",
    "QuorumPolicy",
    "ResultClaim",
    "Status",
    "ValidCheckEvidence",
    "ValidEvidence",
    "check_check_evidence",
    "Verdict",
    "Verifier",
    "check_evidence",
    "make_evidence",
]

MAX_EVIDENCE_SIZE = 128 * 1024
"""Largest evidence envelope a peer accepts (nine results at their schema bounds fit)."""
DEFAULT_EVIDENCE_TTL_MS = 5 * 60 * 1000
"""``expires_at - now`` of published evidence (within the 10 min replay window)."""
MIN_AGREEING = 2
"""Agreeing results an evidence message must carry (a receiver cannot know the reporter's quorum)."""

_FAILURE_OUTCOMES = frozenset({Outcome.TIMEOUT, Outcome.DECLINED_AFTER_ACCEPT, Outcome.INVALID})


# --- claims ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResultClaim:
    """A worker's verified, signed result; ``key`` lets the ``agree`` callback find the output tensors."""

    opened: Opened[JobResult]
    key: Hashable | None = None

    @property
    def worker(self) -> PeerId:
        return self.opened.message.worker

    @property
    def job_digest(self) -> bytes:
        return self.opened.message.job_digest

    @property
    def output_digest(self) -> bytes:
        return self.opened.message.output_digest

    @property
    def outputs(self) -> tuple[TensorMeta, ...]:
        return self.opened.message.outputs

    @property
    def hardware_class(self) -> str:
        return self.opened.message.hardware_class


@dataclass(frozen=True, slots=True)
class KnownAnswer:
    """A result the client computed itself (a hidden spot check): ground truth for the verdict."""

    output_digest: bytes
    outputs: tuple[TensorMeta, ...]
    hardware_class: str
    key: Hashable | None = None


AgreeFn = Callable[[ResultClaim | KnownAnswer, ResultClaim | KnownAnswer], bool]
"""Do two results with different digests agree within the job's tolerance? Must be symmetric."""


@dataclass(frozen=True, slots=True)
class QuorumPolicy:
    """How many agreeing results accept a job, and how far disagreement escalates.

    ``quorum``       agreeing results that accept a job when every result agrees (1 = no replication)
    ``max_workers``  most results (claims) gathered for one job, escalation included
    ``max_attempts`` most workers asked, counting those that timed out or walked away
    """

    quorum: int = 2
    max_workers: int = 5
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ConfigError(f"quorum must be at least 1, got {self.quorum}")
        if self.max_workers < self.quorum:
            raise ConfigError(f"max_workers ({self.max_workers}) must be at least quorum ({self.quorum})")
        if self.max_attempts < self.max_workers:
            raise ConfigError(f"max_attempts ({self.max_attempts}) must be at least max_workers ({self.max_workers})")


# --- statuses and verdicts ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cluster:
    """Results that agree with each other; ``claims[0]`` (the earliest) is its representative."""

    claims: tuple[ResultClaim, ...]

    @property
    def output_digest(self) -> bytes:
        return self.claims[0].output_digest

    @property
    def workers(self) -> tuple[PeerId, ...]:
        return tuple(c.worker for c in self.claims)

    def describe(self) -> str:
        return f"{self.output_digest.hex()[:16]} by {len(self.claims)} ({', '.join(str(w)[-8:] for w in self.workers)})"


@dataclass(frozen=True, slots=True)
class Accusation:
    """An unsigned evidence draft: ``accused`` disagrees with ``agreeing`` (≥ 2) under ``mode``."""

    accused: ResultClaim
    agreeing: tuple[ResultClaim, ...]
    accepted_output_digest: bytes
    mode: ComparisonMode


@dataclass(frozen=True, slots=True)
class Verdict:
    """The accepted result of a job and who agreed, who did not, who failed, and the evidence drafts.

    ``accepted`` is the claim whose outputs the caller uses; it is ``None`` only for a spot check that no
    worker got right (the client then uses its known answer).
    """

    job_digest: bytes
    output_digest: bytes
    accepted: ResultClaim | None
    agreeing: tuple[ResultClaim, ...]
    disagreeing: tuple[ResultClaim, ...]
    failures: tuple[tuple[PeerId, Outcome], ...]
    accusations: tuple[Accusation, ...]
    known_answer: bool

    @property
    def agreeing_workers(self) -> tuple[PeerId, ...]:
        return tuple(c.worker for c in self.agreeing)

    @property
    def disagreeing_workers(self) -> tuple[PeerId, ...]:
        return tuple(c.worker for c in self.disagreeing)

    def outcomes(self) -> dict[PeerId, Outcome]:
        """What to record in the reputation table for every worker asked."""
        out: dict[PeerId, Outcome] = {c.worker: Outcome.VALID for c in self.agreeing}
        out.update({c.worker: Outcome.INVALID for c in self.disagreeing})
        out.update(dict(self.failures))
        return out


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Ask ``count`` more workers (0: just wait for the ``waiting`` ones already asked)."""

    count: int
    waiting: int


@dataclass(frozen=True, slots=True)
class Accepted:
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Failed:
    """No result can be accepted within the policy's bounds; ``clusters`` say what disagreed."""

    detail: str
    clusters: tuple[Cluster, ...]
    failures: tuple[tuple[PeerId, Outcome], ...]

    def error(self) -> VerificationError:
        return VerificationError(Reason.NO_QUORUM, self.detail)

    def outcomes(self) -> dict[PeerId, Outcome]:
        """Only failures are known outcomes: without a verdict nobody's result is judged."""
        return dict(self.failures)


Status = NeedMore | Accepted | Failed


# --- the quorum engine ----------------------------------------------------------------------------------------


class Verifier:
    """Quorum verdict for one job: fed claims and failures one by one, answers :meth:`status`.

    Decision rule (specs/verification.md §4): while every result agrees, ``quorum`` of them accept. Once any
    disagreement is seen, a cluster is accepted only with at least ``quorum + 1`` distinct workers *and* a strict
    majority of all results. With a :class:`KnownAnswer` (spot check) the known answer is the truth: each result
    is judged against it and ``quorum`` results end the job.
    """

    def __init__(
        self,
        policy: QuorumPolicy,
        *,
        job_digest: bytes,
        mode: ComparisonMode,
        agree: AgreeFn,
        known: KnownAnswer | None = None,
    ) -> None:
        self.policy = policy
        self.job_digest = job_digest
        self.mode = mode
        self._agree = agree
        self._known = known
        self._assigned: dict[PeerId, None] = {}
        self._claims: list[ResultClaim] = []
        self._clusters: list[list[ResultClaim]] = []
        self._failures: list[tuple[PeerId, Outcome]] = []
        self._done: set[PeerId] = set()
        self._final: Accepted | Failed | None = None
        self._comparisons = 0

    # -- inputs

    def assign(self, worker: PeerId) -> None:
        """Record that ``worker`` was asked; a worker is never asked twice for one job."""
        self._check_open()
        if worker in self._assigned:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"worker {worker} already asked for this job")
        if len(self._assigned) >= self.policy.max_attempts:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"already asked {self.policy.max_attempts} workers")
        self._assigned[worker] = None

    def unassign(self, worker: PeerId) -> None:
        """Forget that ``worker`` was asked: it declined before it accepted (busy), so the job was never its and
        the attempt does not count against the job's bounds."""
        self._check_open()
        if worker not in self._assigned or worker in self._done:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"worker {worker} was not asked or already answered")
        del self._assigned[worker]

    def add_claim(self, claim: ResultClaim) -> Status:
        """Add a worker's signed result (assigning the worker if it was not yet) and return the new status.

        A result that names another job or whose ``output_digest`` does not match its outputs raises
        :class:`SchemaError` (``inconsistent``) and changes nothing; record it with ``add_failure(worker, INVALID)``.
        """
        self._check_open()
        worker = claim.worker
        if worker in self._done:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"worker {worker} already answered")
        if claim.job_digest != self.job_digest:
            raise SchemaError(
                Reason.INCONSISTENT,
                f"result of {worker} names job {claim.job_digest.hex()[:16]}, not {self.job_digest.hex()[:16]}",
            )
        if outputs_digest(claim.outputs) != claim.output_digest:
            raise SchemaError(Reason.INCONSISTENT, f"result of {worker}: output_digest does not match its outputs")
        if len(self._claims) >= self.policy.max_workers:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"already hold {self.policy.max_workers} results")
        if worker not in self._assigned:
            self.assign(worker)
        self._done.add(worker)
        self._claims.append(claim)
        if self._known is None:
            self._place(claim)
        return self.status()

    def add_failure(self, worker: PeerId, outcome: Outcome) -> Status:
        """Record that an asked worker gave no usable result: it timed out, walked away after accepting
        (``declined_after_accept``), or sent a result that failed its checks before comparison (``invalid``)."""
        self._check_open()
        if outcome not in _FAILURE_OUTCOMES:
            raise LocalProtocolError(Reason.WRONG_TYPE, f"{outcome} is not a failure outcome")
        if worker not in self._assigned:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"worker {worker} was not asked")
        if worker in self._done:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"worker {worker} already answered")
        self._done.add(worker)
        self._failures.append((worker, outcome))
        return self.status()

    def retract(self, worker: PeerId, outcome: Outcome) -> Status:
        """Take back ``worker``'s claim: a later check found it false (``invalid``) or the worker did not deliver
        what it committed to; it counts as that failure from now on."""
        self._check_open()
        if outcome not in _FAILURE_OUTCOMES:
            raise LocalProtocolError(Reason.WRONG_TYPE, f"{outcome} is not a failure outcome")
        claims = [c for c in self._claims if c.worker == worker]
        if not claims:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, f"worker {worker} has no claim to retract")
        self._claims = [c for c in self._claims if c.worker != worker]
        self._clusters = [[c for c in cluster if c.worker != worker] for cluster in self._clusters]
        self._clusters = [cluster for cluster in self._clusters if cluster]
        self._failures.append((worker, outcome))
        return self.status()

    def has_claim(self, worker: PeerId) -> bool:
        return any(c.worker == worker for c in self._claims)

    # -- outputs

    @property
    def comparisons(self) -> int:
        """How many times the ``agree`` callback ran (tensor comparisons cost time)."""
        return self._comparisons

    @property
    def clusters(self) -> tuple[Cluster, ...]:
        """Clusters, largest first (ties: earliest first)."""
        return tuple(Cluster(tuple(c)) for c in self._ordered())

    def status(self) -> Status:
        if self._final is not None:
            return self._final
        result = self._judge_known() if self._known is not None else self._judge()
        if not isinstance(result, NeedMore):
            self._final = result
        return result

    # -- internals

    def _check_open(self) -> None:
        if self._final is not None:
            raise LocalProtocolError(Reason.BAD_TRANSITION, "the verdict for this job is already final")

    def _outstanding(self) -> int:
        return len(self._assigned) - len(self._done)

    def _agrees(self, a: ResultClaim | KnownAnswer, b: ResultClaim | KnownAnswer) -> bool:
        if a.output_digest == b.output_digest:
            return True
        if self.mode is ComparisonMode.EXACT and a.hardware_class == b.hardware_class:
            return False  # same hardware, deterministic job: the bits must match
        self._comparisons += 1
        return bool(self._agree(a, b))

    def _place(self, claim: ResultClaim) -> None:
        for cluster in self._ordered():
            if all(self._agrees(claim, member) for member in cluster):
                cluster.append(claim)
                return
        self._clusters.append([claim])

    def _ordered(self) -> list[list[ResultClaim]]:
        return sorted(self._clusters, key=lambda c: -len(c))  # stable: ties keep arrival order

    def _need(self, needed: int, detail: str) -> NeedMore | Failed:
        """Ask for ``needed`` more results, or fail when the bounds cannot provide them."""
        outstanding = self._outstanding()
        can_arrive = min(
            self.policy.max_workers - len(self._claims),
            self.policy.max_attempts - len(self._assigned) + outstanding,
        )
        if needed > can_arrive:
            return self._failed(f"{detail}; {needed} more results needed, at most {can_arrive} possible")
        return NeedMore(count=max(0, needed - outstanding), waiting=outstanding)

    def _failed(self, detail: str) -> Failed:
        clusters = self.clusters
        what = "; ".join(c.describe() for c in clusters) or "no results"
        failures = ", ".join(f"{str(w)[-8:]} {o.value}" for w, o in self._failures)
        text = f"job {self.job_digest.hex()[:16]}: {detail}; results: {what}" + (
            f"; failed: {failures}" if failures else ""
        )
        return Failed(detail=text, clusters=clusters, failures=tuple(self._failures))

    def _judge(self) -> Status:
        q = self.policy.quorum
        ordered = self._ordered()
        n = len(self._claims)
        if not ordered:
            return self._need(q, "no results yet")
        top = ordered[0]
        a = len(top)
        if len(ordered) == 1:
            if a >= q:
                return Accepted(self._verdict(top, [c for cl in ordered[1:] for c in cl], known=False))
            return self._need(q - a, f"{a} of {q} agreeing results")
        if a >= q + 1 and a > n - a:
            return Accepted(self._verdict(top, [c for cl in ordered[1:] for c in cl], known=False))
        needed = max(q + 1 - a, n - 2 * a + 1, 1)
        return self._need(needed, f"results disagree: {len(ordered)} clusters")

    def _judge_known(self) -> Status:
        known = self._known
        assert known is not None
        n = len(self._claims)
        if n < self.policy.quorum:
            return self._need(self.policy.quorum - n, f"{n} of {self.policy.quorum} results")
        valid = [c for c in self._claims if self._agrees(c, known)]
        invalid = [c for c in self._claims if c not in valid]
        return Accepted(self._verdict(valid, invalid, known=True))

    def _verdict(self, agreeing: list[ResultClaim], disagreeing: list[ResultClaim], *, known: bool) -> Verdict:
        if known:
            assert self._known is not None
            digest = self._known.output_digest
        else:
            digest = agreeing[0].output_digest
        accusations = tuple(a for a in (_accuse(bad, agreeing, self.mode) for bad in disagreeing) if a is not None)
        return Verdict(
            job_digest=self.job_digest,
            output_digest=digest,
            accepted=agreeing[0] if agreeing else None,
            agreeing=tuple(agreeing),
            disagreeing=tuple(disagreeing),
            failures=tuple(self._failures),
            accusations=accusations,
            known_answer=known,
        )


def _accuse(accused: ResultClaim, agreeing: list[ResultClaim], mode: ComparisonMode) -> Accusation | None:
    """The evidence draft against ``accused``: exact when enough agreeing results share its hardware class."""
    if mode is ComparisonMode.EXACT:
        same = [c for c in agreeing if c.hardware_class == accused.hardware_class]
        if len(same) >= MIN_AGREEING:
            return Accusation(
                accused=accused,
                agreeing=tuple(same[:MAX_EVIDENCE_RESULTS]),
                accepted_output_digest=same[0].output_digest,
                mode=ComparisonMode.EXACT,
            )
    if len(agreeing) < MIN_AGREEING:
        return None
    return Accusation(
        accused=accused,
        agreeing=tuple(agreeing[:MAX_EVIDENCE_RESULTS]),
        accepted_output_digest=agreeing[0].output_digest,
        mode=ComparisonMode.TOLERANCE,
    )


# --- evidence -------------------------------------------------------------------------------------------------


def make_evidence(keypair: KeyPair, accusation: Accusation, *, id: bytes, nonce: int, expires_at: int) -> bytes:
    """Seal an accusation as a :class:`CheatingEvidence` envelope signed by ``keypair`` (the client of the job)."""
    results = (accusation.accused, *accusation.agreeing)
    for claim in results:
        if claim.opened.message.client != keypair.peer_id:
            raise LocalProtocolError(Reason.SIGNER_MISMATCH, f"result of {claim.worker} was made for another client")
    evidence = CheatingEvidence(
        id=id,
        nonce=nonce,
        expires_at=expires_at,
        reporter=keypair.peer_id,
        accused=accusation.accused.worker,
        job_digest=accusation.accused.job_digest,
        comparison=accusation.mode,
        accepted_output_digest=accusation.accepted_output_digest,
        accused_result=accusation.accused.opened.envelope,
        agreeing_results=tuple(c.opened.envelope for c in accusation.agreeing),
    )
    return seal(keypair, evidence)


class EvidenceStrength(StrEnum):
    """What a receiver could check offline (specs/verification.md §5.3)."""

    DIGEST = "digest"
    """Exact job, same hardware class: the accused's bits differ from those of ≥ 2 other workers of its class."""
    SHAPE = "shape"
    """Tolerance job: the accused's output shapes or dtypes differ from the agreeing ones (never within tolerance)."""
    CLAIMED = "claimed"
    """Tolerance job, same shapes: values may differ within tolerance; only the reporter's comparison says not."""


@dataclass(frozen=True, slots=True)
class ValidEvidence:
    """Evidence whose every signature and cross-reference checked out."""

    evidence: Opened[CheatingEvidence]
    accused_result: Opened[JobResult]
    agreeing_results: tuple[Opened[JobResult], ...]
    strength: EvidenceStrength

    @property
    def reporter(self) -> PeerId:
        return self.evidence.message.reporter

    @property
    def accused(self) -> PeerId:
        return self.evidence.message.accused

    @property
    def job_digest(self) -> bytes:
        return self.evidence.message.job_digest

    @property
    def agreeing(self) -> tuple[PeerId, ...]:
        return tuple(r.message.worker for r in self.agreeing_results)


def _bad(detail: str) -> SchemaError:
    return SchemaError(Reason.BAD_EVIDENCE, detail)


def _open_result(data: bytes, what: str, signer: PeerId | None = None) -> Opened[JobResult]:
    try:
        return open_envelope(data, expect=JobResult, signer=signer)
    except SignatureError as exc:
        raise SignatureError(Reason.BAD_EVIDENCE, f"{what}: {exc.reason.value}: {exc.detail}") from exc
    except RemoteProtocolError as exc:
        raise _bad(f"{what}: {exc.reason.value}: {exc.detail}") from exc


def _shapes(outputs: tuple[TensorMeta, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((m.dtype, m.shape) for m in outputs)


def check_evidence(opened: Opened[CheatingEvidence], now: int) -> ValidEvidence:
    """Check evidence whose outer envelope is already open: expiry, every embedded signature, every cross-reference.

    Raises :class:`ReplayError` (``expired``), :class:`SignatureError` (``bad_evidence``: an embedded result
    does not verify or is not signed by the worker it must be) or :class:`SchemaError` (``bad_evidence``).
    """
    ev = opened.message
    if ev.expires_at <= now:
        raise ReplayError(Reason.EXPIRED, f"evidence expired {now - ev.expires_at} ms ago")
    if ev.accused == ev.reporter:
        raise _bad("reporter accuses itself")
    accused = _open_result(ev.accused_result, "accused result", signer=ev.accused)
    if accused.message.job_digest != ev.job_digest:
        raise _bad("accused result names another job")
    if accused.message.client != ev.reporter:
        raise _bad("accused result was made for another client than the reporter")
    if len(ev.agreeing_results) < MIN_AGREEING:
        raise _bad(f"{len(ev.agreeing_results)} agreeing results, at least {MIN_AGREEING} needed")
    agreeing: list[Opened[JobResult]] = []
    seen = {ev.accused, ev.reporter}
    for i, data in enumerate(ev.agreeing_results):
        what = f"agreeing result {i}"
        result = _open_result(data, what)
        m = result.message
        if m.worker in seen:
            raise _bad(f"{what}: worker {m.worker} is the accused, the reporter or appears twice")
        seen.add(m.worker)
        if m.job_digest != ev.job_digest:
            raise _bad(f"{what}: names another job")
        if m.client != ev.reporter:
            raise _bad(f"{what}: was made for another client than the reporter")
        if outputs_digest(m.outputs) != m.output_digest:
            raise _bad(f"{what}: output_digest does not match its outputs")
        agreeing.append(result)
    digests = {r.message.output_digest for r in agreeing}
    acc = accused.message
    if ev.comparison is ComparisonMode.EXACT:
        if digests != {ev.accepted_output_digest}:
            raise _bad("exact evidence: an agreeing result does not attest the accepted output digest")
        classes = {r.message.hardware_class for r in agreeing}
        if classes != {acc.hardware_class}:
            raise _bad("exact evidence: results of different hardware classes may differ in bits")
        if acc.output_digest == ev.accepted_output_digest:
            raise _bad("the accused attested the accepted output digest")
        strength = EvidenceStrength.DIGEST
    else:
        if ev.accepted_output_digest not in digests:
            raise _bad("tolerance evidence: no agreeing result attests the accepted output digest")
        if acc.output_digest in digests:
            raise _bad("the accused attested the same outputs as an agreeing worker")
        shapes = {_shapes(r.message.outputs) for r in agreeing}
        if len(shapes) != 1:
            raise _bad("tolerance evidence: agreeing results differ in output shapes or dtypes")
        strength = EvidenceStrength.CLAIMED if _shapes(acc.outputs) in shapes else EvidenceStrength.SHAPE
    return ValidEvidence(evidence=opened, accused_result=accused, agreeing_results=tuple(agreeing), strength=strength)


@dataclass
class EvidenceInbox:
    """Receives gossiped evidence: opens it, refuses replays, checks it, and counts each accusation once.

    An accusation is (reporter, accused, job digest): the same accusation re-sealed with a new nonce is
    ``replayed`` (another reporter cannot re-wrap it: every embedded result names the reporter as its client).
    ``max_remembered`` bounds that memory (oldest forgotten first).
    """

    seen: SeenCache = field(default_factory=SeenCache)
    max_remembered: int = 65_536
    _counted: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def receive(self, data: bytes, now: int) -> ValidEvidence | ValidCheckEvidence:
        """Raise a :class:`RemoteProtocolError` for bad, forged or replayed evidence; else return it, once.

        Check evidence (a failed client check) is returned after its pure checks (signatures, proofs, tensors);
        redoing the check itself needs torch and is the caller's (``compute.evidence.recheck``)."""
        if len(data) > MAX_EVIDENCE_SIZE:
            raise DecodeError(Reason.TOO_LARGE, f"evidence of {len(data)} bytes, limit {MAX_EVIDENCE_SIZE}")
        opened: Opened[Message] = open_envelope(data)
        if not isinstance(opened.message, (CheatingEvidence, CheckEvidence)):
            raise SignatureError(Reason.UNEXPECTED_PAYLOAD_TYPE, f"{opened.message.TYPE} is not evidence")
        expires_at, signer = opened.message.expires_at, opened.signer.raw
        self.seen.check(replay_key(opened), expires_at, now, signer)
        valid: ValidEvidence | ValidCheckEvidence
        if isinstance(opened.message, CheckEvidence):
            valid = check_check_evidence(cast("Opened[CheckEvidence]", opened), now)
        else:
            valid = check_evidence(cast("Opened[CheatingEvidence]", opened), now)
        key = hashlib.sha256(valid.reporter.raw + valid.accused.raw + valid.job_digest).digest()
        if key in self._counted:
            raise ReplayError(Reason.REPLAYED, f"{valid.reporter} already reported {valid.accused} for this job")
        self.seen.add(replay_key(opened), expires_at, now, signer)
        self._counted[key] = None
        while len(self._counted) > self.max_remembered:
            self._counted.popitem(last=False)
        return valid


# --- evidence from the client's own checks --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValidCheckEvidence:
    """Check evidence whose signatures, proofs and tensors checked out; the check itself is still to redo."""

    evidence: Opened[CheckEvidence]
    accused_result: Opened[JobResult]
    spec: JobSpec
    leaves: dict[int, TraceLeaf]
    tensors: dict[bytes, bytes]

    @property
    def reporter(self) -> PeerId:
        return self.evidence.message.reporter

    @property
    def accused(self) -> PeerId:
        return self.evidence.message.accused

    @property
    def job_digest(self) -> bytes:
        return self.evidence.message.job_digest

    @property
    def node(self) -> int:
        return self.evidence.message.node


def check_check_evidence(opened: Opened[CheckEvidence], now: int) -> ValidCheckEvidence:
    """The pure checks of check evidence (specs/verification.md §12): the accused's signed result was made for the
    reporter, the spec is the job's, every leaf is under the result's trace root, the node and each node it reads
    have their leaf, and every tensor the check reads is there with the bytes its meta names.

    Raises :class:`ReplayError` (``expired``), :class:`SignatureError` or :class:`SchemaError` (``bad_evidence``).
    """
    ev = opened.message
    if ev.expires_at <= now:
        raise ReplayError(Reason.EXPIRED, f"evidence expired {now - ev.expires_at} ms ago")
    if ev.accused == ev.reporter:
        raise _bad("reporter accuses itself")
    accused = _open_result(ev.accused_result, "accused result", signer=ev.accused)
    result = accused.message
    if result.job_digest != ev.job_digest or hashlib.sha256(ev.spec).digest() != ev.job_digest:
        raise _bad("the accused result or the spec is not the job's")
    if result.client != ev.reporter:
        raise _bad("accused result was made for another client than the reporter")
    try:
        spec = decode_job(ev.spec)
    except JobFormatError as exc:
        raise _bad(f"spec: {exc.reason.value}: {exc.detail}") from exc
    if result.trace_length != len(spec.nodes) or not ev.node < result.trace_length:
        raise _bad(f"node {ev.node} of a trace of {result.trace_length}; the job has {len(spec.nodes)} nodes")
    leaves: dict[int, TraceLeaf] = {}
    for item in ev.leaves:
        node = item.leaf.node
        if node in leaves:
            raise _bad(f"leaf {node} twice")
        try:
            verify_proof(result.trace_root, result.trace_length, node, leaf_hash(item.leaf), item.proof)
        except RemoteProtocolError as exc:
            raise _bad(f"leaf {node}: {exc.reason.value}: {exc.detail}") from exc
        leaves[node] = item.leaf
    if ev.node not in leaves:
        raise _bad(f"no leaf of the checked node {ev.node}")
    metas = list(leaves[ev.node].outputs)
    for ref in node_refs(spec.nodes[ev.node]):
        try:
            metas.append(meta_of(spec, leaves, ref))
        except TraceError as exc:
            raise _bad(f"node {ev.node} reads a tensor the evidence has no leaf of: {exc.detail}") from exc
    tensors = {hashlib.sha256(data).digest(): data for data in ev.tensors}
    for meta in metas:
        data = tensors.get(meta.digest)
        if data is None:
            raise _bad(f"tensor {meta.digest.hex()[:16]} the check reads is missing")
        try:
            check_blob(meta, data)
        except JobFormatError as exc:
            raise _bad(f"tensor {meta.digest.hex()[:16]}: {exc.reason.value}") from exc
    return ValidCheckEvidence(evidence=opened, accused_result=accused, spec=spec, leaves=leaves, tensors=tensors)


def _replay_key(opened: Opened[CheatingEvidence]) -> bytes:
    return replay_key(cast("Opened[Message]", opened))
