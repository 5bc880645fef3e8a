"""The one exception tree of p2pcompute.

Every error the package raises on purpose derives from :class:`P2PComputeError` and carries a
machine-readable :class:`Reason` code (the codes are listed in ``specs/00-conventions.md``)::

    P2PComputeError                 base; .reason, .detail
    ├── ConfigError                 bad configuration or command-line values
    ├── KeyFileError                a key file is missing, unsafe, truncated, corrupt or of the wrong type
    ├── NetworkError                listening, dialling, lookups or publishing failed
    │   ├── HostStartError          cannot listen on an address (busy port, unbindable address)
    │   ├── DialError               a dial failed, timed out, or the address is unusable
    │   ├── DiscoveryError          a bad capability name
    │   └── GossipError             a publish could not be made
    │       └── MessageTooLarge     over the gossip message size cap
    ├── JobError                    a job could not be run, negotiated or verified (the client's view)
    │   ├── ExecutionError          the executor could not finish a job (wall time, memory, crash)
    │   ├── NegotiationFailed       a worker declined, failed, timed out, or broke the protocol
    │   ├── NoWorkersError          no advertised worker fits the job's requirements
    │   └── VerificationError       results disagree and no quorum was reached
    ├── StoreError                  the SQLite store or the ledger is unusable or tampered with
    ├── LocalProtocolError          *we* tried to do something the protocol forbids (a bug on our side)
    └── RemoteProtocolError         a *peer* sent something the protocol forbids; drop it, log it, carry on
        ├── FramingError            length prefix over the limit, truncated frame
        ├── DecodeError             not canonical msgpack within limits (malformed, trailing bytes, too deep, ...)
        ├── SchemaError             decoded fine, but not a valid message (unknown/missing field, wrong type, ...)
        ├── SignatureError          envelope signature, domain, key or signer does not check out
        ├── ReplayError             replayed, expired or too-far-future message
        ├── JobFormatError          a job spec or tensor breaks the job format or its limits (hostile payloads)
        ├── TransferError           a data-channel transfer broke (bad token, hash/size mismatch, cut short)
        └── TraceError              a committed trace or a Merkle proof does not check out

The split between local and remote protocol errors follows h11: a ``RemoteProtocolError`` is the
peer's fault and must never crash a peer; a ``LocalProtocolError`` is ours.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

__all__ = [
    "ConfigError",
    "ExecutionError",
    "JobError",
    "JobFormatError",
    "NegotiationFailed",
    "NoWorkersError",
    "StoreError",
    "TraceError",
    "TransferError",
    "VerificationError",
    "DecodeError",
    "DialError",
    "DiscoveryError",
    "FramingError",
    "GossipError",
    "HostStartError",
    "KeyFileError",
    "LocalProtocolError",
    "MessageTooLarge",
    "NetworkError",
    "P2PComputeError",
    "Reason",
    "RemoteProtocolError",
    "ReplayError",
    "SchemaError",
    "SignatureError",
]


class Reason(StrEnum):
    """Machine-readable rejection reasons. The string values are part of the specs."""

    # framing (specs/00-conventions.md §Framing)
    FRAME_TOO_LARGE = "frame_too_large"
    TRUNCATED_FRAME = "truncated_frame"
    # decoding (specs/00-conventions.md §Encoding)
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    TRAILING_BYTES = "trailing_bytes"
    NON_CANONICAL = "non_canonical"
    TOO_DEEP = "too_deep"
    TOO_LARGE = "too_large"
    EXT_TYPE = "ext_type"
    # schema (specs/00-conventions.md §Messages)
    NOT_A_MAP = "not_a_map"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"
    TOO_LONG = "too_long"
    UNSUPPORTED_VERSION = "unsupported_version"
    # envelopes (specs/identity-and-envelopes.md)
    BAD_SIGNATURE = "bad_signature"
    WRONG_DOMAIN = "wrong_domain"
    UNKNOWN_PAYLOAD_TYPE = "unknown_payload_type"
    UNEXPECTED_PAYLOAD_TYPE = "unexpected_payload_type"
    BAD_KEY_LENGTH = "bad_key_length"
    SIGNER_MISMATCH = "signer_mismatch"
    BAD_PEER_ID = "bad_peer_id"
    # replay protection (specs/00-conventions.md §Replay protection)
    REPLAYED = "replayed"
    EXPIRED = "expired"
    EXPIRY_TOO_FAR = "expiry_too_far"
    # adverts (specs/adverts.md)
    FUTURE_DATED = "future_dated"
    STALE_SEQUENCE = "stale_sequence"
    INCONSISTENT = "inconsistent"
    # key files (specs/identity-and-envelopes.md §Key files)
    KEY_FILE_MISSING = "key_file_missing"
    KEY_FILE_EXISTS = "key_file_exists"
    KEY_FILE_PERMISSIONS = "key_file_permissions"
    KEY_FILE_TRUNCATED = "key_file_truncated"
    KEY_FILE_WRONG_TYPE = "key_file_wrong_type"
    KEY_FILE_CORRUPT = "key_file_corrupt"
    # configuration
    BAD_CONFIG = "bad_config"
    # network (local conditions, not protocol violations)
    LISTEN_FAILED = "listen_failed"
    DIAL_FAILED = "dial_failed"
    BAD_CAPABILITY = "bad_capability"
    PUBLISH_FAILED = "publish_failed"
    MESSAGE_TOO_LARGE = "message_too_large"
    # job format and safety (specs/job-format.md)
    UNKNOWN_OP = "unknown_op"
    BAD_ARGUMENT = "bad_argument"
    BAD_GRAPH = "bad_graph"
    TOO_MANY_OPS = "too_many_ops"
    TENSOR_TOO_LARGE = "tensor_too_large"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_TOO_LARGE = "output_too_large"
    BAD_DTYPE = "bad_dtype"
    HASH_MISMATCH = "hash_mismatch"
    SHAPE_MISMATCH = "shape_mismatch"
    MISSING_TENSOR = "missing_tensor"
    NOT_EXPORTABLE = "not_exportable"
    # execution (compute/executor.py)
    WALL_TIME = "wall_time"
    WORKER_CRASHED = "worker_crashed"
    EXECUTION_FAILED = "execution_failed"
    EXECUTOR_CLOSED = "executor_closed"
    # negotiation (specs/negotiation.md)
    BAD_TRANSITION = "bad_transition"
    UNEXPECTED_MESSAGE = "unexpected_message"
    CHAIN_MISMATCH = "chain_mismatch"
    TERMS_MISMATCH = "terms_mismatch"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    DECLINED = "declined"
    JOB_FAILED = "job_failed"
    STREAM_CLOSED = "stream_closed"
    # tensor transfer (specs/negotiation.md §Data channel)
    BAD_TOKEN = "bad_token"
    TRANSFER_FAILED = "transfer_failed"
    UNEXPECTED_BLOB = "unexpected_blob"
    # client (p2pcompute/client.py)
    NO_WORKERS = "no_workers"
    ALL_ATTEMPTS_FAILED = "all_attempts_failed"
    # verification, reputation and ledger (specs/verification.md, specs/ledger.md)
    NO_QUORUM = "no_quorum"
    BAD_EVIDENCE = "bad_evidence"
    CHAIN_BROKEN = "chain_broken"
    STORE_FAILED = "store_failed"
    DUPLICATE_ID = "duplicate_id"
    # advert addresses (specs/adverts.md §4)
    FOREIGN_ADDRESS = "foreign_address"
    BAD_ADDRESS = "bad_address"
    # committed traces (specs/verification.md §10)
    BAD_PROOF = "bad_proof"
    BAD_TRACE = "bad_trace"


class P2PComputeError(Exception):
    """Base of every error p2pcompute raises on purpose."""

    reason: Reason
    detail: str

    def __init__(self, reason: Reason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class ConfigError(P2PComputeError):
    """Invalid configuration or command-line values."""

    def __init__(self, detail: str, reason: Reason = Reason.BAD_CONFIG) -> None:
        super().__init__(reason, detail)


class KeyFileError(P2PComputeError):
    """A key file cannot be used (missing, readable by others, truncated, corrupt, wrong key type)."""


class NetworkError(P2PComputeError):
    """A network operation failed: a local condition or an unreachable peer, not a protocol violation."""

    REASON: ClassVar[Reason]

    def __init__(self, detail: str, reason: Reason | None = None) -> None:
        super().__init__(reason or self.REASON, detail)


class HostStartError(NetworkError):
    """The host could not listen on every requested address."""

    REASON = Reason.LISTEN_FAILED


class DialError(NetworkError):
    """A dial failed, timed out, or the multiaddr was unusable."""

    REASON = Reason.DIAL_FAILED


class DiscoveryError(NetworkError):
    """A DHT operation was asked with bad arguments (e.g. a capability name)."""

    REASON = Reason.BAD_CAPABILITY


class GossipError(NetworkError):
    """A publish could not be made."""

    REASON = Reason.PUBLISH_FAILED


class MessageTooLarge(GossipError):
    """A message is larger than the gossip size cap."""

    REASON = Reason.MESSAGE_TOO_LARGE


class LocalProtocolError(P2PComputeError):
    """We tried to send or do something the protocol forbids."""


class RemoteProtocolError(P2PComputeError):
    """A peer sent something the protocol forbids. Never fatal to a peer."""


class FramingError(RemoteProtocolError):
    """A length-prefixed frame is over the limit or cut short."""


class DecodeError(RemoteProtocolError):
    """Bytes are not canonical msgpack within the limits."""


class SchemaError(RemoteProtocolError):
    """A decoded value does not match the message schema."""


class SignatureError(RemoteProtocolError):
    """A signed envelope does not verify."""


class ReplayError(RemoteProtocolError):
    """A message was seen before, has expired, or claims an expiry too far ahead."""


class JobFormatError(RemoteProtocolError):
    """A job spec or a tensor breaks the job format or its limits (specs/job-format.md)."""


class TransferError(RemoteProtocolError):
    """A data-channel transfer failed its checks: bad token, size or hash mismatch, cut short."""


class TraceError(RemoteProtocolError):
    """A committed trace does not fit its job, or a Merkle proof does not lead to the root (specs/verification.md)."""


class JobError(P2PComputeError):
    """A job could not be run, negotiated or verified."""


class ExecutionError(JobError):
    """The executor could not finish a job: wall time, memory limit, a crash or a failing op."""


class NegotiationFailed(JobError):
    """A negotiation with one worker ended without a usable result (declined, failed, timed out, broke protocol)."""


class NoWorkersError(JobError):
    """No advertised worker fits the job's requirements (or every fitting worker was tried)."""


class VerificationError(JobError):
    """Redundant results disagree and no quorum was reached within the escalation bound."""


class TaskFailed(JobError):
    """One task of a ``client.map`` (or one shard of ``map_batch``) could not be done: ``index`` is its position in
    the inputs, ``cause`` the last error, ``results`` the tasks already accepted but not yet yielded (by index:
    nothing accepted is lost)."""

    def __init__(self, index: int, cause: P2PComputeError, results: dict[int, Any] | None = None) -> None:
        super().__init__(cause.reason, f"task {index}: {cause.detail or cause.reason.value}")
        self.index = index
        self.cause = cause
        self.results: dict[int, Any] = dict(results or {})


class StoreError(P2PComputeError):
    """The SQLite store or the ledger is unusable, or a hash chain does not check out."""
