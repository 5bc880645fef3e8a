"""Signed message types and their registry (specs/00-conventions.md §Messages).

Every signed message is a frozen, keyword-only dataclass deriving from :class:`Message`. Besides its
own fields it carries the common header:

``version``     schema version of this message type (a different value is ``unsupported_version``)
``id``          16 bytes naming the thing the message is about (a job, an advert, a record)
``nonce``       u64 chosen by the signer; with ``id`` it makes the message unique for replay checks
``expires_at``  u64 milliseconds since the Unix epoch after which the message is void

Class-level metadata (not on the wire):

``TYPE``          the payload type string carried in the envelope
``DOMAIN``        the signing domain; one per message type, so a signature never transfers
``SIGNER_FIELD``  the field holding the peer id that must have signed the message
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, ClassVar, TypeVar

from p2pcompute.core import codec
from p2pcompute.core.identity import PeerId
from p2pcompute.core.schema import U32_MAX, U64_MAX, Range, Size, Struct, from_wire, to_wire
from p2pcompute.core.tensors import Digest, TensorMeta
from p2pcompute.core.trace import MAX_PROOF_LENGTH, TraceLeaf
from p2pcompute.errors import LocalProtocolError, Reason, SchemaError

MAX_TRACE_LENGTH = 1_000_000
"""Most leaves a result's trace may have: the job format's largest ``max_ops`` (= core.trace.MAX_TRACE_LEAVES)."""

__all__ = [
    "MAX_TRACE_LENGTH",
    "DEFAULT_REGISTRY",
    "JOB_MESSAGES",
    "CheatingEvidence",
    "ComparisonMode",
    "DeclineReason",
    "JobAccept",
    "JobDecline",
    "JobFailed",
    "JobOffer",
    "JobReceipt",
    "JobRejection",
    "JobRequest",
    "JobResult",
    "Requirements",
    "Timings",
    "MAX_CHECK_EVIDENCE_LEAVES",
    "MAX_CHECK_EVIDENCE_SPEC",
    "MAX_CHECK_EVIDENCE_TENSORS",
    "MAX_EVIDENCE_RESULTS",
    "CheckEvidence",
    "LeafProof",
    "MAX_RESULT_ENVELOPE_SIZE",
    "MESSAGE_ID_SIZE",
    "Device",
    "DeviceKind",
    "GpuAdvert",
    "Message",
    "MessageRegistry",
    "PeerRecord",
    "Software",
    "decode_message",
    "encode_message",
]

MESSAGE_ID_SIZE = 16

MessageId = Annotated[bytes, Size(MESSAGE_ID_SIZE, MESSAGE_ID_SIZE)]
U64 = Annotated[int, Range(0, U64_MAX)]
U32 = Annotated[int, Range(0, U32_MAX)]
Multiaddr = Annotated[str, Size(1, 256)]


@dataclass(frozen=True, kw_only=True)
class Message(Struct):
    """Base of every signed message type."""

    TYPE: ClassVar[str]
    DOMAIN: ClassVar[str]
    VERSION: ClassVar[int] = 1
    SIGNER_FIELD: ClassVar[str]

    version: U32 = 1
    id: MessageId
    nonce: U64
    expires_at: U64

    @property
    def claimed_signer(self) -> PeerId:
        """The peer id this message says signed it (the value of ``SIGNER_FIELD``)."""
        signer = getattr(self, self.SIGNER_FIELD)
        assert isinstance(signer, PeerId)
        return signer


M = TypeVar("M", bound=Message)


@dataclass(frozen=True, kw_only=True)
class PeerRecord(Message):
    """A peer's signed statement of the addresses it can be dialled on (after libp2p RFC 0003).

    A higher ``seq`` from the same peer replaces a lower one.
    """

    TYPE: ClassVar[str] = "p2pcompute/peer-record"
    DOMAIN: ClassVar[str] = "p2pcompute/peer-record/v1"
    SIGNER_FIELD: ClassVar[str] = "peer_id"

    peer_id: PeerId
    seq: U64
    addrs: Annotated[tuple[Multiaddr, ...], Size(1, 16)]


class DeviceKind(StrEnum):
    CUDA = "cuda"
    CPU = "cpu"


@dataclass(frozen=True, kw_only=True)
class Device(Struct):
    """One compute device a worker offers, with its measured throughput."""

    kind: DeviceKind
    name: Annotated[str, Size(1, 128)]
    memory_bytes: U64
    free_memory_bytes: U64
    tflops: Annotated[float, Range(0.0, 1e5)]
    compute_capability: Annotated[str, Size(0, 16)]
    cores: Annotated[int, Range(1, U32_MAX)]


@dataclass(frozen=True, kw_only=True)
class Software(Struct):
    """The software stack a worker runs jobs with (part of its hardware class)."""

    p2pcompute: Annotated[str, Size(1, 32)]
    torch: Annotated[str, Size(1, 64)]
    cuda: Annotated[str, Size(0, 32)]
    python: Annotated[str, Size(1, 32)]


@dataclass(frozen=True, kw_only=True)
class GpuAdvert(Message):
    """A worker's signed, expiring advert of its devices, price and free capacity (specs/adverts.md).

    ``price_per_second`` is in micro-credits per job-second (1 credit = 1,000,000). A higher ``seq``
    from the same peer replaces a lower one; ``issued_at`` and ``expires_at`` are ms since the epoch.
    """

    TYPE: ClassVar[str] = "p2pcompute/gpu-advert"
    DOMAIN: ClassVar[str] = "p2pcompute/gpu-advert/v1"
    SIGNER_FIELD: ClassVar[str] = "peer_id"

    peer_id: PeerId
    seq: U64
    issued_at: U64
    addrs: Annotated[tuple[Multiaddr, ...], Size(1, 16)]
    devices: Annotated[tuple[Device, ...], Size(1, 16)]
    price_per_second: U64
    slots_total: Annotated[int, Range(1, 1024)]
    slots_free: Annotated[int, Range(0, 1024)]
    software: Software


def encode_message(message: Message) -> bytes:
    """Canonical msgpack bytes of ``message``; raises :class:`LocalProtocolError` if it breaks its schema."""
    if not isinstance(message, Message):
        raise LocalProtocolError(Reason.WRONG_TYPE, f"{type(message).__name__} is not a Message")
    if message.version != message.VERSION:
        raise LocalProtocolError(
            Reason.UNSUPPORTED_VERSION, f"{message.TYPE} is version {message.VERSION}, not {message.version}"
        )
    return codec.pack(to_wire(message))


def decode_message(cls: type[M], data: bytes, limits: codec.DecodeLimits = codec.DEFAULT_LIMITS) -> M:
    """Decode untrusted bytes as a ``cls``; raises only :class:`RemoteProtocolError` subclasses.

    The version is checked first, so a message of another version is reported as
    ``unsupported_version`` rather than as whatever field differences that version has.
    """
    value = codec.unpack(data, limits)
    if isinstance(value, dict):
        version = value.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version != cls.VERSION:
            raise SchemaError(
                Reason.UNSUPPORTED_VERSION, f"{cls.TYPE} version {version}, this peer speaks {cls.VERSION}"
            )
    return from_wire(cls, value)


class MessageRegistry(Mapping[str, type[Message]]):
    """An immutable map from payload type to message class; checks types and domains are unique."""

    def __init__(self, *classes: type[Message]) -> None:
        by_type: dict[str, type[Message]] = {}
        domains: set[str] = set()
        for cls in classes:
            if cls.TYPE in by_type:
                raise ValueError(f"payload type {cls.TYPE!r} registered twice")
            if cls.DOMAIN in domains:
                raise ValueError(f"signing domain {cls.DOMAIN!r} used by two message types")
            by_type[cls.TYPE] = cls
            domains.add(cls.DOMAIN)
        self._by_type = by_type

    def __getitem__(self, payload_type: str) -> type[Message]:
        return self._by_type[payload_type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_type)

    def __len__(self) -> int:
        return len(self._by_type)

    def with_types(self, *classes: type[Message]) -> MessageRegistry:
        """A new registry holding these types as well."""
        return MessageRegistry(*self._by_type.values(), *classes)


# --- job negotiation (specs/negotiation.md) -------------------------------------------------------------------
#
# One negotiation between a client and a worker is named by ``id`` (16 random bytes chosen by the client);
# every message after the request names the SHA-256 of the envelope before it (``*_hash``), so the whole
# exchange can be checked offline. Prices are micro-credits for the whole job (1 credit = 1,000,000).

HardwareClass = Annotated[str, Size(1, 256)]
ReasonText = Annotated[str, Size(1, 64)]
DetailText = Annotated[str, Size(0, 512)]


@dataclass(frozen=True, kw_only=True)
class Requirements(Struct):
    """What a job needs from a worker, as the client measured it (dry run on the meta device)."""

    device_kind: DeviceKind | None
    memory_bytes: U64
    input_bytes: U64
    output_bytes: U64
    op_count: U32
    flops: U64


@dataclass(frozen=True, kw_only=True)
class Timings(Struct):
    """Where a job's time went on the worker, in milliseconds."""

    queue_ms: U32
    load_ms: U32
    exec_ms: U32
    total_ms: U32


class DeclineReason(StrEnum):
    BUSY = "busy"
    PRICE_TOO_LOW = "price_too_low"
    UNSUPPORTED = "unsupported"
    TOO_LARGE = "too_large"
    DEADLINE = "deadline"
    CLIENT_OWES = "client_owes"
    BAD_JOB = "bad_job"
    SHUTTING_DOWN = "shutting_down"
    CLAIM_MISMATCH = "claim_mismatch"  # the request's requirements disagree with the worker's own dry run
    DUPLICATE_ID = "duplicate_id"  # this client already used the request's job id with this worker


@dataclass(frozen=True, kw_only=True)
class JobRequest(Message):
    """Client → worker: run the job whose spec hashes to ``job_digest`` for at most ``max_price``, by ``deadline``."""

    TYPE: ClassVar[str] = "p2pcompute/job-request"
    DOMAIN: ClassVar[str] = "p2pcompute/job-request/v1"
    SIGNER_FIELD: ClassVar[str] = "client"

    client: PeerId
    worker: PeerId
    job_digest: Digest
    spec_size: U32
    requirements: Requirements
    max_price: U64
    deadline: U64


@dataclass(frozen=True, kw_only=True)
class JobOffer(Message):
    """Worker → client: the worker will run the job for ``price``, expecting to take ``expected_ms``."""

    TYPE: ClassVar[str] = "p2pcompute/job-offer"
    DOMAIN: ClassVar[str] = "p2pcompute/job-offer/v1"
    SIGNER_FIELD: ClassVar[str] = "worker"

    worker: PeerId
    client: PeerId
    request_hash: Digest
    job_digest: Digest
    price: U64
    expected_ms: U32
    hardware_class: HardwareClass


@dataclass(frozen=True, kw_only=True)
class JobDecline(Message):
    """Worker → client: the worker will not run the job, and why."""

    TYPE: ClassVar[str] = "p2pcompute/job-decline"
    DOMAIN: ClassVar[str] = "p2pcompute/job-decline/v1"
    SIGNER_FIELD: ClassVar[str] = "worker"

    worker: PeerId
    client: PeerId
    request_hash: Digest
    reason: DeclineReason
    detail: DetailText


@dataclass(frozen=True, kw_only=True)
class JobAccept(Message):
    """Client → worker: agreement to the offer; names the request and the offer, and repeats the terms."""

    TYPE: ClassVar[str] = "p2pcompute/job-accept"
    DOMAIN: ClassVar[str] = "p2pcompute/job-accept/v1"
    SIGNER_FIELD: ClassVar[str] = "client"

    client: PeerId
    worker: PeerId
    request_hash: Digest
    offer_hash: Digest
    job_digest: Digest
    price: U64


@dataclass(frozen=True, kw_only=True)
class JobResult(Message):
    """Worker → client: the worker's signed attestation of the outputs it computed (the evidence unit).

    Version 2 commits to the job's whole computation: ``trace_root`` is the Merkle root over one leaf per graph
    node (the digests of every intermediate tensor, ``core/trace.py``), ``trace_length`` its number of leaves
    (the job's node count; 0 commits to nothing, and such a result can only be checked by replication).
    """

    TYPE: ClassVar[str] = "p2pcompute/job-result"
    DOMAIN: ClassVar[str] = "p2pcompute/job-result/v2"
    VERSION: ClassVar[int] = 2
    SIGNER_FIELD: ClassVar[str] = "worker"

    version: U32 = 2
    worker: PeerId
    client: PeerId
    accept_hash: Digest
    job_digest: Digest
    output_digest: Digest
    outputs: Annotated[tuple[TensorMeta, ...], Size(0, 64)]
    hardware_class: HardwareClass
    timings: Timings
    trace_root: Digest
    trace_length: Annotated[int, Range(0, MAX_TRACE_LENGTH)]


@dataclass(frozen=True, kw_only=True)
class JobFailed(Message):
    """Worker → client: the accepted job could not be finished (wall time, memory, a failing op ...)."""

    TYPE: ClassVar[str] = "p2pcompute/job-failed"
    DOMAIN: ClassVar[str] = "p2pcompute/job-failed/v1"
    SIGNER_FIELD: ClassVar[str] = "worker"

    worker: PeerId
    client: PeerId
    accept_hash: Digest
    job_digest: Digest
    reason: ReasonText
    detail: DetailText


@dataclass(frozen=True, kw_only=True)
class JobReceipt(Message):
    """Client → worker: payment acknowledgement for a result that passed verification."""

    TYPE: ClassVar[str] = "p2pcompute/job-receipt"
    DOMAIN: ClassVar[str] = "p2pcompute/job-receipt/v1"
    SIGNER_FIELD: ClassVar[str] = "client"

    client: PeerId
    worker: PeerId
    result_hash: Digest
    job_digest: Digest
    output_digest: Digest
    price: U64
    issued_at: U64


@dataclass(frozen=True, kw_only=True)
class JobRejection(Message):
    """Client → worker: the result was not accepted (failed its checks or verification); nothing is owed."""

    TYPE: ClassVar[str] = "p2pcompute/job-rejection"
    DOMAIN: ClassVar[str] = "p2pcompute/job-rejection/v1"
    SIGNER_FIELD: ClassVar[str] = "client"

    client: PeerId
    worker: PeerId
    result_hash: Digest
    job_digest: Digest
    reason: ReasonText
    detail: DetailText


class ComparisonMode(StrEnum):
    """How redundant results of a job are compared (specs/verification.md §3)."""

    EXACT = "exact"
    TOLERANCE = "tolerance"


MAX_EVIDENCE_RESULTS = 8
MAX_RESULT_ENVELOPE_SIZE = 12_288  # a JobResult at its schema bounds seals to ~9.5 KiB
ResultEnvelope = Annotated[bytes, Size(1, MAX_RESULT_ENVELOPE_SIZE)]


@dataclass(frozen=True, kw_only=True)
class CheatingEvidence(Message):
    """Reporter → anyone (gossip): ``accused`` signed a result for ``job_digest`` that other workers contradict.

    Carries the accused's signed ``JobResult`` envelope and those of at least two agreeing workers, exactly as
    received, so any peer can check every signature (specs/verification.md §5).
    """

    TYPE: ClassVar[str] = "p2pcompute/cheating-evidence"
    DOMAIN: ClassVar[str] = "p2pcompute/cheating-evidence/v1"
    SIGNER_FIELD: ClassVar[str] = "reporter"

    reporter: PeerId
    accused: PeerId
    job_digest: Digest
    comparison: ComparisonMode
    accepted_output_digest: Digest
    accused_result: ResultEnvelope
    agreeing_results: Annotated[tuple[ResultEnvelope, ...], Size(2, MAX_EVIDENCE_RESULTS)]


MAX_CHECK_EVIDENCE_LEAVES = 64
"""Leaves a check evidence carries: the checked node's and those of the nodes it reads (an op has few inputs)."""
MAX_CHECK_EVIDENCE_TENSORS = 64
MAX_CHECK_EVIDENCE_SPEC = 48 * 1024
"""Evidence travels on gossip (a 64 KiB cap): it carries the job spec and the tensors only of small jobs."""


@dataclass(frozen=True, kw_only=True)
class LeafProof(Struct):
    """A leaf of a committed trace with its Merkle inclusion proof (specs/verification.md §10)."""

    leaf: TraceLeaf
    proof: Annotated[tuple[Digest, ...], Size(0, MAX_PROOF_LENGTH)]


@dataclass(frozen=True, kw_only=True)
class CheckEvidence(Message):
    """Reporter → anyone (gossip): the client's check of node ``node`` of ``accused``'s committed trace failed.

    Self-contained, so a peer that never saw the job can redo the check (specs/verification.md §12): the accused's
    signed ``JobResult`` (its ``trace_root``), the job spec (whose SHA-256 is the job digest), the leaves of the node
    and of the nodes it reads with their inclusion proofs under that root, the bytes of every tensor the check
    reads, and the check's ``seed``.
    """

    TYPE: ClassVar[str] = "p2pcompute/check-evidence"
    DOMAIN: ClassVar[str] = "p2pcompute/check-evidence/v1"
    SIGNER_FIELD: ClassVar[str] = "reporter"

    reporter: PeerId
    accused: PeerId
    job_digest: Digest
    accused_result: ResultEnvelope
    spec: Annotated[bytes, Size(1, MAX_CHECK_EVIDENCE_SPEC)]
    node: Annotated[int, Range(0, MAX_TRACE_LENGTH - 1)]
    leaves: Annotated[tuple[LeafProof, ...], Size(1, MAX_CHECK_EVIDENCE_LEAVES)]
    tensors: Annotated[tuple[bytes, ...], Size(0, MAX_CHECK_EVIDENCE_TENSORS)]
    seed: U64


JOB_MESSAGES: tuple[type[Message], ...] = (
    JobRequest,
    JobOffer,
    JobDecline,
    JobAccept,
    JobResult,
    JobFailed,
    JobReceipt,
    JobRejection,
)

DEFAULT_REGISTRY = MessageRegistry(PeerRecord, GpuAdvert, *JOB_MESSAGES, CheatingEvidence, CheckEvidence)
