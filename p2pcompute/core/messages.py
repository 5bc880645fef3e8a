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
from p2pcompute.errors import LocalProtocolError, Reason, SchemaError

__all__ = [
    "DEFAULT_REGISTRY",
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


DEFAULT_REGISTRY = MessageRegistry(PeerRecord, GpuAdvert)
