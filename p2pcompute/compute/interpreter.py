"""Run a job spec with torch: tensors from checked blobs, allow-listed ATen overloads, limits checked first.

This module imports torch and runs in the executor's child process. Peer data only ever becomes tensors through
:func:`blob_to_tensor` (length and hash checked, ``torch.frombuffer`` on a copy) and ops only through attribute lookup
on ``torch.ops.aten`` of names in :data:`ALLOWED_OPS`. No pickle, ``torch.load``, ``eval``, ``exec`` or TorchScript.
:func:`dry_run` interprets the graph on the ``meta`` device first (shapes and dtypes only, nothing allocated) and
refuses it when a tensor, the peak of live tensors, or the outputs would pass the limits.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pcompute.core.jobspec import (
    ALLOWED_OPS,
    DEFAULT_JOB_LIMITS,
    Arg,
    ConstRef,
    Device,
    DType,
    InputRef,
    JobLimits,
    JobSpec,
    Layout,
    MemoryFormat,
    NodeRef,
    TensorRef,
    tighter,
)
from p2pcompute.core.tensors import DTYPES, TensorMeta, check_blob, tensor_digest
from p2pcompute.errors import ExecutionError, JobFormatError, Reason

__all__ = [
    "DTYPE_BY_NAME",
    "NAME_BY_DTYPE",
    "DryRun",
    "blob_to_tensor",
    "check_memory",
    "dry_run",
    "execute",
    "resolve_op",
    "tensor_to_blob",
]

DTYPE_BY_NAME: Mapping[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
NAME_BY_DTYPE: Mapping[torch.dtype, str] = {dtype: name for name, dtype in DTYPE_BY_NAME.items()}
assert set(DTYPE_BY_NAME) == set(DTYPES)

_LAYOUTS: Mapping[str, torch.layout] = {"strided": torch.strided}
_MEMORY_FORMATS: Mapping[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}
_MATMUL_OPS = frozenset({"aten.mm.default", "aten.addmm.default", "aten.bmm.default"})


# --- tensors <-> blobs -----------------------------------------------------------------------------------------------


def blob_to_tensor(meta: TensorMeta, data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Build the CPU tensor ``meta`` names from its raw bytes, after checking dtype, length and hash."""
    check_blob(meta, data)
    dtype = DTYPE_BY_NAME[meta.dtype]
    if meta.numel == 0:
        return torch.empty(meta.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a private, writable copy
    if dtype == torch.bool and int(raw.max()) > 1:
        raise JobFormatError(Reason.BAD_ARGUMENT, f"tensor {meta.digest.hex()[:16]}: bool bytes must be 0 or 1")
    return _from_little_endian(raw.view(dtype)).reshape(meta.shape)


def tensor_to_blob(tensor: torch.Tensor) -> tuple[TensorMeta, bytes]:
    """A tensor's wire form: C-contiguous little-endian bytes on the CPU, and the meta naming them."""
    name = NAME_BY_DTYPE.get(tensor.dtype)
    if name is None:
        raise JobFormatError(Reason.BAD_DTYPE, f"dtype {tensor.dtype} is not one of {sorted(DTYPES)}")
    flat = _from_little_endian(tensor.detach().to("cpu").contiguous().reshape(-1))
    data = bytearray(flat.numel() * flat.element_size())
    if data:
        torch.frombuffer(data, dtype=torch.uint8).copy_(flat.view(torch.uint8))
    blob = bytes(data)
    return TensorMeta(digest=tensor_digest(blob), dtype=name, shape=tuple(tensor.shape)), blob


def _from_little_endian(tensor: torch.Tensor) -> torch.Tensor:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise ExecutionError(Reason.EXECUTION_FAILED, "big-endian hosts are not supported")
    return tensor


# --- op lookup and argument conversion -------------------------------------------------------------------------------


def resolve_op(name: str) -> torch._ops.OpOverload:
    """The ``torch.ops.aten`` overload of an allow-listed op name, by attribute lookup."""
    if name not in ALLOWED_OPS:
        raise JobFormatError(Reason.UNKNOWN_OP, f"op {name[:80]!r} is not allowed")
    namespace, packet_name, overload_name = name.split(".")
    assert namespace == "aten"
    try:
        overload = getattr(getattr(torch.ops.aten, packet_name), overload_name)
    except (AttributeError, RuntimeError) as exc:
        raise JobFormatError(Reason.UNKNOWN_OP, f"op {name!r} does not exist in torch {torch.__version__}") from exc
    if not isinstance(overload, torch._ops.OpOverload):  # pragma: no cover - defensive
        raise JobFormatError(Reason.UNKNOWN_OP, f"{name!r} is not an op overload")
    return overload


def _convert(arg: Arg, values: Callable[[TensorRef], torch.Tensor], device: torch.device) -> Any:
    match arg:
        case None | bool() | int() | float():
            return arg
        case InputRef() | ConstRef() | NodeRef():
            return values(arg)
        case DType(name=name):
            return DTYPE_BY_NAME[name]
        case Device():
            return device
        case Layout(name=name):
            return _LAYOUTS[name]
        case MemoryFormat(name=name):
            return _MEMORY_FORMATS[name]
        case tuple():
            return [_convert(item, values, device) for item in arg]
    raise JobFormatError(Reason.BAD_ARGUMENT, f"{type(arg).__name__} is not a job argument")


def _check_signature(op: torch._ops.OpOverload, index: int, n_args: int, kwarg_names: Sequence[str]) -> None:
    schema = op._schema.arguments
    if n_args > len(schema) or any(a.kwarg_only for a in schema[:n_args]):
        raise JobFormatError(Reason.BAD_ARGUMENT, f"node {index} {op}: {n_args} positional arguments")
    names = {a.name for a in schema[n_args:]}
    for name in kwarg_names:
        if name not in names:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"node {index} {op}: unexpected keyword {name!r}")


# --- the interpreter -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DryRun:
    """What a meta-device run of a job found: peak live bytes, output sizes, a rough flop count."""

    peak_bytes: int
    output_bytes: int
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    flops: int


class _Run:
    """One interpretation of a spec; ``meta=True`` allocates nothing and checks limits per node."""

    def __init__(self, spec: JobSpec, inputs: Sequence[torch.Tensor], device: torch.device, limits: JobLimits):
        self.spec = spec
        self.device = device
        self.limits = limits
        self.inputs = list(inputs)
        self.nodes: list[Any] = [None] * len(spec.nodes)
        # the last node that uses each node's value; graph outputs live to the end
        self.last_use = [-1] * len(spec.nodes)
        for i, node in enumerate(spec.nodes):
            for ref in _refs(node.args, node.kwargs):
                if isinstance(ref, NodeRef):
                    self.last_use[ref.node] = i
        for ref in spec.outputs:
            if isinstance(ref, NodeRef):
                self.last_use[ref.node] = len(spec.nodes)

    def value(self, ref: TensorRef) -> torch.Tensor:
        match ref:
            case InputRef(index=index):
                return self.inputs[index]
            case ConstRef(index=index):
                return self.inputs[len(self.spec.inputs) + index]
            case NodeRef(node=node, item=None):
                result = self.nodes[node]
            case NodeRef(node=node, item=item):
                assert item is not None
                seq = self.nodes[node]
                if not isinstance(seq, (tuple, list)) or item >= len(seq):
                    raise JobFormatError(Reason.BAD_GRAPH, f"node {node} has no output {item}")
                result = seq[item]
        if not isinstance(result, torch.Tensor):
            raise JobFormatError(Reason.BAD_GRAPH, f"{ref} does not refer to a tensor")
        return result

    def call(self, index: int) -> Any:
        node = self.spec.nodes[index]
        op = resolve_op(node.op)
        _check_signature(op, index, len(node.args), [name for name, _ in node.kwargs])
        args = [_convert(arg, self.value, self.device) for arg in node.args]
        kwargs = {name: _convert(arg, self.value, self.device) for name, arg in node.kwargs}
        if any(a.name == "device" and a.kwarg_only for a in op._schema.arguments):
            kwargs["device"] = self.device  # factory ops always create on the run's device (meta in the dry run)
        return op(*args, **kwargs)

    def free(self, index: int) -> list[Any]:
        """Drop the values whose last use was node ``index``; return them."""
        dropped = []
        for ref in _refs(self.spec.nodes[index].args, self.spec.nodes[index].kwargs):
            if isinstance(ref, NodeRef) and self.last_use[ref.node] == index and self.nodes[ref.node] is not None:
                dropped.append(self.nodes[ref.node])
                self.nodes[ref.node] = None
        return dropped

    def outputs(self) -> list[torch.Tensor]:
        return [self.value(ref) for ref in self.spec.outputs]


def _refs(args: Sequence[Arg], kwargs: Sequence[tuple[str, Arg]]) -> list[TensorRef]:
    found: list[TensorRef] = []
    for arg in [*args, *(value for _, value in kwargs)]:
        for item in arg if isinstance(arg, tuple) else (arg,):
            if isinstance(item, (InputRef, ConstRef, NodeRef)):
                found.append(item)
    return found


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _storage_key(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage()._cdata)


def dry_run(spec: JobSpec, *, limits: JobLimits = DEFAULT_JOB_LIMITS) -> DryRun:
    """Interpret ``spec`` on the meta device under the tighter of its own and ``limits``.

    Live memory is counted per storage (views share their base's), freed after a value's last use.
    Raises :class:`JobFormatError`: ``tensor_too_large``, ``memory_limit``, ``output_too_large``,
    ``bad_argument`` (an op refused its arguments), ``bad_graph``, ``unknown_op``.
    """
    limits = tighter(spec.limits, limits)
    meta = torch.device("meta")
    inputs = [torch.empty(m.shape, dtype=DTYPE_BY_NAME[m.dtype], device=meta) for m in spec.inputs + spec.constants]
    run = _Run(spec, inputs, meta, limits)
    live: dict[int, list[int]] = {}  # storage key -> [bytes, number of live values using it]
    total = 0

    def hold(tensor: torch.Tensor, where: str) -> None:
        nonlocal total
        key = _storage_key(tensor)
        if key in live:
            live[key][1] += 1
            return
        nbytes = int(tensor.untyped_storage().nbytes())
        if nbytes > limits.max_tensor_bytes:
            raise JobFormatError(Reason.TENSOR_TOO_LARGE, f"{where}: {nbytes} bytes, limit {limits.max_tensor_bytes}")
        live[key] = [nbytes, 1]
        total += nbytes

    def release(tensor: torch.Tensor) -> None:
        nonlocal total
        entry = live[_storage_key(tensor)]
        entry[1] -= 1
        if entry[1] == 0:
            total -= entry[0]
            del live[_storage_key(tensor)]

    for i, tensor in enumerate(inputs):
        hold(tensor, f"tensor {i}")
    peak = total
    flops = 0
    with torch.no_grad():
        for i, node in enumerate(spec.nodes):
            try:
                result = run.call(i)
            except JobFormatError:
                raise
            except Exception as exc:  # an op refused its arguments; torch raises many types
                raise JobFormatError(Reason.BAD_ARGUMENT, f"node {i} {node.op}: {str(exc)[:300]}") from exc
            outs = _tensors(result)
            if isinstance(result, (tuple, list)) and len(outs) != len(result) and node.op != "aten.split.Tensor":
                raise JobFormatError(Reason.BAD_GRAPH, f"node {i} {node.op}: not every output is a tensor")
            if not outs:
                raise JobFormatError(Reason.BAD_GRAPH, f"node {i} {node.op}: no tensor output")
            for tensor in outs:
                hold(tensor, f"node {i} {node.op}")
                flops += _flops(node.op, tensor, run, i)
            run.nodes[i] = result
            peak = max(peak, total)
            if peak > limits.memory_bytes:
                raise JobFormatError(
                    Reason.MEMORY_LIMIT, f"node {i} {node.op}: {peak} live bytes, limit {limits.memory_bytes}"
                )
            for value in run.free(i):
                for tensor in _tensors(value):
                    release(tensor)
            if run.last_use[i] == -1:  # never used: freed at once
                for tensor in _tensors(run.nodes[i]):
                    release(tensor)
                run.nodes[i] = None
    outputs = run.outputs()
    output_bytes = 0
    for tensor in outputs:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > limits.max_tensor_bytes:
            raise JobFormatError(Reason.TENSOR_TOO_LARGE, f"an output of {nbytes} bytes")
        output_bytes += nbytes
    if output_bytes > limits.max_output_bytes:
        raise JobFormatError(Reason.OUTPUT_TOO_LARGE, f"{output_bytes} output bytes, limit {limits.max_output_bytes}")
    shapes = tuple((NAME_BY_DTYPE.get(t.dtype, str(t.dtype)), tuple(t.shape)) for t in outputs)
    if any(name not in DTYPES for name, _ in shapes):
        raise JobFormatError(Reason.BAD_DTYPE, f"an output dtype is not one of {sorted(DTYPES)}")
    return DryRun(peak_bytes=peak, output_bytes=output_bytes, outputs=shapes, flops=flops)


def _flops(op: str, out: torch.Tensor, run: _Run, index: int) -> int:
    """Rough flops: 2·M·N·K for matrix products and convolutions, one per output element otherwise."""
    args = run.spec.nodes[index].args
    if op in _MATMUL_OPS and len(args) >= 2 and isinstance(args[-2], (InputRef, ConstRef, NodeRef)):
        return 2 * out.numel() * int(run.value(args[-2]).shape[-1])
    if op == "aten.convolution.default" and len(args) >= 2 and isinstance(args[1], (InputRef, ConstRef, NodeRef)):
        return 2 * out.numel() * math.prod(run.value(args[1]).shape[1:])
    return out.numel()


def check_memory(spec: JobSpec, *, memory_limit: int, limits: JobLimits = DEFAULT_JOB_LIMITS) -> int:
    """Peak live bytes of ``spec`` from a meta-device run; raises :class:`JobFormatError` beyond the limits."""
    bounded = JobLimits(
        max_ops=limits.max_ops,
        max_tensor_bytes=limits.max_tensor_bytes,
        max_output_bytes=limits.max_output_bytes,
        memory_bytes=min(limits.memory_bytes, memory_limit),
        wall_time_ms=limits.wall_time_ms,
    )
    return dry_run(spec, limits=bounded).peak_bytes


def execute(spec: JobSpec, blobs: Mapping[bytes, bytes], *, device: str = "cpu") -> list[torch.Tensor]:
    """Run ``spec`` on ``device`` with the tensors in ``blobs`` (by digest); return the outputs on the CPU.

    Call :func:`check_memory` first. Raises :class:`JobFormatError` (``missing_tensor``, ``hash_mismatch``,
    ``shape_mismatch``, ``unknown_op``, ``bad_argument``, ``bad_graph``) or :class:`ExecutionError`
    (``execution_failed``: an op failed on the data).
    """
    target = torch.device(device)
    tensors = []
    for meta in spec.inputs + spec.constants:
        data = blobs.get(meta.digest)
        if data is None:
            raise JobFormatError(Reason.MISSING_TENSOR, f"tensor {meta.digest.hex()[:16]} was not provided")
        tensors.append(blob_to_tensor(meta, data).to(target))
    run = _Run(spec, tensors, target, spec.limits)
    with torch.no_grad():
        for i, node in enumerate(spec.nodes):
            try:
                run.nodes[i] = run.call(i)
            except JobFormatError:
                raise
            except (TypeError, ValueError) as exc:
                raise JobFormatError(Reason.BAD_ARGUMENT, f"node {i} {node.op}: {str(exc)[:300]}") from exc
            except Exception as exc:
                raise ExecutionError(Reason.EXECUTION_FAILED, f"node {i} {node.op}: {str(exc)[:300]}") from exc
            run.free(i)
            if run.last_use[i] == -1:
                run.nodes[i] = None
        return [tensor.to("cpu") for tensor in run.outputs()]
