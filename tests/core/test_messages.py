"""Message schemas: round trips for every registered type, and every schema rejection reason."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.core import codec
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import (
    DEFAULT_REGISTRY,
    JOB_MESSAGES,
    CheatingEvidence,
    CheckEvidence,
    GpuAdvert,
    Message,
    MessageRegistry,
    PeerRecord,
    decode_message,
    encode_message,
)
from p2pcompute.core.schema import fields_of, to_wire
from p2pcompute.errors import LocalProtocolError, Reason, RemoteProtocolError, SchemaError
from tests.core.strategies import TEST_REGISTRY, Kitchen, sample_kitchen, sample_record, structs


@pytest.mark.parametrize("payload_type", sorted(TEST_REGISTRY))
@given(data=st.data())
def test_every_message_type_round_trips(payload_type: str, data: st.DataObject) -> None:
    cls = TEST_REGISTRY[payload_type]
    message = data.draw(structs(cls))
    encoded = encode_message(message)
    decoded = decode_message(cls, encoded)
    assert decoded == message
    assert encode_message(decoded) == encoded


def test_default_registry_holds_the_protocol_types() -> None:
    assert set(DEFAULT_REGISTRY) == {PeerRecord.TYPE, GpuAdvert.TYPE, CheatingEvidence.TYPE, CheckEvidence.TYPE} | {
        c.TYPE for c in JOB_MESSAGES
    }
    assert DEFAULT_REGISTRY[PeerRecord.TYPE] is PeerRecord
    assert DEFAULT_REGISTRY[GpuAdvert.TYPE] is GpuAdvert


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError):
        MessageRegistry(PeerRecord, PeerRecord)


def test_messages_are_frozen_and_keyword_only() -> None:
    record = _record()
    with pytest.raises(AttributeError):
        record.seq = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        PeerRecord(1, b"\x00" * 16)  # type: ignore[misc]


def test_every_message_has_the_common_header() -> None:
    for cls in TEST_REGISTRY.values():
        names = [name for name, _ in fields_of(cls)]
        assert names[:4] == ["version", "id", "nonce", "expires_at"]


PAIR = KeyPair.from_seed(bytes(range(32)))


def _record(**changes: Any) -> PeerRecord:
    return sample_record(PAIR, **changes)


def _wire(**changes: Any) -> dict[str, Any]:
    wire = to_wire(_record())
    wire.update(changes)
    return wire


def _reason_of(wire: object, cls: type[Message] = PeerRecord) -> Reason:
    with pytest.raises(SchemaError) as info:
        decode_message(cls, codec.pack(wire))
    return info.value.reason


def test_unknown_field() -> None:
    assert _reason_of(_wire(extra=1)) is Reason.UNKNOWN_FIELD


def test_missing_field() -> None:
    wire = _wire()
    del wire["seq"]
    assert _reason_of(wire) is Reason.MISSING_FIELD


@pytest.mark.parametrize(
    "changes",
    [
        {"seq": "3"},
        {"seq": 3.0},  # a float where an int is meant
        {"seq": True},  # bool is not an int on the wire
        {"id": "x" * 16},
        {"addrs": "/ip4/1.2.3.4/tcp/1"},
        {"addrs": [1]},
        {"peer_id": str(PAIR.peer_id)},
        {"nonce": None},
    ],
)
def test_wrong_type(changes: dict[str, Any]) -> None:
    assert _reason_of(_wire(**changes)) is Reason.WRONG_TYPE


@pytest.mark.parametrize("changes", [{"seq": -1}, {"id": b"\x01" * 15}, {"addrs": []}, {"addrs": [""]}])
def test_out_of_range(changes: dict[str, Any]) -> None:
    assert _reason_of(_wire(**changes)) is Reason.OUT_OF_RANGE


@pytest.mark.parametrize("changes", [{"id": b"\x01" * 17}, {"addrs": ["/a"] * 17}, {"addrs": ["x" * 257]}])
def test_too_long(changes: dict[str, Any]) -> None:
    assert _reason_of(_wire(**changes)) is Reason.TOO_LONG


def test_bad_peer_id() -> None:
    assert _reason_of(_wire(peer_id=b"\x00" * 38)) is Reason.BAD_PEER_ID


def test_not_a_map() -> None:
    assert _reason_of([1, 2, 3]) is Reason.NOT_A_MAP


def test_unsupported_version_is_reported_before_field_differences() -> None:
    assert _reason_of(_wire(version=2, new_field=1)) is Reason.UNSUPPORTED_VERSION


def _kitchen_wire(**changes: Any) -> dict[str, Any]:
    kitchen = sample_kitchen(PAIR.peer_id)
    wire = to_wire(kitchen)
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"colour": "blue"}, Reason.OUT_OF_RANGE),
        ({"colour": 1}, Reason.WRONG_TYPE),
        ({"ratio": 1}, Reason.WRONG_TYPE),  # an int where a float is meant
        ({"ratio": float("nan")}, Reason.OUT_OF_RANGE),
        ({"ratio": float("inf")}, Reason.OUT_OF_RANGE),
        ({"delta": 1001}, Reason.OUT_OF_RANGE),
        ({"maybe": 11}, Reason.OUT_OF_RANGE),
        ({"inner": {"name": "a"}}, Reason.MISSING_FIELD),
        ({"inner": {"name": "a", "weight": 1.0, "x": 1}}, Reason.UNKNOWN_FIELD),
        ({"inner": 5}, Reason.NOT_A_MAP),
        ({"items": [{"name": "", "weight": 1.0}]}, Reason.OUT_OF_RANGE),
        ({"tags": ["123456789"]}, Reason.TOO_LONG),
        ({"label": "é" * 21}, Reason.TOO_LONG),  # 42 UTF-8 bytes > 40
    ],
)
def test_nested_and_other_field_kinds(changes: dict[str, Any], reason: Reason) -> None:
    assert _reason_of(_kitchen_wire(**changes), Kitchen) is reason


def test_decoding_non_canonical_message_is_rejected() -> None:
    import msgpack

    data = msgpack.packb(dict(reversed(list(_wire().items()))), use_bin_type=True)
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(PeerRecord, data)
    assert info.value.reason is Reason.NON_CANONICAL


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"seq": -1}, Reason.OUT_OF_RANGE),
        ({"addrs": ()}, Reason.OUT_OF_RANGE),
        ({"id": b"x"}, Reason.OUT_OF_RANGE),
        ({"seq": "1"}, Reason.WRONG_TYPE),
        ({"version": 9}, Reason.UNSUPPORTED_VERSION),
    ],
)
def test_encoding_an_invalid_message_is_a_local_error(changes: dict[str, Any], reason: Reason) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_message(_record(**changes))
    assert info.value.reason is reason
