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
import contextlib
import functools
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pcompute.compute.compare import make_agree
from p2pcompute.config import NodeConfig, parse_price
from p2pcompute.core.cluster import Capacity
from p2pcompute.core.envelope import Opened
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.jobspec import (
    Comparison,
    JobLimits,
    JobSpec,
    decode_bundle,
    decode_job,
    encode_job,
    job_digest,
)
from p2pcompute.core.ledger import LedgerRole
from p2pcompute.core.matching import Candidate, default_weight, eligible
from p2pcompute.core.messages import ComparisonMode, DeclineReason, DeviceKind, JobResult, Requirements, Timings
from p2pcompute.core.negotiation import MAX_CLOCK_SKEW_MS, MAX_TRACE_REQUEST_NODES, MESSAGE_TTL_MS
from p2pcompute.core.replay import SeenCache
from p2pcompute.core.reputation import Outcome
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
from p2pcompute.core.throughput import ThroughputLedger
from p2pcompute.core.trace import TraceLeaf, check_trace, first_divergence
from p2pcompute.core.verification import (
    DEFAULT_EVIDENCE_TTL_MS,
    KnownAnswer,
    ResultClaim,
    ValidCheckEvidence,
    Verdict,
    make_evidence,
)
from p2pcompute.errors import (
    JobError,
    NegotiationFailed,
    NoWorkersError,
    P2PComputeError,
    Reason,
    TraceError,
    TransferError,
)
from p2pcompute.keys import default_data_dir, load_or_create_key
from p2pcompute.net.host import HostConfig, open_host
from p2pcompute.net.logs import libp2p_logs_at_debug
from p2pcompute.net.negotiate import ClientSession, PreparedJob, WorkerResult, open_session
from p2pcompute.node import Node
from p2pcompute.store import STORE_FILE, JobRecord, JobRole, JobState, Store, open_store
from p2pcompute.tasks import (
    DEFAULT_RETRIES,
    DEFAULT_TASK_DEADLINE_S,
    Item,
    MapProgressFn,
    MapRun,
    map_batch,
)

if TYPE_CHECKING:
    import torch

    from p2pcompute.compute.check import NodeCheck
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
TRACE_FETCH_TIMEOUT_S = 60.0  # a bisection's wait for a worker's committed leaves
ROOM_RECHECK_S = 1.0  # a job waiting for room re-checks at least this often (holds after busy answers end)
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
    trace_bytes: int = 0  # bytes of every node's outputs: what checking a result in full may fetch
    check_flops: int = 0  # flops of checking a result in full (Freivalds for products, recomputation for the rest)
    source: _Source | None = field(default=None, compare=False, repr=False)  # what from_module exported

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
        job = cls.from_exported(export_job(module, tuple(example_inputs), **kwargs), device_kind=device_kind)
        source = _Source(module, tuple(example_inputs), compare, limits, device_kind)
        return replace(job, source=source)

    @classmethod
    def from_train_step(
        cls,
        model: Any,
        loss_fn: Callable[..., torch.Tensor],
        example_inputs: Sequence[torch.Tensor],
        *,
        targets: int = 1,
        compare: Comparison | None = None,
        limits: JobLimits | None = None,
        device_kind: DeviceKind | None = None,
    ) -> Job:
        """Export one training step of ``model`` (an ``nn.Module``): forward and backward as one graph whose outputs
        are the loss and the gradients (``compute.export.export_train_step``).

        The loss is ``loss_fn(model(*example_inputs[:-targets]), *example_inputs[-targets:])``, a 0-dim tensor. The
        job's inputs are the model's trainable parameters (``named_parameters()`` order, ``requires_grad`` only),
        then ``example_inputs``; its outputs the loss, then each parameter's gradient in the same order. Run it
        with new parameters and data by :meth:`with_inputs`; :mod:`p2pcompute.train` does so step by step."""
        from p2pcompute.compute.export import export_train_step

        kwargs: dict[str, Any] = {"compare": compare, "targets": targets}
        if limits is not None:
            kwargs["limits"] = limits
        exported = export_train_step(model, loss_fn, tuple(example_inputs), **kwargs)
        return cls.from_exported(exported, device_kind=device_kind)

    def with_inputs(self, inputs: Sequence[torch.Tensor]) -> Job:
        """The same graph and constants with other input tensors, each of the dtype and shape of the one it
        replaces (what ``client.map`` sends for each item). Raises :class:`JobError` (``shape_mismatch``)."""
        import torch

        from p2pcompute.compute.interpreter import tensor_to_blob

        spec = self.spec
        if len(inputs) != len(spec.inputs):
            raise JobError(Reason.SHAPE_MISMATCH, f"the job takes {len(spec.inputs)} inputs, got {len(inputs)}")
        blobs = {meta.digest: self.blobs[meta.digest] for meta in spec.constants}
        metas = []
        for i, (tensor, old) in enumerate(zip(inputs, spec.inputs, strict=True)):
            if not isinstance(tensor, torch.Tensor):
                raise JobError(Reason.BAD_ARGUMENT, f"input {i} is a {type(tensor).__name__}, not a tensor")
            meta, blob = tensor_to_blob(tensor)
            if (meta.dtype, meta.shape) != (old.dtype, old.shape):
                raise JobError(
                    Reason.SHAPE_MISMATCH,
                    f"input {i}: {meta.dtype}{list(meta.shape)}, the job takes {old.dtype}{list(old.shape)}",
                )
            metas.append(meta)
            blobs[meta.digest] = blob
        spec_bytes = encode_job(replace(spec, inputs=tuple(metas)))
        return replace(self, spec_bytes=spec_bytes, digest=job_digest(spec_bytes), blobs=blobs)

    def for_batch(self, rows: int) -> Job:
        """This job exported again for inputs of ``rows`` rows (every input's first dimension); only for a job
        made by :meth:`from_module`. What ``client.map_batch`` runs on each shard (then :meth:`with_inputs`)."""
        if self.source is None:
            raise JobError(Reason.NOT_EXPORTABLE, "only a job made by Job.from_module can be re-exported per shard")
        if rows < 1:
            raise JobError(Reason.SHAPE_MISMATCH, f"a shard needs at least one row, got {rows}")
        source = self.source
        if any(x.dim() == 0 or x.shape[0] < 1 for x in source.example_inputs):
            raise JobError(Reason.SHAPE_MISMATCH, "every example input needs a first (batch) dimension")
        if all(x.shape[0] == rows for x in source.example_inputs):
            return self
        import torch

        first = torch.zeros(rows, dtype=torch.long)
        examples = tuple(x.index_select(0, first) for x in source.example_inputs)  # row 0, repeated: valid values
        return Job.from_module(
            source.module, examples, compare=source.compare, limits=source.limits, device_kind=source.device_kind
        )

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
        from p2pcompute.compute.check import check_costs
        from p2pcompute.compute.interpreter import dry_run

        spec = decode_job(spec_bytes)
        run = dry_run(spec)
        costs = check_costs(spec, run)
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
            trace_bytes=sum(_nbytes(dtype, shape) for outs in run.node_outputs for dtype, shape in outs),
            check_flops=sum(cost.check_flops for cost in costs),
        )

    @property
    def facts(self) -> TaskFacts:
        """What the verification scheduler knows of this job (from the client's own dry run)."""
        return TaskFacts(
            digest=self.digest,
            flops=self.requirements.flops,
            nodes=len(self.spec.nodes),
            trace_bytes=self.trace_bytes,
            check_flops=self.check_flops,
            mode=ComparisonMode(self.spec.compare.mode.value),
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


@dataclass(frozen=True, eq=False)
class _Source:
    """What :meth:`Job.from_module` exported, kept to export it again for another batch size."""

    module: Any
    example_inputs: tuple[torch.Tensor, ...]
    compare: Comparison | None
    limits: JobLimits | None
    device_kind: DeviceKind | None


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
    plan: str = ""  # how it was verified: "full" (every node checked against the committed trace) or "sample"
    check_flops: int = 0  # what the client's own checks cost
    check_bytes: int = 0  # intermediates fetched for them
    job_flops: int = 0  # one honest run of the job
    index: int = 0  # the task's position in the inputs of a ``client.map`` (0 for ``client.run``)

    @property
    def compute(self) -> float:
        """Compute spent on this job in units of one honest run: results gathered plus the client's checks."""
        runs = len(self.workers) + (1 if self.spot_check else 0)
        return runs + (self.check_flops / self.job_flops if self.job_flops else 0.0)

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
            "index": self.index,
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
            "plan": self.plan,
            "check_flops": self.check_flops,
            "check_bytes": self.check_bytes,
        }


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    from p2pcompute.core.tensors import DTYPES

    return math.prod(shape) * DTYPES.get(dtype, 8)


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
        self.throughput = ThroughputLedger()  # what workers deliver against their adverts' TFLOPS
        self.scheduler_policy = SchedulerPolicy()  # how jobs are verified (core.scheduler; verification.md §11)
        self.capacity = Capacity()  # this client's tasks in flight per worker (core.cluster; verification.md §13)
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

    def with_room(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates that should take another task of this client now: room left (never more of its tasks
        on a worker than its advert offers) and, while other tasks wait, no faster worker about to be free
        (``core.cluster.Capacity.placeable``: earliest finish, at measured speed)."""
        measured = [self._measured(c) for c in candidates]
        return self.capacity.placeable(measured, self.clock(), backlog=self.capacity.waiting + 1)

    @contextlib.contextmanager
    def _waiting_for_room(self) -> Iterator[None]:
        self.capacity.waiting += 1
        try:
            yield
        finally:
            self.capacity.waiting -= 1

    def _measured(self, candidate: Candidate) -> Candidate:
        """The candidate with its expected run time at the speed it delivered, when it claims more
        (``core.throughput``)."""
        claimed = candidate.device.tflops
        delivered = self.throughput.effective_tflops(candidate.peer, claimed)
        if 0 < delivered < claimed:
            return replace(candidate, expected_ms=int(candidate.expected_ms * claimed / delivered))
        return candidate

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until ``predicate()`` holds, re-checking when an advert arrives, a task of
        this client ends, or a worker held back after a busy answer may be asked again. Returns the predicate."""
        with trio.move_on_after(max(0.0, timeout_s)):
            while not predicate():
                now = self.clock()
                change = self.capacity.next_change_ms(now)
                tick = ROOM_RECHECK_S if change is None else min(ROOM_RECHECK_S, max(0.01, (change - now) / 1000))
                with trio.move_on_after(tick):
                    await self.node.wait_for(predicate)
        return predicate()

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
        only: Sequence[PeerId] | None = None,
        prefer: PeerId | None = None,
    ) -> RunResult:
        """Run ``job`` on workers for at most ``max_price`` credits each, within ``deadline`` seconds from now.

        ``redundancy`` is the quorum: that many independent workers (distinct peers and address groups) must
        agree. ``None`` (the default) lets the scheduler decide (specs/verification.md §11): a job whose
        intermediates fit the check budget runs on one worker and its committed trace is checked node by node
        before it is paid; a bigger one is replicated by the worker's proven work and sampled, disagreements
        bisected. ``only`` restricts the workers to these peers; ``prefer`` asks that worker first when it has room
        (``map_batch`` sizes each shard for one). A worker gets no more of this client's jobs at once than its advert
        offers slots (``core.cluster``): the job waits for room, within ``deadline``, rather than fail on a busy
        worker; a worker that answers busy all the same is held back and another one asked. Disagreement
        escalates to more workers, up to
        ``max_workers`` results and ``max_attempts`` workers asked. Only workers whose results are accepted get a
        receipt; the others get a signed rejection, and evidence
        against them is gossiped. Raises :class:`VerificationError` (no quorum), :class:`NoWorkersError`, or
        :class:`NegotiationFailed` (``timeout``: no verified result within ``deadline``).
        """
        run = _Run(self, job, _to_micro(max_price), progress or (lambda event: None), only, prefer)
        with trio.move_on_after(max(0.001, deadline)) as scope:
            return await run.execute(redundancy, max_workers, max_attempts, self.clock() + int(deadline * 1000))
        assert scope.cancelled_caught
        raise NegotiationFailed(Reason.TIMEOUT, f"job {job.digest.hex()[:16]}: no verified result in {deadline} s")

    def map(
        self,
        job: Job,
        inputs: Iterable[Item] | AsyncIterable[Item],
        *,
        max_price: int | float | str | Decimal,
        deadline: float | None = None,
        task_deadline: float = DEFAULT_TASK_DEADLINE_S,
        redundancy: int | None = None,
        ordered: bool = True,
        progress: MapProgressFn | None = None,
        window: int | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> MapRun:
        """Run ``job`` once per item of ``inputs`` (a tensor or a tuple of tensors each, read lazily; an iterable
        or an async iterable) on as many workers as have room; use as
        ``async with client.map(...) as results: async for result in results: ...``.

        Results come in input order (``ordered=False``: as they finish), each a :class:`RunResult` verified as by
        :meth:`run` (``result.index``: its position). ``deadline`` bounds the whole map (None: no bound),
        ``task_deadline`` each placement of a task; a task whose run fails is placed again up to ``retries``
        times, then :class:`TaskFailed` is raised with its index (and the accepted results not yet yielded).
        At most ``window`` tasks are held at once (default: twice the room the market offers this client).
        Leaving the block early cancels the rest; only accepted results are paid. See :mod:`p2pcompute.tasks`."""
        return MapRun(
            self,
            job,
            inputs,
            max_price=max_price,
            deadline=deadline,
            task_deadline=task_deadline,
            redundancy=redundancy,
            ordered=ordered,
            progress=progress,
            window=window,
            retries=retries,
        )

    # ``await client.map_batch(job, batch, max_price=...)``: one big batch in shards sized to each worker's speed,
    # run as verified jobs, outputs concatenated in order (:func:`p2pcompute.tasks.map_batch`)
    map_batch = map_batch

    def _weight(self, candidate: Candidate) -> float:
        """Matching weight: cheaper and faster, and more for a better reputation (never zero).

        Faster as measured: a worker that claims more TFLOPS than it delivered is weighed at what it delivered
        (``core.throughput``), so over-claiming wins it no work."""
        candidate = self._measured(candidate)
        # A better score is likelier, but at most 2x: work must stay spread, or newcomers (honest ones, and those a
        # check would catch) never get work, and the few favourites are busy (measured: 6x concentrated the work of
        # a 5-worker testnet on 3 workers within 20 jobs, and earlier raised the replication overhead).
        score = self.node.reputation.get(candidate.peer).score
        return default_weight(candidate) * (1.0 + max(0.0, min(score, 20.0)) / 20.0)

    async def benchmark(
        self, worker: PeerId, *, max_price: int | float | str | Decimal, deadline: float = DEFAULT_DEADLINE_S
    ) -> float:
        """Measure what ``worker`` delivers: a short matrix-product job sized to take ``min_expected_ms`` at its
        claimed TFLOPS, run (and checked, and paid) there like any job. Returns the TFLOPS it delivered (a lower
        bound); the measurement caps its advert's claim from now on (``core.throughput``)."""
        claimed = next((c.device.tflops for c in self.candidates_all() if c.peer == worker), 0.0)
        job = benchmark_job(max(claimed, 0.01), self.throughput.policy.min_expected_ms)
        result = await self.run(job, max_price=max_price, deadline=deadline, redundancy=1, only=(worker,))
        waited = max(1, result.elapsed_ms)
        return job.requirements.flops / (waited * 1e9)

    def candidates_all(self) -> list[Candidate]:
        """Every worker in the market view with a live advert, whatever the job (for measurements)."""
        now = self.clock()
        adverts = [entry.advert for entry in self.node.market.adverts(now)]
        probe = Requirements(device_kind=None, memory_bytes=0, input_bytes=0, output_bytes=0, op_count=1, flops=0)
        return eligible(adverts, probe, 1 << 62, now, exclude=(self.peer_id,))

    def record(self, peer: PeerId, outcome: Outcome, *, flops: int = 0, group: str = "") -> None:
        self.node.record_outcome(peer, outcome, flops=flops, group=group)

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


@dataclass
class _Session:
    """One worker's session, driven by the runner: a result, then checks, then a settlement."""

    candidate: Candidate
    commands: trio.MemorySendChannel[tuple[str, Any]]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    accepted: bool = False  # it accepted the job (its failures may cost it reputation)
    answered: bool = False


class _Run:
    """One job: the core scheduler (``core.scheduler``) decides; this runner opens sessions, fetches and checks
    committed traces, settles, and records what the scheduler says."""

    def __init__(
        self,
        client: Client,
        job: Job,
        max_price: int,
        report: ProgressFn,
        only: Sequence[PeerId] | None = None,
        prefer: PeerId | None = None,
    ) -> None:
        self.only = frozenset(only) if only is not None else None
        self.prefer = prefer
        self.client = client
        self.job = job
        self.max_price = max_price
        self.report = report
        self.started = client.clock()
        self.spec = job.spec
        self.attempts: list[Attempt] = []
        self.sessions: dict[PeerId, _Session] = {}
        self.results: dict[PeerId, WorkerResult] = {}
        self.blobs: dict[Hashable, list[bytes]] = {}
        self.accusations: list[Accuse] = []
        self.paid = 0
        self.done: Done | None = None
        self.error: P2PComputeError | None = None
        self.send, self.inbox = trio.open_memory_channel[tuple[str, Any]](math.inf)

    async def execute(self, redundancy: int | None, max_workers: int, max_attempts: int, deadline_ms: int) -> RunResult:
        client, job = self.client, self.job
        self.deadline_ms = deadline_ms
        self.report(ProgressEvent("matching", 0, 1))
        if not self._eligible():
            await client.wait_until(lambda: bool(self._eligible()), MARKET_WAIT_S)
        if self._eligible() and not self._candidates():  # workers, all busy with this client's other jobs
            self.report(ProgressEvent("waiting", 0, 1))
            with client._waiting_for_room():
                await client.wait_until(lambda: bool(self._candidates()), (deadline_ms - client.clock()) / 1000)
        compare = self.spec.compare
        self.scheduler = JobScheduler(
            facts=job.facts,
            policy=replace(
                client.scheduler_policy,
                max_workers=max(1, max_workers),
                max_attempts=max(max_workers, max_attempts),
            ),
            trust=ReputationTrust(client.node.reputation, client._weight),
            rng=client.rng,
            agree=make_agree(self.blobs, compare.rtol, compare.atol),
            known=self._known_answer,
            redundancy=redundancy,
        )
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._do(self.scheduler.start(self._candidates()))
            while self.done is None and self.error is None:
                kind, payload = await self.inbox.receive()
                self._do(self._feed(kind, payload))
            for session in self.sessions.values():  # nothing left to wait for
                if not session.answered:
                    session.scope.cancel()
        await self._publish_evidence()  # a cheater caught is reported whether or not the job got an answer
        if self.error is not None:
            raise self.error
        assert self.done is not None
        self.report(ProgressEvent("done", 1, 1))
        return self._result(self.done)

    # -- the scheduler's actions -------------------------------------------------------------------------------

    def _do(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Launch):
                if self.client.capacity.free(action.candidate, self.client.clock()) < 1:
                    # chosen from candidates that had room when the scheduler got them, full now (this client's
                    # other jobs): handed back like a busy answer, without asking the worker
                    self._do(self.scheduler.on_busy(action.candidate.peer))
                    continue
                self._launch(action.candidate)
            elif isinstance(action, Check):
                self._command(action.peer, ("check", action.nodes))
            elif isinstance(action, Bisect):
                self.nursery.start_soon(self._bisect, action.first, action.second)
            elif isinstance(action, Settle):
                self._settle(action)
            elif isinstance(action, Record):
                session = self.sessions.get(action.peer)
                group = session.candidate.group if session is not None else ""
                if session is None or session.accepted or action.outcome is not Outcome.DECLINED_AFTER_ACCEPT:
                    self.client.record(action.peer, action.outcome, flops=action.flops, group=group)
            elif isinstance(action, Accuse):
                self.accusations.append(action)
            elif isinstance(action, NeedCandidates):
                self.nursery.start_soon(self._wait_for_candidates)
            elif isinstance(action, Done):
                self.done = action
            elif isinstance(action, Abandon):
                error = action.error
                if isinstance(error, NoWorkersError) and self.attempts:
                    error = NoWorkersError(error.reason, f"job {self.job.digest.hex()[:16]}: {self._tried()}")
                self.error = error

    def _feed(self, kind: str, payload: Any) -> list[Action]:
        scheduler, now = self.scheduler, self.client.clock()
        if kind == "result":
            candidate, answer = payload
            peer = candidate.peer
            result = answer.result.message
            self.results[peer] = answer
            self.blobs[peer] = [answer.outputs[meta.digest] for meta in result.outputs]
            self.attempts.append(Attempt(peer, "result", "", now - self.started))
            self.client.throughput.observe(
                peer,
                flops=self.job.requirements.flops,
                waited_ms=answer.elapsed_ms,
                claimed_tflops=candidate.device.tflops,
            )
            traced = result.trace_length == len(self.spec.nodes) and result.trace_length > 0
            return scheduler.on_result(peer, ResultClaim(answer.result, key=peer), traced=traced)
        if kind == "failure":
            candidate, error, after_accept = payload
            peer = candidate.peer
            log.info("job %s on %s: %s", self.job.digest.hex()[:16], peer, error)
            self.attempts.append(Attempt(peer, error.reason.value, error.detail, now - self.started))
            if error.reason is Reason.TIMEOUT:
                outcome = Outcome.TIMEOUT
            elif after_accept and error.reason in _MISBEHAVIOUR:
                outcome = Outcome.INVALID  # it signed or sent something false: not a crash, not the network
            else:
                outcome = Outcome.DECLINED_AFTER_ACCEPT  # it walked away, died, or the connection broke
            return scheduler.on_failure(peer, outcome, after_accept=after_accept)
        if kind == "checked":
            peer, outcome = payload
            if not outcome.ok:
                what = "trace_refused" if outcome.refused else "check_failed"
                log.info("job %s on %s: %s: %s", self.job.digest.hex()[:16], peer, what, outcome.detail)
                self.attempts.append(Attempt(peer, what, outcome.detail, now - self.started))
            return scheduler.on_check(peer, outcome)
        if kind == "busy":
            candidate, queued = payload
            self.attempts.append(Attempt(candidate.peer, "busy", "no free slot: asked again later", now - self.started))
            self.client.capacity.busy(candidate.peer, now, queued=queued)
            del self.sessions[candidate.peer]  # it never took the job: it may be asked again once it has room
            return scheduler.on_busy(candidate.peer)
        if kind == "candidates":
            return scheduler.offer(payload) if payload else scheduler.give_up()
        raise AssertionError(kind)

    def _eligible(self) -> list[Candidate]:
        """Workers that could run the job (price, hardware, ``only``, not flagged), whether or not they have room."""
        reputation = self.client.node.reputation
        found = [c for c in self.client.candidates(self.job, self.max_price) if reputation.eligible(c.peer)]
        return found if self.only is None else [c for c in found if c.peer in self.only]

    def _candidates(self) -> list[Candidate]:
        """The eligible workers with room for another task of this client; the preferred one alone while it has
        room and was not asked yet."""
        found = self.client.with_room(self._eligible())
        if self.prefer is not None and self.prefer not in self.sessions:
            preferred = [c for c in found if c.peer == self.prefer]
            if preferred:
                return preferred
        return found

    def _tried(self) -> str:
        return "; ".join(f"{a.worker}: {a.outcome} {a.detail}".strip() for a in self.attempts)

    def _launch(self, candidate: Candidate) -> None:
        send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        session = _Session(candidate, send)
        self.sessions[candidate.peer] = session
        self.client.capacity.take(candidate.peer, self.client.clock(), self.client._measured(candidate).expected_ms)
        self.nursery.start_soon(self._work, session, receive)

    def _command(self, peer: PeerId, command: tuple[str, Any]) -> None:
        session = self.sessions[peer]
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            session.commands.send_nowait(command)

    def _settle(self, settle: Settle) -> None:
        session = self.sessions.get(settle.peer)
        if session is None:
            return
        if not session.answered:
            session.scope.cancel()  # not needed any more: abort, nothing is owed
            return
        self._command(settle.peer, ("settle", settle))

    async def _wait_for_candidates(self) -> None:
        """Nobody left to ask with room now: wait for room on an eligible worker not yet asked (within the
        job's deadline), or, when there is none, a little for adverts of workers not yet asked."""
        client = self.client
        asked = set(self.sessions)

        def fresh() -> list[Candidate]:
            return [c for c in self._candidates() if c.peer not in asked]

        def busy() -> bool:
            return any(c.peer not in asked for c in self._eligible())

        with client._waiting_for_room():
            await client.wait_until(lambda: bool(fresh()) or not busy(), (self.deadline_ms - client.clock()) / 1000)
        if not fresh():
            await client.wait_until(lambda: bool(fresh()), ESCALATION_WAIT_S)
        self.send.send_nowait(("candidates", fresh()))

    # -- one worker --------------------------------------------------------------------------------------------

    async def _work(self, session: _Session, commands: trio.MemoryReceiveChannel[tuple[str, Any]]) -> None:
        client, candidate = self.client, session.candidate

        def forward(phase: str, done: int, total: int) -> None:
            self.report(ProgressEvent(phase, done, total, candidate.peer))

        try:
            await self._session(session, commands, forward)
        finally:
            client.capacity.release(candidate.peer, accepted=session.accepted)
            client.node.notify_waiters()

    async def _session(
        self,
        session: _Session,
        commands: trio.MemoryReceiveChannel[tuple[str, Any]],
        forward: Callable[[str, int, int], None],
    ) -> None:
        client, candidate = self.client, session.candidate
        with session.scope:
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
                    dial=client.node.reach.dial,
                ) as worker_session:
                    try:
                        outcome = await worker_session.run()
                    except P2PComputeError as exc:
                        session.answered = True
                        accepted = worker_session.machine.accept is not None
                        if not accepted and _is_busy(exc):
                            queued = client.capacity.in_flight(candidate.peer) > candidate.advert.slots_total
                            self.send.send_nowait(("busy", (candidate, queued)))
                        else:
                            self.send.send_nowait(("failure", (candidate, exc, accepted)))
                        return
                    session.answered = session.accepted = True
                    self.send.send_nowait(("result", (candidate, outcome)))
                    async for command, argument in commands:
                        if command == "check":
                            checked = await self._check(worker_session, outcome, argument)
                            self.send.send_nowait(("checked", (candidate.peer, checked)))
                        elif command == "leaves":
                            argument.send_nowait(await self._leaves(worker_session))
                        elif command == "settle":
                            await self._pay_or_reject(worker_session, outcome, argument)
                            return
            except P2PComputeError as exc:
                if not session.answered:
                    session.answered = True
                    self.send.send_nowait(("failure", (candidate, exc, False)))
                else:
                    log.info("job %s with %s: %s", self.job.digest.hex()[:16], candidate.peer, exc)

    async def _pay_or_reject(self, worker_session: ClientSession, outcome: WorkerResult, settle: Settle) -> None:
        if settle.pay:
            receipt = await worker_session.pay()
            self.paid += outcome.price
            self.client._remember(worker_session.request.id, worker_session.worker, self.job, outcome, receipt.envelope)
        else:
            await worker_session.reject(settle.reason or "verification_failed", settle.detail)

    async def _leaves(self, worker_session: ClientSession) -> tuple[TraceLeaf, ...] | None:
        """The committed trace's leaves, checked against the signed root; None when the worker does not deliver."""
        if worker_session.machine.trace_rounds:
            return tuple(worker_session.machine.trace_leaves)
        try:
            return (await worker_session.fetch_trace((), leaves=True)).leaves
        except P2PComputeError as exc:
            log.info("trace leaves from %s: %s", worker_session.worker, exc)
            return None

    async def _check(
        self, worker_session: ClientSession, outcome: WorkerResult, nodes: tuple[int, ...] | None
    ) -> CheckOutcome:
        """Fetch what checking ``nodes`` (all: None) needs from the committed trace, and check it.

        The leaves are checked against the job (one per node, the dry run's dtypes and shapes) before any tensor is
        fetched, so a worker cannot make the client download more than the job's own intermediates."""
        from p2pcompute.compute.check import TraceChecker

        spec = self.spec
        wanted = tuple(range(len(spec.nodes))) if nodes is None else nodes
        fetched = 0
        try:
            leaves = await self._leaves(worker_session)
            if leaves is None:
                return CheckOutcome(ok=False, refused=True, detail="the committed trace was not delivered")
            check_trace(spec, leaves, outcome.result.message.outputs)
            checker = await trio.to_thread.run_sync(TraceChecker, spec, self.job.blobs, leaves)
            needed = checker.needed(wanted)
            fetch = [i for i, leaf in enumerate(leaves) if any(m.digest in needed for m in leaf.outputs)]
            tensors: dict[bytes, bytes] = {}
            for start in range(0, len(fetch), MAX_TRACE_REQUEST_NODES):
                answer = await worker_session.fetch_trace(fetch[start : start + MAX_TRACE_REQUEST_NODES], leaves=False)
                if answer.unavailable and nodes is None:
                    # a full check is planned only within the budget every worker keeps (TRACE_BYTES_BUDGET)
                    missing = sorted(answer.unavailable)[:8]
                    return CheckOutcome(ok=False, refused=True, detail=f"nodes {missing} not delivered")
                tensors.update(answer.blobs)
                fetched += sum(len(b) for b in answer.blobs.values())
            if nodes is not None:  # a sample over budget: check what the worker kept (the rest is unchecked)
                wanted = tuple(i for i in wanted if checker.needed((i,)) <= tensors.keys())
            seed = self.client.rng.getrandbits(64)
            checks = await trio.to_thread.run_sync(functools.partial(checker.check, wanted, tensors, seed=seed))
            draft = _CheckDraft(outcome.result, leaves, {**checker.blobs, **tensors}, seed)
        except TraceError as exc:  # a trace that contradicts its signed root, the result or the job
            return CheckOutcome(ok=False, bytes=fetched, detail=f"{exc.reason.value}: {exc.detail}")
        except (TransferError, NegotiationFailed) as exc:  # the stream or a transfer broke: no check was possible
            return CheckOutcome(ok=False, refused=True, bytes=fetched, detail=f"{exc.reason.value}: {exc.detail}")
        except P2PComputeError as exc:  # a committed tensor an op refuses: no honest worker commits one
            return CheckOutcome(ok=False, bytes=fetched, detail=f"{exc.reason.value}: {exc.detail}")
        flops = sum(c.flops for c in checks)
        failed = next((c for c in checks if not c.ok), None)
        if failed is None:
            return CheckOutcome(ok=True, flops=flops, bytes=fetched, covered=len(checks))
        return CheckOutcome(
            ok=False,
            flops=flops,
            bytes=fetched,
            node=failed.node,
            detail=f"{failed.op} ({failed.method.value}): error {failed.error:.3g} over bound {failed.bound:.3g}",
            evidence=replace(draft, failed=failed),
        )

    async def _bisect(self, first: PeerId, second: PeerId) -> None:
        """Verde's referee: the first node where two committed traces part is checked on both."""
        leaves: dict[PeerId, tuple[TraceLeaf, ...] | None] = {}
        for peer in (first, second):
            send, receive = trio.open_memory_channel[tuple[TraceLeaf, ...] | None](1)
            self._command(peer, ("leaves", send))
            with trio.move_on_after(TRACE_FETCH_TIMEOUT_S):
                leaves[peer] = await receive.receive()
        a, b = leaves.get(first), leaves.get(second)
        if a is None or b is None:
            for peer, got in ((first, a), (second, b)):
                refused = CheckOutcome(ok=False, refused=True, detail="no trace for the bisection")
                self.send.send_nowait(("checked", (peer, CheckOutcome(ok=True) if got is not None else refused)))
            return
        node = first_divergence(a, b)
        nodes = (node,) if node is not None else ()
        for peer in (first, second):
            self._command(peer, ("check", nodes))

    # -- results -------------------------------------------------------------------------------------------------

    async def _publish_evidence(self) -> None:
        client, now = self.client, self.client.clock()
        for accuse in self.accusations:
            ident, nonce, expires_at = secrets.token_bytes(16), secrets.randbits(64), now + DEFAULT_EVIDENCE_TTL_MS
            data: bytes | None = None
            if accuse.accusation is not None:
                data = make_evidence(client.keypair, accuse.accusation, id=ident, nonce=nonce, expires_at=expires_at)
            elif isinstance(accuse.check, _CheckDraft) and accuse.check.failed is not None:
                from p2pcompute.compute.evidence import make_check_evidence

                draft, failed = accuse.check, accuse.check.failed
                data = make_check_evidence(
                    client.keypair, draft.result, self.job.spec_bytes, draft.leaves, draft.tensors, failed,
                    draft.seed, id=ident, nonce=nonce, expires_at=expires_at,
                )  # fmt: skip
                if data is None:
                    log.info("the check evidence against %s is too large for gossip; kept local", accuse.peer)
            if data is None:
                continue
            try:
                await client.node.publish_evidence(data)
            except P2PComputeError as exc:
                log.warning("could not publish evidence against %s: %s", accuse.peer, exc)
            client.evidence_published.append(data)

    def _known_answer(self) -> KnownAnswer:
        from p2pcompute.compute.interpreter import tensor_to_blob

        blobs = [tensor_to_blob(t) for t in self.job.run_locally()]
        metas = tuple(meta for meta, _ in blobs)
        self.blobs["known"] = [data for _, data in blobs]
        return KnownAnswer(output_digest=outputs_digest(metas), outputs=metas, hardware_class="client", key="known")

    def _result(self, done: Done) -> RunResult:
        from p2pcompute.compute.interpreter import blob_to_tensor

        verdict = done.verdict
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
            spot_check=done.plan.spot_check,
            plan=done.plan.level.value,
            check_flops=done.check_flops,
            check_bytes=done.check_bytes,
            job_flops=self.job.requirements.flops,
        )


@dataclass(frozen=True, eq=False)
class _CheckDraft:
    """What a failed check needs to become evidence (``compute.evidence.make_check_evidence``)."""

    result: Opened[JobResult]
    leaves: tuple[TraceLeaf, ...]
    tensors: dict[bytes, bytes]
    seed: int
    failed: NodeCheck | None = None


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
    config = NodeConfig(
        data_dir=directory, listen=tuple(listen), bootstrap=tuple(bootstrap), status_port=0, serve_jobs=False
    ).validate()
    store = open_store(directory / STORE_FILE)
    try:
        async with open_host(keypair.seed, config.listen, config=HostConfig()) as host:
            node = Node(config, keypair, None, host, store=store)
            node.rechecker = _recheck_in_thread  # a client has torch: it redoes others' failed checks itself
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


def _is_busy(error: P2PComputeError) -> bool:
    """A decline for want of a free slot (``busy``): the worker is full, not failing."""
    return error.reason is Reason.DECLINED and error.detail.startswith(DeclineReason.BUSY.value)


async def _recheck_in_thread(valid: ValidCheckEvidence) -> tuple[bool, str]:
    from p2pcompute.compute.evidence import recheck

    return await trio.to_thread.run_sync(recheck, valid)


def benchmark_job(tflops: float, milliseconds: int) -> Job:
    """A chain of square float32 matrix products that takes about ``milliseconds`` at ``tflops`` (at least 8
    products of 64 x 64): what :meth:`Client.benchmark` sends."""
    import torch

    from p2pcompute.testing.jobs import chain_module

    flops = tflops * 1e9 * milliseconds
    n = min(4096, max(64, round((flops / 16) ** (1 / 3) / 64) * 64))
    steps = max(8, math.ceil(flops / (2 * n**3)))
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = chain_module(n, steps)
    return Job.from_module(module, (torch.randn(n, n, generator=generator),))


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
