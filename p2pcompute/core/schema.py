"""Typed schemas for wire structs: frozen keyword-only dataclasses checked field by field.

A struct is a frozen, keyword-only dataclass deriving from :class:`Struct`. Its field annotations
are the schema; ``typing.Annotated`` adds bounds::

    nonce: Annotated[int, Range(0, U64_MAX)]
    id: Annotated[bytes, Size(16, 16)]
    addrs: Annotated[tuple[Annotated[str, Size(1, 256)], ...], Size(0, 16)]
    dtype: Annotated[str, Size(1, 16), OneOf(DTYPES, Reason.BAD_DTYPE)]

Supported field types: ``int``, ``float`` (finite), ``bool``, ``str`` (size in UTF-8 bytes),
``bytes``, ``X | None``, ``tuple[X, ...]``, nested :class:`Struct` subclasses, :class:`PeerId` (wire:
its 38 raw bytes) and ``str``-valued ``Enum`` classes (wire: the value). :class:`OneOf` closes a ``str``
field to a set of names, refused with a reason of its own (dtype names: ``bad_dtype``).

:func:`to_wire` turns a struct into a msgpack-ready map and checks it (raising
:class:`LocalProtocolError`); :func:`from_wire` checks an untrusted decoded value and builds the
struct (raising :class:`SchemaError`). Both walk the same compiled :class:`FieldType` tree, which
tests also use to generate values.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, Union, cast

from p2pcompute.core.identity import PeerId
from p2pcompute.errors import LocalProtocolError, P2PComputeError, Reason, SchemaError

__all__ = [
    "I64_MAX",
    "I64_MIN",
    "U32_MAX",
    "U64_MAX",
    "FieldType",
    "OneOf",
    "Range",
    "Size",
    "Struct",
    "TBool",
    "TBytes",
    "TEnum",
    "TFloat",
    "TInt",
    "TOptional",
    "TPeerId",
    "TStr",
    "TStruct",
    "TTuple",
    "fields_of",
    "from_wire",
    "to_wire",
]

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

# Defaults for fields without explicit bounds.
_DEFAULT_STR_MAX = 4096
_DEFAULT_BYTES_MAX = 1 << 20
_DEFAULT_TUPLE_MAX = 1024


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive numeric bounds for an ``int`` or ``float`` field."""

    lo: int | float
    hi: int | float


@dataclass(frozen=True, slots=True)
class Size:
    """Inclusive length bounds: UTF-8 bytes of a ``str``, bytes of ``bytes``, items of a ``tuple``."""

    lo: int
    hi: int


@dataclass(frozen=True, slots=True, init=False)
class OneOf:
    """A ``str`` field whose value must be one of ``names``; any other is refused with ``reason``.

    Checked after the length bounds, on encoding (:class:`LocalProtocolError`) and decoding (:class:`SchemaError`).
    """

    names: frozenset[str]
    reason: Reason

    def __init__(self, names: Iterable[str], reason: Reason = Reason.OUT_OF_RANGE) -> None:
        object.__setattr__(self, "names", frozenset(names))
        object.__setattr__(self, "reason", reason)


# --- the compiled type tree -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TInt:
    lo: int = I64_MIN
    hi: int = U64_MAX


@dataclass(frozen=True, slots=True)
class TFloat:
    lo: float = -math.inf
    hi: float = math.inf


@dataclass(frozen=True, slots=True)
class TBool:
    pass


@dataclass(frozen=True, slots=True)
class TStr:
    lo: int = 0
    hi: int = _DEFAULT_STR_MAX
    names: frozenset[str] | None = None  # a closed set of values (OneOf), refused with ``reason``
    reason: Reason = Reason.OUT_OF_RANGE


@dataclass(frozen=True, slots=True)
class TBytes:
    lo: int = 0
    hi: int = _DEFAULT_BYTES_MAX


@dataclass(frozen=True, slots=True)
class TPeerId:
    pass


@dataclass(frozen=True, slots=True)
class TEnum:
    cls: type[enum.Enum]


@dataclass(frozen=True, slots=True)
class TOptional:
    inner: FieldType


@dataclass(frozen=True, slots=True)
class TTuple:
    item: FieldType
    lo: int = 0
    hi: int = _DEFAULT_TUPLE_MAX


@dataclass(frozen=True, slots=True)
class TStruct:
    cls: type[Struct]


FieldType = TInt | TFloat | TBool | TStr | TBytes | TPeerId | TEnum | TOptional | TTuple | TStruct


@dataclass(frozen=True, kw_only=True)
class Struct:
    """Base of every wire struct. Subclasses are ``@dataclass(frozen=True, kw_only=True)``."""


S = TypeVar("S", bound=Struct)


def _compile(tp: Any, owner: type) -> FieldType:
    bounds: list[Range | Size | OneOf] = []
    if typing.get_origin(tp) is Annotated:
        tp, *extras = typing.get_args(tp)
        bounds = [extra for extra in extras if isinstance(extra, (Range, Size, OneOf))]
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"{owner.__name__}: only `X | None` unions are supported, got {tp}")
        return TOptional(_compile(args[0], owner))
    if origin is tuple:
        targs = typing.get_args(tp)
        if len(targs) != 2 or targs[1] is not Ellipsis:
            raise TypeError(f"{owner.__name__}: only tuple[X, ...] is supported, got {tp}")
        size = _one(bounds, Size)
        item = _compile(targs[0], owner)
        return TTuple(item, size.lo, size.hi) if size else TTuple(item)
    if tp is bool:
        return TBool()
    if tp is int:
        rng = _one(bounds, Range)
        return TInt(int(rng.lo), int(rng.hi)) if rng else TInt()
    if tp is float:
        rng = _one(bounds, Range)
        return TFloat(float(rng.lo), float(rng.hi)) if rng else TFloat()
    if tp is str:
        size = _one(bounds, Size)
        lo, hi = (size.lo, size.hi) if size else (0, _DEFAULT_STR_MAX)
        one_of = _one(bounds, OneOf)
        return TStr(lo, hi, one_of.names, one_of.reason) if one_of else TStr(lo, hi)
    if tp is bytes:
        size = _one(bounds, Size)
        return TBytes(size.lo, size.hi) if size else TBytes()
    if tp is PeerId:
        return TPeerId()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return TEnum(tp)
    if isinstance(tp, type) and issubclass(tp, Struct):
        return TStruct(tp)
    raise TypeError(f"{owner.__name__}: unsupported field type {tp!r}")


_B = TypeVar("_B", Range, Size, OneOf)


def _one(bounds: list[Range | Size | OneOf], kind: type[_B]) -> _B | None:
    found = [b for b in bounds if isinstance(b, kind)]
    return found[0] if found else None


def fields_of(cls: type[Struct]) -> tuple[tuple[str, FieldType], ...]:
    """The compiled schema of a struct class: (field name, type) pairs in declaration order."""
    return _compiled_fields(cast(Hashable, cls))


@functools.cache
def _compiled_fields(key: Hashable) -> tuple[tuple[str, FieldType], ...]:
    cls = cast(type[Struct], key)
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f.name, _compile(hints[f.name], cls)) for f in dataclasses.fields(cls))


# --- encoding ----------------------------------------------------------------------------------


def to_wire(struct: Struct) -> dict[str, Any]:
    """Check ``struct`` against its schema and return its msgpack-ready map."""
    return _struct_to_wire(struct, type(struct), type(struct).__name__)


def _struct_to_wire(value: object, cls: type[Struct], path: str) -> dict[str, Any]:
    if not isinstance(value, cls):
        raise LocalProtocolError(Reason.WRONG_TYPE, f"{path}: expected {cls.__name__}")
    return {name: _to_wire(getattr(value, name), ft, f"{path}.{name}") for name, ft in fields_of(cls)}


def _to_wire(value: object, ft: FieldType, path: str) -> Any:
    _check(value, ft, path, LocalProtocolError)
    match ft:
        case TPeerId():
            assert isinstance(value, PeerId)
            return value.raw
        case TEnum():
            assert isinstance(value, enum.Enum)
            return value.value
        case TOptional(inner=inner):
            return None if value is None else _to_wire(value, inner, path)
        case TTuple(item=item):
            assert isinstance(value, tuple)
            return [_to_wire(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        case TStruct(cls=cls):
            return _struct_to_wire(value, cls, path)
        case _:
            return value


# --- decoding ----------------------------------------------------------------------------------


def from_wire(cls: type[S], value: object, path: str | None = None) -> S:
    """Check an untrusted decoded ``value`` against ``cls``'s schema and build the struct.

    Raises :class:`SchemaError` with reason ``not_a_map``, ``unknown_field``, ``missing_field``,
    ``wrong_type``, ``out_of_range``, ``too_long``, ``bad_peer_id`` or the reason of a :class:`OneOf` field
    (``bad_dtype``); never another exception.
    """
    return _struct_from_wire(cls, value, path or cls.__name__)


def _struct_from_wire(cls: type[S], value: object, path: str) -> S:
    if not isinstance(value, dict):
        raise SchemaError(Reason.NOT_A_MAP, f"{path}: expected a map, got {_wire_type(value)}")
    schema = fields_of(cls)
    known = {name for name, _ in schema}
    for key in value:
        if key not in known:
            raise SchemaError(Reason.UNKNOWN_FIELD, f"{path}: unknown field {str(key)[:64]!r}")
    kwargs: dict[str, Any] = {}
    for name, ft in schema:
        if name not in value:
            raise SchemaError(Reason.MISSING_FIELD, f"{path}: missing field {name!r}")
        kwargs[name] = _from_wire(value[name], ft, f"{path}.{name}")
    try:
        return cls(**kwargs)
    except P2PComputeError as exc:
        raise SchemaError(exc.reason, f"{path}: {exc.detail}") from exc


def _from_wire(value: object, ft: FieldType, path: str) -> Any:
    match ft:
        case TPeerId():
            if not isinstance(value, bytes):
                raise SchemaError(Reason.WRONG_TYPE, f"{path}: expected peer id bytes, got {_wire_type(value)}")
            try:
                return PeerId(value)
            except SchemaError as exc:
                raise SchemaError(exc.reason, f"{path}: {exc.detail}") from exc
        case TEnum(cls=enum_cls):
            if not isinstance(value, str):
                raise SchemaError(Reason.WRONG_TYPE, f"{path}: expected str, got {_wire_type(value)}")
            try:
                return enum_cls(value)
            except ValueError as exc:
                raise SchemaError(Reason.OUT_OF_RANGE, f"{path}: {value[:64]!r} is not a known value") from exc
        case TOptional(inner=inner):
            return None if value is None else _from_wire(value, inner, path)
        case TTuple(item=item, lo=lo, hi=hi):
            if not isinstance(value, list):
                raise SchemaError(Reason.WRONG_TYPE, f"{path}: expected array, got {_wire_type(value)}")
            _check_len(len(value), lo, hi, path, SchemaError)
            return tuple(_from_wire(v, item, f"{path}[{i}]") for i, v in enumerate(value))
        case TStruct(cls=cls):
            return _struct_from_wire(cls, value, path)
        case _:
            _check(value, ft, path, SchemaError)
            return value


# --- shared checks -----------------------------------------------------------------------------


def _check(value: object, ft: FieldType, path: str, error: type[P2PComputeError]) -> None:
    """Check scalar types and bounds; containers only check their own kind and length here."""
    match ft:
        case TBool():
            if not isinstance(value, bool):
                raise error(Reason.WRONG_TYPE, f"{path}: expected bool, got {_wire_type(value)}")
        case TInt(lo=lo, hi=hi):
            if not isinstance(value, int) or isinstance(value, bool):
                raise error(Reason.WRONG_TYPE, f"{path}: expected int, got {_wire_type(value)}")
            if not lo <= value <= hi:
                raise error(Reason.OUT_OF_RANGE, f"{path}: {value} not in [{lo}, {hi}]")
        case TFloat(lo=flo, hi=fhi):
            if not isinstance(value, float):
                raise error(Reason.WRONG_TYPE, f"{path}: expected float, got {_wire_type(value)}")
            if not math.isfinite(value) or not flo <= value <= fhi:
                raise error(Reason.OUT_OF_RANGE, f"{path}: {value} not a finite value in [{flo}, {fhi}]")
        case TStr(lo=lo, hi=hi, names=names, reason=reason):
            if not isinstance(value, str):
                raise error(Reason.WRONG_TYPE, f"{path}: expected str, got {_wire_type(value)}")
            _check_len(len(value.encode("utf-8", "surrogatepass")), lo, hi, path, error)
            if names is not None and value not in names:
                raise error(reason, f"{path}: {value[:64]!r} is not one of {sorted(names)}")
        case TBytes(lo=lo, hi=hi):
            if not isinstance(value, bytes):
                raise error(Reason.WRONG_TYPE, f"{path}: expected bytes, got {_wire_type(value)}")
            _check_len(len(value), lo, hi, path, error)
        case TPeerId():
            if not isinstance(value, PeerId):
                raise error(Reason.WRONG_TYPE, f"{path}: expected PeerId, got {_wire_type(value)}")
        case TEnum(cls=enum_cls):
            if not isinstance(value, enum_cls):
                raise error(Reason.WRONG_TYPE, f"{path}: expected {enum_cls.__name__}, got {_wire_type(value)}")
        case TOptional():
            pass
        case TTuple(lo=lo, hi=hi):
            if not isinstance(value, tuple):
                raise error(Reason.WRONG_TYPE, f"{path}: expected tuple, got {_wire_type(value)}")
            _check_len(len(value), lo, hi, path, error)
        case TStruct():
            pass


def _check_len(n: int, lo: int, hi: int, path: str, error: type[P2PComputeError]) -> None:
    if n > hi:
        raise error(Reason.TOO_LONG, f"{path}: length {n} over the limit {hi}")
    if n < lo:
        raise error(Reason.OUT_OF_RANGE, f"{path}: length {n} under the minimum {lo}")


def _wire_type(value: object) -> str:
    return type(value).__name__
