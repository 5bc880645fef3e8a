"""Hypothesis strategies generated from the wire schemas, plus a test-only message type that uses
every kind of field the schema language has."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from hypothesis import strategies as st

from p2pcompute.core import codec
from p2pcompute.core.envelope import Envelope, signing_bytes
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.messages import (
    DEFAULT_REGISTRY,
    U64,
    Device,
    DeviceKind,
    GpuAdvert,
    Message,
    MessageRegistry,
    PeerRecord,
    Software,
)
from p2pcompute.core.schema import (
    FieldType,
    Range,
    Size,
    Struct,
    TBool,
    TBytes,
    TEnum,
    TFloat,
    TInt,
    TOptional,
    TPeerId,
    TStr,
    TStruct,
    TTuple,
    fields_of,
    to_wire,
)


class Colour(enum.StrEnum):
    RED = "red"
    GREEN = "green"


@dataclass(frozen=True, kw_only=True)
class Inner(Struct):
    name: Annotated[str, Size(1, 32)]
    weight: Annotated[float, Range(0.0, 1e6)]


@dataclass(frozen=True, kw_only=True)
class Kitchen(Message):
    """A test-only message with one field of every kind."""

    TYPE: ClassVar[str] = "test/kitchen"
    DOMAIN: ClassVar[str] = "test/kitchen/v1"
    SIGNER_FIELD: ClassVar[str] = "sender"

    sender: PeerId
    count: U64
    delta: Annotated[int, Range(-1000, 1000)]
    ratio: float
    flag: bool
    label: Annotated[str, Size(0, 40)]
    blob: Annotated[bytes, Size(0, 64)]
    maybe: Annotated[int, Range(0, 10)] | None
    colour: Colour
    inner: Inner
    items: Annotated[tuple[Inner, ...], Size(0, 4)]
    tags: Annotated[tuple[Annotated[str, Size(1, 8)], ...], Size(0, 3)]


TEST_REGISTRY: MessageRegistry = DEFAULT_REGISTRY.with_types(Kitchen)


def sample_record(pair: KeyPair, **changes: Any) -> PeerRecord:
    """A fixed, valid PeerRecord of ``pair``."""
    fields: dict[str, Any] = dict(
        id=b"\x01" * 16, nonce=7, expires_at=1_700_000_000_000, peer_id=pair.peer_id, seq=3,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
    )  # fmt: skip
    fields.update(changes)
    return PeerRecord(**fields)


SAMPLE_DEVICE = Device(
    kind=DeviceKind.CUDA,
    name="NVIDIA H100 80GB HBM3",
    memory_bytes=80 * 2**30,
    free_memory_bytes=79 * 2**30,
    tflops=51.2,
    compute_capability="9.0",
    cores=132,
)
SAMPLE_SOFTWARE = Software(p2pcompute="0.1.0", torch="2.13.0", cuda="12.8", python="3.11.7")


def sample_advert(pair: KeyPair, now: int, **changes: Any) -> GpuAdvert:
    """A fixed, valid GpuAdvert of ``pair`` issued at ``now``."""
    fields: dict[str, Any] = dict(
        id=b"\x0a" * 16,
        nonce=1,
        expires_at=now + 60_000,
        peer_id=pair.peer_id,
        seq=100,
        issued_at=now,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        devices=(SAMPLE_DEVICE,),
        price_per_second=2000,
        slots_total=4,
        slots_free=3,
        software=SAMPLE_SOFTWARE,
    )
    fields.update(changes)
    return GpuAdvert(**fields)


def sample_kitchen(sender: PeerId, **changes: Any) -> Kitchen:
    """A fixed, valid Kitchen message."""
    fields: dict[str, Any] = dict(
        id=b"\x02" * 16, nonce=1, expires_at=5, sender=sender, count=1, delta=-5, ratio=0.5, flag=True, label="ok",
        blob=b"", maybe=None, colour=Colour.RED, inner=Inner(name="a", weight=1.0), items=(), tags=(),
    )  # fmt: skip
    fields.update(changes)
    return Kitchen(**fields)


def sign_raw(pair: KeyPair, cls: type[Message], payload: bytes) -> bytes:
    """Envelope bytes for ``payload`` signed by ``pair`` under ``cls``'s domain, with no checks at all:
    how an attacker (or a buggy peer) can build what :func:`seal` refuses to."""
    signature = pair.sign(signing_bytes(cls.DOMAIN, cls.TYPE, payload))
    env = Envelope(public_key=pair.public_key, payload_type=cls.TYPE, payload=payload, signature=signature)
    return codec.pack(to_wire(env))


_CAP = 64  # keep generated sizes small


def for_type(ft: FieldType) -> st.SearchStrategy[Any]:
    match ft:
        case TInt(lo=lo, hi=hi):
            return st.integers(lo, hi)
        case TFloat(lo=lo, hi=hi):
            return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
        case TBool():
            return st.booleans()
        case TStr(names=names) if names is not None:
            return st.sampled_from(sorted(names))
        case TStr(lo=lo, hi=hi):
            return st.text(min_size=lo, max_size=min(hi, _CAP)).filter(lambda s: lo <= len(s.encode()) <= hi)
        case TBytes(lo=lo, hi=hi):
            return st.binary(min_size=lo, max_size=min(hi, _CAP))
        case TPeerId():
            return peer_ids()
        case TEnum(cls=cls):
            return st.sampled_from(list(cls))
        case TOptional(inner=inner):
            return st.none() | for_type(inner)
        case TTuple(item=item, lo=lo, hi=hi):
            return st.lists(for_type(item), min_size=lo, max_size=min(hi, 4)).map(tuple)
        case TStruct(cls=cls):
            return structs(cls)
    raise AssertionError(ft)


def peer_ids() -> st.SearchStrategy[PeerId]:
    return st.binary(min_size=32, max_size=32).map(PeerId.from_public_key)


def structs(cls: type[Struct], **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    kwargs = {name: overrides.get(name, for_type(ft)) for name, ft in fields_of(cls)}
    if issubclass(cls, Message):
        kwargs["version"] = st.just(cls.VERSION)
    return st.builds(cls, **kwargs)
