"""Ed25519 identities: key pairs, libp2p-compatible peer ids and the private-key byte format.

One Ed25519 key per peer is both its libp2p identity and its signing key, so the peer id named in a
message is exactly the key that must have signed it (specs/identity-and-envelopes.md).

Pure: no file, clock or randomness. Key generation takes a seed from the caller; key *files* live in
:mod:`p2pcompute.keys`.
"""

from __future__ import annotations

from dataclasses import dataclass

import base58
import nacl.exceptions
import nacl.signing

from p2pcompute.errors import KeyFileError, Reason, SchemaError, SignatureError

__all__ = [
    "PRIVATE_KEY_SIZE",
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "SIGNATURE_SIZE",
    "KeyPair",
    "PeerId",
    "verify_signature",
]

SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

# libp2p crypto.proto: KeyType Ed25519 = 1. PublicKey/PrivateKey are {1: varint Type, 2: bytes Data}.
_KEY_TYPE_ED25519 = 1
_KEY_TYPE_NAMES = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}
_PB_TYPE_TAG = 0x08  # field 1, varint
_PB_DATA_TAG = 0x12  # field 2, length-delimited
# Identity multihash (code 0x00) of the 36-byte protobuf public key: 0x00, 0x24, then the key.
_MH_IDENTITY = 0x00
_PB_PUBLIC_KEY = bytes([_PB_TYPE_TAG, _KEY_TYPE_ED25519, _PB_DATA_TAG, PUBLIC_KEY_SIZE])
_PEER_ID_PREFIX = bytes([_MH_IDENTITY, len(_PB_PUBLIC_KEY) + PUBLIC_KEY_SIZE]) + _PB_PUBLIC_KEY
PEER_ID_SIZE = len(_PEER_ID_PREFIX) + PUBLIC_KEY_SIZE  # 38
# Private key bytes: protobuf PrivateKey{Type: Ed25519, Data: seed || public key} (as go-libp2p writes it).
_PB_PRIVATE_KEY_PREFIX = bytes([_PB_TYPE_TAG, _KEY_TYPE_ED25519, _PB_DATA_TAG, SEED_SIZE + PUBLIC_KEY_SIZE])
PRIVATE_KEY_SIZE = len(_PB_PRIVATE_KEY_PREFIX) + SEED_SIZE + PUBLIC_KEY_SIZE  # 68


@dataclass(frozen=True, slots=True)
class PeerId:
    """A libp2p peer id of an Ed25519 key: the identity multihash of its protobuf public key.

    ``raw`` is byte-for-byte what ``libp2p.peer.id.ID.from_pubkey(key).to_bytes()`` gives; ``str()``
    is its base58btc text form (``12D3KooW...``). Because the multihash is the identity, the public
    key can be read back out of the id, so a signature can be checked against a peer id alone.
    """

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PEER_ID_SIZE or not self.raw.startswith(_PEER_ID_PREFIX):
            raise SchemaError(Reason.BAD_PEER_ID, "not the identity multihash of an Ed25519 public key")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise SignatureError(
                Reason.BAD_KEY_LENGTH,
                f"Ed25519 public key must be {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}",
            )
        return cls(_PEER_ID_PREFIX + public_key)

    @classmethod
    def from_base58(cls, text: str) -> PeerId:
        try:
            raw = base58.b58decode(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise SchemaError(Reason.BAD_PEER_ID, f"not base58: {text!r}") from exc
        return cls(raw)

    @property
    def public_key(self) -> bytes:
        return self.raw[len(_PEER_ID_PREFIX) :]

    def to_base58(self) -> str:
        return base58.b58encode(self.raw).decode("ascii")

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()!r})"

    def short(self) -> str:
        """A short form for tables and logs (last 8 characters of the base58 form)."""
        return "…" + self.to_base58()[-8:]


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``.

    Raises :class:`SignatureError` (``bad_key_length``) for a key that is not 32 bytes; any other
    mismatch (wrong length signature included) is ``False``.
    """
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise SignatureError(
            Reason.BAD_KEY_LENGTH,
            f"Ed25519 public key must be {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}",
        )
    if len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


class KeyPair:
    """An Ed25519 signing key and its public half. Build it from a 32-byte seed the caller supplies."""

    __slots__ = ("_signing_key", "peer_id", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.peer_id: PeerId = PeerId.from_public_key(self.public_key)

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        if len(seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self._signing_key)

    def sign(self, data: bytes) -> bytes:
        return bytes(self._signing_key.sign(data).signature)

    def __repr__(self) -> str:
        return f"KeyPair(peer_id={self.peer_id.to_base58()!r})"

    # --- private key byte format (what a key file holds) ---

    def private_key_bytes(self) -> bytes:
        """The libp2p protobuf ``PrivateKey`` encoding: 08 01 12 40 || seed || public key (68 bytes)."""
        return _PB_PRIVATE_KEY_PREFIX + self.seed + self.public_key

    @classmethod
    def from_private_key_bytes(cls, data: bytes) -> KeyPair:
        """Parse :meth:`private_key_bytes`; raise :class:`KeyFileError` with a specific reason."""
        if len(data) < 2 or data[0] != _PB_TYPE_TAG:
            raise KeyFileError(Reason.KEY_FILE_WRONG_TYPE, "not a libp2p private key")
        key_type = data[1]
        if key_type != _KEY_TYPE_ED25519:
            name = _KEY_TYPE_NAMES.get(key_type, f"type {key_type}")
            raise KeyFileError(Reason.KEY_FILE_WRONG_TYPE, f"{name} key; only Ed25519 keys are supported")
        if len(data) < PRIVATE_KEY_SIZE:
            raise KeyFileError(
                Reason.KEY_FILE_TRUNCATED, f"{len(data)} bytes, an Ed25519 private key is {PRIVATE_KEY_SIZE}"
            )
        if not data.startswith(_PB_PRIVATE_KEY_PREFIX):
            raise KeyFileError(Reason.KEY_FILE_CORRUPT, "bad Ed25519 private key header")
        if len(data) > PRIVATE_KEY_SIZE:
            raise KeyFileError(Reason.KEY_FILE_CORRUPT, f"{len(data) - PRIVATE_KEY_SIZE} unexpected trailing bytes")
        seed = data[len(_PB_PRIVATE_KEY_PREFIX) : len(_PB_PRIVATE_KEY_PREFIX) + SEED_SIZE]
        public_key = data[len(_PB_PRIVATE_KEY_PREFIX) + SEED_SIZE :]
        pair = cls.from_seed(seed)
        if pair.public_key != public_key:
            raise KeyFileError(Reason.KEY_FILE_CORRUPT, "public key does not match the private key")
        return pair
