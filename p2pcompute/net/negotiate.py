"""Drive the pure negotiation machines (``core.negotiation``) over ``/p2pcompute/job/1.0.0`` streams.

The adapter moves bytes and time only: it reads a frame, turns it into an event (opening envelopes with the
signer pinned to the Noise-authenticated remote peer), passes signed messages through the seen cache, and feeds
the machine, which decides. Every wait is bounded by the machine's own phase deadline (``timeout_at``) or a
named transfer timeout; on a timeout, cancellation or any protocol error the adapter tells the machine, sends a
best-effort ``abort`` frame and resets the stream.

:class:`Conversation` is shared by both roles. :class:`ClientSession` is the client's side of one negotiation
with one worker; the stream stays open after the result so the client can verify before it signs a receipt
(or a rejection). The worker's side lives in :mod:`p2pcompute.worker`.

Tensors above :data:`INLINE_BYTES` move on a data-channel ticket. The client decides where (:meth:`ClientSession.
data_transport`): a ``/p2pcompute/data/1.0.0`` stream on the libp2p connection when that connection is relayed
(:func:`relayed`) or when the worker's data port does not connect within ``DATA_DIAL_TIMEOUT_S``; otherwise the
direct TCP data channel. Either way the same session runs (``net.transfer``: token, seal, hash checks).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2pcompute.core.envelope import Opened
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.messages import (
    JobDecline,
    JobFailed,
    JobOffer,
    JobReceipt,
    JobRequest,
    JobResult,
    Message,
    Requirements,
)
from p2pcompute.core.negotiation import (
    MESSAGE_TTL_MS,
    Abort,
    Accept,
    BlobAssembler,
    Blobs,
    ClientNegotiation,
    Decline,
    Event,
    Failed,
    Offer,
    Progress,
    Receipt,
    Rejection,
    Request,
    Result,
    State,
    Ticket,
    TicketDirection,
    TicketFrame,
    Trace,
    TraceRequest,
    TraceRequestFrame,
    WorkerNegotiation,
    abort_frame,
    blob_frames,
    decode_frame_payload,
    encode_frame_payload,
    event_from_frame,
    frame_of,
    seal_opened,
)
from p2pcompute.core.replay import SeenCache
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.core.trace import TraceLeaf
from p2pcompute.errors import (
    DialError,
    NegotiationFailed,
    P2PComputeError,
    Reason,
    TransferError,
)
from p2pcompute.net.protocols import DATA_PROTOCOL, JOB_PROTOCOL
from p2pcompute.net.stream import FramedStream
from p2pcompute.net.transfer import (
    DATA_DIAL_TIMEOUT_S,
    DataChannelConfig,
    DataPath,
    DataTransport,
    dial_data_server,
    download_over,
    ticket_cipher,
    upload_over,
)

__all__ = [
    "INLINE_BYTES",
    "MESSAGE_TTL_MS",
    "ClientSession",
    "Conversation",
    "PreparedJob",
    "ProgressCallback",
    "TraceAnswer",
    "WorkerResult",
    "open_data_stream",
    "open_session",
    "relayed",
    "remote_host",
]

log = logging.getLogger(__name__)

INLINE_BYTES = 256 * 1024  # inputs (or outputs) up to this many bytes in all travel inline on the stream
DIAL_TIMEOUT_S = 10.0
STREAM_ATTEMPTS = 2
TRANSFER_TIMEOUT_S = 600.0  # one data-channel upload or download
ABORT_TIMEOUT_S = 1.0  # best effort: telling the peer why we stop

ProgressCallback = Callable[[str, int, int], None]
"""``(phase, done, total)``: called as a job moves (negotiating, uploading, running, downloading, ...)."""

E1 = TypeVar("E1", bound=Event)
E2 = TypeVar("E2", bound=Event)
E3 = TypeVar("E3", bound=Event)
E4 = TypeVar("E4", bound=Event)

_EVENT_OF: dict[type[Message], Callable[[Opened[Message]], Event]] = {
    JobOffer: lambda o: Offer(opened=o),  # type: ignore[arg-type]
    JobDecline: lambda o: Decline(opened=o),  # type: ignore[arg-type]
    JobResult: lambda o: Result(opened=o),  # type: ignore[arg-type]
    JobFailed: lambda o: Failed(opened=o),  # type: ignore[arg-type]
    JobReceipt: lambda o: Receipt(opened=o),  # type: ignore[arg-type]
}


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


def remote_host(stream: INetStream) -> str:
    """The IP address the stream's connection reaches the peer on (where its data channel listens)."""
    address = stream.get_remote_address()
    if address is None:
        raise TransferError(Reason.TRANSFER_FAILED, "the stream has no IP remote address for a data channel")
    return address[0]


def relayed(stream: INetStream) -> str | None:
    """Why the stream's connection is relayed (circuit relay v2), or None when nothing says it is.

    Over a relayed connection the remote address is the relay's: a data-channel dial there would reach the relay,
    never the worker. py-libp2p 0.8.1 says so in two places, both checked: the transport under the muxer
    (``muxed_conn.get_connection_type()`` is ``RELAYED`` and its ``get_transport_addresses()`` contain
    ``/p2p-circuit`` on the dialling side), and the swarm connection, which the circuit protocol tags ``RELAYED``
    on the listening side (``swarm_conn.get_connection_type()``). The swarm connection's addresses are not read:
    they fall back to the peerstore's, where a peer's advertised relay address says nothing about this connection.
    """
    muxed = getattr(stream, "muxed_conn", None)
    swarm = getattr(stream, "swarm_conn", None)
    for name, conn in (("transport", muxed), ("swarm connection", swarm)):
        with contextlib.suppress(Exception):
            if conn is not None and conn.get_connection_type() is ConnectionType.RELAYED:
                return f"the connection is relayed (its {name} says so)"
    with contextlib.suppress(Exception):
        for address in muxed.get_transport_addresses() if muxed is not None else ():
            if "/p2p-circuit" in str(address):
                return f"the connection is relayed ({address})"
    return None


async def open_data_stream(host: IHost, peer: ID) -> INetStream:
    """A ``/p2pcompute/data/1.0.0`` stream to ``peer`` (on the connection its job stream uses)."""
    try:
        with trio.fail_after(DIAL_TIMEOUT_S):
            return await host.new_stream(peer, [DATA_PROTOCOL])
    except (BaseLibp2pError, OSError, trio.TooSlowError) as exc:
        raise TransferError(Reason.TRANSFER_FAILED, f"cannot open a {DATA_PROTOCOL} stream to {peer}: {exc!r}") from exc


class Conversation:
    """One negotiation on one stream: frames in and out through the machine, under its phase deadlines."""

    def __init__(
        self,
        stream: INetStream,
        machine: ClientNegotiation | WorkerNegotiation,
        keypair: KeyPair,
        remote: PeerId,
        seen: SeenCache,
        clock: Callable[[], int],
    ) -> None:
        self.stream = stream
        self.machine = machine
        self.keypair = keypair
        self.remote = remote
        self.seen = seen
        self.clock = clock
        self._framed = FramedStream(stream)

    def message_fields(self) -> dict[str, int]:
        """``nonce`` and ``expires_at`` for a message we sign now."""
        return {"nonce": secrets.randbits(64), "expires_at": self.clock() + MESSAGE_TTL_MS}

    async def send(self, event: Event) -> None:
        """Let the machine check and record ``event``, then write its frame."""
        self.machine.send(event, self.clock())
        await self._write(encode_frame_payload(frame_of(event)))

    async def send_signed(self, message: Message, wrap: Callable[[Opened[Message]], Event]) -> Opened[Message]:
        opened = seal_opened(self.keypair, message)
        await self.send(wrap(opened))
        return opened

    async def _write(self, payload: bytes) -> None:
        try:
            await self._framed.send(payload)
        except (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise NegotiationFailed(Reason.STREAM_CLOSED, f"writing to {self.remote}: {exc}") from exc

    async def receive(self) -> Event:
        """The next event from the peer, accepted by the machine; bounded by the current phase's deadline."""
        deadline = self.machine.timeout_at()
        wait_s = max(0.0, (deadline - self.clock()) / 1000) if deadline is not None else TRANSFER_TIMEOUT_S
        with trio.move_on_after(wait_s) as scope:
            try:
                payload = await self._framed.receive()
            except (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise NegotiationFailed(Reason.STREAM_CLOSED, f"reading from {self.remote}: {exc}") from exc
        if scope.cancelled_caught:
            state = self.machine.state
            self.machine.on_timeout(self.clock())
            raise NegotiationFailed(Reason.TIMEOUT, f"no answer from {self.remote} in state {state.value}")
        if payload is None:
            raise NegotiationFailed(
                Reason.STREAM_CLOSED, f"{self.remote} closed the stream in state {self.machine.state.value}"
            )
        event = event_from_frame(decode_frame_payload(payload), signer=self.remote)
        opened = getattr(event, "opened", None)
        if opened is not None:
            self.seen.accept(opened, self.clock())
        self.machine.receive(event, self.clock())
        if isinstance(event, Abort):
            raise NegotiationFailed(
                Reason.CANCELLED, f"{self.remote} aborted: {event.frame.reason} {event.frame.detail}".strip()
            )
        return event

    @overload
    async def receive_kind(self, k1: type[E1], /) -> E1: ...
    @overload
    async def receive_kind(self, k1: type[E1], k2: type[E2], /) -> E1 | E2: ...
    @overload
    async def receive_kind(self, k1: type[E1], k2: type[E2], k3: type[E3], /) -> E1 | E2 | E3: ...
    @overload
    async def receive_kind(self, k1: type[E1], k2: type[E2], k3: type[E3], k4: type[E4], /) -> E1 | E2 | E3 | E4: ...
    async def receive_kind(self, *kinds: Any) -> Any:
        """The next event, which must be one of ``kinds`` (the machine has already checked it is legal)."""
        event = await self.receive()
        if not isinstance(event, kinds):
            # The machine allows more than the caller handles here (e.g. progress before a ticket): a bug.
            names = ", ".join(k.__name__ for k in kinds)
            raise NegotiationFailed(Reason.UNEXPECTED_MESSAGE, f"{type(event).__name__} where {names} was expected")
        return event

    async def abort(self, error: P2PComputeError) -> None:
        """Best effort: tell the peer why we stop, then reset the stream. Safe to call more than once."""
        if self.machine.state not in (State.DONE, State.DECLINED, State.FAILED, State.REJECTED):
            self.machine.cancel(self.clock())
            with trio.move_on_after(ABORT_TIMEOUT_S), contextlib.suppress(P2PComputeError):
                await self._write(encode_frame_payload(abort_frame(error)))
        await self.reset()

    async def reset(self) -> None:
        with trio.move_on_after(ABORT_TIMEOUT_S), contextlib.suppress(BaseLibp2pError, OSError, Exception):
            await self.stream.reset()

    async def close(self) -> None:
        with trio.move_on_after(ABORT_TIMEOUT_S), contextlib.suppress(BaseLibp2pError, OSError, Exception):
            await self.stream.close()


@dataclass(frozen=True, kw_only=True)
class PreparedJob:
    """What the client sends: the spec, the tensors it names, and the client's measurement of its needs."""

    spec_bytes: bytes
    digest: bytes
    tensors: tuple[TensorMeta, ...]  # inputs and constants, each once
    blobs: Mapping[bytes, bytes]
    requirements: Requirements


@dataclass(frozen=True, kw_only=True)
class TraceAnswer:
    """What a trace request brought: every leaf so far (checked against the signed root), the requested tensors
    (each checked against its leaf), and the requested nodes the worker could not send."""

    leaves: tuple[TraceLeaf, ...]
    blobs: dict[bytes, bytes]
    unavailable: frozenset[int]


@dataclass(frozen=True, kw_only=True)
class WorkerResult:
    """A worker's answer: its signed attestation, the checked output bytes and the exchange so far."""

    worker: PeerId
    offer: Opened[JobOffer]
    result: Opened[JobResult]
    outputs: dict[bytes, bytes]
    price: int
    elapsed_ms: int

    @property
    def hardware_class(self) -> str:
        return self.result.message.hardware_class


class ClientSession:
    """The client's side of one negotiation with one worker (use :func:`open_session`)."""

    def __init__(
        self,
        conversation: Conversation,
        job: PreparedJob,
        request: JobRequest,
        progress: ProgressCallback,
        *,
        host: IHost,
        data_config: DataChannelConfig | None = None,
    ) -> None:
        self.conversation = conversation
        self.host = host
        self.data_config = data_config or DataChannelConfig()
        #: The path each data-channel ticket of this session took, in order (direct TCP or the libp2p stream).
        self.data_paths: list[DataPath] = []
        self.machine: ClientNegotiation = conversation.machine  # type: ignore[assignment]
        self.job = job
        self.request = request
        self.progress = progress
        self.result: WorkerResult | None = None
        self.receipt: Opened[JobReceipt] | None = None

    @property
    def worker(self) -> PeerId:
        return self.conversation.remote

    async def run(self) -> WorkerResult:
        """Request, accept the offer, send the inputs, wait for the result and fetch the checked outputs.

        Raises :class:`NegotiationFailed` (declined, failed, timed out, protocol broken), :class:`TransferError`.
        """
        conv, clock = self.conversation, self.conversation.clock
        started = clock()
        self.progress("negotiating", 0, 1)
        request = seal_opened(conv.keypair, self.request)
        await conv.send(Request(opened=request, spec=self.job.spec_bytes))
        answer = await conv.receive_kind(Offer, Decline)
        if isinstance(answer, Decline):
            decline = answer.opened.message
            raise NegotiationFailed(Reason.DECLINED, f"{decline.reason.value}: {decline.detail}".rstrip(": "))
        offer = answer.opened
        accept = self.machine.make_accept(**conv.message_fields())
        await conv.send_signed(accept, lambda o: Accept(opened=o))  # type: ignore[arg-type]
        event = await self._send_inputs()
        while isinstance(event, Progress):
            self.progress(event.frame.phase, event.frame.done, event.frame.total)
            event = await conv.receive_kind(Progress, Result, Failed)
        if isinstance(event, Failed):
            failed = event.opened.message
            raise NegotiationFailed(Reason.JOB_FAILED, f"{failed.reason}: {failed.detail}".rstrip(": "))
        result: Opened[JobResult] = event.opened
        outputs = await self._receive_outputs(result.message.outputs)
        self.progress("received", 1, 1)
        self.result = WorkerResult(
            worker=self.worker,
            offer=offer,
            result=result,
            outputs=outputs,
            price=offer.message.price,
            elapsed_ms=clock() - started,
        )
        return self.result

    async def _send_inputs(self) -> Progress | Result | Failed:
        conv = self.conversation
        total = sum(meta.nbytes for meta in self.job.tensors)
        if total <= INLINE_BYTES:
            self.progress("uploading", 0, total)
            for frame in blob_frames((meta.digest, self.job.blobs[meta.digest]) for meta in self.job.tensors):
                await conv.send(Blobs(frame=frame))
            self.progress("uploading", total, total)
            return await conv.receive_kind(Progress, Result, Failed)
        event = await conv.receive_kind(Ticket, Progress, Result, Failed)
        if not isinstance(event, Ticket):
            return event  # the worker had every tensor already (content-addressed cache)
        ticket = event.frame
        unknown = [d for d in ticket.digests if d not in self.job.blobs]
        if ticket.direction is not TicketDirection.UPLOAD or unknown:
            raise TransferError(Reason.UNEXPECTED_BLOB, "the upload ticket names tensors this job does not have")
        nbytes = sum(blob.nbytes for blob in ticket.blobs)
        self.progress("uploading", 0, nbytes)
        with trio.fail_after(TRANSFER_TIMEOUT_S):
            transport = await self.data_transport(ticket)
            blobs = {d: self.job.blobs[d] for d in ticket.digests}
            await upload_over(transport, ticket.token, ticket.key, blobs, config=self.data_config)
        self.progress("uploading", nbytes, nbytes)
        return await conv.receive_kind(Progress, Result, Failed)

    async def _receive_outputs(self, metas: Sequence[TensorMeta]) -> dict[bytes, bytes]:
        conv = self.conversation
        total = sum(meta.nbytes for meta in {m.digest: m for m in metas}.values())
        self.progress("downloading", 0, total)
        if total <= INLINE_BYTES:
            assembler = BlobAssembler(metas)
            while not assembler.complete:
                event = await conv.receive_kind(Blobs)
                assembler.feed(event.frame)
            return assembler.blobs()
        ticket: TicketFrame = (await conv.receive_kind(Ticket)).frame
        blobs = await self._download(ticket, metas)
        self.progress("downloading", total, total)
        return blobs

    async def _download(self, ticket: TicketFrame, metas: Sequence[TensorMeta]) -> dict[bytes, bytes]:
        if ticket.direction is not TicketDirection.DOWNLOAD:
            raise TransferError(Reason.UNEXPECTED_BLOB, "an upload ticket where a download was due")
        with trio.fail_after(TRANSFER_TIMEOUT_S):
            transport = await self.data_transport(ticket)
            got = await download_over(transport, ticket.token, ticket.key, metas, config=self.data_config)
        return {digest: bytes(view) for digest, view in got.items()}

    async def data_transport(self, ticket: TicketFrame) -> DataTransport:
        """Where a ticket's session runs (specs/data-channel.md §10.2), recorded in :attr:`data_paths`.

        A ``/p2pcompute/data/1.0.0`` stream on the libp2p connection when that connection is relayed
        (:func:`relayed`), has no IP address, or when the worker's data port (at the connection's IP) does not
        connect within ``DATA_DIAL_TIMEOUT_S``; the direct TCP connection otherwise. The stream is logged at info
        with the reason. A failed dial sent nothing, so the ticket is still unclaimed for the stream; once a dial
        connects, the session stays on it (a refusal there is final: the ticket may be claimed).
        A keyless ticket without the clear opt-in is refused (``bad_token``) before anything is dialled.
        """
        ticket_cipher(ticket.key, self.data_config)
        stream = self.conversation.stream
        why = relayed(stream)
        if why is None:
            try:
                connection = await dial_data_server(remote_host(stream), ticket.port, timeout_s=DATA_DIAL_TIMEOUT_S)
            except TransferError as exc:
                why = exc.detail
            else:
                self.data_paths.append(DataPath.DIRECT)
                return connection
        log.info(
            "job %s with %s: the %s goes over %s on the libp2p connection: %s",
            self.request.id.hex()[:16],
            self.worker,
            ticket.direction.value,
            DATA_PROTOCOL,
            why,
        )
        data_stream = await open_data_stream(self.host, ID(self.worker.raw))
        self.data_paths.append(DataPath.STREAM)
        return data_stream

    async def fetch_trace(self, nodes: Sequence[int], *, leaves: bool) -> TraceAnswer:
        """Ask the worker for its committed trace: the leaves (when ``leaves``; the first request must) and the
        output tensors of ``nodes`` (ascending, at most MAX_TRACE_REQUEST_NODES). The machine checks the leaves
        against the signed ``trace_root`` and every tensor against its leaf; returns what came, and the nodes the
        worker said it cannot send."""
        conv = self.conversation
        await conv.send(TraceRequest(frame=TraceRequestFrame(leaves=leaves, nodes=tuple(nodes))))
        while True:
            event = await conv.receive_kind(Trace)
            if event.frame.last:
                break
        machine = self.machine
        unavailable = frozenset(event.frame.unavailable)
        metas: dict[bytes, TensorMeta] = {}
        for node in nodes:
            if node not in unavailable:
                for meta in machine.trace_leaves[node].outputs:
                    metas.setdefault(meta.digest, meta)
        blobs: dict[bytes, bytes] = {}
        if metas:
            total = sum(meta.nbytes for meta in metas.values())
            if total <= INLINE_BYTES:
                assembler = BlobAssembler(metas.values())
                while not assembler.complete:
                    assembler.feed((await conv.receive_kind(Blobs)).frame)
                blobs = assembler.blobs()
            else:
                ticket: TicketFrame = (await conv.receive_kind(Ticket)).frame
                blobs = await self._download(ticket, list(metas.values()))
        return TraceAnswer(leaves=tuple(machine.trace_leaves), blobs=blobs, unavailable=unavailable)

    async def pay(self) -> Opened[JobReceipt]:
        """Sign and send the receipt for the result (call only once it passed verification).

        The signed receipt is returned even when it could not be delivered (the worker died or the stream broke
        after its result was accepted): the client used the result, so it records what it owes all the same."""
        conv = self.conversation
        now = conv.clock()
        receipt = self.machine.make_receipt(issued_at=now, **conv.message_fields())
        opened: Opened[JobReceipt] = seal_opened(conv.keypair, receipt)
        self.receipt = opened
        try:
            await conv.send(Receipt(opened=opened))
            await conv.close()
        except NegotiationFailed as exc:
            log.info("receipt for %s not delivered: %s", conv.remote, exc)
        return opened

    async def reject(self, reason: str, detail: str = "") -> None:
        """Sign and send a rejection of the result (it failed its checks or verification): nothing is owed."""
        conv = self.conversation
        rejection = self.machine.make_rejection(reason=reason, detail=detail[:512], **conv.message_fields())
        await conv.send_signed(rejection, lambda o: Rejection(opened=o))  # type: ignore[arg-type]
        await conv.close()


#: Connects to a peer from its advert's addresses, relayed ones included
#: (:meth:`p2pcompute.net.reach.ReachService.dial`); raises :class:`DialError`.
Dialer = Callable[[ID, Sequence[str]], Awaitable[None]]


async def _connect(host: IHost, peer: ID, addrs: Sequence[str], dial: Dialer | None = None) -> None:
    if peer in host.get_connected_peers():
        return
    if dial is not None:
        # 0.8.1 dials only one TCP address per peer, the first it knows (see below): the advert's addresses win.
        with contextlib.suppress(Exception):
            host.get_peerstore().clear_addrs(peer)
        await dial(peer, [a for a in addrs if "/ip4/0.0.0.0/" not in a])
        return
    maddrs = []
    for addr in addrs:
        if "/ip4/0.0.0.0/" in addr:
            continue
        with contextlib.suppress(ValueError, Exception):
            maddrs.append(multiaddr.Multiaddr(addr.split("/p2p/")[0]))
    if not maddrs:
        raise DialError(f"no dialable address for {peer}")
    # 0.8.1 dials only one TCP address per peer, the first it knows: after a peer restarted on a new port,
    # its old address would be dialled forever. The advert is signed and fresh, so its addresses win.
    with contextlib.suppress(Exception):
        host.get_peerstore().clear_addrs(peer)
    try:
        with trio.fail_after(DIAL_TIMEOUT_S):
            await host.connect(PeerInfo(peer, maddrs))
    except (BaseLibp2pError, OSError, trio.TooSlowError) as exc:
        raise DialError(f"cannot reach {peer}: {exc}") from exc


async def _open_stream(host: IHost, peer: ID, addrs: Sequence[str], dial: Dialer | None = None) -> INetStream:
    """A job stream to ``peer``, dialling first if needed; one retry on a fresh connection.

    py-libp2p 0.8.1 can hand out a connection that is closing ("No valid connections available"); a second
    attempt after a new dial then succeeds.
    """
    for attempt in range(STREAM_ATTEMPTS):
        await _connect(host, peer, addrs, dial)
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                return await host.new_stream(peer, [JOB_PROTOCOL])
        except (BaseLibp2pError, OSError, trio.TooSlowError) as exc:
            if attempt + 1 == STREAM_ATTEMPTS:
                raise DialError(f"cannot open a job stream to {peer}: {exc}") from exc
            log.info("opening a job stream to %s failed (%s); dialling again", peer, exc)
            with contextlib.suppress(BaseLibp2pError, OSError, Exception):
                await host.disconnect(peer)
    raise AssertionError("unreachable")


@asynccontextmanager
async def open_session(
    host: IHost,
    keypair: KeyPair,
    worker: PeerId,
    addrs: Sequence[str],
    job: PreparedJob,
    *,
    max_price: int,
    deadline: int,
    seen: SeenCache,
    clock: Callable[[], int],
    progress: ProgressCallback = _no_progress,
    job_id: bytes | None = None,
    dial: Dialer | None = None,
) -> AsyncIterator[ClientSession]:
    """Open a job stream to ``worker`` and yield a session; on leaving unsettled, abort and reset the stream.

    ``dial`` connects when no connection exists (a node's reachability service: relayed addresses too); without
    it, only the direct addresses are dialled.

    ``job_id`` is the request's id (16 bytes; a fresh random one by default: a worker declines an id this client
    used with it before).
    """
    peer = ID(worker.raw)
    stream = await _open_stream(host, peer, addrs, dial)
    machine = ClientNegotiation(local=keypair.peer_id, remote=worker)
    conversation = Conversation(stream, machine, keypair, worker, seen, clock)
    now = clock()
    request = JobRequest(
        id=job_id if job_id is not None else secrets.token_bytes(16),
        nonce=secrets.randbits(64),
        expires_at=now + MESSAGE_TTL_MS,
        client=keypair.peer_id,
        worker=worker,
        job_digest=job.digest,
        spec_size=len(job.spec_bytes),
        requirements=job.requirements,
        max_price=max_price,
        deadline=deadline,
    )
    session = ClientSession(conversation, job, request, progress, host=host)
    try:
        yield session
    except BaseException as exc:
        error = exc if isinstance(exc, P2PComputeError) else NegotiationFailed(Reason.CANCELLED, "client gave up")
        with trio.CancelScope(shield=True):
            await conversation.abort(error)
        raise
    finally:
        if machine.state not in (State.DONE, State.REJECTED, State.DECLINED, State.FAILED):
            with trio.CancelScope(shield=True):
                await conversation.abort(NegotiationFailed(Reason.CANCELLED, "session closed before settling"))
