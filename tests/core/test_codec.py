"""Canonical msgpack and framing."""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.core import codec
from p2pcompute.core.codec import DecodeLimits, FrameDecoder, encode_frame, pack, unpack
from p2pcompute.errors import DecodeError, FramingError, LocalProtocolError, Reason

# Values of the canonical subset: None, bool, int, float64, str, bytes, list, dict with str keys.
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@given(wire_values)
def test_round_trip_and_unique_encoding(value: object) -> None:
    data = pack(value)
    decoded = unpack(data)
    assert decoded == value
    assert pack(decoded) == data  # decode -> encode gives the same bytes


@given(st.dictionaries(st.text(max_size=8), st.integers(0, 9), min_size=2, max_size=6))
def test_map_key_order_does_not_change_bytes(d: dict[str, int]) -> None:
    assert pack(d) == pack(dict(reversed(list(d.items()))))


def test_map_keys_sorted_by_utf8_bytes() -> None:
    data = pack({"b": 1, "a": 2, "é": 3, "Z": 4})
    assert list(msgpack.unpackb(data).keys()) == ["Z", "a", "b", "é"]


def test_tuples_encode_as_arrays() -> None:
    assert pack((1, 2)) == pack([1, 2])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (msgpack.packb({"b": 1, "a": 2}), Reason.NON_CANONICAL),  # unsorted keys
        (b"\xcd\x00\x01", Reason.NON_CANONICAL),  # uint16 holding 1
        (b"\xca\x3f\x80\x00\x00", Reason.NON_CANONICAL),  # float32 1.0
        (b"\xd9\x01a", Reason.NON_CANONICAL),  # str8 holding a 1-char string
        (b"\x82\xa1a\x01\xa1a\x02", Reason.NON_CANONICAL),  # duplicate key
        (msgpack.packb(msgpack.ExtType(5, b"xy")), Reason.EXT_TYPE),
        (b"\xd6\xff\x00\x00\x00\x01", Reason.EXT_TYPE),  # timestamp ext
        (b"\xc1", Reason.MALFORMED),  # reserved byte
        (b"\xa2\xff\xfe", Reason.MALFORMED),  # invalid utf-8
        (msgpack.packb({1: 2}), Reason.MALFORMED),  # non-string key
        (b"", Reason.TRUNCATED),
        (pack([1, 2, "abc"])[:-1], Reason.TRUNCATED),
        (pack([1]) + b"\x01", Reason.TRAILING_BYTES),
        (b"\x91" * 17 + b"\x01", Reason.TOO_DEEP),
        (b"\x91" * 5000 + b"\x01", Reason.TOO_DEEP),
        (b"\xdd\x80\x00\x00\x00", Reason.TOO_LARGE),  # array claiming 2^31 items
        (b"\xc6\x80\x00\x00\x00", Reason.TRUNCATED),  # bin claiming 2^31 bytes: body missing
        (b"\xdf\x80\x00\x00\x00", Reason.TOO_LARGE),  # map claiming 2^31 pairs
    ],
)
def test_rejections(data: bytes, reason: Reason) -> None:
    with pytest.raises(DecodeError) as info:
        unpack(data)
    assert info.value.reason is reason


def test_limits_are_enforced() -> None:
    limits = DecodeLimits(max_bytes=100, max_str_len=4, max_bin_len=4, max_array_len=2, max_map_len=1, max_depth=2)
    for value in ["abcde", b"abcde", [1, 2, 3], {"a": 1, "b": 2}]:
        with pytest.raises(DecodeError) as info:
            unpack(pack(value), limits)
        assert info.value.reason is Reason.TOO_LARGE
    with pytest.raises(DecodeError) as info:
        unpack(pack([[[1]]]), limits)
    assert info.value.reason is Reason.TOO_DEEP
    with pytest.raises(DecodeError) as info:
        unpack(b"\xc4\x00" + b"\x00" * 200, limits)
    assert info.value.reason is Reason.TOO_LARGE


def test_huge_length_claims_allocate_nothing() -> None:
    tracemalloc.start()
    try:
        for data in (b"\xdd\x80\x00\x00\x00", b"\xc6\x80\x00\x00\x00", b"\xdb\x80\x00\x00\x00"):
            with pytest.raises(DecodeError):
                unpack(data)
        decoder = FrameDecoder()
        with pytest.raises(FramingError):
            decoder.feed(struct.pack(">I", 1 << 31))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_pack_and_unpack_agree_on_the_depth_limit() -> None:
    value: object = 1
    for _ in range(codec.DEFAULT_LIMITS.max_depth):
        value = [value]
    assert unpack(pack(value)) == value
    with pytest.raises(LocalProtocolError) as info:
        pack([value])
    assert info.value.reason is Reason.TOO_DEEP


def test_unhashable_map_key_is_malformed() -> None:
    with pytest.raises(DecodeError) as info:
        unpack(b"\x81\x90\x01")  # {[]: 1}
    assert info.value.reason is Reason.MALFORMED


def test_frame_decoder_never_buffers_past_a_bad_header() -> None:
    decoder = FrameDecoder(max_frame_size=16)
    with pytest.raises(FramingError):
        decoder.feed(struct.pack(">I", 1 << 30) + b"x" * 100_000)
    assert decoder.pending == 0


def test_empty_frames() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(b"") * 3) == [b"", b"", b""]


def test_pack_refuses_what_is_not_in_the_subset() -> None:
    for value in [{1: 2}, {"a": object()}, 1 << 64, -(1 << 63) - 1, {"a": {1.5}}]:
        with pytest.raises(LocalProtocolError):
            pack(value)


# --- framing ---


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 50))
def test_frames_round_trip_in_any_chunking(payloads: list[bytes], chunk: int) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(0, len(stream), chunk):
        out.extend(decoder.feed(stream[i : i + chunk]))
    decoder.close()
    assert out == payloads
    assert decoder.pending == 0


def test_frame_length_prefix_over_limit_rejected_before_body() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(FramingError) as info:
        decoder.feed(struct.pack(">I", 2**31))
    assert info.value.reason is Reason.FRAME_TOO_LARGE
    assert decoder.pending == 0


def test_frame_exactly_at_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    assert decoder.feed(encode_frame(b"x" * 10, 10)) == [b"x" * 10]
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(b"x" * 11, 10)
    assert info.value.reason is Reason.FRAME_TOO_LARGE


@pytest.mark.parametrize("cut", [1, 3, 4, 7])
def test_truncated_frame_reported_on_close(cut: int) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(b"hello")[:cut]) == []
    with pytest.raises(FramingError) as info:
        decoder.close()
    assert info.value.reason is Reason.TRUNCATED_FRAME


def test_default_limit_is_one_mebibyte() -> None:
    assert codec.MAX_FRAME_SIZE == 1 << 20
