"""Identities: peer ids match libp2p byte for byte; private key bytes parse strictly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.peer.id import ID

from p2pcompute.core.identity import PEER_ID_SIZE, PRIVATE_KEY_SIZE, KeyPair, PeerId, verify_signature
from p2pcompute.errors import KeyFileError, Reason, SchemaError, SignatureError

seeds = st.binary(min_size=32, max_size=32)


@given(seeds)
def test_peer_id_is_the_libp2p_peer_id(seed: bytes) -> None:
    pair = KeyPair.from_seed(seed)
    theirs = ID.from_pubkey(Ed25519PublicKey.from_bytes(pair.public_key))
    assert pair.peer_id.raw == theirs.to_bytes()
    assert str(pair.peer_id) == theirs.to_base58()
    assert len(pair.peer_id.raw) == PEER_ID_SIZE
    assert str(pair.peer_id).startswith("12D3KooW")


def test_libp2p_private_key_from_same_seed_has_same_id() -> None:
    seed = bytes(range(32))
    theirs = Ed25519PrivateKey.from_bytes(seed)
    assert ID.from_pubkey(theirs.get_public_key()).to_bytes() == KeyPair.from_seed(seed).peer_id.raw


@given(seeds)
def test_base58_round_trip_and_public_key_recovery(seed: bytes) -> None:
    pair = KeyPair.from_seed(seed)
    again = PeerId.from_base58(str(pair.peer_id))
    assert again == pair.peer_id
    assert again.public_key == pair.public_key


@pytest.mark.parametrize(
    "raw", [b"", b"\x00" * 38, b"\x12\x20" + b"\x00" * 32, b"\x00\x24\x08\x00\x12\x20" + b"\x00" * 32]
)
def test_peer_id_rejects_other_forms(raw: bytes) -> None:
    with pytest.raises(SchemaError) as info:
        PeerId(raw)
    assert info.value.reason is Reason.BAD_PEER_ID


def test_peer_id_from_bad_base58() -> None:
    with pytest.raises(SchemaError) as info:
        PeerId.from_base58("0OIl not base58")
    assert info.value.reason is Reason.BAD_PEER_ID


@given(seeds, st.binary(max_size=200))
def test_sign_and_verify(seed: bytes, data: bytes) -> None:
    pair = KeyPair.from_seed(seed)
    sig = pair.sign(data)
    assert verify_signature(pair.public_key, data, sig)
    assert not verify_signature(pair.public_key, data + b"x", sig)
    assert not verify_signature(pair.public_key, data, sig[:-1])


def test_verify_rejects_bad_key_length() -> None:
    with pytest.raises(SignatureError) as info:
        verify_signature(b"\x01" * 31, b"", b"\x00" * 64)
    assert info.value.reason is Reason.BAD_KEY_LENGTH
    with pytest.raises(SignatureError) as info:
        PeerId.from_public_key(b"\x01" * 33)
    assert info.value.reason is Reason.BAD_KEY_LENGTH


def test_seed_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        KeyPair.from_seed(b"short")


@given(seeds)
def test_private_key_bytes_round_trip(seed: bytes) -> None:
    pair = KeyPair.from_seed(seed)
    data = pair.private_key_bytes()
    assert len(data) == PRIVATE_KEY_SIZE
    assert KeyPair.from_private_key_bytes(data).peer_id == pair.peer_id


def test_private_key_bytes_are_go_libp2p_protobuf() -> None:
    # crypto.proto PrivateKey{Type: Ed25519 (1), Data: seed || public key}, as go-libp2p marshals it.
    pair = KeyPair.from_seed(bytes(range(32)))
    assert pair.private_key_bytes() == b"\x08\x01\x12\x40" + bytes(range(32)) + pair.public_key


def _good() -> bytes:
    return KeyPair.from_seed(bytes(range(32))).private_key_bytes()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.KEY_FILE_WRONG_TYPE),
        (b"-----BEGIN PRIVATE KEY-----\n", Reason.KEY_FILE_WRONG_TYPE),
        (b"\x08\x00\x12\x40" + b"\x00" * 64, Reason.KEY_FILE_WRONG_TYPE),  # RSA
        (b"\x08\x02\x12\x20" + b"\x00" * 32, Reason.KEY_FILE_WRONG_TYPE),  # secp256k1
        (_good()[:40], Reason.KEY_FILE_TRUNCATED),
        (_good()[:-1], Reason.KEY_FILE_TRUNCATED),
        (_good() + b"\x00", Reason.KEY_FILE_CORRUPT),
        (_good()[:-1] + bytes([_good()[-1] ^ 1]), Reason.KEY_FILE_CORRUPT),
        (b"\x08\x01\x12\x41" + _good()[4:], Reason.KEY_FILE_CORRUPT),
    ],
)
def test_private_key_bytes_rejections(data: bytes, reason: Reason) -> None:
    with pytest.raises(KeyFileError) as info:
        KeyPair.from_private_key_bytes(data)
    assert info.value.reason is reason
