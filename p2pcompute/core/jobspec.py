"""The job format: a graph of allow-listed core ATen ops over content-addressed tensors (specs/job-format.md).

A job is data, never code. A :class:`JobSpec` names its tensors by :class:`TensorMeta` (inputs, then constants) and
lists :class:`Node` s, each an op name from :data:`ALLOWED_OPS` with typed arguments (:data:`Arg`). Arguments refer to
tensors only backwards: an input, a constant, or the output of an earlier node (an element of it for ops that return
tuples). :func:`encode_job` gives the one canonical msgpack encoding; :func:`decode_job` checks untrusted bytes and
raises only :class:`JobFormatError` with a specific reason. Pure: no torch here (``compute/interpreter.py`` runs it).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from p2pcompute.core import codec
from p2pcompute.core.schema import U32_MAX, U64_MAX, Range, Struct, from_wire, to_wire
from p2pcompute.core.tensors import DIGEST_SIZE, DTYPES, TensorMeta, check_blob
from p2pcompute.errors import JobFormatError, LocalProtocolError, P2PComputeError, Reason

__all__ = [
    "ALLOWED_OPS",
    "BUNDLE_FORMAT",
    "DEFAULT_JOB_LIMITS",
    "JOB_FORMAT_VERSION",
    "LAYOUTS",
    "MAX_CONSTANTS",
    "MAX_INPUTS",
    "MAX_LIST_LEN",
    "MAX_OUTPUTS",
    "MAX_SPEC_SIZE",
    "MAX_TUPLE_OUTPUTS",
    "MEMORY_FORMATS",
    "OP_SCHEMAS",
    "SPEC_DECODE_LIMITS",
    "TUPLE_OPS",
    "Arg",
    "ArgType",
    "CompareMode",
    "Comparison",
    "ConstRef",
    "DType",
    "Device",
    "InputRef",
    "JobLimits",
    "JobSpec",
    "JobSummary",
    "Layout",
    "MemoryFormat",
    "Node",
    "NodeRef",
    "OpSchema",
    "Param",
    "TensorRef",
    "check_args",
    "decode_bundle",
    "decode_job",
    "encode_bundle",
    "encode_job",
    "job_digest",
    "node_refs",
    "summary",
    "tighter",
]

JOB_FORMAT_VERSION = 1
MAX_SPEC_SIZE = codec.MAX_FRAME_SIZE - (65 << 10)
"""Largest encoded job spec (982,016 bytes): the spec travels in one negotiation request frame (1 MiB) next to the
signed request (at most 64 KiB) and 1 KiB of framing. ``core/negotiation.py`` uses this constant. Tensor data never
travels inside the spec."""
MAX_INPUTS = 256
MAX_CONSTANTS = 16384
MAX_OUTPUTS = 64  # = the outputs bound of JobResult
MAX_LIST_LEN = 1024
MAX_KWARGS = 16
MAX_NAME_LEN = 64
GIB = 1 << 30

BUNDLE_FORMAT = "p2pcompute/job-bundle"
BUNDLE_VERSION = 1

U32 = Annotated[int, Range(0, U32_MAX)]
U64 = Annotated[int, Range(0, U64_MAX)]
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
_S = TypeVar("_S", bound=Struct)

# --- the allow-list --------------------------------------------------------------------------------------------------

_SCHEMA_TEXT = """
_adaptive_avg_pool2d(Tensor self, SymInt[2] output_size) -> Tensor
_adaptive_avg_pool2d_backward(Tensor grad_output, Tensor self) -> Tensor
_log_softmax(Tensor self, int dim, bool half_to_float) -> Tensor
_native_batch_norm_legit_no_training(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,
    Tensor running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)
_softmax(Tensor self, int dim, bool half_to_float) -> Tensor
_to_copy(Tensor self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None, bool? pin_memory=None,
    bool non_blocking=False, MemoryFormat? memory_format=None) -> Tensor
_unsafe_view(Tensor self, SymInt[] size) -> Tensor
abs(Tensor self) -> Tensor
add.Scalar(Tensor self, Scalar other, Scalar alpha=1) -> Tensor
add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor
addmm(Tensor self, Tensor mat1, Tensor mat2, *, Scalar beta=1, Scalar alpha=1) -> Tensor
alias(Tensor(a) self) -> Tensor(a)
amax(Tensor self, int[1] dim=[], bool keepdim=False) -> Tensor
amin(Tensor self, int[1] dim=[], bool keepdim=False) -> Tensor
any(Tensor self) -> Tensor
any.dim(Tensor self, int dim, bool keepdim=False) -> Tensor
any.dims(Tensor self, int[]? dim=None, bool keepdim=False) -> Tensor
arange(Scalar end, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None) -> Tensor
arange.start(Scalar start, Scalar end, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None) -> Tensor
arange.start_step(Scalar start, Scalar end, Scalar step=1, *, ScalarType? dtype=None, Layout? layout=None,
    Device? device=None, bool? pin_memory=None) -> Tensor
argmax(Tensor self, int? dim=None, bool keepdim=False) -> Tensor
argmin(Tensor self, int? dim=None, bool keepdim=False) -> Tensor
avg_pool2d(Tensor self, int[2] kernel_size, int[2] stride=[], int[2] padding=0, bool ceil_mode=False,
    bool count_include_pad=True, int? divisor_override=None) -> Tensor
avg_pool2d_backward(Tensor grad_output, Tensor self, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode,
    bool count_include_pad, int? divisor_override) -> Tensor
bitwise_and.Tensor(Tensor self, Tensor other) -> Tensor
bitwise_not(Tensor self) -> Tensor
bitwise_or.Tensor(Tensor self, Tensor other) -> Tensor
bmm(Tensor self, Tensor mat2) -> Tensor
cat(Tensor[] tensors, int dim=0) -> Tensor
ceil(Tensor self) -> Tensor
clamp(Tensor self, Scalar? min=None, Scalar? max=None) -> Tensor
clamp.Tensor(Tensor self, Tensor? min=None, Tensor? max=None) -> Tensor
clone(Tensor self, *, MemoryFormat? memory_format=None) -> Tensor
constant_pad_nd(Tensor self, SymInt[] pad, Scalar value=0) -> Tensor
convolution(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation,
    bool transposed, SymInt[] output_padding, SymInt groups) -> Tensor
convolution_backward(Tensor grad_output, Tensor input, Tensor weight, SymInt[]? bias_sizes, SymInt[] stride,
    SymInt[] padding, SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups,
    bool[3] output_mask) -> (Tensor, Tensor, Tensor)
cos(Tensor self) -> Tensor
cumprod(Tensor self, int dim, *, ScalarType? dtype=None) -> Tensor
cumsum(Tensor self, int dim, *, ScalarType? dtype=None) -> Tensor
div.Scalar(Tensor self, Scalar other) -> Tensor
div.Tensor(Tensor self, Tensor other) -> Tensor
div.Tensor_mode(Tensor self, Tensor other, *, str? rounding_mode) -> Tensor
embedding(Tensor weight, Tensor indices, SymInt padding_idx=-1, bool scale_grad_by_freq=False,
    bool sparse=False) -> Tensor
empty.memory_format(SymInt[] size, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None, MemoryFormat? memory_format=None) -> Tensor
empty_like(Tensor self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None, MemoryFormat? memory_format=None) -> Tensor
eq.Scalar(Tensor self, Scalar other) -> Tensor
eq.Tensor(Tensor self, Tensor other) -> Tensor
erf(Tensor self) -> Tensor
exp(Tensor self) -> Tensor
expand(Tensor(a) self, SymInt[] size, *, bool implicit=False) -> Tensor(a)
expm1(Tensor self) -> Tensor
flip(Tensor self, int[] dims) -> Tensor
floor(Tensor self) -> Tensor
fmod.Scalar(Tensor self, Scalar other) -> Tensor
fmod.Tensor(Tensor self, Tensor other) -> Tensor
full(SymInt[] size, Scalar fill_value, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None) -> Tensor
full_like(Tensor self, Scalar fill_value, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None, MemoryFormat? memory_format=None) -> Tensor
gather(Tensor self, int dim, Tensor index, *, bool sparse_grad=False) -> Tensor
ge.Scalar(Tensor self, Scalar other) -> Tensor
ge.Tensor(Tensor self, Tensor other) -> Tensor
gelu(Tensor self, *, str approximate="none") -> Tensor
gt.Scalar(Tensor self, Scalar other) -> Tensor
gt.Tensor(Tensor self, Tensor other) -> Tensor
hardtanh(Tensor self, Scalar min_val=-1, Scalar max_val=1) -> Tensor
index.Tensor(Tensor self, Tensor?[] indices) -> Tensor
index_put(Tensor self, Tensor?[] indices, Tensor values, bool accumulate=False) -> Tensor
index_select(Tensor self, int dim, Tensor index) -> Tensor
isnan(Tensor self) -> Tensor
le.Scalar(Tensor self, Scalar other) -> Tensor
le.Tensor(Tensor self, Tensor other) -> Tensor
leaky_relu(Tensor self, Scalar negative_slope=0.01) -> Tensor
linalg_vector_norm(Tensor self, Scalar ord=2, int[1]? dim=None, bool keepdim=False, *,
    ScalarType? dtype=None) -> Tensor
log(Tensor self) -> Tensor
log1p(Tensor self) -> Tensor
log2(Tensor self) -> Tensor
logical_and(Tensor self, Tensor other) -> Tensor
logical_not(Tensor self) -> Tensor
logical_or(Tensor self, Tensor other) -> Tensor
logical_xor(Tensor self, Tensor other) -> Tensor
lt.Scalar(Tensor self, Scalar other) -> Tensor
lt.Tensor(Tensor self, Tensor other) -> Tensor
max.dim(Tensor self, int dim, bool keepdim=False) -> (Tensor values, Tensor indices)
max_pool2d_with_indices(Tensor self, int[2] kernel_size, int[2] stride=[], int[2] padding=0, int[2] dilation=1,
    bool ceil_mode=False) -> (Tensor, Tensor)
max_pool2d_with_indices_backward(Tensor grad_output, Tensor self, int[2] kernel_size, int[2] stride,
    int[2] padding, int[2] dilation, bool ceil_mode, Tensor indices) -> Tensor
maximum(Tensor self, Tensor other) -> Tensor
mean(Tensor self, *, ScalarType? dtype=None) -> Tensor
mean.dim(Tensor self, int[1]? dim, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor
min.dim(Tensor self, int dim, bool keepdim=False) -> (Tensor values, Tensor indices)
minimum(Tensor self, Tensor other) -> Tensor
mm(Tensor self, Tensor mat2) -> Tensor
mul.Scalar(Tensor self, Scalar other) -> Tensor
mul.Tensor(Tensor self, Tensor other) -> Tensor
native_group_norm(Tensor input, Tensor? weight, Tensor? bias, SymInt N, SymInt C, SymInt HxW, int group,
    float eps) -> (Tensor, Tensor, Tensor)
native_layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> (Tensor,
    Tensor, Tensor)
ne.Scalar(Tensor self, Scalar other) -> Tensor
ne.Tensor(Tensor self, Tensor other) -> Tensor
neg(Tensor self) -> Tensor
ones_like(Tensor self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None, MemoryFormat? memory_format=None) -> Tensor
permute(Tensor(a) self, int[] dims) -> Tensor(a)
pow.Scalar(Scalar self, Tensor exponent) -> Tensor
pow.Tensor_Scalar(Tensor self, Scalar exponent) -> Tensor
pow.Tensor_Tensor(Tensor self, Tensor exponent) -> Tensor
prod(Tensor self, *, ScalarType? dtype=None) -> Tensor
prod.dim_int(Tensor self, int dim, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor
reciprocal(Tensor self) -> Tensor
relu(Tensor self) -> Tensor
remainder.Scalar(Tensor self, Scalar other) -> Tensor
remainder.Tensor(Tensor self, Tensor other) -> Tensor
repeat(Tensor self, SymInt[] repeats) -> Tensor
round(Tensor self) -> Tensor
rsqrt(Tensor self) -> Tensor
scalar_tensor(Scalar s, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None) -> Tensor
scatter.src(Tensor self, int dim, Tensor index, Tensor src) -> Tensor
scatter.value(Tensor self, int dim, Tensor index, Scalar value) -> Tensor
scatter_add(Tensor self, int dim, Tensor index, Tensor src) -> Tensor
select.int(Tensor(a) self, int dim, SymInt index) -> Tensor(a)
sigmoid(Tensor self) -> Tensor
sign(Tensor self) -> Tensor
sin(Tensor self) -> Tensor
slice.Tensor(Tensor(a) self, int dim=0, SymInt? start=None, SymInt? end=None, SymInt step=1) -> Tensor(a)
slice_scatter(Tensor self, Tensor src, int dim=0, SymInt? start=None, SymInt? end=None, SymInt step=1) -> Tensor
sort(Tensor self, int dim=-1, bool descending=False) -> (Tensor values, Tensor indices)
split.Tensor(Tensor(a -> *) self, SymInt split_size, int dim=0) -> Tensor(a)[]
split_with_sizes(Tensor(a -> *) self, SymInt[] split_sizes, int dim=0) -> Tensor(a)[]
sqrt(Tensor self) -> Tensor
squeeze(Tensor(a) self) -> Tensor(a)
squeeze.dim(Tensor(a) self, int dim) -> Tensor(a)
squeeze.dims(Tensor(a) self, int[] dim) -> Tensor(a)
sub.Scalar(Tensor self, Scalar other, Scalar alpha=1) -> Tensor
sub.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor
sum(Tensor self, *, ScalarType? dtype=None) -> Tensor
sum.dim_IntList(Tensor self, int[1]? dim, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor
tanh(Tensor self) -> Tensor
topk(Tensor self, SymInt k, int dim=-1, bool largest=True, bool sorted=True) -> (Tensor values, Tensor indices)
tril(Tensor self, SymInt diagonal=0) -> Tensor
triu(Tensor self, SymInt diagonal=0) -> Tensor
trunc(Tensor self) -> Tensor
unbind.int(Tensor(a -> *) self, int dim=0) -> Tensor(a)[]
unsqueeze(Tensor(a) self, int dim) -> Tensor(a)
upsample_bilinear2d.vec(Tensor input, SymInt[]? output_size, bool align_corners, float[]? scale_factors) -> Tensor
upsample_nearest2d.vec(Tensor input, SymInt[]? output_size, float[]? scale_factors) -> Tensor
var.correction(Tensor self, int[1]? dim=None, *, Scalar? correction=None, bool keepdim=False) -> Tensor
var_mean.correction(Tensor self, int[1]? dim=None, *, Scalar? correction=None, bool keepdim=False) -> (Tensor,
    Tensor)
view(Tensor(a) self, SymInt[] size) -> Tensor(a)
where.self(Tensor condition, Tensor self, Tensor other) -> Tensor
zeros_like(Tensor self, *, ScalarType? dtype=None, Layout? layout=None, Device? device=None,
    bool? pin_memory=None, MemoryFormat? memory_format=None) -> Tensor
"""
"""The allow-list: every op a job may use, as its ATen schema (``str(op._schema)`` without ``aten::``; a line that
starts with spaces continues the one before). The interpreter refuses to run an op whose installed schema differs."""


class ArgType(StrEnum):
    """The base type of an op parameter, as the schema writes it."""

    TENSOR = "Tensor"
    INT = "int"
    SYMINT = "SymInt"
    FLOAT = "float"
    BOOL = "bool"
    SCALAR = "Scalar"
    SCALAR_TYPE = "ScalarType"
    LAYOUT = "Layout"
    DEVICE = "Device"
    MEMORY_FORMAT = "MemoryFormat"
    STR = "str"


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of an op schema: ``T``, ``T?`` (optional), ``T[]``/``T[N]`` (a list), ``T?[]`` (list of optional).

    ``size`` is the ``N`` of ``T[N]``, where a bare ``T`` is accepted too. ``default`` is the schema's default text, or
    ``None`` when the parameter is required.
    """

    name: str
    type: ArgType
    optional: bool = False
    is_list: bool = False
    size: int | None = None
    item_optional: bool = False
    kwarg_only: bool = False
    default: str | None = None


@dataclass(frozen=True, slots=True)
class OpSchema:
    """An allowed op: its name, parameters, number of outputs (-1: a list whose length depends on the arguments)
    and whether its outputs are views of an argument (``Tensor(a)``)."""

    name: str
    params: tuple[Param, ...]
    outputs: int
    aliases: bool
    text: str


_TYPE_RE = re.compile(r"^(?P<base>[A-Za-z]+)(?:\([^)]*\))?(?P<opt>\?)?(?:\[(?P<size>\d*)\])?(?P<list_opt>\?)?$")


def _parse_schema(text: str) -> OpSchema:
    head, _, returns = text.rpartition(" -> ")
    qualified, _, params_text = head.partition("(")
    packet, _, overload = qualified.partition(".")
    params: list[Param] = []
    kwarg_only = False
    for raw in params_text.removesuffix(")").split(", ") if params_text != ")" else []:
        if raw == "*":
            kwarg_only = True
            continue
        type_text, _, rest = raw.rpartition(" ")
        name, has_default, default = rest.partition("=")
        match = _TYPE_RE.match(type_text)
        if match is None:  # pragma: no cover - the table is fixed
            raise ValueError(f"bad schema type {type_text!r}")
        is_list = match["size"] is not None
        params.append(
            Param(
                name=name,
                type=ArgType(match["base"]),
                optional=bool(match["list_opt"]) if is_list else bool(match["opt"]),
                is_list=is_list,
                size=int(match["size"]) if match["size"] else None,
                item_optional=is_list and bool(match["opt"]),
                kwarg_only=kwarg_only,
                default=default if has_default else None,
            )
        )
    outputs = returns.count(",") + 1 if returns.startswith("(") else -1 if returns.endswith("[]") else 1
    return OpSchema(
        name=f"aten.{packet}.{overload or 'default'}",
        params=tuple(params),
        outputs=outputs,
        aliases="Tensor(a" in returns,
        text=text,
    )


def _schemas(text: str) -> dict[str, OpSchema]:
    joined = re.sub(r"\n {4}", " ", text.strip())
    parsed = [_parse_schema(line) for line in joined.splitlines()]
    return {schema.name: schema for schema in parsed}


OP_SCHEMAS: Mapping[str, OpSchema] = _schemas(_SCHEMA_TEXT)
"""Every allowed op by name (``aten.<name>.<overload>``): the one table of ops and their typed parameters."""

ALLOWED_OPS: frozenset[str] = frozenset(OP_SCHEMAS)
"""Core ATen overloads a worker runs: pure, deterministic given their inputs, no I/O, no randomness."""

TUPLE_OPS: Mapping[str, int] = {name: schema.outputs for name, schema in OP_SCHEMAS.items() if schema.outputs != 1}
"""Ops that return a tuple or list of tensors: the number of elements, or -1 when it depends on the arguments
(``split.Tensor``, ``split_with_sizes``, ``unbind.int``; at most :data:`MAX_TUPLE_OUTPUTS`)."""

MAX_TUPLE_OUTPUTS = 1024
"""Most tensors one node may return (a list-valued op's length is computed from the arguments before it runs)."""

LAYOUTS: frozenset[str] = frozenset({"strided"})
MEMORY_FORMATS: frozenset[str] = frozenset({"contiguous_format", "preserve_format", "channels_last"})
_DEVICE_WIRE = "default"

# --- arguments -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputRef:
    """The job's input tensor number ``index``."""

    index: int


@dataclass(frozen=True, slots=True)
class ConstRef:
    """The job's constant tensor number ``index`` (a parameter, buffer or lifted constant)."""

    index: int


@dataclass(frozen=True, slots=True)
class NodeRef:
    """The output of node ``node``; with ``item``, element ``item`` of a node that returns a tuple."""

    node: int
    item: int | None = None


@dataclass(frozen=True, slots=True)
class DType:
    """A dtype, by its name in :data:`DTYPES`."""

    name: str


@dataclass(frozen=True, slots=True)
class Device:
    """The device the worker executes on (jobs never name a device themselves)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """A tensor layout; only ``strided``."""

    name: str


@dataclass(frozen=True, slots=True)
class MemoryFormat:
    """A memory format, one of :data:`MEMORY_FORMATS`."""

    name: str


TensorRef = InputRef | ConstRef | NodeRef
Scalar = None | bool | int | float
Arg = Scalar | TensorRef | DType | Device | Layout | MemoryFormat | tuple[Scalar | TensorRef, ...]
"""An op argument. Lists hold scalars and tensor references only (int[], float[], Tensor[], Tensor?[])."""


@dataclass(frozen=True, slots=True)
class Node:
    """One op application. ``kwargs`` is sorted by name."""

    op: str
    args: tuple[Arg, ...] = ()
    kwargs: tuple[tuple[str, Arg], ...] = ()


def check_args(schema: OpSchema, args: tuple[Arg, ...], kwargs: tuple[tuple[str, Arg], ...], path: str) -> None:
    """Type a node's arguments against its op's schema; raise :class:`JobFormatError` on the first mismatch.

    Arity and names: at most as many positional arguments as the schema has before ``*``, keyword names from the
    schema, none given twice, every parameter without a default given. Values (specs/job-format.md §3.1): a
    ``Tensor`` takes a tensor reference, ``int``/``SymInt`` an int (never a bool or float), ``float`` an int or
    float, ``bool`` a bool, ``Scalar`` a bool, int or float, ``ScalarType`` a :class:`DType` (anything else is
    ``bad_dtype``), ``Layout``/``Device``/``MemoryFormat`` their tags, ``str`` nothing (only ``None`` where it is
    optional); ``T?`` also takes ``None``; a list type takes a list of its items, ``T[N]`` a bare item too.
    """
    positional = [p for p in schema.params if not p.kwarg_only]
    if len(args) > len(positional):
        raise JobFormatError(
            Reason.BAD_ARGUMENT, f"{path}: {schema.name} takes at most {len(positional)} positional arguments"
        )
    given: dict[str, Arg] = {p.name: value for p, value in zip(positional, args, strict=False)}
    by_name = {p.name: p for p in schema.params}
    for name, value in kwargs:
        if name not in by_name:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: {schema.name} has no argument {name[:MAX_NAME_LEN]!r}")
        if name in given:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: argument {name!r} given twice")
        given[name] = value
    for param in schema.params:
        if param.name in given:
            _check_value(param, given[param.name], f"{path}: {schema.name} argument {param.name!r}")
        elif param.default is None:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: {schema.name} needs argument {param.name!r}")


def _check_value(param: Param, value: Arg, where: str) -> None:
    if value is None:
        if not param.optional:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{where}: None where {_type_text(param)} is required")
        return
    if isinstance(value, tuple):
        if not param.is_list:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{where}: a list where {_type_text(param)} is required")
        for item in value:
            if item is None and param.item_optional:
                continue
            _check_item(param, item, where)
        return
    if param.is_list and param.size is None:
        raise JobFormatError(Reason.BAD_ARGUMENT, f"{where}: {_type_text(param)} needs a list")
    _check_item(param, value, where)


_ITEM_CHECKS: Mapping[ArgType, Any] = {
    ArgType.TENSOR: lambda v: isinstance(v, (InputRef, ConstRef, NodeRef)),
    ArgType.INT: lambda v: type(v) is int,
    ArgType.SYMINT: lambda v: type(v) is int,
    ArgType.FLOAT: lambda v: type(v) in (int, float),
    ArgType.BOOL: lambda v: type(v) is bool,
    ArgType.SCALAR: lambda v: type(v) in (bool, int, float),
    ArgType.SCALAR_TYPE: lambda v: isinstance(v, DType),
    ArgType.LAYOUT: lambda v: isinstance(v, Layout),
    ArgType.DEVICE: lambda v: isinstance(v, Device),
    ArgType.MEMORY_FORMAT: lambda v: isinstance(v, MemoryFormat),
    ArgType.STR: lambda v: False,  # strings are not job arguments: only an optional str's None
}


def _check_item(param: Param, value: Arg, where: str) -> None:
    if not _ITEM_CHECKS[param.type](value):
        reason = Reason.BAD_DTYPE if param.type is ArgType.SCALAR_TYPE else Reason.BAD_ARGUMENT
        raise JobFormatError(reason, f"{where}: {type(value).__name__} where {_type_text(param)} is required")


def _type_text(param: Param) -> str:
    text = param.type.value + ("?" if param.item_optional else "")
    if param.is_list:
        text += f"[{param.size or ''}]"
    return text + ("?" if param.optional and param.is_list else "?" if param.optional else "")


def node_refs(node: Node) -> list[TensorRef]:
    """Every tensor a node reads, in argument order (positional, then keyword; list items in order)."""
    found: list[TensorRef] = []
    for arg in (*node.args, *(value for _, value in node.kwargs)):
        for item in arg if isinstance(arg, tuple) else (arg,):
            if isinstance(item, (InputRef, ConstRef, NodeRef)):
                found.append(item)
    return found


# --- limits, comparison, the spec ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobLimits(Struct):
    """Resource limits: a job declares its own; a worker applies the tighter of those and its own (:func:`tighter`)."""

    max_ops: Annotated[int, Range(1, 1_000_000)] = 10_000
    max_tensor_bytes: U64 = 1 * GIB
    max_output_bytes: U64 = 1 * GIB
    memory_bytes: U64 = 4 * GIB
    wall_time_ms: U32 = 60_000


DEFAULT_JOB_LIMITS = JobLimits()


def tighter(a: JobLimits, b: JobLimits) -> JobLimits:
    """The field-by-field minimum of two limit sets."""
    return JobLimits(
        max_ops=min(a.max_ops, b.max_ops),
        max_tensor_bytes=min(a.max_tensor_bytes, b.max_tensor_bytes),
        max_output_bytes=min(a.max_output_bytes, b.max_output_bytes),
        memory_bytes=min(a.memory_bytes, b.memory_bytes),
        wall_time_ms=min(a.wall_time_ms, b.wall_time_ms),
    )


class CompareMode(StrEnum):
    EXACT = "exact"
    TOLERANCE = "tolerance"


@dataclass(frozen=True, kw_only=True)
class Comparison(Struct):
    """How redundant results are compared: bit for bit, or ``|a - b| <= atol + rtol * |b|`` elementwise."""

    mode: CompareMode = CompareMode.TOLERANCE
    rtol: Annotated[float, Range(0.0, 1.0)] = 1e-4
    atol: Annotated[float, Range(0.0, 1e6)] = 1e-5


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A job: tensors by content hash, a graph of allow-listed ops, outputs, limits and the comparison rule."""

    version: int = JOB_FORMAT_VERSION
    inputs: tuple[TensorMeta, ...]
    constants: tuple[TensorMeta, ...] = ()
    nodes: tuple[Node, ...]
    outputs: tuple[TensorRef, ...]
    limits: JobLimits = field(default_factory=JobLimits)
    compare: Comparison = field(default_factory=Comparison)


@dataclass(frozen=True, slots=True)
class JobSummary:
    """Sizes known from the spec alone (output sizes need a dry run: ``compute.interpreter.dry_run``)."""

    op_count: int
    input_bytes: int
    constant_bytes: int
    tensor_count: int


def summary(spec: JobSpec) -> JobSummary:
    return JobSummary(
        op_count=len(spec.nodes),
        input_bytes=sum(meta.nbytes for meta in spec.inputs),
        constant_bytes=sum(meta.nbytes for meta in spec.constants),
        tensor_count=len(spec.inputs) + len(spec.constants),
    )


# --- encoding --------------------------------------------------------------------------------------------------------


def encode_job(spec: JobSpec) -> bytes:
    """The canonical encoding of ``spec``; checks it first and raises :class:`LocalProtocolError` when invalid."""
    try:
        wire = _spec_to_wire(spec)
        # Checking the wire form with the decoder's rules keeps encode and decode from drifting apart.
        _spec_from_wire(wire, spec.limits)
    except JobFormatError as exc:
        raise LocalProtocolError(exc.reason, exc.detail) from exc
    data = codec.pack(wire)
    if len(data) > MAX_SPEC_SIZE:  # negotiation could not carry it
        raise LocalProtocolError(Reason.TOO_LARGE, f"job spec of {len(data)} bytes, limit {MAX_SPEC_SIZE}")
    return data


def job_digest(spec_bytes: bytes) -> bytes:
    """SHA-256 of a job's canonical encoding: the job's name in every message."""
    return hashlib.sha256(spec_bytes).digest()


def _spec_to_wire(spec: JobSpec) -> dict[str, Any]:
    try:
        return {
            "version": spec.version,
            "inputs": [to_wire(meta) for meta in spec.inputs],
            "constants": [to_wire(meta) for meta in spec.constants],
            "nodes": [_node_to_wire(node) for node in spec.nodes],
            "outputs": [_arg_to_wire(ref) for ref in spec.outputs],
            "limits": to_wire(spec.limits),
            "compare": to_wire(spec.compare),
        }
    except LocalProtocolError as exc:
        raise JobFormatError(exc.reason, exc.detail) from exc


def _node_to_wire(node: Node) -> dict[str, Any]:
    return {
        "op": node.op,
        "args": [_arg_to_wire(arg) for arg in node.args],
        "kwargs": {name: _arg_to_wire(arg) for name, arg in node.kwargs},
    }


def _arg_to_wire(arg: object) -> Any:
    match arg:
        case None | bool() | int() | float():
            return arg
        case InputRef(index=index):
            return {"input": index}
        case ConstRef(index=index):
            return {"const": index}
        case NodeRef(node=node, item=None):
            return {"node": node}
        case NodeRef(node=node, item=item):
            return {"item": [node, item]}
        case DType(name=name):
            return {"dtype": name}
        case Device():
            return {"device": _DEVICE_WIRE}
        case Layout(name=name):
            return {"layout": name}
        case MemoryFormat(name=name):
            return {"memory_format": name}
        case tuple():
            return [_arg_to_wire(item) for item in arg]
    raise JobFormatError(Reason.BAD_ARGUMENT, f"{type(arg).__name__} is not a job argument")


# --- decoding --------------------------------------------------------------------------------------------------------

SPEC_DECODE_LIMITS = codec.DecodeLimits(
    max_bytes=MAX_SPEC_SIZE,
    max_str_len=256,
    max_bin_len=2 * DIGEST_SIZE,
    max_array_len=MAX_SPEC_SIZE,
    max_map_len=64,
    max_depth=8,
)
"""The codec limits of a job spec's decoding; ``max_array_len`` is lowered to ``max(16, len(data))`` per spec."""
_SPEC_KEYS = frozenset({"version", "inputs", "constants", "nodes", "outputs", "limits", "compare"})
_NODE_KEYS = frozenset({"op", "args", "kwargs"})


def decode_job(data: bytes, limits: JobLimits = DEFAULT_JOB_LIMITS) -> JobSpec:
    """Check untrusted job bytes and build the spec, applying the tighter of the job's and the receiver's ``limits``.

    Raises :class:`JobFormatError` only: the codec's and schema's reasons (``malformed``, ``non_canonical``,
    ``missing_field`` ...) or ``unsupported_version``, ``unknown_op``, ``bad_argument``, ``bad_graph``,
    ``too_many_ops``, ``tensor_too_large``, ``bad_dtype``.
    """
    if len(data) > MAX_SPEC_SIZE:
        raise JobFormatError(Reason.TOO_LARGE, f"job spec of {len(data)} bytes, limit {MAX_SPEC_SIZE}")
    # an array element takes at least one byte, so no array is longer than the spec
    decode_limits = replace(SPEC_DECODE_LIMITS, max_array_len=max(16, len(data)))
    try:
        wire = codec.unpack(data, decode_limits)
    except P2PComputeError as exc:
        raise JobFormatError(exc.reason, f"job spec: {exc.detail}") from exc
    return _spec_from_wire(wire, limits)


def _spec_from_wire(wire: object, receiver: JobLimits) -> JobSpec:
    top = _exact_map(wire, _SPEC_KEYS, "job")
    if type(top["version"]) is not int or top["version"] != JOB_FORMAT_VERSION:
        raise JobFormatError(Reason.UNSUPPORTED_VERSION, f"job format version {str(top['version'])[:32]}")
    job_limits = _struct(JobLimits, top["limits"], "job.limits")
    compare = _struct(Comparison, top["compare"], "job.compare")
    limits = tighter(job_limits, receiver)
    inputs = _metas(top["inputs"], MAX_INPUTS, limits, "job.inputs")
    constants = _metas(top["constants"], MAX_CONSTANTS, limits, "job.constants")
    raw_nodes = _list(top["nodes"], "job.nodes")
    if len(raw_nodes) > limits.max_ops:
        raise JobFormatError(Reason.TOO_MANY_OPS, f"{len(raw_nodes)} ops, limit {limits.max_ops}")
    graph = _Graph(len(inputs), len(constants))
    nodes = tuple(graph.node(raw, i) for i, raw in enumerate(raw_nodes))
    raw_outputs = _list(top["outputs"], "job.outputs")
    if not 1 <= len(raw_outputs) <= MAX_OUTPUTS:
        raise JobFormatError(Reason.BAD_GRAPH, f"{len(raw_outputs)} outputs, must be 1 to {MAX_OUTPUTS}")
    outputs = tuple(graph.tensor_ref(raw, len(nodes), f"job.outputs[{i}]") for i, raw in enumerate(raw_outputs))
    return JobSpec(
        version=JOB_FORMAT_VERSION,
        inputs=inputs,
        constants=constants,
        nodes=nodes,
        outputs=outputs,
        limits=job_limits,
        compare=compare,
    )


class _Graph:
    """Decodes nodes in order, so a reference can only point backwards."""

    def __init__(self, n_inputs: int, n_constants: int) -> None:
        self.n_inputs = n_inputs
        self.n_constants = n_constants
        self.ops: list[str] = []

    def node(self, raw: object, index: int) -> Node:
        path = f"job.nodes[{index}]"
        fields = _exact_map(raw, _NODE_KEYS, path)
        op = fields["op"]
        if not isinstance(op, str):
            raise JobFormatError(Reason.WRONG_TYPE, f"{path}.op: expected str")
        if op not in ALLOWED_OPS:
            raise JobFormatError(Reason.UNKNOWN_OP, f"{path}: op {op[:80]!r} is not allowed")
        raw_args = _list(fields["args"], f"{path}.args")
        if len(raw_args) > MAX_KWARGS * 2:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: {len(raw_args)} arguments")
        args = tuple(self.arg(a, index, f"{path}.args[{i}]") for i, a in enumerate(raw_args))
        raw_kwargs = fields["kwargs"]
        if not isinstance(raw_kwargs, dict):
            raise JobFormatError(Reason.WRONG_TYPE, f"{path}.kwargs: expected a map")
        if len(raw_kwargs) > MAX_KWARGS:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: {len(raw_kwargs)} keyword arguments")
        kwargs = []
        for name in sorted(raw_kwargs):
            if not (0 < len(name) <= MAX_NAME_LEN and name.isidentifier()):
                raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}.kwargs: bad name {name[:MAX_NAME_LEN]!r}")
            kwargs.append((name, self.arg(raw_kwargs[name], index, f"{path}.kwargs.{name}")))
        check_args(OP_SCHEMAS[op], args, tuple(kwargs), path)
        self.ops.append(op)
        return Node(op=op, args=args, kwargs=tuple(kwargs))

    def arg(self, raw: object, before: int, path: str, *, in_list: bool = False) -> Arg:
        if raw is None or isinstance(raw, bool):
            return raw
        if isinstance(raw, int):
            if not I64_MIN <= raw <= I64_MAX:
                raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: integer outside int64")
            return raw
        if isinstance(raw, float):
            if math.isnan(raw):
                raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: NaN is not a job argument")
            return raw
        if isinstance(raw, list):
            if in_list:
                raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: lists do not nest")
            if len(raw) > MAX_LIST_LEN:
                raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: list of {len(raw)}, limit {MAX_LIST_LEN}")
            items: list[Scalar | TensorRef] = []
            for i, item in enumerate(raw):
                value = self.arg(item, before, f"{path}[{i}]", in_list=True)
                if isinstance(value, (DType, Device, Layout, MemoryFormat, tuple)):
                    raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}[{i}]: only scalars and tensors in lists")
                items.append(value)
            return tuple(items)
        if isinstance(raw, dict) and len(raw) == 1:
            ((tag, value),) = raw.items()
            if tag in ("input", "const", "node", "item"):
                return self.tensor_ref(raw, before, path)
            if not isinstance(value, str):
                raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: the value of {str(tag)[:32]!r} must be a str")
            if tag == "dtype":
                if value not in DTYPES:
                    raise JobFormatError(Reason.BAD_DTYPE, f"{path}: dtype {value[:16]!r} is not one of the DTYPES")
                return DType(value)
            if tag == "device" and value == _DEVICE_WIRE:
                return Device()
            if tag == "layout" and value in LAYOUTS:
                return Layout(value)
            if tag == "memory_format" and value in MEMORY_FORMATS:
                return MemoryFormat(value)
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: unknown tagged value {str(tag)[:32]!r}")
        raise JobFormatError(Reason.BAD_ARGUMENT, f"{path}: {type(raw).__name__} is not a job argument")

    def tensor_ref(self, raw: object, before: int, path: str) -> TensorRef:
        if not isinstance(raw, dict) or len(raw) != 1:
            raise JobFormatError(Reason.BAD_GRAPH, f"{path}: expected a tensor reference")
        ((tag, value),) = raw.items()
        if tag == "item":
            if not (isinstance(value, list) and len(value) == 2 and all(_is_index(v) for v in value)):
                raise JobFormatError(Reason.BAD_GRAPH, f"{path}: item reference must be [node, index]")
            node, item = value
            self._check_node(node, before, path, tuple_wanted=True)
            arity = TUPLE_OPS[self.ops[node]]
            if arity >= 0 and item >= arity:
                raise JobFormatError(Reason.BAD_GRAPH, f"{path}: {self.ops[node]} has {arity} outputs, not {item + 1}")
            return NodeRef(node, item)
        if not _is_index(value):
            raise JobFormatError(Reason.BAD_GRAPH, f"{path}: reference index must be a non-negative int")
        assert isinstance(value, int)
        if tag == "input":
            if value >= self.n_inputs:
                raise JobFormatError(Reason.BAD_GRAPH, f"{path}: input {value} of {self.n_inputs}")
            return InputRef(value)
        if tag == "const":
            if value >= self.n_constants:
                raise JobFormatError(Reason.BAD_GRAPH, f"{path}: constant {value} of {self.n_constants}")
            return ConstRef(value)
        if tag == "node":
            self._check_node(value, before, path, tuple_wanted=False)
            return NodeRef(value)
        raise JobFormatError(Reason.BAD_GRAPH, f"{path}: expected a tensor reference, got {str(tag)[:32]!r}")

    def _check_node(self, node: int, before: int, path: str, *, tuple_wanted: bool) -> None:
        if node >= before:
            raise JobFormatError(Reason.BAD_GRAPH, f"{path}: node {node} is not before node {before}")
        returns_tuple = self.ops[node] in TUPLE_OPS
        if returns_tuple != tuple_wanted:
            want = "an item reference" if returns_tuple else "a plain node reference"
            raise JobFormatError(Reason.BAD_GRAPH, f"{path}: {self.ops[node]} (node {node}) needs {want}")


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U32_MAX


def _exact_map(value: object, keys: frozenset[str], path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise JobFormatError(Reason.NOT_A_MAP, f"{path}: expected a map, got {type(value).__name__}")
    for key in value:
        if key not in keys:
            raise JobFormatError(Reason.UNKNOWN_FIELD, f"{path}: unknown field {str(key)[:64]!r}")
    for key in sorted(keys):
        if key not in value:
            raise JobFormatError(Reason.MISSING_FIELD, f"{path}: missing field {key!r}")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise JobFormatError(Reason.WRONG_TYPE, f"{path}: expected an array, got {type(value).__name__}")
    return value


def _struct(cls: type[_S], value: object, path: str) -> _S:
    try:
        return from_wire(cls, value, path)
    except P2PComputeError as exc:
        raise JobFormatError(exc.reason, exc.detail) from exc


def _metas(value: object, most: int, limits: JobLimits, path: str) -> tuple[TensorMeta, ...]:
    items = _list(value, path)
    if len(items) > most:
        raise JobFormatError(Reason.TOO_LONG, f"{path}: {len(items)} tensors, limit {most}")
    metas = []
    for i, item in enumerate(items):
        meta = _struct(TensorMeta, item, f"{path}[{i}]")
        if meta.nbytes > limits.max_tensor_bytes:  # nbytes raises bad_dtype for an unknown dtype
            raise JobFormatError(
                Reason.TENSOR_TOO_LARGE, f"{path}[{i}]: {meta.nbytes} bytes, limit {limits.max_tensor_bytes}"
            )
        metas.append(meta)
    return tuple(metas)


# --- bundles ---------------------------------------------------------------------------------------------------------

_BUNDLE_KEYS = frozenset({"format", "version", "spec", "blobs"})


def encode_bundle(spec_bytes: bytes, blobs: Mapping[bytes, bytes]) -> bytes:
    """A self-contained job file: the spec bytes and the blob of every input and constant, sorted by digest."""
    return codec.pack(
        {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "spec": spec_bytes,
            "blobs": [[digest, bytes(blobs[digest])] for digest in sorted(blobs)],
        }
    )


def decode_bundle(data: bytes, limits: JobLimits = DEFAULT_JOB_LIMITS) -> tuple[bytes, dict[bytes, bytes]]:
    """Check a job bundle: the spec decodes, every tensor it names is present once and matches its meta.

    Raises :class:`JobFormatError`: the codec's reasons, ``bad_argument`` (not a bundle), the spec's reasons,
    ``missing_tensor``, ``inconsistent`` (a blob the spec does not name, or out of order), ``shape_mismatch``,
    ``hash_mismatch``.
    """
    decode_limits = codec.DecodeLimits(
        max_bytes=len(data),
        max_str_len=256,
        max_bin_len=max(len(data), 1),
        max_array_len=max(16, len(data)),
        max_map_len=16,
        max_depth=4,
    )
    try:
        wire = codec.unpack(data, decode_limits)
    except P2PComputeError as exc:
        raise JobFormatError(exc.reason, f"job bundle: {exc.detail}") from exc
    top = _exact_map(wire, _BUNDLE_KEYS, "bundle")
    if top["format"] != BUNDLE_FORMAT or not isinstance(top["spec"], bytes):
        raise JobFormatError(Reason.BAD_ARGUMENT, "not a p2pcompute job bundle")
    if type(top["version"]) is not int or top["version"] != BUNDLE_VERSION:
        raise JobFormatError(Reason.UNSUPPORTED_VERSION, f"bundle version {str(top['version'])[:32]}")
    spec_bytes: bytes = top["spec"]
    spec = decode_job(spec_bytes, limits)
    blobs: dict[bytes, bytes] = {}
    last = b""
    for i, pair in enumerate(_list(top["blobs"], "bundle.blobs")):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, bytes) for p in pair)):
            raise JobFormatError(Reason.WRONG_TYPE, f"bundle.blobs[{i}]: expected [digest, bytes]")
        digest, blob = pair
        if digest <= last:
            raise JobFormatError(Reason.INCONSISTENT, f"bundle.blobs[{i}]: digests not sorted or repeated")
        blobs[digest] = blob
        last = digest
    metas = spec.inputs + spec.constants
    named = {meta.digest for meta in metas}
    for digest in blobs:
        if digest not in named:
            raise JobFormatError(Reason.INCONSISTENT, f"blob {digest.hex()[:16]} is not named by the job")
    for meta in metas:
        if meta.digest not in blobs:
            raise JobFormatError(Reason.MISSING_TENSOR, f"tensor {meta.digest.hex()[:16]} is not in the bundle")
        check_blob(meta, blobs[meta.digest])
    return spec_bytes, blobs
