"""The worker's side of ``/p2pcompute/job/1.0.0``: admission, inputs, the executor, the result, the receipt.

A :class:`Worker` serves one job per stream. It measures every job itself (the executor's dry run: peak memory
with per-tensor overhead, output bytes, flops) and admits, limits and prices it from those numbers, never the
client's claims (a claim far from them is declined as ``claim_mismatch``); it admits only what fits its free slots,
memory and price floor (``core.negotiation.admission``). It bounds the streams each peer and each address group may
hold at once and the accepted jobs still waiting for their inputs; every phase has its own deadline, the first
(a request on a new stream) included, and any failure in a stream ends that stream alone. It persists every
accepted job in the SQLite store before it runs it (so a restart neither loses nor silently forgets it:
``Store.recover``; a job id a client already used is declined, never overwritten), runs it in the sandboxed
executor and sends a signed attestation of the outputs. It never imports torch: the executor's child processes do.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from p2pcompute.compute.executor import Estimate, ExecResult, Executor
from p2pcompute.core.envelope import Opened
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.jobspec import DEFAULT_JOB_LIMITS, JobLimits, JobSpec, decode_job, summary
from p2pcompute.core.ledger import DEFAULT_RECEIPT_GRACE_MS, LedgerRole
from p2pcompute.core.matching import DEFAULT_MIN_PRICE, address_group
from p2pcompute.core.messages import DeclineReason, DeviceKind, JobReceipt, JobRequest, Requirements
from p2pcompute.core.negotiation import (
    MAX_CLOCK_SKEW_MS,
    MAX_LEAVES_PER_FRAME,
    MAX_TICKET_BLOBS,
    MESSAGE_TTL_MS,
    Accept,
    Admit,
    BlobAssembler,
    Blobs,
    Capacity,
    Decline,
    Failed,
    NegotiationPolicy,
    Offer,
    Progress,
    ProgressFrame,
    Receipt,
    Refuse,
    Rejection,
    Request,
    Result,
    Ticket,
    TicketBlob,
    TicketDirection,
    TicketFrame,
    Trace,
    TraceFrame,
    TraceRequest,
    TraceRequestFrame,
    WorkerNegotiation,
    admission,
    blob_frames,
)
from p2pcompute.core.replay import SeenCache
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.errors import (
    ExecutionError,
    JobFormatError,
    NegotiationFailed,
    P2PComputeError,
    Reason,
    StoreError,
    TransferError,
)
from p2pcompute.net.negotiate import INLINE_BYTES, Conversation
from p2pcompute.net.protocols import DATA_PROTOCOL, JOB_PROTOCOL
from p2pcompute.net.transfer import DataServer, Direction
from p2pcompute.net.transfer import Ticket as DataTicket
from p2pcompute.store import JobRecord, JobRole, JobState, Store

__all__ = ["Worker", "WorkerSettings"]

log = logging.getLogger(__name__)

_K = TypeVar("_K", bound=Hashable)
TRANSFER_TIMEOUT_S = 600.0  # an upload when the phase has no deadline (never, once a request was accepted)

BLOB_CACHE_BYTES = 256 * 1024 * 1024  # content-addressed tensors kept between jobs (weights sent once)
CLAIM_SLACK = 0.25  # a client's memory or flops claim may differ from the worker's own dry run by this fraction ...
CLAIM_SLACK_BYTES = 1 << 20  # ... plus this many bytes (memory) or flops


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What a worker charges and holds (from the node's configuration)."""

    price_per_second: int
    slots: int
    memory_bytes: int  # the most memory one job may use
    device_kinds: frozenset[DeviceKind]
    tflops: float
    min_price: int = DEFAULT_MIN_PRICE
    receipt_grace_ms: int = DEFAULT_RECEIPT_GRACE_MS  # after this, a client without a receipt owes it
    queue_depth: int = 1  # jobs admitted beyond the slots; they wait for a free executor (queue_ms)
    limits: JobLimits = DEFAULT_JOB_LIMITS
    policy: NegotiationPolicy = field(default_factory=NegotiationPolicy)


class _BlobCache:
    """A bounded LRU of tensor bytes by content hash (hash-checked on the way in, so safe to reuse)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._used = 0
        self._items: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()

    def get(self, digest: bytes) -> bytes | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        if digest in self._items or len(data) > self._capacity:
            return
        self._items[digest] = data
        self._used += len(data)
        while self._used > self._capacity:
            _, old = self._items.popitem(last=False)
            self._used -= len(old)


class Worker:
    """Serves job streams for one peer: register every handler of :meth:`stream_handlers` on the host (the job
    protocol, and the data channel's libp2p-stream fallback)."""

    def __init__(
        self,
        *,
        keypair: KeyPair,
        executor: Executor,
        store: Store,
        data: DataServer,
        settings: WorkerSettings,
        clock: Callable[[], int],
        on_capacity: Callable[[int], None] = lambda free: None,
        on_receipt: Callable[[Opened[JobReceipt]], None] = lambda receipt: None,
    ) -> None:
        self.keypair = keypair
        self.executor = executor
        self.store = store
        self.data = data
        self.settings = settings
        self.clock = clock
        self.on_capacity = on_capacity
        self.on_receipt = on_receipt
        self.free_slots = settings.slots
        # Slot occupancy (utilisation): milliseconds of slot-time held by admitted jobs, integrated at each change
        # of the slots taken (min(taken, slots): a job queued beyond the slots occupies none), and ms in the executor.
        self._slot_busy_ms = 0
        self._slots_changed_at = clock()
        self._exec_ms = 0
        # Only messages that live no longer than this worker's own TTL: nobody can park far-future keys here.
        self.seen = SeenCache(max_ttl_ms=MESSAGE_TTL_MS + MAX_CLOCK_SKEW_MS)
        self.stats: collections.Counter[str] = collections.Counter()
        self._streams_per_peer: collections.Counter[PeerId] = collections.Counter()
        self._streams_per_group: collections.Counter[str] = collections.Counter()
        self._pending_per_peer: collections.Counter[PeerId] = collections.Counter()
        self._pending_per_group: collections.Counter[str] = collections.Counter()
        self._cache = _BlobCache(BLOB_CACHE_BYTES)
        self.shutting_down = False
        # Earnings: the hash-chained ledger of receipts (re-checked in full on load: tampering is detected).
        self.ledger = store.load_ledger(keypair, LedgerRole.WORKER)

    @property
    def peer_id(self) -> PeerId:
        return self.keypair.peer_id

    def owing_clients(self) -> set[PeerId]:
        """Clients that took a result and neither paid nor rejected it within the grace period."""
        return self.store.unpaid_clients(self.clock(), self.settings.receipt_grace_ms)

    def _occupied(self) -> int:
        return min(self.settings.slots, max(0, self.settings.slots - self.free_slots))

    def _account_slots(self) -> None:
        now = self.clock()
        self._slot_busy_ms += self._occupied() * max(0, now - self._slots_changed_at)
        self._slots_changed_at = now

    def slot_busy_s(self) -> float:
        """Seconds of slot occupancy since start: the integral over time of the slots held by admitted jobs (from
        admission to the receipt or the end of the exchange). Over ``slots`` x elapsed time: the utilisation."""
        now = self.clock()
        return (self._slot_busy_ms + self._occupied() * max(0, now - self._slots_changed_at)) / 1000

    def exec_s(self) -> float:
        """Seconds spent waiting on the executor for job runs (summed over slots)."""
        return self._exec_ms / 1000

    def _take_slot(self) -> None:
        self._account_slots()
        self.free_slots -= 1  # below zero while jobs wait in the queue
        self.on_capacity(max(0, self.free_slots))

    def _give_slot(self) -> None:
        self._account_slots()
        self.free_slots += 1
        self.on_capacity(max(0, self.free_slots))

    def capacity(self) -> Capacity:
        s = self.settings
        return Capacity(
            free_slots=self.free_slots + s.queue_depth,
            memory_bytes=s.memory_bytes,
            free_memory_bytes=s.memory_bytes if self.free_slots + s.queue_depth > 0 else 0,
            device_kinds=s.device_kinds,
            tflops=s.tflops,
            price_per_second=s.price_per_second,
            min_price=s.min_price,
            max_input_bytes=s.limits.max_tensor_bytes,
            max_output_bytes=s.limits.max_output_bytes,
            max_ops=s.limits.max_ops,
            shutting_down=self.shutting_down,
        )

    def stream_handlers(self) -> dict[TProtocol, Callable[[INetStream], Awaitable[None]]]:
        """The libp2p protocol handlers a worker serves, for ``host.set_stream_handler`` (none of them raises):
        ``/p2pcompute/job/1.0.0`` (:meth:`handle_stream`) and ``/p2pcompute/data/1.0.0`` (the data server's
        :meth:`~p2pcompute.net.transfer.DataServer.handle_stream`: tickets over the libp2p connection when no direct
        TCP path exists)."""
        return {JOB_PROTOCOL: self.handle_stream, DATA_PROTOCOL: self.data.handle_stream}

    async def handle_stream(self, stream: INetStream) -> None:
        """One negotiation; never raises (a peer's misbehaviour is logged and costs only its stream)."""
        try:
            remote = PeerId(stream.muxed_conn.peer_id.to_bytes())
            group = _group_of(stream)
        except Exception as exc:  # a stream without an authenticated peer or an address: nothing to serve
            log.info("refused a job stream: %s", exc)
            await _reset(stream)
            return
        policy = self.settings.policy
        if (
            self._streams_per_peer[remote] >= policy.max_streams_per_peer
            or self._streams_per_group[group] >= policy.max_streams_per_group
        ):
            self.stats["refused_streams"] += 1
            log.info(
                "refused a job stream from %s: %d open already (%d from %s)",
                remote,
                self._streams_per_peer[remote],
                self._streams_per_group[group],
                group,
            )
            await _reset(stream)
            return
        self._streams_per_peer[remote] += 1
        self._streams_per_group[group] += 1
        try:
            machine = WorkerNegotiation(local=self.peer_id, remote=remote, policy=policy, opened_at=self.clock())
            conv = Conversation(stream, machine, self.keypair, remote, self.seen, self.clock)
            try:
                await self._serve(conv, group)
                await conv.close()
            except P2PComputeError as exc:
                self.stats[f"error_{exc.reason.value}"] += 1
                log.info("job stream with %s ended: %s", remote, exc)
                await conv.abort(exc)
            except Exception as exc:  # a timeout, a library error, a bug: this stream ends, the node goes on
                self.stats["error_internal"] += 1
                log.warning("job stream with %s failed: %s: %s", remote, type(exc).__name__, exc, exc_info=True)
                await conv.abort(NegotiationFailed(Reason.CANCELLED, f"worker error: {type(exc).__name__}"))
        finally:
            _drop(self._streams_per_peer, remote)
            _drop(self._streams_per_group, group)

    async def _serve(self, conv: Conversation, group: str) -> None:
        machine: WorkerNegotiation = conv.machine  # type: ignore[assignment]
        event = await conv.receive_kind(Request)
        request: JobRequest = event.opened.message
        try:
            spec = decode_job(event.spec, self.settings.limits)
        except JobFormatError as exc:
            await self._decline(conv, DeclineReason.BAD_JOB, f"{exc.reason.value}: {exc.detail}")
            return
        if self.store.has_job(request.id, JobRole.WORKER, conv.remote.raw):
            await self._decline(conv, DeclineReason.DUPLICATE_ID, f"job id {request.id.hex()} was used before")
            return
        try:
            estimate = await self.executor.estimate(event.spec)
        except (JobFormatError, ExecutionError) as exc:
            await self._decline(conv, DeclineReason.BAD_JOB, f"dry run: {exc.reason.value}: {exc.detail}")
            return
        mismatch = _claim_mismatch(request.requirements, estimate)
        if mismatch:
            self.stats["claim_mismatch"] += 1
            await self._decline(conv, DeclineReason.CLAIM_MISMATCH, mismatch)
            return
        decision = admission(
            request,
            self._summary(request, spec, estimate),
            self.capacity(),
            now=self.clock(),
            owing=frozenset(self.owing_clients()),
        )
        if isinstance(decision, Refuse):
            await self._decline(conv, decision.reason, decision.detail)
            return
        policy = self.settings.policy
        if (
            self._pending_per_peer[conv.remote] >= policy.max_pending_inputs_per_peer
            or self._pending_per_group[group] >= policy.max_pending_inputs_per_group
        ):
            await self._decline(conv, DeclineReason.BUSY, "too many of your jobs are still waiting for their inputs")
            return
        self._take_slot()
        try:
            await self._offer_and_run(conv, machine, event.spec, spec, decision, group)
        finally:
            self._give_slot()

    def _summary(self, request: JobRequest, spec: JobSpec, estimate: Estimate) -> Requirements:
        # The worker's own numbers: sizes from the parsed spec, memory, outputs and flops from its dry run.
        sizes = summary(spec)
        return Requirements(
            device_kind=request.requirements.device_kind,
            memory_bytes=max(estimate.peak_bytes, 1),
            input_bytes=sizes.input_bytes + sizes.constant_bytes,
            output_bytes=estimate.output_bytes,
            op_count=sizes.op_count,
            flops=estimate.flops,
        )

    async def _decline(self, conv: Conversation, reason: DeclineReason, detail: str) -> None:
        machine: WorkerNegotiation = conv.machine  # type: ignore[assignment]
        self.stats[f"declined_{reason.value}"] += 1
        decline = machine.make_decline(reason, detail=detail[:512], **conv.message_fields())
        await conv.send_signed(decline, lambda o: Decline(opened=o))  # type: ignore[arg-type]

    async def _offer_and_run(
        self,
        conv: Conversation,
        machine: WorkerNegotiation,
        spec_bytes: bytes,
        spec: JobSpec,
        admit: Admit,
        group: str,
    ) -> None:
        offer = machine.make_offer(admit, hardware_class=self.executor.hardware_class_base, **conv.message_fields())
        await conv.send_signed(offer, lambda o: Offer(opened=o))  # type: ignore[arg-type]
        accept = (await conv.receive_kind(Accept)).opened
        request = machine.request
        assert request is not None and machine.offer is not None
        now = self.clock()
        record = JobRecord(
            id=request.message.id,
            role=JobRole.WORKER,
            peer=conv.remote.raw,
            job_digest=request.message.job_digest,
            state=JobState.ACCEPTED,
            price=accept.message.price,
            created_ms=now,
            updated_ms=now,
            envelopes={
                "request": request.envelope,
                "offer": machine.offer.envelope,
                "accept": accept.envelope,
            },
        )
        try:
            self.store.put_job(record)  # refuses a job id this client used before (a race of two streams)
        except StoreError as exc:
            if exc.reason is Reason.DUPLICATE_ID:
                raise NegotiationFailed(Reason.DUPLICATE_ID, exc.detail) from exc
            raise
        self.stats["accepted"] += 1
        key = (record.id, JobRole.WORKER, record.peer)
        try:
            self._pending_per_peer[conv.remote] += 1
            self._pending_per_group[group] += 1
            try:
                blobs = await self._receive_inputs(conv, spec)
            finally:
                _drop(self._pending_per_peer, conv.remote)
                _drop(self._pending_per_group, group)
            await conv.send(Progress(frame=ProgressFrame(phase="running", done=0, total=1)))
            self.store.update_job(*key, state=JobState.RUNNING, now=self.clock())
            began = self.clock()
            try:
                try:
                    result = await self.executor.run(spec_bytes, blobs)
                finally:
                    self._exec_ms += max(0, self.clock() - began)
            except (ExecutionError, JobFormatError) as exc:
                failed = machine.make_failed(exc.reason.value, detail=exc.detail[:512], **conv.message_fields())
                sent = await conv.send_signed(failed, lambda o: Failed(opened=o))  # type: ignore[arg-type]
                self.store.update_job(
                    *key, state=JobState.FAILED, now=self.clock(), envelopes={"failed": sent.envelope}, detail=str(exc)
                )
                self.stats["failed"] += 1
                return
            await self._send_result(conv, machine, result, key, blobs)
        except P2PComputeError as exc:
            # The exchange broke after the accept (the client vanished, a transfer failed): the job is over.
            # A cancellation (this worker shutting down) is left open on purpose: the next start's
            # Store.recover() reports it as interrupted rather than forgetting it.
            current = self.store.get_job(*key)
            if current is not None and current.state in (JobState.ACCEPTED, JobState.RUNNING):
                self.store.update_job(*key, state=JobState.FAILED, now=self.clock(), detail=str(exc)[:500])
            raise

    async def _receive_inputs(self, conv: Conversation, spec: JobSpec) -> dict[bytes, bytes]:
        needed = {meta.digest: meta for meta in (*spec.inputs, *spec.constants)}
        total = sum(meta.nbytes for meta in needed.values())
        blobs: dict[bytes, bytes] = {}
        if total <= INLINE_BYTES:
            assembler = BlobAssembler(needed.values())
            while not assembler.complete:
                event = await conv.receive_kind(Blobs)
                assembler.feed(event.frame)
            blobs = assembler.blobs()
        else:
            missing: list[TensorMeta] = []
            for digest, meta in needed.items():
                cached = self._cache.get(digest)
                if cached is None:
                    missing.append(meta)
                else:
                    blobs[digest] = cached
            if missing:
                ticket = self.data.expect_upload(missing)
                try:
                    await conv.send(Ticket(frame=_ticket_frame(ticket)))
                    # the inputs phase's own deadline (the machine's), not a transfer-sized one: a client whose
                    # inputs do not come frees the slot when the phase ends
                    deadline = conv.machine.timeout_at()
                    wait_s = TRANSFER_TIMEOUT_S if deadline is None else max(0.0, (deadline - self.clock()) / 1000)
                    with trio.move_on_after(wait_s) as scope:
                        received = await self.data.receive_upload(ticket)
                    if scope.cancelled_caught:
                        raise NegotiationFailed(Reason.TIMEOUT, f"the inputs did not arrive in {wait_s:.1f} s")
                finally:
                    self.data.discard(ticket)
                for digest, view in received.items():
                    data = bytes(view)
                    blobs[digest] = data
                    self._cache.put(digest, data)
        for meta in spec.constants:
            self._cache.put(meta.digest, blobs[meta.digest])
        return blobs

    async def _send_result(
        self,
        conv: Conversation,
        machine: WorkerNegotiation,
        result: ExecResult,
        key: tuple[bytes, JobRole, bytes],
        inputs: Mapping[bytes, bytes],
    ) -> None:
        metas = tuple(meta for meta, _ in result.outputs)
        attestation = machine.make_result(
            metas,
            hardware_class=result.hardware_class,
            timings=result.timings,
            trace_root=result.trace_root or bytes(32),
            trace_length=len(result.trace) if result.trace_root else 0,
            **conv.message_fields(),
        )
        sent = await conv.send_signed(attestation, lambda o: Result(opened=o))  # type: ignore[arg-type]
        self.store.update_job(*key, state=JobState.RESULT_SENT, now=self.clock(), envelopes={"result": sent.envelope})
        self.stats["results"] += 1
        outputs = {meta.digest: data for meta, data in result.outputs}
        if sum(len(data) for data in outputs.values()) <= INLINE_BYTES:
            for frame in blob_frames(outputs.items()):
                await conv.send(Blobs(frame=frame))
        else:
            ticket = self.data.offer_download(outputs)
            await conv.send(Ticket(frame=_ticket_frame(ticket)))
        known = {**inputs, **outputs, **result.trace_blobs}
        settled = await conv.receive_kind(Receipt, Rejection, TraceRequest)
        while isinstance(settled, TraceRequest):  # the client checks the committed trace before it pays
            self.stats["trace_requests"] += 1
            await self._serve_trace(conv, result, settled.frame, known)
            settled = await conv.receive_kind(Receipt, Rejection, TraceRequest)
        if isinstance(settled, Receipt):
            self.store.append_to_ledger(self.ledger, settled.opened.envelope)
            self.store.update_job(
                *key, state=JobState.PAID, now=self.clock(), envelopes={"receipt": settled.opened.envelope}
            )
            self.stats["paid"] += 1
            self.on_receipt(settled.opened)
        else:
            rejection = settled.opened.message
            self.store.update_job(
                *key,
                state=JobState.REJECTED,
                now=self.clock(),
                envelopes={"rejection": settled.opened.envelope},
                detail=f"{rejection.reason}: {rejection.detail}",
            )
            self.stats["rejected"] += 1

    async def _serve_trace(
        self, conv: Conversation, result: ExecResult, request: TraceRequestFrame, known: Mapping[bytes, bytes]
    ) -> None:
        """Answer a trace request: the leaves (in frames of at most MAX_LEAVES_PER_FRAME), then the tensors of the
        requested nodes that this worker kept (the rest named ``unavailable``), inline or over the data channel."""
        leaves = result.trace if request.leaves else ()
        send: dict[bytes, bytes] = {}
        unavailable: list[int] = []
        for node in request.nodes:
            digests = [meta.digest for meta in result.trace[node].outputs]
            new = [d for d in digests if d not in send]
            if any(d not in known for d in digests) or len(send) + len(new) > MAX_TICKET_BLOBS:
                unavailable.append(node)
                continue
            for digest in new:
                send[digest] = known[digest]
        chunks = [leaves[i : i + MAX_LEAVES_PER_FRAME] for i in range(0, len(leaves), MAX_LEAVES_PER_FRAME)] or [()]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            frame = TraceFrame(
                first=i * MAX_LEAVES_PER_FRAME if chunk else 0,
                leaves=tuple(chunk),
                last=last,
                unavailable=tuple(unavailable) if last else (),
            )
            await conv.send(Trace(frame=frame))
        if not send:
            return
        if sum(len(data) for data in send.values()) <= INLINE_BYTES:
            for blobs in blob_frames(send.items()):
                await conv.send(Blobs(frame=blobs))
        else:
            ticket = self.data.offer_download(send)
            await conv.send(Ticket(frame=_ticket_frame(ticket)))

    def status(self) -> dict[str, object]:
        """Counters for the status endpoint: slots, jobs by outcome, slot occupancy and executor time (seconds since
        start), data-channel tickets claimed and sessions refused by path (direct TCP or the libp2p stream), stored
        jobs by state."""
        return {
            "free_slots": self.free_slots,
            "slots": self.settings.slots,
            "hardware_class": self.executor.hardware_class_base,
            "counters": dict(sorted(self.stats.items())),
            "data_channel": dict(sorted(self.data.stats.items())),
            "slot_busy_s": round(self.slot_busy_s(), 3),
            "exec_s": round(self.exec_s(), 3),
            "earned": self.ledger.total(),
            "receipts": len(self.ledger),
            "stored": {state.value: self.store.count_jobs(JobRole.WORKER, state) for state in JobState},
        }

    def recover(self) -> list[JobRecord]:
        """At start-up: jobs a previous run accepted but did not finish, now marked interrupted (and logged)."""
        left_open = self.store.recover(self.clock())
        for record in left_open:
            log.warning(
                "job %s from %s was %s when this worker stopped; marked interrupted",
                record.id.hex(),
                PeerId(record.peer) if len(record.peer) == 38 else record.peer.hex(),
                record.state.value,
            )
        return left_open


def _claim_mismatch(claimed: Requirements, own: Estimate) -> str:
    """Why a client's requirements disagree with the worker's own dry run, or ``""`` when they agree."""
    pairs = (("memory", claimed.memory_bytes, own.peak_bytes), ("flops", claimed.flops, own.flops))
    for what, claim, measured in pairs:
        if abs(claim - measured) > CLAIM_SLACK * measured + CLAIM_SLACK_BYTES:
            return f"claimed {what} {claim}, the worker's dry run measured {measured}"
    return ""


def _group_of(stream: INetStream) -> str:
    """The address group of the stream's remote IP (core.matching.address_group)."""
    address = stream.get_remote_address()
    if address is None:
        raise TransferError(Reason.TRANSFER_FAILED, "the stream has no IP remote address")
    host = str(address[0])
    return address_group(f"/{'ip6' if ':' in host else 'ip4'}/{host}")


def _drop(counter: collections.Counter[_K], key: _K) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(1.0), contextlib.suppress(Exception):
        await stream.reset()


def _ticket_frame(ticket: DataTicket) -> TicketFrame:
    direction = TicketDirection.UPLOAD if ticket.direction is Direction.UPLOAD else TicketDirection.DOWNLOAD
    return TicketFrame(
        direction=direction,
        port=ticket.port,
        token=ticket.token,
        key=ticket.key,
        expires_at=ticket.expires_at_ms,
        blobs=tuple(TicketBlob(digest=d, nbytes=n) for d, n in ticket.blobs),
    )
