"""The client library: run PyTorch work on workers found through the network.

::

    async with open_client(bootstrap=["/ip4/.../tcp/4001/p2p/12D3KooW..."]) as client:
        job = Job.from_module(model, (x,))
        result = await client.run(job, max_price="0.01", deadline=60)
        print(result.outputs[0], result.worker, result.price)

For scripts and notebooks, :func:`run_job` does the same without async code. The client joins the network as a
light peer (it reads adverts and never advertises), matches the job to eligible workers (``core.matching``),
negotiates (``net.negotiate``), sends the inputs, checks every output against its content hash and the worker's
signed attestation, and retries on another worker when one declines, times out or fails.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pcompute.compute.compare import make_agree
from p2pcompute.config import NodeConfig, parse_price
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.jobspec import Comparison, JobLimits, JobSpec, decode_bundle, decode_job, job_digest
from p2pcompute.core.ledger import LedgerRole
from p2pcompute.core.matching import Candidate, choose, default_weight, eligible
from p2pcompute.core.messages import ComparisonMode, DeviceKind, Requirements, Timings
from p2pcompute.core.negotiation import MAX_CLOCK_SKEW_MS, MESSAGE_TTL_MS
from p2pcompute.core.replay import SeenCache
from p2pcompute.core.reputation import Outcome
from p2pcompute.core.tensors import TensorMeta, outputs_digest
from p2pcompute.core.verification import (
    DEFAULT_EVIDENCE_TTL_MS,
    Accepted,
    Failed,
    KnownAnswer,
    NeedMore,
    QuorumPolicy,
    ResultClaim,
    Status,
    Verdict,
    Verifier,
    make_evidence,
)
from p2pcompute.errors import (
    NoWorkersError,
    P2PComputeError,
    Reason,
)
from p2pcompute.keys import default_data_dir, load_or_create_key
from p2pcompute.net.host import HostConfig, open_host
from p2pcompute.net.logs import libp2p_logs_at_debug
from p2pcompute.net.negotiate import PreparedJob, WorkerResult, open_session
from p2pcompute.node import Node
from p2pcompute.store import STORE_FILE, JobRecord, JobRole, JobState, Store, open_store

if TYPE_CHECKING:
    import torch

    from p2pcompute.compute.export import ExportedJob

__all__ = ["Attempt", "Client", "Job", "ProgressEvent", "RunResult", "open_client", "run_job"]

log = logging.getLogger(__name__)

DEFAULT_CLIENT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
MARKET_WAIT_S = 15.0  # how long run() waits for a first eligible advert before NoWorkersError
DEFAULT_MAX_ATTEMPTS = 16  # workers asked for one job, those that declined (busy) or failed included
# Failures after an accept that prove the worker misbehaved (bytes that contradict its own signed result, a broken
# chain or terms); anything else after an accept (a closed stream, a cut transfer) may be a crash, not cheating.
_MISBEHAVIOUR = frozenset(
    {
        Reason.HASH_MISMATCH,
        Reason.SHAPE_MISMATCH,
        Reason.UNEXPECTED_BLOB,
        Reason.BAD_SIGNATURE,
        Reason.SIGNER_MISMATCH,
        Reason.WRONG_DOMAIN,
        Reason.CHAIN_MISMATCH,
        Reason.TERMS_MISMATCH,
        Reason.OUTPUT_TOO_LARGE,
        Reason.BAD_DTYPE,
        Reason.INCONSISTENT,
    }
)
MAX_RESELECTIONS = 8  # how often a job given to one trusted worker that declines (busy) is placed anew
ESCALATION_WAIT_S = 5.0  # how long a job needing more workers waits for adverts of workers not yet asked
DEFAULT_MAX_WORKERS = 5  # results gathered for one job when results disagree (escalation bound)
DEFAULT_DEADLINE_S = 120.0


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Where a job is: ``phase`` (matching, negotiating, uploading, running, downloading, received, done)."""

    phase: str
    done: int
    total: int
    worker: PeerId | None = None


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class Job:
    """A job ready to send: the exported program and tensors, and what it needs from a worker."""

    spec_bytes: bytes
    digest: bytes
    blobs: dict[bytes, bytes]
    requirements: Requirements
    outputs: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each output, from the dry run

    @classmethod
    def from_module(
        cls,
        module: Any,
        example_inputs: Sequence[torch.Tensor],
        *,
        compare: Comparison | None = None,
        limits: JobLimits | None = None,
        device_kind: DeviceKind | None = None,
    ) -> Job:
        """Export ``module`` (an ``nn.Module`` or a function of tensors) with ``example_inputs`` as a job."""
        from p2pcompute.compute.export import export_job

        kwargs: dict[str, Any] = {"compare": compare}
        if limits is not None:
            kwargs["limits"] = limits
        return cls.from_exported(export_job(module, tuple(example_inputs), **kwargs), device_kind=device_kind)

    @classmethod
    def from_exported(cls, exported: ExportedJob, *, device_kind: DeviceKind | None = None) -> Job:
        return cls.from_parts(exported.spec_bytes, exported.blobs, device_kind=device_kind)

    @classmethod
    def from_bundle(cls, data: bytes, *, device_kind: DeviceKind | None = None) -> Job:
        """A job from a bundle file written by ``p2pcompute job export`` (every tensor is hash-checked)."""
        spec_bytes, blobs = decode_bundle(data)
        return cls.from_parts(spec_bytes, blobs, device_kind=device_kind)

    @classmethod
    def from_parts(cls, spec_bytes: bytes, blobs: dict[bytes, bytes], *, device_kind: DeviceKind | None) -> Job:
        from p2pcompute.compute.interpreter import dry_run

        spec = decode_job(spec_bytes)
        run = dry_run(spec)
        tensors = {m.digest: m for m in (*spec.inputs, *spec.constants)}
        requirements = Requirements(
            device_kind=device_kind,
            memory_bytes=run.peak_bytes,
            input_bytes=sum(m.nbytes for m in tensors.values()),
            output_bytes=run.output_bytes,
            op_count=len(spec.nodes),
            flops=run.flops,
        )
        return cls(
            spec_bytes=spec_bytes,
            digest=job_digest(spec_bytes),
            blobs=blobs,
            requirements=requirements,
            outputs=run.outputs,
        )

    @functools.cached_property
    def spec(self) -> JobSpec:
        """The parsed job spec (parsed once)."""
        return decode_job(self.spec_bytes)

    @functools.cached_property
    def tensors(self) -> tuple[TensorMeta, ...]:
        """Every tensor the job names (inputs and constants), each once."""
        return tuple({m.digest: m for m in (*self.spec.inputs, *self.spec.constants)}.values())

    def prepared(self) -> PreparedJob:
        return PreparedJob(
            spec_bytes=self.spec_bytes,
            digest=self.digest,
            tensors=self.tensors,
            blobs=self.blobs,
            requirements=self.requirements,
        )

    def run_locally(self) -> list[torch.Tensor]:
        """Run the job in this process with the same interpreter a worker uses (for checks and spot checks)."""
        from p2pcompute.compute.interpreter import execute

        return execute(self.spec, self.blobs)


@dataclass(frozen=True)
class Attempt:
    """One worker tried for a job and how it ended (``ok``, or a reason code)."""

    worker: PeerId
    outcome: str
    detail: str = ""
    elapsed_ms: int = 0


@dataclass(frozen=True)
class RunResult:
    """A finished job: the outputs as tensors and where, for how much and how fast they were computed."""

    outputs: list[torch.Tensor]
    output_digest: bytes
    worker: PeerId
    price: int  # micro-credits paid
    timings: Timings
    hardware_class: str
    elapsed_ms: int
    attempts: tuple[Attempt, ...]
    job_digest: bytes
    workers: tuple[WorkerResult, ...] = field(default=(), repr=False)
    verdict: Verdict | None = field(default=None, repr=False)
    spot_check: bool = False

    @property
    def agreeing(self) -> tuple[PeerId, ...]:
        """Workers whose results were accepted (and paid)."""
        return self.verdict.agreeing_workers if self.verdict is not None else (self.worker,)

    @property
    def disagreeing(self) -> tuple[PeerId, ...]:
        """Workers whose results disagreed with the accepted one (rejected, reported with evidence)."""
        return self.verdict.disagreeing_workers if self.verdict is not None else ()

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``p2pcompute submit`` prints and the testnet report records)."""
        return {
            "job_digest": self.job_digest.hex(),
            "output_digest": self.output_digest.hex(),
            "worker": str(self.worker),
            "price_micro_credits": self.price,
            "price_credits": str(Decimal(self.price) / 1_000_000),
            "hardware_class": self.hardware_class,
            "elapsed_ms": self.elapsed_ms,
            "timings_ms": {
                "queue": self.timings.queue_ms,
                "load": self.timings.load_ms,
                "exec": self.timings.exec_ms,
                "total": self.timings.total_ms,
            },
            "outputs": [{"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for t in self.outputs],
            "attempts": [{"worker": str(a.worker), "outcome": a.outcome, "detail": a.detail} for a in self.attempts],
            "agreeing": [str(p) for p in self.agreeing],
            "disagreeing": [str(p) for p in self.disagreeing],
            "results": len(self.workers),
            "spot_check": self.spot_check,
        }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _to_micro(price: int | float | str | Decimal) -> int:
    """``max_price`` in credits (``"0.01"``, ``0.01``, ``Decimal``) to micro-credits; an ``int`` is micro-credits."""
    if isinstance(price, int) and not isinstance(price, bool):
        return price
    return parse_price(str(price))


class Client:
    """A light peer that runs jobs. Build it with :func:`open_client`."""

    def __init__(self, node: Node, keypair: KeyPair, store: Store, *, clock: Callable[[], int] = _now_ms) -> None:
        self.node = node
        self.keypair = keypair
        self.store = store
        self.clock = clock
        self.seen = SeenCache(max_ttl_ms=MESSAGE_TTL_MS + MAX_CLOCK_SKEW_MS)  # no longer-lived message is taken
        self.rng = random.Random(secrets.randbits(64))
        # Spending: the hash-chained ledger of the receipts this client signed.
        self.ledger = store.load_ledger(keypair, LedgerRole.CLIENT)
        self.evidence_published: list[bytes] = []

    @property
    def peer_id(self) -> PeerId:
        return self.keypair.peer_id

    def candidates(self, job: Job, max_price: int, exclude: Sequence[PeerId] = ()) -> list[Candidate]:
        """Eligible workers for ``job`` in the current market view."""
        now = self.clock()
        adverts = [entry.advert for entry in self.node.market.adverts(now)]
        return eligible(adverts, job.requirements, max_price, now, exclude=(self.peer_id, *exclude))

    async def wait_for_workers(
        self, job: Job, max_price: int, *, count: int = 1, timeout_s: float = MARKET_WAIT_S
    ) -> int:
        """Wait (bounded) until at least ``count`` eligible workers are known; returns how many there are."""
        with trio.move_on_after(timeout_s):
            await self.node.wait_for(lambda: len(self.candidates(job, max_price)) >= count)
        return len(self.candidates(job, max_price))

    async def run(
        self,
        job: Job,
        *,
        max_price: int | float | str | Decimal,
        deadline: float = DEFAULT_DEADLINE_S,
        redundancy: int | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        progress: ProgressFn | None = None,
    ) -> RunResult:
        """Run ``job`` on workers for at most ``max_price`` credits each, within ``deadline`` seconds from now.

        ``redundancy`` is the quorum: that many independent workers (distinct peers and address groups) must
        agree. ``None`` (the default) is adaptive (specs/verification.md): 2 for a worker not yet trusted here,
        then falling with its run of verified results, with hidden spot checks the client computes itself.
        Disagreement escalates to more workers, up to ``max_workers`` results and ``max_attempts`` workers asked.
        Only workers whose results are accepted get a receipt; the others get a signed rejection, and evidence
        against them is gossiped. Raises :class:`VerificationError` (no quorum) or :class:`NoWorkersError`.
        """
        run = _Run(self, job, _to_micro(max_price), progress or (lambda event: None))
        with trio.fail_after(max(0.001, deadline)):
            return await run.execute(redundancy, max_workers, max_attempts, self.clock() + int(deadline * 1000))

    def _weight(self, candidate: Candidate) -> float:
        """Matching weight: cheaper and faster, and more for a better reputation (never zero)."""
        # A better score is likelier, but at most 6x: work must stay spread, or only a few workers ever earn
        # the trust that lets their jobs run unreplicated (measured: a stronger preference raised the overhead).
        score = self.node.reputation.get(candidate.peer).score
        return default_weight(candidate) * (1.0 + max(0.0, min(score, 50.0)) / 10.0)

    def _pick(
        self, job: Job, max_price: int, count: int, exclude: Sequence[PeerId], groups: Sequence[str]
    ) -> list[Candidate]:
        pool = [c for c in self.candidates(job, max_price, exclude) if self.node.reputation.eligible(c.peer)]
        return choose(pool, count, self.rng, weight=self._weight, taken_groups=groups)

    def record(self, peer: PeerId, outcome: Outcome) -> None:
        self.node.record_outcome(peer, outcome)

    def _remember(self, job_id: bytes, worker: PeerId, job: Job, outcome: WorkerResult, receipt: bytes) -> None:
        now = self.clock()
        self.store.put_job(
            JobRecord(
                id=job_id,
                role=JobRole.CLIENT,
                peer=worker.raw,
                job_digest=job.digest,
                state=JobState.PAID,
                price=outcome.price,
                created_ms=now - outcome.elapsed_ms,
                updated_ms=now,
                envelopes={
                    "offer": outcome.offer.envelope,
                    "result": outcome.result.envelope,
                    "receipt": receipt,
                },
            )
        )
        self.store.append_to_ledger(self.ledger, receipt)


class _Reselect(Exception):
    """Internal: the one trusted worker of an unreplicated job declined before accepting; choose again."""


@dataclass
class _Pending:
    """A worker's open session waiting for the verdict: pay it or reject it."""

    settled: trio.Event = field(default_factory=trio.Event)
    pay: bool = False
    reason: str = ""
    detail: str = ""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    has_result: bool = False


class _Run:
    """One job's redundant execution: launch workers, feed the verifier, settle every session."""

    def __init__(self, client: Client, job: Job, max_price: int, report: ProgressFn) -> None:
        self.client = client
        self.job = job
        self.max_price = max_price
        self.report = report
        self.started = client.clock()
        self.spec = job.spec
        self.attempts: list[Attempt] = []
        self.asked: list[PeerId] = []
        self.groups: list[str] = []
        self.pending: dict[PeerId, _Pending] = {}
        self.results: dict[PeerId, WorkerResult] = {}
        self.before_accept: set[PeerId] = set()
        self.unanswered: set[PeerId] = set()
        self.reselect_on_decline = False
        self.spot_check = False
        self.blobs: dict[Hashable, list[bytes]] = {}
        self.paid = 0
        self.send, self.inbox = trio.open_memory_channel[tuple[Candidate, WorkerResult | P2PComputeError, bool]](
            math.inf
        )

    async def execute(self, redundancy: int | None, max_workers: int, max_attempts: int, deadline_ms: int) -> RunResult:
        client, job = self.client, self.job
        self.deadline_ms = deadline_ms
        self.report(ProgressEvent("matching", 0, 1))
        if not client.candidates(job, self.max_price):
            await client.wait_for_workers(job, self.max_price)
        failure: P2PComputeError | None = None
        verdict: Verdict | None = None
        for _ in range(MAX_RESELECTIONS):
            try:
                verdict = await self._attempt(redundancy, max_workers, max_attempts)
                break
            except _Reselect:
                log.debug("job %s: the trusted worker declined; choosing again", job.digest.hex()[:16])
                continue  # a trusted worker declined before accepting: decide the replication anew
            except P2PComputeError as exc:
                failure = exc
                break
        else:
            failure = NoWorkersError(Reason.ALL_ATTEMPTS_FAILED, f"job {job.digest.hex()[:16]}: {self._tried()}")
        if failure is not None:
            raise failure
        assert verdict is not None
        self._record_outcomes(verdict.outcomes())
        await self._publish_evidence(verdict)
        self.report(ProgressEvent("done", 1, 1))
        return self._result(verdict)

    async def _attempt(self, redundancy: int | None, max_workers: int, max_attempts: int) -> Verdict:
        """One verifier's worth of work: choose the replication, launch workers, gather, settle every session.

        In adaptive mode a job given to one trusted worker (*q* = 1) must get its result from that worker: when
        it declines before accepting, :class:`_Reselect` starts over, so the replacement's trust decides anew.
        """
        client, job = self.client, self.job
        first = client._pick(job, self.max_price, 1, self.asked, self.groups)
        if not first:
            raise NoWorkersError(
                Reason.NO_WORKERS if not self.asked else Reason.ALL_ATTEMPTS_FAILED,
                f"no eligible worker for job {job.digest.hex()[:16]}" + (f" ({self._tried()})" if self.asked else ""),
            )
        reputation = client.node.reputation
        if redundancy is None:
            quorum = 2 if reputation.should_replicate(first[0].peer, client.rng.random()) else 1
        else:
            quorum = max(1, redundancy)
        self.reselect_on_decline = redundancy is None and quorum == 1
        log.debug("job %s: first worker %s, quorum %d", job.digest.hex()[:16], first[0].peer, quorum)
        known = None
        if quorum == 1 and redundancy is None and reputation.spot_check(client.rng.random()):
            known = await trio.to_thread.run_sync(self._known_answer)
        self.spot_check = known is not None
        compare = self.spec.compare
        # Declines before an accept (a busy worker) cost nothing but count as asked: leave room for them.
        policy = QuorumPolicy(
            quorum=quorum,
            max_workers=max(quorum, max_workers),
            max_attempts=max(quorum, max_workers, max_attempts),
        )
        self.verifier = Verifier(
            policy,
            job_digest=job.digest,
            mode=ComparisonMode(compare.mode.value),
            agree=make_agree(self.blobs, compare.rtol, compare.atol),
            known=known,
        )
        error: P2PComputeError | _Reselect | None = None
        verdict: Verdict | None = None
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._launch(first)
            if quorum > 1:
                self._launch(client._pick(job, self.max_price, quorum - 1, self.asked, self.groups))
            try:
                verdict = await self._gather()
            except (P2PComputeError, _Reselect) as exc:
                error = exc  # raised below, outside the nursery, as itself (not in an exception group)
            self._settle_all(verdict)  # receipts for the accepted, rejections for the rest, abort the unfinished
        if error is not None:
            raise error
        assert verdict is not None
        return verdict

    async def _gather(self) -> Verdict:
        """Feed answers to the verifier, asking more workers when it says so, until a verdict or a failure."""
        client, job = self.client, self.job
        status: Status = self.verifier.status()
        while not isinstance(status, (Accepted, Failed)):
            if isinstance(status, NeedMore) and status.count:
                launched = self._launch(client._pick(job, self.max_price, status.count, self.asked, self.groups))
                if not launched and not self._in_flight():
                    # Nobody left to ask in the market view now: wait a little for adverts of others.
                    with trio.move_on_after(ESCALATION_WAIT_S):
                        await client.node.wait_for(
                            lambda: bool(client._pick(job, self.max_price, 1, self.asked, self.groups))
                        )
                    launched = self._launch(client._pick(job, self.max_price, status.count, self.asked, self.groups))
                if not launched and not self._in_flight():
                    raise NoWorkersError(
                        Reason.ALL_ATTEMPTS_FAILED,
                        f"job {job.digest.hex()[:16]}: no further eligible worker ({self._tried()})",
                    )
            elif not self._in_flight():
                raise NoWorkersError(Reason.ALL_ATTEMPTS_FAILED, f"job {job.digest.hex()[:16]}: {self._tried()}")
            candidate, answer, after_accept = await self.inbox.receive()
            status = self._absorb(candidate, answer, after_accept)
            if self.reselect_on_decline and not isinstance(answer, WorkerResult) and not after_accept:
                raise _Reselect
        if isinstance(status, Failed):
            self._record_outcomes(status.outcomes())
            raise status.error()
        return status.verdict

    def _tried(self) -> str:
        return "; ".join(f"{a.worker}: {a.outcome} {a.detail}".strip() for a in self.attempts) or "none tried"

    def _in_flight(self) -> bool:
        """Some worker asked has not been heard of yet (its answer may already wait in the inbox)."""
        return bool(self.unanswered)

    def _launch(self, candidates: Sequence[Candidate]) -> int:
        for candidate in candidates:
            self.verifier.assign(candidate.peer)
            self.asked.append(candidate.peer)
            self.groups.append(candidate.group)
            self.pending[candidate.peer] = _Pending()
            self.unanswered.add(candidate.peer)
            self.nursery.start_soon(self._work, candidate)
        return len(candidates)

    async def _work(self, candidate: Candidate) -> None:
        client, pending = self.client, self.pending[candidate.peer]

        def forward(phase: str, done: int, total: int) -> None:
            self.report(ProgressEvent(phase, done, total, candidate.peer))

        answered = False
        with pending.scope:
            try:
                async with open_session(
                    client.node.host,
                    client.keypair,
                    candidate.peer,
                    candidate.advert.addrs,
                    self.job.prepared(),
                    max_price=self.max_price,
                    deadline=self.deadline_ms,
                    seen=client.seen,
                    clock=client.clock,
                    progress=forward,
                ) as session:
                    try:
                        outcome = await session.run()
                    except P2PComputeError as exc:
                        answered = True
                        self.send.send_nowait((candidate, exc, session.machine.accept is not None))
                        return
                    answered = True
                    pending.has_result = True
                    self.send.send_nowait((candidate, outcome, True))
                    await pending.settled.wait()
                    if pending.pay:
                        receipt = await session.pay()
                        self.paid += outcome.price
                        client._remember(session.request.id, candidate.peer, self.job, outcome, receipt.envelope)
                    else:
                        await session.reject(pending.reason, pending.detail)
            except P2PComputeError as exc:
                if not answered:
                    self.send.send_nowait((candidate, exc, False))
                else:
                    log.info("settling job %s with %s failed: %s", self.job.digest.hex()[:16], candidate.peer, exc)

    def _absorb(self, candidate: Candidate, answer: WorkerResult | P2PComputeError, after_accept: bool) -> Status:
        peer, now = candidate.peer, self.client.clock()
        self.unanswered.discard(peer)
        if isinstance(answer, WorkerResult):
            result = answer.result.message
            self.results[peer] = answer
            self.blobs[peer] = [answer.outputs[meta.digest] for meta in result.outputs]
            self.attempts.append(Attempt(peer, "result", "", now - self.started))
            try:
                return self.verifier.add_claim(ResultClaim(answer.result, key=peer))
            except P2PComputeError as exc:
                self.attempts[-1] = Attempt(peer, exc.reason.value, exc.detail, now - self.started)
                return self.verifier.add_failure(peer, Outcome.INVALID)
        log.info("job %s on %s: %s", self.job.digest.hex()[:16], peer, answer)
        self.attempts.append(Attempt(peer, answer.reason.value, answer.detail, now - self.started))
        self.pending[peer].settled.set()
        if answer.reason is Reason.TIMEOUT:
            outcome = Outcome.TIMEOUT
        elif after_accept and answer.reason in _MISBEHAVIOUR:
            outcome = Outcome.INVALID  # it signed or sent something false: not a crash, not the network
        else:
            outcome = Outcome.DECLINED_AFTER_ACCEPT  # it walked away, died, or the connection broke
        if not after_accept:
            self.before_accept.add(peer)  # declining or being unreachable costs no reputation
        return self.verifier.add_failure(peer, outcome)

    def _settle_all(self, verdict: Verdict | None) -> None:
        agreeing = set(verdict.agreeing_workers) if verdict is not None else set()
        for peer, pending in self.pending.items():
            if pending.settled.is_set():
                continue
            if not pending.has_result:
                pending.scope.cancel()  # not needed any more: abort, nothing is owed
                continue
            pending.pay = peer in agreeing
            if not pending.pay:
                pending.reason = "verification_failed" if verdict is not None else Reason.NO_QUORUM.value
                pending.detail = "result outside the accepted cluster" if verdict is not None else "no quorum"
            pending.settled.set()

    def _record_outcomes(self, outcomes: dict[PeerId, Outcome]) -> None:
        for peer, outcome in outcomes.items():
            if peer not in self.before_accept:
                self.client.record(peer, outcome)

    async def _publish_evidence(self, verdict: Verdict) -> None:
        client, now = self.client, self.client.clock()
        for accusation in verdict.accusations:
            data = make_evidence(
                client.keypair,
                accusation,
                id=secrets.token_bytes(16),
                nonce=secrets.randbits(64),
                expires_at=now + DEFAULT_EVIDENCE_TTL_MS,
            )
            try:
                await client.node.publish_evidence(data)
            except P2PComputeError as exc:
                log.warning("could not publish evidence against %s: %s", accusation.accused.worker, exc)
            client.evidence_published.append(data)

    def _known_answer(self) -> KnownAnswer:
        from p2pcompute.compute.interpreter import tensor_to_blob

        blobs = [tensor_to_blob(t) for t in self.job.run_locally()]
        metas = tuple(meta for meta, _ in blobs)
        self.blobs["known"] = [data for _, data in blobs]
        return KnownAnswer(output_digest=outputs_digest(metas), outputs=metas, hardware_class="client", key="known")

    def _result(self, verdict: Verdict) -> RunResult:
        from p2pcompute.compute.interpreter import blob_to_tensor

        accepted = verdict.accepted
        if accepted is not None:
            chosen = self.results[accepted.worker]
            metas = accepted.outputs
            tensors = [blob_to_tensor(meta, chosen.outputs[meta.digest]) for meta in metas]
            worker, timings, hardware = chosen.worker, chosen.result.message.timings, chosen.hardware_class
        else:  # a spot check nobody got right: the client's own answer
            tensors = self.job.run_locally()
            worker, timings, hardware = (
                self.client.peer_id,
                Timings(queue_ms=0, load_ms=0, exec_ms=0, total_ms=0),
                "client",
            )
        return RunResult(
            outputs=tensors,
            output_digest=verdict.output_digest,
            worker=worker,
            price=self.paid,
            timings=timings,
            hardware_class=hardware,
            elapsed_ms=self.client.clock() - self.started,
            attempts=tuple(self.attempts),
            job_digest=self.job.digest,
            workers=tuple(self.results.values()),
            verdict=verdict,
            spot_check=self.spot_check,
        )


@asynccontextmanager
async def open_client(
    bootstrap: Sequence[str],
    *,
    key: KeyPair | Path | None = None,
    data_dir: Path | None = None,
    listen: Sequence[str] = DEFAULT_CLIENT_LISTEN,
    wait_for_market_s: float = 0.0,
) -> AsyncIterator[Client]:
    """Join the network through ``bootstrap`` peers as a client and yield a :class:`Client`.

    ``key`` is a key pair or a key file (created if missing); by default ``<data_dir>/identity.key``.
    ``data_dir`` (default: the platform data directory + ``/client``) holds the client's SQLite store.

    Logging: nothing is configured on the root logger. py-libp2p's own warnings ("Failed to open TCP stream ...")
    are re-emitted at DEBUG under ``p2pcompute.libp2p`` (:mod:`p2pcompute.net.logs`): enable DEBUG there to see them.
    """
    libp2p_logs_at_debug()
    if not bootstrap:
        raise NoWorkersError(Reason.NO_WORKERS, "open_client needs at least one bootstrap address")
    directory = data_dir if data_dir is not None else default_data_dir() / "client"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if isinstance(key, KeyPair):
        keypair = key
    else:
        keypair, _ = load_or_create_key(key if key is not None else directory / "identity.key")
    config = NodeConfig(data_dir=directory, listen=tuple(listen), bootstrap=tuple(bootstrap), status_port=0).validate()
    store = open_store(directory / STORE_FILE)
    try:
        async with open_host(keypair.seed, config.listen, config=HostConfig()) as host:
            node = Node(config, keypair, None, host, store=store)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: node.run(advertise=False, serve_status=False, task_status=task_status)
                )
                client = Client(node, keypair, store)
                if wait_for_market_s > 0:
                    with trio.move_on_after(wait_for_market_s):
                        await node.wait_for(lambda: len(node.market) > 0)
                yield client
                nursery.cancel_scope.cancel()
    finally:
        store.close()


def run_job(
    job: Job,
    *,
    bootstrap: Sequence[str],
    max_price: int | float | str | Decimal,
    deadline: float = DEFAULT_DEADLINE_S,
    key: KeyPair | Path | None = None,
    data_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> RunResult:
    """Run ``job`` without async code (scripts, notebooks): a client is opened, used once and closed.

    The event loop runs in a separate thread, so this also works where another loop is already running
    (Jupyter).
    """

    async def main() -> RunResult:
        async with open_client(bootstrap, key=key, data_dir=data_dir) as client:
            return await client.run(job, max_price=max_price, deadline=deadline, progress=progress)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(trio.run, main).result()
