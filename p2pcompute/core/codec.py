"""Canonical msgpack and length-prefixed framing (specs/00-conventions.md).

Canonical form: every value has exactly one encoding — map keys are UTF-8 strings sorted by their
bytes, integers in their shortest form, floats always float64, strings as ``str`` and byte strings as
``bin`` in their shortest headers, no ext types, no duplicate keys. :func:`unpack` accepts only
canonical bytes (it re-encodes what it decoded and compares), so a signature over bytes pins one
value and one value has one hash.

Frames are a 4-byte big-endian unsigned length followed by that many bytes. The length is checked
against the limit *before* anything is buffered for it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pcompute.errors import DecodeError, FramingError, LocalProtocolError, Reason

__all__ = [
    "DEFAULT_LIMITS",
    "FRAME_HEADER_SIZE",
    "MAX_FRAME_SIZE",
    "DecodeLimits",
    "FrameDecoder",
    "encode_frame",
    "pack",
    "read_frame_header",
    "unpack",
]

FRAME_HEADER_SIZE = 4
MAX_FRAME_SIZE = 1 << 20  # 1 MiB: control messages; bulk tensor data does not travel in frames
_FRAME_HEADER = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Hard limits applied while decoding untrusted msgpack (all checked before allocation)."""

    max_bytes: int = MAX_FRAME_SIZE
    max_str_len: int = 64 * 1024
    max_bin_len: int = MAX_FRAME_SIZE
    max_array_len: int = 4096
    max_map_len: int = 256
    max_depth: int = 16


DEFAULT_LIMITS = DecodeLimits()

_Wire = None | bool | int | float | str | bytes | list[Any] | dict[str, Any]
_MSGPACK_INT_MIN = -(1 << 63)
_MSGPACK_INT_MAX = (1 << 64) - 1


class _ExtTypeSeen(Exception):
    pass


def _reject_ext(code: int, data: bytes) -> object:
    raise _ExtTypeSeen(code)


def _canonicalise(value: object, depth: int = 0) -> _Wire:
    """Return a copy of ``value`` whose maps have sorted keys; raise on anything not representable."""
    if isinstance(value, (list, tuple, dict)) and depth >= DEFAULT_LIMITS.max_depth:
        raise LocalProtocolError(Reason.TOO_DEEP, f"more than {DEFAULT_LIMITS.max_depth} nested arrays/maps")
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return value
    if isinstance(value, int):
        if not _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
            raise LocalProtocolError(Reason.OUT_OF_RANGE, f"integer {value} does not fit msgpack")
        return value
    if isinstance(value, (list, tuple)):
        return [_canonicalise(item, depth + 1) for item in value]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise LocalProtocolError(Reason.WRONG_TYPE, f"map key {key!r} is not a string")
        return {key: _canonicalise(value[key], depth + 1) for key in sorted(value, key=_key_order)}
    raise LocalProtocolError(Reason.WRONG_TYPE, f"{type(value).__name__} cannot be encoded")


def _key_order(key: str) -> bytes:
    return key.encode("utf-8")


def pack(value: object) -> bytes:
    """Encode ``value`` (None, bool, int, float, str, bytes, list/tuple, dict with str keys) canonically."""
    data: bytes = msgpack.packb(_canonicalise(value), use_bin_type=True, use_single_float=False, datetime=False)
    return data


def unpack(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """Decode canonical msgpack from untrusted ``data``.

    Raises :class:`DecodeError` with reason ``too_large``, ``truncated``, ``trailing_bytes``,
    ``malformed``, ``ext_type``, ``too_deep`` or ``non_canonical``; never any other exception.
    """
    if len(data) > limits.max_bytes:
        raise DecodeError(Reason.TOO_LARGE, f"{len(data)} bytes, limit {limits.max_bytes}")
    unpacker = msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=False,
        timestamp=0,
        ext_hook=_reject_ext,
        max_buffer_size=max(len(data), 1),
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
        max_array_len=limits.max_array_len,
        max_map_len=limits.max_map_len,
        max_ext_len=limits.max_bin_len,
    )
    try:
        unpacker.feed(data)
        value = unpacker.unpack()
    except msgpack.OutOfData as exc:
        raise DecodeError(Reason.TRUNCATED, "input ends inside a value") from exc
    except _ExtTypeSeen as exc:
        raise DecodeError(Reason.EXT_TYPE, f"ext type {exc.args[0]} is not allowed") from exc
    except msgpack.StackError as exc:
        raise DecodeError(Reason.TOO_DEEP, "nesting exceeds the decoder stack") from exc
    except (msgpack.FormatError, UnicodeDecodeError) as exc:
        raise DecodeError(Reason.MALFORMED, str(exc) or type(exc).__name__) from exc
    except TypeError as exc:  # e.g. an array or map used as a map key (unhashable)
        raise DecodeError(Reason.MALFORMED, str(exc)) from exc
    except ValueError as exc:
        # msgpack raises a plain ValueError when a declared length passes a max_*_len limit.
        raise DecodeError(Reason.TOO_LARGE, str(exc)) from exc
    if unpacker.tell() != len(data):
        raise DecodeError(Reason.TRAILING_BYTES, f"{len(data) - unpacker.tell()} bytes after the value")
    _check_shape(value, limits.max_depth)
    try:
        again = pack(value)
    except LocalProtocolError as exc:  # pragma: no cover - _check_shape admits only packable values
        raise DecodeError(Reason.MALFORMED, exc.detail) from exc
    if again != data:
        raise DecodeError(Reason.NON_CANONICAL, "not the canonical encoding of its value")
    return value


def _check_shape(value: object, max_depth: int) -> None:
    """Iteratively check nesting depth, map key types and forbidden ext values (no recursion)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth >= max_depth:
                raise DecodeError(Reason.TOO_DEEP, f"nested deeper than {max_depth}")
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        raise DecodeError(Reason.MALFORMED, "map keys must be strings")
                    stack.append((sub, depth + 1))
            else:
                stack.extend((sub, depth + 1) for sub in item)
        elif isinstance(item, msgpack.Timestamp):
            raise DecodeError(Reason.EXT_TYPE, "the timestamp ext type is not allowed")


def encode_frame(payload: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Prefix ``payload`` with its 4-byte big-endian length."""
    if len(payload) > max_frame_size:
        raise LocalProtocolError(Reason.FRAME_TOO_LARGE, f"{len(payload)} bytes, limit {max_frame_size}")
    return _FRAME_HEADER.pack(len(payload)) + payload


def read_frame_header(header: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> int:
    """Length announced by a 4-byte frame header; raise ``frame_too_large`` before anything is read."""
    (length,) = _FRAME_HEADER.unpack(header)
    if length > max_frame_size:
        raise FramingError(Reason.FRAME_TOO_LARGE, f"frame announces {length} bytes, limit {max_frame_size}")
    return int(length)


class FrameDecoder:
    """Sans-I/O frame splitter: feed bytes as they arrive, take out whole frames.

    Buffers at most one header plus one frame of at most ``max_frame_size`` bytes; an over-limit
    length prefix raises :class:`FramingError` at once, before any of its body is buffered.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max = max_frame_size
        self._buffer = bytearray()
        self._expected: int | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return every frame it completes (possibly none).

        Bytes are taken only as far as the current header or frame needs them, so an over-limit
        length prefix is refused before any byte after it is buffered.
        """
        frames: list[bytes] = []
        view = memoryview(data)
        while view:
            if self._expected is None:
                take = FRAME_HEADER_SIZE - len(self._buffer)
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) < FRAME_HEADER_SIZE:
                    break
                header = bytes(self._buffer)
                self._buffer.clear()
                self._expected = read_frame_header(header, self._max)
            take = self._expected - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == self._expected:
                frames.append(bytes(self._buffer))
                self._buffer.clear()
                self._expected = None
        return frames

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buffer)

    def close(self) -> None:
        """The byte stream ended: raise ``truncated_frame`` if a frame was cut short."""
        if self._buffer or self._expected is not None:
            raise FramingError(Reason.TRUNCATED_FRAME, f"stream ended with {len(self._buffer)} bytes of a frame")
