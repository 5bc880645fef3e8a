"""Signed envelopes (specs/identity-and-envelopes.md), after libp2p RFC 0002.

An envelope is the canonical msgpack map::

    {"payload": bin, "payload_type": str, "public_key": bin(32), "signature": bin(64)}

The Ed25519 signature covers the *signing bytes*::

    uvarint(len(domain)) || domain || uvarint(len(payload_type)) || payload_type || uvarint(len(payload)) || payload

where ``domain`` is the signing domain of the payload type (never sent: the verifier supplies it) and
``payload`` is the canonical encoding of the message, verified exactly as received. The decoded
message is returned only after the signature checks and the message's signer field names the key
that signed it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar

from p2pcompute.core import codec
from p2pcompute.core.identity import PUBLIC_KEY_SIZE, KeyPair, PeerId, verify_signature
from p2pcompute.core.messages import (
    DEFAULT_REGISTRY,
    Message,
    MessageRegistry,
    decode_message,
    encode_message,
)
from p2pcompute.core.schema import Size, Struct, from_wire, to_wire
from p2pcompute.errors import LocalProtocolError, Reason, SignatureError

__all__ = [
    "MAX_ENVELOPE_SIZE",
    "Envelope",
    "Opened",
    "open_envelope",
    "seal",
    "signing_bytes",
    "uvarint",
]

MAX_ENVELOPE_SIZE = codec.MAX_FRAME_SIZE
_ENVELOPE_OVERHEAD = 256  # map header, keys, key, signature, type: generous upper bound
MAX_PAYLOAD_SIZE = MAX_ENVELOPE_SIZE - _ENVELOPE_OVERHEAD

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, kw_only=True)
class Envelope(Struct):
    """The wire form of a signed message. Key and signature lengths are checked by :func:`open_envelope`."""

    public_key: Annotated[bytes, Size(0, 1024)]
    payload_type: Annotated[str, Size(1, 64)]
    payload: Annotated[bytes, Size(0, MAX_PAYLOAD_SIZE)]
    signature: Annotated[bytes, Size(0, 1024)]


@dataclass(frozen=True, slots=True)
class Opened(Generic[M]):
    """A verified message with the exact bytes it arrived in (kept for evidence and hash chains)."""

    message: M
    signer: PeerId
    envelope: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 of the envelope bytes: how other messages name this one."""
        return hashlib.sha256(self.envelope).digest()


def uvarint(n: int) -> bytes:
    """Unsigned LEB128 varint (as multiformats unsigned-varint)."""
    if n < 0:
        raise ValueError("uvarint of a negative number")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def signing_bytes(domain: str, payload_type: str, payload: bytes) -> bytes:
    """The bytes an envelope signature covers (length-prefixed domain, payload type and payload)."""
    d = domain.encode("utf-8")
    t = payload_type.encode("utf-8")
    return uvarint(len(d)) + d + uvarint(len(t)) + t + uvarint(len(payload)) + payload


def seal(keypair: KeyPair, message: Message) -> bytes:
    """Sign ``message`` under its type's domain and return the envelope bytes.

    Raises :class:`LocalProtocolError` if the message breaks its schema or names another signer.
    """
    if message.claimed_signer != keypair.peer_id:
        raise LocalProtocolError(
            Reason.SIGNER_MISMATCH,
            f"{message.TYPE}.{message.SIGNER_FIELD} is {message.claimed_signer}, signing key is {keypair.peer_id}",
        )
    payload = encode_message(message)
    signature = keypair.sign(signing_bytes(message.DOMAIN, message.TYPE, payload))
    envelope = Envelope(public_key=keypair.public_key, payload_type=message.TYPE, payload=payload, signature=signature)
    data = codec.pack(to_wire(envelope))
    if len(data) > MAX_ENVELOPE_SIZE:
        raise LocalProtocolError(Reason.TOO_LARGE, f"envelope of {len(data)} bytes, limit {MAX_ENVELOPE_SIZE}")
    return data


def open_envelope(
    data: bytes,
    registry: MessageRegistry = DEFAULT_REGISTRY,
    *,
    expect: type[M] | None = None,
    signer: PeerId | None = None,
) -> Opened[M]:
    """Verify envelope bytes as received and return the message they carry.

    ``expect`` pins the message type (its domain is then the only one accepted); ``signer`` pins
    the peer that must have signed. Raises only :class:`RemoteProtocolError` subclasses, with the
    reasons: ``bad_key_length``, ``unknown_payload_type``, ``unexpected_payload_type``,
    ``wrong_domain``, ``bad_signature``, ``signer_mismatch`` (and the codec/schema reasons).
    """
    env = from_wire(Envelope, codec.unpack(data, codec.DecodeLimits(max_bytes=MAX_ENVELOPE_SIZE)))
    if len(env.public_key) != PUBLIC_KEY_SIZE:
        raise SignatureError(
            Reason.BAD_KEY_LENGTH,
            f"public key of {len(env.public_key)} bytes, Ed25519 needs {PUBLIC_KEY_SIZE}",
        )
    if env.payload_type not in registry:
        raise SignatureError(Reason.UNKNOWN_PAYLOAD_TYPE, f"payload type {env.payload_type[:64]!r} is not known")
    cls = registry[env.payload_type]
    if expect is not None and cls is not expect:
        raise SignatureError(
            Reason.UNEXPECTED_PAYLOAD_TYPE, f"expected {expect.TYPE!r}, envelope carries {env.payload_type!r}"
        )
    if not verify_signature(env.public_key, signing_bytes(cls.DOMAIN, cls.TYPE, env.payload), env.signature):
        other = _domain_that_verifies(env, registry, exclude=cls.DOMAIN)
        if other is not None:
            raise SignatureError(Reason.WRONG_DOMAIN, f"signature was made for domain {other!r}, not {cls.DOMAIN!r}")
        raise SignatureError(Reason.BAD_SIGNATURE, f"{cls.TYPE} signature does not verify")
    message = decode_message(cls, env.payload)
    key_owner = PeerId.from_public_key(env.public_key)
    if message.claimed_signer != key_owner:
        raise SignatureError(
            Reason.SIGNER_MISMATCH,
            f"{cls.TYPE}.{cls.SIGNER_FIELD} names {message.claimed_signer}, signed by {key_owner}",
        )
    if signer is not None and key_owner != signer:
        raise SignatureError(Reason.SIGNER_MISMATCH, f"expected a message signed by {signer}, got {key_owner}")
    return Opened(message=message, signer=key_owner, envelope=data)  # type: ignore[arg-type]


def _domain_that_verifies(env: Envelope, registry: MessageRegistry, *, exclude: str) -> str | None:
    """On a failed check, find whether the signature belongs to another known domain (bounded work)."""
    for other in registry.values():
        if exclude == other.DOMAIN:
            continue
        for payload_type in {env.payload_type, other.TYPE}:
            if verify_signature(env.public_key, signing_bytes(other.DOMAIN, payload_type, env.payload), env.signature):
                return other.DOMAIN
    return None
