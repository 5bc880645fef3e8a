"""Signed envelopes: round trip, and every rejection with its specific reason."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.core import codec
from p2pcompute.core.envelope import Envelope, open_envelope, seal, signing_bytes, uvarint
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import DEFAULT_REGISTRY, PeerRecord, encode_message
from p2pcompute.core.schema import to_wire
from p2pcompute.errors import LocalProtocolError, Reason, RemoteProtocolError, SignatureError
from tests.core.strategies import TEST_REGISTRY, Kitchen, sample_kitchen, sample_record, sign_raw, structs

ALICE = KeyPair.from_seed(b"\x01" * 32)
MALLORY = KeyPair.from_seed(b"\x02" * 32)


def _record(pair: KeyPair = ALICE, **changes: Any) -> PeerRecord:
    return sample_record(pair, **changes)


def _envelope(**changes: Any) -> bytes:
    record = _record()
    payload = encode_message(record)
    env = Envelope(
        public_key=ALICE.public_key,
        payload_type=PeerRecord.TYPE,
        payload=payload,
        signature=ALICE.sign(signing_bytes(PeerRecord.DOMAIN, PeerRecord.TYPE, payload)),
    )
    return codec.pack(to_wire(replace(env, **changes)))


def _reason(data: bytes, **kwargs: Any) -> Reason:
    with pytest.raises(RemoteProtocolError) as info:
        open_envelope(data, **kwargs)
    return info.value.reason


def test_seal_and_open() -> None:
    record = _record()
    data = seal(ALICE, record)
    opened = open_envelope(data, expect=PeerRecord)
    assert opened.message == record
    assert opened.signer == ALICE.peer_id
    assert opened.envelope == data
    assert len(opened.digest) == 32
    assert _envelope() == data  # sealing is deterministic (Ed25519 + canonical encoding)


@settings(max_examples=50)
@given(st.data())
def test_any_message_seals_and_opens(data: st.DataObject) -> None:
    message = data.draw(structs(Kitchen, sender=st.just(ALICE.peer_id)))
    opened = open_envelope(seal(ALICE, message), TEST_REGISTRY)
    assert opened.message == message


def test_signing_bytes_layout() -> None:
    assert uvarint(0) == b"\x00"
    assert uvarint(127) == b"\x7f"
    assert uvarint(128) == b"\x80\x01"
    assert uvarint(300) == b"\xac\x02"
    assert signing_bytes("d", "tt", b"ppp") == b"\x01d\x02tt\x03ppp"


def test_bad_signature() -> None:
    good = _envelope()
    env = codec.unpack(good)
    env["signature"] = bytes([env["signature"][0] ^ 1]) + env["signature"][1:]
    assert _reason(codec.pack(env)) is Reason.BAD_SIGNATURE
    assert _reason(_envelope(signature=b"")) is Reason.BAD_SIGNATURE
    assert _reason(_envelope(signature=b"\x00" * 64)) is Reason.BAD_SIGNATURE


def test_signature_by_another_key_is_bad() -> None:
    payload = encode_message(_record())
    forged = _envelope(signature=MALLORY.sign(signing_bytes(PeerRecord.DOMAIN, PeerRecord.TYPE, payload)))
    assert _reason(forged) is Reason.BAD_SIGNATURE


def test_signature_from_domain_a_fails_under_domain_b() -> None:
    # A PeerRecord payload signed under the Kitchen domain is not a valid PeerRecord signature.
    payload = encode_message(_record())
    signature = ALICE.sign(signing_bytes(Kitchen.DOMAIN, PeerRecord.TYPE, payload))
    assert _reason(_envelope(signature=signature), registry=TEST_REGISTRY) is Reason.WRONG_DOMAIN
    # ... and a default-registry peer, which does not know that domain, calls it a bad signature.
    assert _reason(_envelope(signature=signature)) is Reason.BAD_SIGNATURE


def test_relabelled_payload_type_is_wrong_domain() -> None:
    # A signed Kitchen relabelled as another type: its signature names the Kitchen domain.
    kitchen_env = codec.unpack(seal(ALICE, _kitchen()))
    kitchen_env["payload_type"] = PeerRecord.TYPE
    assert _reason(codec.pack(kitchen_env), registry=TEST_REGISTRY) is Reason.WRONG_DOMAIN


def _kitchen() -> Kitchen:
    return sample_kitchen(ALICE.peer_id)


def test_unknown_payload_type() -> None:
    assert _reason(seal(ALICE, _kitchen())) is Reason.UNKNOWN_PAYLOAD_TYPE


def test_unexpected_payload_type() -> None:
    data = seal(ALICE, _kitchen())
    assert _reason(data, registry=TEST_REGISTRY, expect=PeerRecord) is Reason.UNEXPECTED_PAYLOAD_TYPE


@pytest.mark.parametrize("n", [0, 31, 33, 64, 65, 1024])
def test_wrong_key_length(n: int) -> None:
    assert _reason(_envelope(public_key=b"\x01" * n)) is Reason.BAD_KEY_LENGTH


def test_truncated_and_trailing_bytes() -> None:
    good = _envelope()
    assert _reason(good[:-1]) is Reason.TRUNCATED
    assert _reason(good[: len(good) // 2]) is Reason.TRUNCATED
    assert _reason(good + b"\x00") is Reason.TRAILING_BYTES


def test_signer_different_from_claimed_peer_id() -> None:
    # Mallory signs a record that claims to be Alice's.
    forged = sign_raw(MALLORY, PeerRecord, encode_message(_record(peer_id=ALICE.peer_id)))
    assert _reason(forged) is Reason.SIGNER_MISMATCH


def test_expected_signer() -> None:
    data = seal(ALICE, _record())
    assert open_envelope(data, signer=ALICE.peer_id).signer == ALICE.peer_id
    assert _reason(data, signer=MALLORY.peer_id) is Reason.SIGNER_MISMATCH


def test_seal_refuses_to_sign_for_another_peer() -> None:
    with pytest.raises(LocalProtocolError) as info:
        seal(MALLORY, _record(peer_id=ALICE.peer_id))
    assert info.value.reason is Reason.SIGNER_MISMATCH


def test_payload_schema_errors_surface_after_signature() -> None:
    # A correctly signed payload that is not a valid PeerRecord: schema error, not a crash.
    data = sign_raw(ALICE, PeerRecord, codec.pack({**to_wire(_record()), "extra": 1}))
    assert _reason(data) is Reason.UNKNOWN_FIELD


def test_every_single_bit_flip_is_rejected() -> None:
    good = seal(ALICE, _record())
    for i in range(len(good) * 8):
        flipped = bytearray(good)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(RemoteProtocolError):
            open_envelope(bytes(flipped))


def test_envelope_errors_are_signature_errors_for_signature_reasons() -> None:
    with pytest.raises(SignatureError):
        open_envelope(_envelope(public_key=b""))
    assert PeerRecord.TYPE in DEFAULT_REGISTRY
