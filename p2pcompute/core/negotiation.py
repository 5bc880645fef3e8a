"""Job negotiation on ``/p2pcompute/job/1.0.0`` (specs/negotiation.md): frames, state machines, admission.

One stream carries one negotiation; the client dials the worker. Every frame on it is one canonical msgpack map
with a ``kind`` tag (:func:`encode_frame_payload`, :func:`decode_frame_payload`). Both roles run the same
conversation table, :data:`TRANSITIONS` (h11 ``_state.py`` style): a state and an event *sent by a role* give the
next state. :class:`ClientNegotiation` and :class:`WorkerNegotiation` check every signed message against the one
before it (the hash chain) and against the agreed terms; an illegal or invalid event puts the machine in
:attr:`State.ERROR` and raises :class:`LocalProtocolError` (our side) or a :class:`RemoteProtocolError`
(the peer's side). Pure: ``now`` is integer milliseconds since the Unix epoch, passed in; nothing is signed here
except by :func:`seal_opened`, which the adapter calls with its key.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Annotated, Any, ClassVar, NoReturn, TypeVar

from p2pcompute.core import codec, jobspec, matching
from p2pcompute.core.envelope import Opened, open_envelope, seal
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.matching import run_estimate_ms
from p2pcompute.core.messages import (
    JOB_MESSAGES,
    MAX_TRACE_LENGTH,
    DeclineReason,
    DeviceKind,
    JobAccept,
    JobDecline,
    JobFailed,
    JobOffer,
    JobReceipt,
    JobRejection,
    JobRequest,
    JobResult,
    Message,
    MessageRegistry,
    Requirements,
    Timings,
)
from p2pcompute.core.schema import U64_MAX, Range, Size, Struct, from_wire, to_wire
from p2pcompute.core.tensors import Digest, TensorMeta, check_blob, outputs_digest
from p2pcompute.core.trace import TraceLeaf, trace_root
from p2pcompute.errors import (
    JobFormatError,
    LocalProtocolError,
    P2PComputeError,
    Reason,
    RemoteProtocolError,
    ReplayError,
    SchemaError,
    SignatureError,
    TraceError,
    TransferError,
)

__all__ = [
    "ANY_STATE_TRANSITIONS",
    "JOB_REGISTRY",
    "MAX_BLOB_CHUNK_SIZE",
    "MAX_CLOCK_SKEW_MS",
    "MAX_CHUNKS_PER_FRAME",
    "MAX_SIGNED_SIZE",
    "MESSAGE_TTL_MS",
    "MAX_SPEC_SIZE",
    "MAX_LEAVES_PER_FRAME",
    "MAX_TICKET_BLOBS",
    "MAX_TRACE_REQUEST_NODES",
    "MAX_TRACE_ROUNDS",
    "NON_TERMINAL",
    "PROTOCOL_ID",
    "TERMINAL",
    "TRANSITIONS",
    "Abort",
    "AbortFrame",
    "Accept",
    "Admit",
    "BlobAssembler",
    "BlobChunk",
    "Blobs",
    "BlobsFrame",
    "Capacity",
    "ClientNegotiation",
    "Decline",
    "Event",
    "EventKind",
    "Failed",
    "Frame",
    "FrameKind",
    "NegotiationPolicy",
    "Offer",
    "Progress",
    "ProgressFrame",
    "Receipt",
    "Refuse",
    "Rejection",
    "Request",
    "RequestFrame",
    "Result",
    "Role",
    "SignedEvent",
    "SignedFrame",
    "State",
    "Ticket",
    "TicketDirection",
    "TicketBlob",
    "TicketFrame",
    "WorkerNegotiation",
    "abort_frame",
    "admission",
    "blob_frames",
    "decode_frame_payload",
    "encode_frame_payload",
    "estimate_run_ms",
    "event_from_frame",
    "frame_of",
    "job_price",
    "seal_opened",
    "state_diagram",
]

PROTOCOL_ID = "/p2pcompute/job/1.0.0"

MAX_SIGNED_SIZE = 64 * 1024
"""Largest signed envelope carried in a ``request`` or ``signed`` frame."""
MAX_SPEC_SIZE = jobspec.MAX_SPEC_SIZE
"""Largest job spec (the job format's own limit): it travels in the request frame next to the request envelope."""
assert MAX_SPEC_SIZE + MAX_SIGNED_SIZE + 1024 <= codec.MAX_FRAME_SIZE
MAX_BLOB_CHUNK_SIZE = codec.MAX_FRAME_SIZE - 1024
"""Largest piece of one tensor in one ``blobs`` frame (a tensor of any size travels as several chunks)."""
MAX_CHUNKS_PER_FRAME = 256
MAX_TICKET_BLOBS = 1024
MAX_TRACE_REQUEST_NODES = 256
"""Nodes one ``trace_request`` may ask the tensors of (a client checking more asks again)."""
MAX_TRACE_ROUNDS = 64
"""``trace_request`` s one negotiation may carry."""
MAX_LEAVES_PER_FRAME = 4096
"""Leaves one ``trace`` frame carries (each a few dozen bytes; a frame stays under ``MAX_FRAME_SIZE``)."""
MAX_BLOB_TOTAL = 1 << 40

JOB_REGISTRY = MessageRegistry(*JOB_MESSAGES)
"""The only payload types a job stream carries."""

U64 = Annotated[int, Range(0, U64_MAX)]
M = TypeVar("M", bound=Message)


# --- frames -----------------------------------------------------------------------------------------------------


class FrameKind(StrEnum):
    REQUEST = "request"
    SIGNED = "signed"
    BLOBS = "blobs"
    TICKET = "ticket"
    PROGRESS = "progress"
    ABORT = "abort"
    TRACE_REQUEST = "trace_request"
    TRACE = "trace"


class TicketDirection(StrEnum):
    UPLOAD = "upload"  # client → worker: inputs
    DOWNLOAD = "download"  # worker → client: outputs


@dataclass(frozen=True, kw_only=True)
class RequestFrame(Struct):
    """Client → worker, first frame: the signed :class:`JobRequest` and the job spec it names."""

    KIND: ClassVar[FrameKind] = FrameKind.REQUEST
    envelope: Annotated[bytes, Size(1, MAX_SIGNED_SIZE)]
    spec: Annotated[bytes, Size(1, MAX_SPEC_SIZE)]


@dataclass(frozen=True, kw_only=True)
class SignedFrame(Struct):
    """Any later signed job message, as its envelope bytes."""

    KIND: ClassVar[FrameKind] = FrameKind.SIGNED
    envelope: Annotated[bytes, Size(1, MAX_SIGNED_SIZE)]


@dataclass(frozen=True, kw_only=True)
class BlobChunk(Struct):
    """Bytes ``[offset, offset + len(data))`` of the tensor named ``digest``, whose raw bytes are ``total`` long."""

    digest: Digest
    offset: Annotated[int, Range(0, MAX_BLOB_TOTAL)]
    total: Annotated[int, Range(0, MAX_BLOB_TOTAL)]
    data: Annotated[bytes, Size(0, MAX_BLOB_CHUNK_SIZE)]


@dataclass(frozen=True, kw_only=True)
class BlobsFrame(Struct):
    """Tensor bytes sent inline on the stream (inputs by the client, outputs by the worker)."""

    KIND: ClassVar[FrameKind] = FrameKind.BLOBS
    chunks: Annotated[tuple[BlobChunk, ...], Size(1, MAX_CHUNKS_PER_FRAME)]


@dataclass(frozen=True, kw_only=True)
class TicketBlob(Struct):
    """One tensor a data-channel ticket moves: its digest and byte length."""

    digest: Digest
    nbytes: Annotated[int, Range(0, MAX_BLOB_TOTAL)]


@dataclass(frozen=True, kw_only=True)
class TicketFrame(Struct):
    """Worker → client: tensors move over the data channel (specs/data-channel.md) on ``port``.

    ``token`` authorises one transfer, ``key`` (when present) seals its bytes, ``expires_at`` (ms) ends the
    ticket, ``blobs`` lists what moves (in the order the worker sends them on a download).
    """

    KIND: ClassVar[FrameKind] = FrameKind.TICKET
    direction: TicketDirection
    port: Annotated[int, Range(1, 65535)]
    token: Annotated[bytes, Size(32, 32)]
    key: Annotated[bytes, Size(32, 32)] | None
    expires_at: U64
    blobs: Annotated[tuple[TicketBlob, ...], Size(0, MAX_TICKET_BLOBS)]

    @property
    def digests(self) -> tuple[bytes, ...]:
        return tuple(blob.digest for blob in self.blobs)


@dataclass(frozen=True, kw_only=True)
class ProgressFrame(Struct):
    """Worker → client: ``done`` of ``total`` units of ``phase``; informative only."""

    KIND: ClassVar[FrameKind] = FrameKind.PROGRESS
    phase: Annotated[str, Size(1, 32)]
    done: U64
    total: U64


@dataclass(frozen=True, kw_only=True)
class AbortFrame(Struct):
    """Either side: the negotiation ends now, unsigned; ``reason`` is a reason code string."""

    KIND: ClassVar[FrameKind] = FrameKind.ABORT
    reason: Annotated[str, Size(1, 64)]
    detail: Annotated[str, Size(0, 512)]


@dataclass(frozen=True, kw_only=True)
class TraceRequestFrame(Struct):
    """Client → worker, after a result: send the trace's leaves (when ``leaves``) and the output tensors of
    ``nodes`` (ascending, distinct) from the committed trace (specs/verification.md §10)."""

    KIND: ClassVar[FrameKind] = FrameKind.TRACE_REQUEST
    leaves: bool
    nodes: Annotated[tuple[Annotated[int, Range(0, MAX_TRACE_LENGTH - 1)], ...], Size(0, MAX_TRACE_REQUEST_NODES)]


@dataclass(frozen=True, kw_only=True)
class TraceFrame(Struct):
    """Worker → client, answering a ``trace_request``: leaves ``first ..`` of the trace, in order (when the request
    asked for them), and in the answer's ``last`` frame the requested nodes whose tensors it cannot send
    (``unavailable``). The tensors of the other requested nodes follow as ``blobs`` frames or one download
    ticket."""

    KIND: ClassVar[FrameKind] = FrameKind.TRACE
    first: Annotated[int, Range(0, MAX_TRACE_LENGTH)]
    leaves: Annotated[tuple[TraceLeaf, ...], Size(0, MAX_LEAVES_PER_FRAME)]
    last: bool
    unavailable: Annotated[tuple[Annotated[int, Range(0, MAX_TRACE_LENGTH - 1)], ...], Size(0, MAX_TRACE_REQUEST_NODES)]


Frame = (
    RequestFrame | SignedFrame | BlobsFrame | TicketFrame | ProgressFrame | AbortFrame | TraceRequestFrame | TraceFrame
)
_FRAME_CLASSES: dict[str, type[Struct]] = {
    cls.KIND.value: cls
    for cls in (
        RequestFrame,
        SignedFrame,
        BlobsFrame,
        TicketFrame,
        ProgressFrame,
        AbortFrame,
        TraceRequestFrame,
        TraceFrame,
    )
}


def _check_frame(frame: Struct, error: type[P2PComputeError]) -> None:
    """Invariants a schema cannot state."""
    if isinstance(frame, BlobsFrame):
        for i, chunk in enumerate(frame.chunks):
            if chunk.offset + len(chunk.data) > chunk.total:
                raise error(
                    Reason.INCONSISTENT, f"chunks[{i}]: offset {chunk.offset} + {len(chunk.data)} > {chunk.total}"
                )
            if not chunk.data and chunk.total:
                raise error(Reason.INCONSISTENT, f"chunks[{i}]: empty chunk of a non-empty tensor")
    elif isinstance(frame, ProgressFrame):
        if frame.done > frame.total:
            raise error(Reason.INCONSISTENT, f"progress {frame.done} > total {frame.total}")
    elif isinstance(frame, TicketFrame) and len(set(frame.digests)) != len(frame.blobs):
        raise error(Reason.INCONSISTENT, "a digest is named twice")
    elif isinstance(frame, TraceRequestFrame) and any(a >= b for a, b in itertools.pairwise(frame.nodes)):
        raise error(Reason.INCONSISTENT, "trace_request nodes must be ascending and distinct")
    elif isinstance(frame, TraceFrame):
        for i, leaf in enumerate(frame.leaves):
            if leaf.node != frame.first + i:
                raise error(Reason.INCONSISTENT, f"leaf {frame.first + i} names node {leaf.node}")
        if frame.unavailable and not frame.last:
            raise error(Reason.INCONSISTENT, "unavailable nodes are named in an answer's last frame only")


def encode_frame_payload(frame: Frame) -> bytes:
    """The canonical msgpack map of ``frame`` (its fields plus ``kind``); raises :class:`LocalProtocolError`."""
    cls = type(frame)
    if cls not in _FRAME_CLASSES.values():
        raise LocalProtocolError(Reason.WRONG_TYPE, f"{cls.__name__} is not a job stream frame")
    _check_frame(frame, LocalProtocolError)
    wire = to_wire(frame)
    wire["kind"] = frame.KIND.value
    data = codec.pack(wire)
    if len(data) > codec.MAX_FRAME_SIZE:
        raise LocalProtocolError(Reason.FRAME_TOO_LARGE, f"{frame.KIND} frame of {len(data)} bytes")
    return data


def decode_frame_payload(data: bytes) -> Frame:
    """Decode one untrusted frame body; raises only :class:`RemoteProtocolError` subclasses."""
    value = codec.unpack(data)
    if not isinstance(value, dict):
        raise SchemaError(Reason.NOT_A_MAP, f"frame is a {type(value).__name__}, not a map")
    kind = value.pop("kind", None)
    if kind is None:
        raise SchemaError(Reason.MISSING_FIELD, "frame has no kind")
    if not isinstance(kind, str):
        raise SchemaError(Reason.WRONG_TYPE, f"frame kind is a {type(kind).__name__}")
    cls = _FRAME_CLASSES.get(kind)
    if cls is None:
        raise SchemaError(Reason.OUT_OF_RANGE, f"unknown frame kind {kind[:32]!r}")
    frame = from_wire(cls, value, f"{kind} frame")
    _check_frame(frame, SchemaError)
    assert isinstance(
        frame,
        (RequestFrame, SignedFrame, BlobsFrame, TicketFrame, ProgressFrame, AbortFrame, TraceRequestFrame, TraceFrame),
    )
    return frame


_CHUNK_OVERHEAD = 128  # keys, digest, two u64, bin header: generous
_FRAME_OVERHEAD = 64


def blob_frames(
    blobs: Iterable[tuple[bytes, bytes]], max_frame_size: int = codec.MAX_FRAME_SIZE
) -> Iterator[BlobsFrame]:
    """Cut ``(digest, raw bytes)`` pairs into :class:`BlobsFrame` s that each encode to at most ``max_frame_size``."""
    budget = max_frame_size - _FRAME_OVERHEAD
    piece = min(MAX_BLOB_CHUNK_SIZE, budget - _CHUNK_OVERHEAD)
    if piece < 1:
        raise ValueError(f"max_frame_size {max_frame_size} leaves no room for data")
    chunks: list[BlobChunk] = []
    used = 0
    for digest, data in blobs:
        view = memoryview(data)
        offsets = range(0, len(data), piece) if data else range(1)
        for offset in offsets:
            room = budget - used - _CHUNK_OVERHEAD
            if chunks and (room < min(piece, len(data) - offset) or len(chunks) == MAX_CHUNKS_PER_FRAME):
                yield BlobsFrame(chunks=tuple(chunks))
                chunks, used = [], 0
            part = bytes(view[offset : offset + piece])
            chunks.append(BlobChunk(digest=digest, offset=offset, total=len(data), data=part))
            used += len(part) + _CHUNK_OVERHEAD
    if chunks:
        yield BlobsFrame(chunks=tuple(chunks))


class BlobAssembler:
    """Rebuilds expected tensors from :class:`BlobsFrame` chunks, in order, checking size and hash.

    Memory is bounded by the expected tensors' sizes. Reasons: ``unexpected_blob`` (a tensor not expected, or one
    already complete), ``shape_mismatch`` (``total`` is not the tensor's size), ``transfer_failed`` (a chunk out of
    order), ``hash_mismatch`` (the bytes do not hash to the digest).
    """

    def __init__(self, expected: Iterable[TensorMeta]) -> None:
        self._expected = {meta.digest: meta for meta in expected}
        self._buffers: dict[bytes, bytearray] = {}
        self._done: dict[bytes, bytes] = {}

    def feed(self, frame: BlobsFrame) -> list[bytes]:
        """Take a frame's chunks; return the digests they completed."""
        completed: list[bytes] = []
        for chunk in frame.chunks:
            meta = self._expected.get(chunk.digest)
            if meta is None:
                raise TransferError(Reason.UNEXPECTED_BLOB, f"tensor {chunk.digest.hex()[:16]} not expected")
            if chunk.digest in self._done:
                raise TransferError(Reason.UNEXPECTED_BLOB, f"tensor {chunk.digest.hex()[:16]} already complete")
            if chunk.total != meta.nbytes:
                raise JobFormatError(Reason.SHAPE_MISMATCH, f"tensor {chunk.digest.hex()[:16]}: total {chunk.total}")
            buffer = self._buffers.setdefault(chunk.digest, bytearray())
            if chunk.offset != len(buffer):
                raise TransferError(
                    Reason.TRANSFER_FAILED, f"chunk at offset {chunk.offset}, expected {len(buffer)} (in order)"
                )
            buffer += chunk.data
            if len(buffer) == meta.nbytes:
                data = bytes(self._buffers.pop(chunk.digest))
                check_blob(meta, data)
                self._done[chunk.digest] = data
                completed.append(chunk.digest)
        return completed

    @property
    def complete(self) -> bool:
        return len(self._done) == len(self._expected)

    @property
    def missing(self) -> frozenset[bytes]:
        return frozenset(self._expected) - frozenset(self._done)

    def blobs(self) -> dict[bytes, bytes]:
        """The completed tensors' bytes by digest."""
        return dict(self._done)


# --- events -----------------------------------------------------------------------------------------------------


class Role(StrEnum):
    CLIENT = "client"
    WORKER = "worker"


class EventKind(StrEnum):
    REQUEST = "request"
    OFFER = "offer"
    DECLINE = "decline"
    ACCEPT = "accept"
    BLOBS = "blobs"
    UPLOAD_TICKET = "upload_ticket"
    DOWNLOAD_TICKET = "download_ticket"
    PROGRESS = "progress"
    RESULT = "result"
    FAILED = "failed"
    RECEIPT = "receipt"
    REJECTION = "rejection"
    ABORT = "abort"
    TRACE_REQUEST = "trace_request"
    TRACE_PART = "trace_part"  # a trace frame that is not its answer's last
    TRACE_END = "trace_end"  # the last trace frame of an answer


class _Event:
    """Base of the events: ``kind`` is the class's ``KIND`` (a frame's direction refines it for tickets)."""

    __slots__ = ()
    KIND: ClassVar[EventKind]

    @property
    def kind(self) -> EventKind:
        return self.KIND


@dataclass(frozen=True, slots=True)
class Request(_Event):
    KIND: ClassVar[EventKind] = EventKind.REQUEST
    opened: Opened[JobRequest]
    spec: bytes


@dataclass(frozen=True, slots=True)
class Offer(_Event):
    KIND: ClassVar[EventKind] = EventKind.OFFER
    opened: Opened[JobOffer]


@dataclass(frozen=True, slots=True)
class Decline(_Event):
    KIND: ClassVar[EventKind] = EventKind.DECLINE
    opened: Opened[JobDecline]


@dataclass(frozen=True, slots=True)
class Accept(_Event):
    KIND: ClassVar[EventKind] = EventKind.ACCEPT
    opened: Opened[JobAccept]


@dataclass(frozen=True, slots=True)
class Result(_Event):
    KIND: ClassVar[EventKind] = EventKind.RESULT
    opened: Opened[JobResult]


@dataclass(frozen=True, slots=True)
class Failed(_Event):
    KIND: ClassVar[EventKind] = EventKind.FAILED
    opened: Opened[JobFailed]


@dataclass(frozen=True, slots=True)
class Receipt(_Event):
    KIND: ClassVar[EventKind] = EventKind.RECEIPT
    opened: Opened[JobReceipt]


@dataclass(frozen=True, slots=True)
class Rejection(_Event):
    KIND: ClassVar[EventKind] = EventKind.REJECTION
    opened: Opened[JobRejection]


@dataclass(frozen=True, slots=True)
class Blobs(_Event):
    KIND: ClassVar[EventKind] = EventKind.BLOBS
    frame: BlobsFrame


@dataclass(frozen=True, slots=True)
class Ticket(_Event):
    frame: TicketFrame

    @property
    def kind(self) -> EventKind:
        """``upload_ticket`` or ``download_ticket``: the direction decides where the ticket is legal."""
        return EventKind.UPLOAD_TICKET if self.frame.direction is TicketDirection.UPLOAD else EventKind.DOWNLOAD_TICKET


@dataclass(frozen=True, slots=True)
class Progress(_Event):
    KIND: ClassVar[EventKind] = EventKind.PROGRESS
    frame: ProgressFrame


@dataclass(frozen=True, slots=True)
class Abort(_Event):
    KIND: ClassVar[EventKind] = EventKind.ABORT
    frame: AbortFrame


@dataclass(frozen=True, slots=True)
class TraceRequest(_Event):
    KIND: ClassVar[EventKind] = EventKind.TRACE_REQUEST
    frame: TraceRequestFrame


@dataclass(frozen=True, slots=True)
class Trace(_Event):
    frame: TraceFrame

    @property
    def kind(self) -> EventKind:
        """``trace_end`` for an answer's last frame (the tensors may follow), ``trace_part`` before it."""
        return EventKind.TRACE_END if self.frame.last else EventKind.TRACE_PART


Event = (
    Request
    | Offer
    | Decline
    | Accept
    | Result
    | Failed
    | Receipt
    | Rejection
    | Blobs
    | Ticket
    | Progress
    | Abort
    | TraceRequest
    | Trace
)
SignedEvent = Offer | Decline | Accept | Result | Failed | Receipt | Rejection

_SIGNED_EVENTS: dict[type[Message], type[SignedEvent]] = {
    JobOffer: Offer,
    JobDecline: Decline,
    JobAccept: Accept,
    JobResult: Result,
    JobFailed: Failed,
    JobReceipt: Receipt,
    JobRejection: Rejection,
}


def seal_opened(keypair: KeyPair, message: M) -> Opened[M]:
    """Seal ``message`` with ``keypair`` and wrap it as the :class:`Opened` a send event carries."""
    return Opened(message=message, signer=keypair.peer_id, envelope=seal(keypair, message))


def event_from_frame(frame: Frame, *, signer: PeerId) -> Event:
    """Turn a received frame into an event, opening any envelope with its signer pinned to the peer ``signer``.

    Raises only :class:`RemoteProtocolError` subclasses (envelope reasons; ``unexpected_message`` for a request
    envelope outside the request frame).
    """
    if isinstance(frame, RequestFrame):
        request: Opened[JobRequest] = open_envelope(frame.envelope, JOB_REGISTRY, expect=JobRequest, signer=signer)
        return Request(opened=request, spec=frame.spec)
    if isinstance(frame, SignedFrame):
        opened: Opened[Message] = open_envelope(frame.envelope, JOB_REGISTRY, signer=signer)
        event_cls = _SIGNED_EVENTS.get(type(opened.message))
        if event_cls is None:
            raise RemoteProtocolError(Reason.UNEXPECTED_MESSAGE, f"{opened.message.TYPE} outside a request frame")
        return event_cls(opened=opened)  # type: ignore[arg-type]
    if isinstance(frame, BlobsFrame):
        return Blobs(frame=frame)
    if isinstance(frame, TicketFrame):
        return Ticket(frame=frame)
    if isinstance(frame, ProgressFrame):
        return Progress(frame=frame)
    if isinstance(frame, TraceRequestFrame):
        return TraceRequest(frame=frame)
    if isinstance(frame, TraceFrame):
        return Trace(frame=frame)
    return Abort(frame=frame)


def frame_of(event: Event) -> Frame:
    """The frame that carries ``event`` on the stream (what the adapter writes after :meth:`send`)."""
    if isinstance(event, Request):
        return RequestFrame(envelope=event.opened.envelope, spec=event.spec)
    if isinstance(event, (Blobs, Ticket, Progress, Abort, TraceRequest, Trace)):
        return event.frame
    return SignedFrame(envelope=event.opened.envelope)


def abort_frame(error: P2PComputeError) -> AbortFrame:
    """The abort frame that reports ``error`` to the peer."""
    return AbortFrame(reason=error.reason.value, detail=error.detail.encode()[:512].decode("utf-8", "ignore"))


# --- the conversation table -------------------------------------------------------------------------------------


class State(Enum):
    IDLE = "IDLE"
    REQUESTED = "REQUESTED"
    OFFERED = "OFFERED"
    INPUTS = "INPUTS"
    RUNNING = "RUNNING"
    OUTPUTS = "OUTPUTS"
    TRACE_ASKED = "TRACE_ASKED"
    TRACED = "TRACED"
    DONE = "DONE"
    DECLINED = "DECLINED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    ABORTED = "ABORTED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"
    ERROR = "ERROR"


C, W = Role.CLIENT, Role.WORKER
K = EventKind

TRANSITIONS: Mapping[State, Mapping[tuple[Role, EventKind], State]] = {
    State.IDLE: {(C, K.REQUEST): State.REQUESTED},
    State.REQUESTED: {(W, K.OFFER): State.OFFERED, (W, K.DECLINE): State.DECLINED},
    State.OFFERED: {(C, K.ACCEPT): State.INPUTS},
    State.INPUTS: {
        (C, K.BLOBS): State.INPUTS,
        (W, K.UPLOAD_TICKET): State.INPUTS,
        (W, K.PROGRESS): State.RUNNING,
        (W, K.RESULT): State.OUTPUTS,
        (W, K.FAILED): State.FAILED,
    },
    State.RUNNING: {
        (W, K.PROGRESS): State.RUNNING,
        (W, K.RESULT): State.OUTPUTS,
        (W, K.FAILED): State.FAILED,
    },
    State.OUTPUTS: {
        (W, K.BLOBS): State.OUTPUTS,
        (W, K.DOWNLOAD_TICKET): State.OUTPUTS,
        (C, K.TRACE_REQUEST): State.TRACE_ASKED,
        (C, K.RECEIPT): State.DONE,
        (C, K.REJECTION): State.REJECTED,
    },
    State.TRACE_ASKED: {
        (W, K.TRACE_PART): State.TRACE_ASKED,
        (W, K.TRACE_END): State.TRACED,
        (C, K.REJECTION): State.REJECTED,
    },
    State.TRACED: {
        (W, K.BLOBS): State.TRACED,
        (W, K.DOWNLOAD_TICKET): State.TRACED,
        (C, K.TRACE_REQUEST): State.TRACE_ASKED,
        (C, K.RECEIPT): State.DONE,
        (C, K.REJECTION): State.REJECTED,
    },
}
"""state → (sender, event kind) → next state. The same conversation for both roles: a role *sends* the events
it is the sender of and *receives* the others. Terminal states have no entries."""

ANY_STATE_TRANSITIONS: Mapping[str, State] = {
    "receive abort": State.ABORTED,
    "timeout": State.TIMED_OUT,
    "cancel": State.CANCELLED,
}
"""What moves any non-terminal state, besides the table: a peer's abort frame, a local timeout, a local cancel.
An illegal or invalid event moves any state to ERROR."""

TERMINAL = frozenset(
    {
        State.DONE,
        State.DECLINED,
        State.FAILED,
        State.REJECTED,
        State.ABORTED,
        State.TIMED_OUT,
        State.CANCELLED,
        State.ERROR,
    }
)
NON_TERMINAL = frozenset(State) - TERMINAL


def state_diagram(role: Role) -> str:
    """Mermaid ``stateDiagram-v2`` text of the table as ``role`` sees it (``send``/``receive`` labels)."""
    lines = ["stateDiagram-v2", "    [*] --> IDLE"]
    for state, moves in TRANSITIONS.items():
        for (sender, kind), target in moves.items():
            verb = "send" if sender is role else "receive"
            lines.append(f"    {state.value} --> {target.value}: {verb} {kind.value}")
    for label, target in ANY_STATE_TRANSITIONS.items():
        lines.append(f"    {target.value}: {target.value} (any non-terminal state, on {label})")
    lines.append(f"    {State.ERROR.value}: ERROR (any state, on an illegal or invalid event)")
    for state in State:
        if state in TERMINAL:
            lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines) + "\n"


# --- policy and admission ---------------------------------------------------------------------------------------


MESSAGE_TTL_MS = 120_000
"""``expires_at - now`` of every signed negotiation message: an offer binds the worker this long at most."""
MAX_CLOCK_SKEW_MS = 10_000
"""How far a peer's clock may run ahead of ours: a receiver refuses messages living longer than
``MESSAGE_TTL_MS + MAX_CLOCK_SKEW_MS`` (its replay cache's ``max_ttl_ms``)."""


@dataclass(frozen=True, slots=True)
class NegotiationPolicy:
    """Named timeouts (ms) and bounds of one negotiation (specs/negotiation.md §Timeouts and §Bounds)."""

    request_timeout_ms: int = 5_000  # stream opened → request (IDLE: a peer that opens a stream and says nothing)
    offer_timeout_ms: int = 10_000  # request → offer or decline
    accept_timeout_ms: int = 10_000  # offer → accept
    inputs_timeout_ms: int = 60_000  # accept → first progress or result (inputs uploaded); never past the deadline
    receipt_timeout_ms: int = 30_000  # result → receipt or rejection (outputs transferred and verified)
    trace_timeout_ms: int = 60_000  # first trace request → receipt or rejection (the client's checks)
    max_streams_per_peer: int = 4  # concurrent job streams with one peer; more are reset
    max_streams_per_group: int = 16  # ... with all peers of one address group (matching.address_group)
    max_pending_inputs_per_peer: int = 2  # accepted jobs of one peer whose inputs have not all arrived; more: busy
    max_pending_inputs_per_group: int = 4  # ... of one address group

    def __post_init__(self) -> None:
        for name in (
            "request_timeout_ms",
            "offer_timeout_ms",
            "accept_timeout_ms",
            "inputs_timeout_ms",
            "receipt_timeout_ms",
            "trace_timeout_ms",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "max_streams_per_peer",
            "max_streams_per_group",
            "max_pending_inputs_per_peer",
            "max_pending_inputs_per_group",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a worker has free now and charges; the input of :func:`admission`."""

    free_slots: int
    memory_bytes: int  # the largest job memory this worker can ever hold
    free_memory_bytes: int
    device_kinds: frozenset[DeviceKind]
    tflops: float  # measured throughput of the device jobs run on
    price_per_second: int  # micro-credits per job-second
    min_price: int = matching.DEFAULT_MIN_PRICE  # micro-credits: the least any job costs
    overhead_ms: int = matching.DEFAULT_OVERHEAD_MS  # fixed per-job cost (loading, transfer set-up)
    queue_ms: int = 0  # expected wait before the job starts
    max_input_bytes: int = 1 << 30
    max_output_bytes: int = 1 << 30
    max_ops: int = 10_000
    shutting_down: bool = False


@dataclass(frozen=True, slots=True)
class Admit:
    """Admission's yes: the price (micro-credits) and expected run time to put in the offer."""

    price: int
    expected_ms: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """Admission's no: the decline reason and a short detail."""

    reason: DeclineReason
    detail: str


def estimate_run_ms(summary: Requirements, capacity: Capacity) -> int:
    """Overhead plus ``flops`` at the measured throughput, rounded up (``core.matching.run_estimate_ms``)."""
    return run_estimate_ms(summary.flops, capacity.tflops, capacity.overhead_ms)


def job_price(run_ms: int, capacity: Capacity) -> int:
    """``max(min_price, ceil(run_ms * price_per_second / 1000))`` micro-credits (``core.matching.job_price``)."""
    return matching.job_price(run_ms, capacity.price_per_second, capacity.min_price)


def admission(
    request: JobRequest,
    summary: Requirements,
    capacity: Capacity,
    *,
    now: int,
    owing: frozenset[PeerId] = frozenset(),
) -> Admit | Refuse:
    """Decide whether to offer: the first failing rule, in order, gives the decline reason.

    ``summary`` is the worker's own measurement of the spec (its meta dry run), not the client's claim;
    ``owing`` holds the clients that owe receipts.
    """
    if capacity.shutting_down:
        return Refuse(DeclineReason.SHUTTING_DOWN, "worker is shutting down")
    if request.client in owing:
        return Refuse(DeclineReason.CLIENT_OWES, "receipts for earlier results are outstanding")
    kind = request.requirements.device_kind or summary.device_kind
    if kind is not None and kind not in capacity.device_kinds:
        return Refuse(DeclineReason.UNSUPPORTED, f"no {kind.value} device")
    too_large = [
        (summary.memory_bytes, capacity.memory_bytes, "memory"),
        (summary.input_bytes, capacity.max_input_bytes, "input bytes"),
        (summary.output_bytes, capacity.max_output_bytes, "output bytes"),
        (summary.op_count, capacity.max_ops, "ops"),
    ]
    for need, limit, what in too_large:
        if need > limit:
            return Refuse(DeclineReason.TOO_LARGE, f"{what} {need} over {limit}")
    if capacity.free_slots < 1:
        return Refuse(DeclineReason.BUSY, "no free slot")
    if summary.memory_bytes > capacity.free_memory_bytes:
        return Refuse(DeclineReason.BUSY, f"memory {summary.memory_bytes} over free {capacity.free_memory_bytes}")
    run_ms = estimate_run_ms(summary, capacity)
    if now + capacity.queue_ms + run_ms > request.deadline:
        return Refuse(
            DeclineReason.DEADLINE, f"would finish {now + capacity.queue_ms + run_ms - request.deadline} ms late"
        )
    price = job_price(run_ms, capacity)
    if price > request.max_price:
        return Refuse(DeclineReason.PRICE_TOO_LOW, f"price {price} over max_price {request.max_price}")
    return Admit(price=price, expected_ms=run_ms)


_Bad = Callable[..., NoReturn]
"""Raises the error of a failed check: :class:`LocalProtocolError` for our events, the given remote class else."""


# --- the machines -----------------------------------------------------------------------------------------------


class _Negotiation:
    ROLE: ClassVar[Role]

    def __init__(
        self, *, local: PeerId, remote: PeerId, policy: NegotiationPolicy | None = None, opened_at: int | None = None
    ) -> None:
        """``opened_at``: when the stream opened (ms); the request is then due ``request_timeout_ms`` after it."""
        if local == remote:
            raise ValueError("a negotiation needs two different peers")
        self.opened_at = opened_at
        self.local = local
        self.remote = remote
        self.policy = policy or NegotiationPolicy()
        self._state = State.IDLE
        self._entered_at: int | None = None
        self.error: P2PComputeError | None = None
        self.request: Opened[JobRequest] | None = None
        self.spec: bytes | None = None
        self.offer: Opened[JobOffer] | None = None
        self.decline: Opened[JobDecline] | None = None
        self.accept: Opened[JobAccept] | None = None
        self.result: Opened[JobResult] | None = None
        self.failed: Opened[JobFailed] | None = None
        self.receipt: Opened[JobReceipt] | None = None
        self.rejection: Opened[JobRejection] | None = None
        self.upload_ticket: TicketFrame | None = None
        self.download_ticket: TicketFrame | None = None
        self.progress: ProgressFrame | None = None
        self.peer_abort: AbortFrame | None = None
        # the committed trace (after a result): its leaves as they arrive, and the request being answered
        self.trace_leaves: list[TraceLeaf] = []
        self.trace_rounds = 0
        self.trace_request: TraceRequestFrame | None = None
        self._traced_at = 0  # when the first trace request was sent or received: the checks' time starts
        self._now = 0
        self.trace_expected: dict[bytes, int] = {}  # tensors the open request's answer may carry
        self.trace_ticket: TicketFrame | None = None
        self._trace_unavailable: frozenset[int] = frozenset()

    @property
    def state(self) -> State:
        return self._state

    @property
    def client(self) -> PeerId:
        return self.local if self.ROLE is Role.CLIENT else self.remote

    @property
    def worker(self) -> PeerId:
        return self.remote if self.ROLE is Role.CLIENT else self.local

    @property
    def transcript(self) -> tuple[Opened[Message], ...]:
        """Every signed message of the exchange so far, in order (each names the one before)."""
        parts: list[Opened[Any] | None] = [
            self.request,
            self.offer or self.decline,
            self.accept,
            self.result or self.failed,
            self.receipt or self.rejection,
        ]
        return tuple(p for p in parts if p is not None)

    # -- driving ---------------------------------------------------------------------------------------------------

    def send(self, event: Event, now: int) -> State:
        """Record an event this side is about to write; raises :class:`LocalProtocolError` (then state is ERROR)."""
        return self._apply(event, self.ROLE, now)

    def receive(self, event: Event, now: int) -> State:
        """Apply an event the peer sent; raises a :class:`RemoteProtocolError` (then state is ERROR)."""
        return self._apply(event, Role.WORKER if self.ROLE is Role.CLIENT else Role.CLIENT, now)

    def on_timeout(self, now: int) -> State:
        """The adapter's timer for the current phase ran out: TIMED_OUT (no change in a terminal state)."""
        return self._interrupt(State.TIMED_OUT, now)

    def cancel(self, now: int) -> State:
        """The local caller gave up: CANCELLED (no change in a terminal state)."""
        return self._interrupt(State.CANCELLED, now)

    def timeout_at(self) -> int | None:
        """When the current phase must have moved on (ms since the epoch); None at the end, and before the request
        unless the machine knows when its stream opened (``opened_at``)."""
        if self._state is State.IDLE:
            return None if self.opened_at is None else self.opened_at + self.policy.request_timeout_ms
        if self._state in TERMINAL or self._entered_at is None:
            return None
        assert self.request is not None
        deadline = self.request.message.deadline
        p = self.policy
        if self._state is State.REQUESTED:
            return self._entered_at + p.offer_timeout_ms
        if self._state is State.OFFERED:
            return self._entered_at + p.accept_timeout_ms
        if self._state is State.INPUTS:
            return min(self._entered_at + p.inputs_timeout_ms, deadline)
        if self._state is State.RUNNING:
            return deadline
        if self._state in (State.TRACE_ASKED, State.TRACED):
            return self._traced_at + p.trace_timeout_ms
        return self._entered_at + p.receipt_timeout_ms

    def _interrupt(self, target: State, now: int) -> State:
        if self._state not in TERMINAL:
            self._state = target
            self._entered_at = now
        return self._state

    def _apply(self, event: Event, sender: Role, now: int) -> State:
        local = sender is self.ROLE
        self._now = now
        target: State | None = None
        if self._state not in TERMINAL:
            if event.kind is EventKind.ABORT:
                target = None if local else State.ABORTED
            else:
                target = TRANSITIONS[self._state].get((sender, event.kind))
        if target is None:
            verb = "send" if local else "receive"
            error: P2PComputeError = (
                LocalProtocolError(Reason.BAD_TRANSITION, f"cannot {verb} {event.kind.value} in {self._state.value}")
                if local
                else RemoteProtocolError(
                    Reason.UNEXPECTED_MESSAGE, f"{event.kind.value} not expected in {self._state.value}"
                )
            )
            self._fail(error)
        try:
            self._check(event, sender, local, now)
        except P2PComputeError as exc:
            self._fail(exc)
        assert target is not None
        self._record(event)
        if target is not self._state:  # a phase's clock starts when it is entered, not at each frame within it
            self._entered_at = now
        self._state = target
        return target

    def _fail(self, error: P2PComputeError) -> NoReturn:
        self._state = State.ERROR
        self.error = error
        raise error

    # -- checks ----------------------------------------------------------------------------------------------------

    def _check(self, event: Event, sender: Role, local: bool, now: int) -> None:
        def bad(reason: Reason, detail: str, remote_cls: type[RemoteProtocolError] = RemoteProtocolError) -> NoReturn:
            raise (LocalProtocolError if local else remote_cls)(reason, detail)

        if isinstance(event, Request):
            self._check_request(event, now, bad)
            return
        if isinstance(event, TraceRequest):
            self._check_trace_request(event.frame, bad)
            return
        if isinstance(event, Trace):
            self._check_trace(event.frame, bad)
            return
        if isinstance(event, (Blobs, Ticket, Progress, Abort)):
            self._check_frame_event(event, now, bad)
            return
        opened: Opened[Any] = event.opened
        message: JobOffer | JobDecline | JobAccept | JobResult | JobFailed | JobReceipt | JobRejection = opened.message
        sender_id = self.client if sender is Role.CLIENT else self.worker
        if opened.signer != sender_id or message.claimed_signer != sender_id:
            bad(
                Reason.SIGNER_MISMATCH,
                f"{message.TYPE} signed by {opened.signer}, expected {sender_id}",
                SignatureError,
            )
        assert self.request is not None
        request = self.request.message
        if message.id != request.id:
            bad(Reason.CHAIN_MISMATCH, f"{message.TYPE} names negotiation {message.id.hex()}, not {request.id.hex()}")
        if message.client != self.client or message.worker != self.worker:
            bad(Reason.TERMS_MISMATCH, f"{message.TYPE} is between {message.client} and {message.worker}")
        if message.expires_at <= now:
            bad(Reason.EXPIRED, f"{message.TYPE} expired {now - message.expires_at} ms ago", ReplayError)
        if not isinstance(message, JobDecline) and message.job_digest != request.job_digest:
            bad(Reason.TERMS_MISMATCH, f"{message.TYPE} names another job")
        if isinstance(message, (JobOffer, JobDecline, JobAccept)) and message.request_hash != self.request.digest:
            bad(Reason.CHAIN_MISMATCH, f"{message.TYPE}.request_hash is not the request's digest")
        if isinstance(message, JobOffer) and message.price > request.max_price:
            bad(Reason.TERMS_MISMATCH, f"price {message.price} over max_price {request.max_price}")
        if isinstance(message, JobAccept):
            assert self.offer is not None
            if message.offer_hash != self.offer.digest:
                bad(Reason.CHAIN_MISMATCH, "accept.offer_hash is not the offer's digest")
            if message.price != self.offer.message.price:
                bad(Reason.TERMS_MISMATCH, f"accept price {message.price}, offer price {self.offer.message.price}")
        if isinstance(message, (JobResult, JobFailed)):
            assert self.accept is not None
            if message.accept_hash != self.accept.digest:
                bad(Reason.CHAIN_MISMATCH, f"{message.TYPE}.accept_hash is not the accept's digest")
        if isinstance(message, JobResult):
            self._check_outputs(message, bad)
        if isinstance(message, (JobReceipt, JobRejection)):
            assert self.result is not None and self.accept is not None
            if message.result_hash != self.result.digest:
                bad(Reason.CHAIN_MISMATCH, f"{message.TYPE}.result_hash is not the result's digest")
            if isinstance(message, JobReceipt) and message.output_digest != self.result.message.output_digest:
                bad(Reason.TERMS_MISMATCH, "receipt names other outputs than the result")
            if isinstance(message, JobReceipt) and message.price != self.accept.message.price:
                bad(Reason.TERMS_MISMATCH, f"receipt price {message.price}, agreed {self.accept.message.price}")
        if isinstance(message, (JobOffer, JobAccept, JobResult)) and now > request.deadline:
            bad(Reason.EXPIRED, f"{message.TYPE} {now - request.deadline} ms after the deadline", ReplayError)

    def _check_request(self, event: Request, now: int, bad: _Bad) -> None:
        request = event.opened.message
        if event.opened.signer != self.client or request.client != self.client or request.worker != self.worker:
            bad(Reason.TERMS_MISMATCH, f"request is from {request.client} to {request.worker}")
        if len(event.spec) != request.spec_size or hashlib.sha256(event.spec).digest() != request.job_digest:
            bad(Reason.HASH_MISMATCH, "the spec bytes are not the ones the request names", JobFormatError)
        if request.expires_at <= now:
            bad(Reason.EXPIRED, f"request expired {now - request.expires_at} ms ago", ReplayError)
        if request.deadline <= now:
            bad(Reason.EXPIRED, f"request deadline passed {now - request.deadline} ms ago", ReplayError)

    def _check_trace_request(self, frame: TraceRequestFrame, bad: _Bad) -> None:
        assert self.result is not None
        length = self.result.message.trace_length
        if length == 0:
            bad(Reason.UNEXPECTED_MESSAGE, "the result commits to no trace")
        if self.trace_rounds >= MAX_TRACE_ROUNDS:
            bad(Reason.TOO_LONG, f"more than {MAX_TRACE_ROUNDS} trace requests")
        if not frame.leaves and not self.trace_rounds:
            bad(Reason.UNEXPECTED_MESSAGE, "the first trace request must ask for the leaves")
        if frame.nodes and frame.nodes[-1] >= length:
            bad(Reason.OUT_OF_RANGE, f"node {frame.nodes[-1]} of a trace of {length}")

    def _check_trace(self, frame: TraceFrame, bad: _Bad) -> None:
        assert self.result is not None
        request = self.trace_request
        assert request is not None  # the table allows trace frames only after a trace request
        length = self.result.message.trace_length
        if frame.leaves and (not request.leaves or frame.first != len(self.trace_leaves)):
            bad(Reason.UNEXPECTED_MESSAGE, f"leaves from {frame.first}, expected from {len(self.trace_leaves)}")
        if len(self.trace_leaves) + len(frame.leaves) > length:
            bad(Reason.BAD_TRACE, f"more leaves than the {length} the result commits to", TraceError)
        if not frame.last:
            return
        leaves = [*self.trace_leaves, *frame.leaves]
        if len(leaves) != length:
            bad(Reason.BAD_TRACE, f"{len(leaves)} leaves, the result commits to {length}", TraceError)
        if request.leaves and trace_root(leaves) != self.result.message.trace_root:
            bad(Reason.BAD_TRACE, "the leaves do not hash to the result's trace_root", TraceError)
        requested = set(request.nodes)
        if not set(frame.unavailable) <= requested:
            bad(Reason.INCONSISTENT, "unavailable names a node that was not requested")

    def _trace_round_expected(self) -> dict[bytes, int]:
        """The tensors the open request's answer may carry: outputs of requested nodes that are available."""
        request = self.trace_request
        assert request is not None
        expected: dict[bytes, int] = {}
        for node in request.nodes:
            if node in self._trace_unavailable:
                continue
            for meta in self.trace_leaves[node].outputs:
                expected[meta.digest] = meta.nbytes
        return expected

    def _check_frame_event(self, event: Blobs | Ticket | Progress | Abort, now: int, bad: _Bad) -> None:
        tracing = self._state is State.TRACED
        if isinstance(event, Ticket):
            if tracing:
                held: TicketFrame | None = self.trace_ticket
            else:
                held = self.upload_ticket if event.kind is EventKind.UPLOAD_TICKET else self.download_ticket
            if held is not None:
                bad(Reason.UNEXPECTED_MESSAGE, f"a second {event.kind.value}")
            if event.frame.expires_at <= now:
                bad(Reason.EXPIRED, f"ticket expired {now - event.frame.expires_at} ms ago", ReplayError)
        if self.result is None:
            return
        outputs = {meta.digest: meta.nbytes for meta in self.result.message.outputs}
        sizes = self.trace_expected if tracing else outputs
        if isinstance(event, Blobs):
            named = [(chunk.digest, chunk.total) for chunk in event.frame.chunks]
        elif isinstance(event, Ticket):
            named = [(blob.digest, blob.nbytes) for blob in event.frame.blobs]
        else:
            return
        for digest, nbytes in named:
            if digest not in sizes:
                what = "a requested trace tensor" if tracing else "an output of the result"
                bad(Reason.UNEXPECTED_BLOB, f"tensor {digest.hex()[:16]} is not {what}", TransferError)
            if nbytes != sizes[digest]:
                bad(
                    Reason.SHAPE_MISMATCH,
                    f"output {digest.hex()[:16]}: {nbytes} bytes, not {sizes[digest]}",
                    JobFormatError,
                )

    def _check_outputs(self, result: JobResult, bad: _Bad) -> None:
        assert self.request is not None
        if outputs_digest(result.outputs) != result.output_digest:
            bad(Reason.TERMS_MISMATCH, "output_digest does not match the outputs")
        total = 0
        for meta in result.outputs:
            try:
                total += meta.nbytes
            except JobFormatError as exc:
                bad(exc.reason, exc.detail, JobFormatError)
        limit = self.request.message.requirements.output_bytes
        if total > limit:
            bad(Reason.OUTPUT_TOO_LARGE, f"outputs of {total} bytes, the request allows {limit}", JobFormatError)

    def _record(self, event: Event) -> None:
        match event:
            case Request():
                self.request, self.spec = event.opened, event.spec
            case Offer():
                self.offer = event.opened
            case Decline():
                self.decline = event.opened
            case Accept():
                self.accept = event.opened
            case Result():
                self.result = event.opened
            case Failed():
                self.failed = event.opened
            case Receipt():
                self.receipt = event.opened
            case Rejection():
                self.rejection = event.opened
            case Ticket():
                if self._state is State.TRACED:
                    self.trace_ticket = event.frame
                elif event.kind is EventKind.UPLOAD_TICKET:
                    self.upload_ticket = event.frame
                else:
                    self.download_ticket = event.frame
            case TraceRequest():
                if not self.trace_rounds:
                    self._traced_at = self._now
                self.trace_request = event.frame
                self.trace_rounds += 1
                self.trace_expected = {}
                self.trace_ticket = None
                self._trace_unavailable = frozenset()
                if event.frame.leaves:
                    self.trace_leaves = []
            case Trace():
                self.trace_leaves.extend(event.frame.leaves)
                if event.frame.last:
                    self._trace_unavailable = frozenset(event.frame.unavailable)
                    self.trace_expected = self._trace_round_expected()
            case Progress():
                self.progress = event.frame
            case Abort():
                self.peer_abort = event.frame
            case Blobs():
                pass

    def _require(self, kind: EventKind) -> None:
        """Makers build only what may be sent now; misuse raises without changing state."""
        if self._state in TERMINAL or (self.ROLE, kind) not in TRANSITIONS[self._state]:
            raise LocalProtocolError(Reason.BAD_TRANSITION, f"cannot make {kind.value} in {self._state.value}")


class ClientNegotiation(_Negotiation):
    """The client's side: sends request, accept, blobs (inputs), receipt or rejection."""

    ROLE = Role.CLIENT

    def make_accept(self, *, nonce: int, expires_at: int) -> JobAccept:
        """Agreement to the offer received, repeating its terms."""
        self._require(EventKind.ACCEPT)
        assert self.request is not None and self.offer is not None
        return JobAccept(
            id=self.request.message.id,
            nonce=nonce,
            expires_at=expires_at,
            client=self.client,
            worker=self.worker,
            request_hash=self.request.digest,
            offer_hash=self.offer.digest,
            job_digest=self.request.message.job_digest,
            price=self.offer.message.price,
        )

    def make_receipt(self, *, nonce: int, expires_at: int, issued_at: int) -> JobReceipt:
        """Payment acknowledgement for the result received (call only after verifying the outputs)."""
        self._require(EventKind.RECEIPT)
        assert self.request is not None and self.accept is not None and self.result is not None
        return JobReceipt(
            id=self.request.message.id,
            nonce=nonce,
            expires_at=expires_at,
            client=self.client,
            worker=self.worker,
            result_hash=self.result.digest,
            job_digest=self.request.message.job_digest,
            output_digest=self.result.message.output_digest,
            price=self.accept.message.price,
            issued_at=issued_at,
        )

    def make_rejection(self, *, nonce: int, expires_at: int, reason: str, detail: str = "") -> JobRejection:
        """Refusal of the result received; nothing is owed."""
        self._require(EventKind.REJECTION)
        assert self.request is not None and self.result is not None
        return JobRejection(
            id=self.request.message.id,
            nonce=nonce,
            expires_at=expires_at,
            client=self.client,
            worker=self.worker,
            result_hash=self.result.digest,
            job_digest=self.request.message.job_digest,
            reason=reason,
            detail=detail,
        )


class WorkerNegotiation(_Negotiation):
    """The worker's side: sends offer or decline, tickets, progress, result or failed, blobs (outputs)."""

    ROLE = Role.WORKER

    def make_offer(self, admit: Admit, *, hardware_class: str, nonce: int, expires_at: int) -> JobOffer:
        """The offer for the request received, at the price and time :func:`admission` gave."""
        self._require(EventKind.OFFER)
        assert self.request is not None
        return JobOffer(
            id=self.request.message.id,
            nonce=nonce,
            expires_at=expires_at,
            worker=self.worker,
            client=self.client,
            request_hash=self.request.digest,
            job_digest=self.request.message.job_digest,
            price=admit.price,
            expected_ms=admit.expected_ms,
            hardware_class=hardware_class,
        )

    def make_decline(self, reason: DeclineReason, *, detail: str = "", nonce: int, expires_at: int) -> JobDecline:
        self._require(EventKind.DECLINE)
        assert self.request is not None
        return JobDecline(
            id=self.request.message.id,
            nonce=nonce,
            expires_at=expires_at,
            worker=self.worker,
            client=self.client,
            request_hash=self.request.digest,
            reason=reason,
            detail=detail,
        )

    def make_result(
        self,
        outputs: tuple[TensorMeta, ...],
        *,
        hardware_class: str,
        timings: Timings,
        trace_root: bytes,
        trace_length: int,
        nonce: int,
        expires_at: int,
    ) -> JobResult:
        """The signed attestation of ``outputs`` (their digest is computed here) and of the committed trace."""
        self._require(EventKind.RESULT)
        assert self.request is not None and self.accept is not None
        return JobResult(
            id=self.request.message.id,
            nonce=nonce,
            expires_at=expires_at,
            worker=self.worker,
            client=self.client,
            accept_hash=self.accept.digest,
            job_digest=self.request.message.job_digest,
            output_digest=outputs_digest(outputs),
            outputs=outputs,
            hardware_class=hardware_class,
            timings=timings,
            trace_root=trace_root,
            trace_length=trace_length,
        )

    def make_failed(self, reason: str, *, detail: str = "", nonce: int, expires_at: int) -> JobFailed:
        self._require(EventKind.FAILED)
        assert self.request is not None and self.accept is not None
        return JobFailed(
            id=self.request.message.id,
            nonce=nonce,
            expires_at=expires_at,
            worker=self.worker,
            client=self.client,
            accept_hash=self.accept.digest,
            job_digest=self.request.message.job_digest,
            reason=reason,
            detail=detail,
        )
