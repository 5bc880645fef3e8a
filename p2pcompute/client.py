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
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pcompute.config import NodeConfig, parse_price
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.jobspec import Comparison, JobLimits, decode_bundle, decode_job, job_digest
from p2pcompute.core.matching import Candidate, choose, eligible
from p2pcompute.core.messages import DeviceKind, Requirements, Timings
from p2pcompute.core.replay import SeenCache
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.errors import (
    DialError,
    JobError,
    NegotiationFailed,
    NoWorkersError,
    Reason,
    RemoteProtocolError,
)
from p2pcompute.keys import default_data_dir, load_or_create_key
from p2pcompute.net.host import HostConfig, open_host
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
DEFAULT_MAX_ATTEMPTS = 4
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

    @property
    def tensors(self) -> tuple[TensorMeta, ...]:
        spec = decode_job(self.spec_bytes)
        return tuple({m.digest: m for m in (*spec.inputs, *spec.constants)}.values())

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

        return execute(decode_job(self.spec_bytes), self.blobs)


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
        self.seen = SeenCache()
        self.rng = random.Random(secrets.randbits(64))

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
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        progress: ProgressFn | None = None,
    ) -> RunResult:
        """Run ``job`` on a worker for at most ``max_price`` credits, within ``deadline`` seconds from now.

        Retries on another worker when one declines, cannot be reached, times out or fails, up to
        ``max_attempts`` workers. Raises :class:`NoWorkersError` when no eligible worker is (or remains)
        known, with every attempt in the detail.
        """
        price_cap = _to_micro(max_price)
        report = progress or (lambda event: None)
        started = self.clock()
        deadline_ms = started + int(deadline * 1000)
        attempts: list[Attempt] = []
        report(ProgressEvent("matching", 0, 1))
        if not self.candidates(job, price_cap):
            await self.wait_for_workers(job, price_cap)
        while len(attempts) < max_attempts:
            tried = [a.worker for a in attempts]
            picked = choose(self.candidates(job, price_cap, exclude=tried), 1, self.rng)
            if not picked:
                break
            candidate = picked[0]
            try:
                with trio.fail_after(max(0.0, (deadline_ms - self.clock()) / 1000)):
                    outcome = await self._run_on(job, candidate, price_cap, deadline_ms, report)
            except trio.TooSlowError:
                attempts.append(Attempt(candidate.peer, Reason.TIMEOUT.value, "job deadline passed"))
                break
            except (NegotiationFailed, DialError, RemoteProtocolError, JobError) as exc:
                log.info("job %s on %s failed: %s", job.digest.hex()[:16], candidate.peer, exc)
                attempts.append(Attempt(candidate.peer, exc.reason.value, exc.detail, self.clock() - started))
                continue
            attempts.append(Attempt(candidate.peer, "ok", "", outcome.elapsed_ms))
            report(ProgressEvent("done", 1, 1, candidate.peer))
            return self._result(job, outcome, attempts, started)
        tried_text = "; ".join(f"{a.worker}: {a.outcome} {a.detail}".strip() for a in attempts) or "none eligible"
        raise NoWorkersError(
            Reason.NO_WORKERS if not attempts else Reason.ALL_ATTEMPTS_FAILED,
            f"job {job.digest.hex()[:16]} found no worker to finish it ({len(attempts)} tried: {tried_text})",
        )

    async def _run_on(
        self, job: Job, candidate: Candidate, max_price: int, deadline_ms: int, report: ProgressFn
    ) -> WorkerResult:
        def forward(phase: str, done: int, total: int) -> None:
            report(ProgressEvent(phase, done, total, candidate.peer))

        async with open_session(
            self.node.host,
            self.keypair,
            candidate.peer,
            candidate.advert.addrs,
            job.prepared(),
            max_price=max_price,
            deadline=deadline_ms,
            seen=self.seen,
            clock=self.clock,
            progress=forward,
        ) as session:
            outcome = await session.run()
            # The outputs were checked against their hashes and the signed metas on arrival; redundancy=1
            # trusts the one attestation (verification by redundancy: specs/verification.md).
            receipt = await session.pay()
            self._remember(session.request.id, candidate.peer, job, outcome, receipt.envelope)
            return outcome

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

    def _result(self, job: Job, outcome: WorkerResult, attempts: list[Attempt], started: int) -> RunResult:
        from p2pcompute.compute.interpreter import blob_to_tensor

        result = outcome.result.message
        tensors = [blob_to_tensor(meta, outcome.outputs[meta.digest]) for meta in result.outputs]
        return RunResult(
            outputs=tensors,
            output_digest=result.output_digest,
            worker=outcome.worker,
            price=outcome.price,
            timings=result.timings,
            hardware_class=result.hardware_class,
            elapsed_ms=self.clock() - started,
            attempts=tuple(attempts),
            job_digest=job.digest,
            workers=(outcome,),
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
    """
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
            node = Node(config, keypair, None, host)
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
