"""Run a job spec with torch: tensors from checked blobs, allow-listed ATen overloads, limits checked first.

This module imports torch and runs in the executor's child process. Peer data only ever becomes tensors through
:func:`blob_to_tensor` (length and hash checked, ``torch.frombuffer`` on a copy) and ops only through attribute lookup
on ``torch.ops.aten`` of names in :data:`ALLOWED_OPS`. No pickle, ``torch.load``, ``eval``, ``exec`` or TorchScript.
:func:`dry_run` interprets the graph on the ``meta`` device first (shapes and dtypes only, nothing allocated) and
refuses it when a tensor, the peak of live tensors, or the outputs would pass the limits. Before every op, in both
runs, the arguments are typed against the op's schema (``jobspec.check_args``) and checked by the op's validators
(``compute/validators.py``); the validators' data checks run in execution only.

With a :class:`TraceSink`, :func:`execute` also commits to every intermediate (specs/verification.md §10): after each
node it hashes each tensor the node returned (its wire bytes: C-contiguous, little-endian, read on the CPU in chunks
of at most :data:`HASH_CHUNK_BYTES`) into a :class:`~p2pcompute.core.trace.TraceLeaf`, and keeps the bytes themselves
while their total stays within the sink's budget (:data:`TRACE_BYTES_BUDGET`). :func:`run_node` runs one node alone
on given tensors, through the same typed, validated call path (the client's checks recompute committed nodes with it).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pcompute.compute.validators import MAX_NUMEL, Call, validate
from p2pcompute.core.jobspec import (
    ALLOWED_OPS,
    DEFAULT_JOB_LIMITS,
    OP_SCHEMAS,
    Arg,
    ConstRef,
    Device,
    DType,
    InputRef,
    JobLimits,
    JobSpec,
    Layout,
    MemoryFormat,
    Node,
    NodeRef,
    TensorRef,
    check_args,
    node_refs,
    tighter,
)
from p2pcompute.core.tensors import DTYPES, MAX_DIM, MAX_DIMS, TensorMeta, check_blob, tensor_digest
from p2pcompute.core.trace import TRACE_BYTES_BUDGET, TraceLeaf
from p2pcompute.errors import ExecutionError, JobFormatError, Reason

__all__ = [
    "DTYPE_BY_NAME",
    "HASH_CHUNK_BYTES",
    "NAME_BY_DTYPE",
    "TENSOR_OVERHEAD_BYTES",
    "TRACE_BYTES_BUDGET",
    "DryRun",
    "TraceSink",
    "bind_node",
    "blob_to_tensor",
    "check_memory",
    "dry_run",
    "execute",
    "resolve_op",
    "run_node",
    "tensor_meta",
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
_SORT_OPS = frozenset({"aten.sort.default", "aten.topk.default"})
_POOL_OPS = frozenset(
    {
        "aten.avg_pool2d.default",
        "aten.max_pool2d_with_indices.default",
        "aten.avg_pool2d_backward.default",
        "aten.max_pool2d_with_indices_backward.default",
    }
)
_CONV_BACKWARD = "aten.convolution_backward.default"
_MASKED_OUTPUTS: Mapping[str, str] = {_CONV_BACKWARD: "grad_output"}
"""Ops with an ``output_mask``: an output it turns off is an empty tensor (shape ``[0]``, the named argument's
dtype), whatever the kernel returned there (``None``, or on some CPU paths the gradient anyway, of another shape),
so every output position holds a tensor and the dry run, execution and every device agree."""
_VIEW_OPS = frozenset({name for name, schema in OP_SCHEMAS.items() if schema.aliases} | {"aten._unsafe_view.default"})

TENSOR_OVERHEAD_BYTES = 1024
"""Memory the dry run counts for every live tensor besides its storage's bytes. Measured on torch 2.13 (CPU, x86-64):
300,000 views made by ``split`` or ``unbind`` grew the process by 630-640 bytes each (766 with 8 dimensions),
1-byte tensors with their own storage by 510-540 bytes each; 1 KiB covers the tensor, its sizes and strides, its
storage and the allocator's rounding, with a margin."""


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
    dense = _from_little_endian(tensor.detach().to("cpu").contiguous())
    blob = bytes(_raw(dense))  # the one copy: a C-contiguous tensor's elements lie in row-major order at data_ptr
    return TensorMeta(digest=tensor_digest(blob), dtype=name, shape=tuple(tensor.shape)), blob


def tensor_meta(tensor: torch.Tensor) -> TensorMeta:
    """The meta of a tensor's wire form (:func:`tensor_to_blob`'s), hashed without building the whole blob.

    A contiguous CPU tensor is hashed in place; any other (a view with gaps or overlaps, a CUDA tensor) in
    contiguous CPU chunks of at most :data:`HASH_CHUNK_BYTES`, rows in order, so the digest is the blob's.
    """
    name = NAME_BY_DTYPE.get(tensor.dtype)
    if name is None:
        raise JobFormatError(Reason.BAD_DTYPE, f"dtype {tensor.dtype} is not one of {sorted(DTYPES)}")
    h = hashlib.sha256()
    _hash_into(h, _from_little_endian(tensor.detach()))
    return TensorMeta(digest=h.digest(), dtype=name, shape=tuple(int(s) for s in tensor.shape))


HASH_CHUNK_BYTES = 16 << 20
"""Largest contiguous CPU copy :func:`tensor_meta` makes to hash a non-contiguous or CUDA tensor (beyond a row)."""


def _hash_into(h: Any, tensor: torch.Tensor) -> None:
    if tensor.numel() == 0:
        return
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        h.update(_raw(tensor))
        return
    if nbytes <= HASH_CHUNK_BYTES or tensor.dim() == 0:
        dense = tensor.contiguous().to("cpu")  # held while hashed: the view below does not keep it alive
        h.update(_raw(dense))
        del dense
        return
    if tensor.shape[0] == 1:
        _hash_into(h, tensor[0])
        return
    rows = max(1, HASH_CHUNK_BYTES // (nbytes // int(tensor.shape[0])))
    for start in range(0, int(tensor.shape[0]), rows):
        _hash_into(h, tensor[start : start + rows])


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a C-contiguous CPU tensor, in place. The view does not keep the tensor alive: the caller must."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    assert tensor.device.type == "cpu" and tensor.is_contiguous()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


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
    if str(overload._schema) != "aten::" + OP_SCHEMAS[name].text:  # the types checked are the kernel's types
        raise JobFormatError(Reason.UNKNOWN_OP, f"op {name!r} has another schema in torch {torch.__version__}")
    return overload


def _defaults(op: torch._ops.OpOverload) -> dict[str, Any]:
    return {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}


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


# --- the interpreter -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DryRun:
    """What a meta-device run of a job found: peak live bytes, output sizes, a rough flop count, per-node shapes."""

    peak_bytes: int
    output_bytes: int
    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    flops: int
    node_flops: tuple[int, ...] = ()
    """:func:`_flops` of each node, in node order."""
    node_outputs: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...] = ()
    """(dtype, shape) of each tensor each node returns, in node order: what its trace leaf must state."""


class _Run:
    """One interpretation of a spec; ``meta=True`` allocates nothing and checks limits per node."""

    def __init__(
        self,
        spec: JobSpec,
        inputs: Sequence[torch.Tensor],
        device: torch.device,
        limits: JobLimits,
        lookup: Callable[[TensorRef], torch.Tensor] | None = None,
    ):
        self.spec = spec
        self.lookup = lookup  # run_node: tensor arguments from the caller
        self.device = device
        self.limits = limits
        self.inputs = list(inputs)
        self.nodes: list[Any] = [None] * len(spec.nodes)
        self.bound: Mapping[str, Any] = {}  # the last call's arguments by name
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
        if self.lookup is not None:
            return self.lookup(ref)
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
        op, args, kwargs = self.prepare(index)
        result = op(*args, **kwargs)
        like = _MASKED_OUTPUTS.get(self.spec.nodes[index].op)
        if like is not None and isinstance(result, tuple):
            dtype, mask = self.bound[like].dtype, [bool(m) for m in self.bound["output_mask"]]
            result = tuple(
                r if on and r is not None else torch.empty((0,), dtype=dtype, device=self.device)
                for r, on in zip(result, mask, strict=True)
            )
        return result

    def prepare(self, index: int) -> tuple[torch._ops.OpOverload, list[Any], dict[str, Any]]:
        """Type, convert and validate node ``index``'s arguments (``self.bound`` gets them by name)."""
        node = self.spec.nodes[index]
        op = resolve_op(node.op)
        where = f"node {index} {node.op}"
        check_args(OP_SCHEMAS[node.op], node.args, node.kwargs, f"node {index}")
        args = [_convert(arg, self.value, self.device) for arg in node.args]
        kwargs = {name: _convert(arg, self.value, self.device) for name, arg in node.kwargs}
        params = op._schema.arguments
        if any(a.name == "device" and a.kwarg_only for a in params):
            kwargs["device"] = self.device  # factory ops always create on the run's device (meta in the dry run)
        values = {**_defaults(op), **{a.name: v for a, v in zip(params, args, strict=False)}, **kwargs}
        validate(Call(node.op, where, values, self.device.type == "meta", self.limits))
        self.bound = values
        return op, args, kwargs

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
    return node_refs(Node(op="", args=tuple(args), kwargs=tuple(kwargs)))


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

    Live memory is counted per storage (views share their base's), freed after a value's last use, plus
    :data:`TENSOR_OVERHEAD_BYTES` per live tensor. ``flops`` is an upper-ish estimate of the work (:func:`_flops`).
    Raises :class:`JobFormatError`: ``tensor_too_large``, ``memory_limit``, ``output_too_large``,
    ``bad_argument`` (an op or a validator refused its arguments), ``bad_graph``, ``unknown_op``, ``bad_dtype``.
    """
    limits = tighter(spec.limits, limits)
    meta = torch.device("meta")
    inputs = [torch.empty(m.shape, dtype=DTYPE_BY_NAME[m.dtype], device=meta) for m in spec.inputs + spec.constants]
    run = _Run(spec, inputs, meta, limits)
    live: dict[int, list[int]] = {}  # storage key -> [bytes, number of live values using it]
    total = 0

    def hold(tensor: torch.Tensor, where: str) -> None:
        nonlocal total
        if tensor.numel() > MAX_NUMEL:
            raise JobFormatError(Reason.BAD_ARGUMENT, f"{where}: {tensor.numel()} elements, limit {MAX_NUMEL}")
        total += TENSOR_OVERHEAD_BYTES
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
        total -= TENSOR_OVERHEAD_BYTES
        entry = live[_storage_key(tensor)]
        entry[1] -= 1
        if entry[1] == 0:
            total -= entry[0]
            del live[_storage_key(tensor)]

    for i, tensor in enumerate(inputs):
        hold(tensor, f"tensor {i}")
    peak = total
    flops = 0
    node_flops: list[int] = []
    node_outputs: list[tuple[tuple[str, tuple[int, ...]], ...]] = []
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
            node_flops.append(_flops(node.op, [run.value(r) for r in _refs(node.args, node.kwargs)], outs, run.bound))
            flops += node_flops[-1]
            node_outputs.append(tuple((NAME_BY_DTYPE.get(t.dtype, str(t.dtype)), tuple(t.shape)) for t in outs))
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
        if tensor.dim() > MAX_DIMS or max(tensor.shape, default=0) > MAX_DIM:
            raise JobFormatError(
                Reason.BAD_GRAPH, f"an output of shape {list(tensor.shape)[:16]} (at most {MAX_DIMS} dims)"
            )
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > limits.max_tensor_bytes:
            raise JobFormatError(Reason.TENSOR_TOO_LARGE, f"an output of {nbytes} bytes")
        output_bytes += nbytes
    if output_bytes > limits.max_output_bytes:
        raise JobFormatError(Reason.OUTPUT_TOO_LARGE, f"{output_bytes} output bytes, limit {limits.max_output_bytes}")
    shapes = tuple((NAME_BY_DTYPE.get(t.dtype, str(t.dtype)), tuple(t.shape)) for t in outputs)
    if any(name not in DTYPES for name, _ in shapes):
        raise JobFormatError(Reason.BAD_DTYPE, f"an output dtype is not one of {sorted(DTYPES)}")
    return DryRun(
        peak_bytes=peak,
        output_bytes=output_bytes,
        outputs=shapes,
        flops=flops,
        node_flops=tuple(node_flops),
        node_outputs=tuple(node_outputs),
    )


def _flops(op: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], bound: Mapping[str, Any]) -> int:
    """An upper-ish estimate of one op's work, at least 1.

    Matrix products 2·M·N·K (+ M·N for ``addmm``); convolutions 2 * the larger of (output, input) elements *
    the weight's elements per output channel; ``convolution_backward`` such a count (``grad_output`` as the
    output) for each of the input's and the weight's gradients it computes, + ``grad_output``'s elements;
    ``sort``/``topk`` n·⌈log₂ m + 1⌉ for n elements sorted along m; 2-D pooling and its backward ops the output
    elements * the window; views 1; every other op the larger of its input elements and its output elements (a
    reduction reads every input element, a creation writes every output element).
    """
    n_in = sum(t.numel() for t in inputs)
    n_out = sum(t.numel() for t in outputs)
    if op in _VIEW_OPS:
        return 1
    if op in _MATMUL_OPS:
        first = bound["mat1"] if op == "aten.addmm.default" else bound["self"]
        return max(1, 2 * n_out * int(first.shape[-1]) + n_out)
    if op == "aten.convolution.default":
        per_channel = math.prod(int(s) for s in bound["weight"].shape[1:])
        return max(1, 2 * max(n_out, int(bound["input"].numel())) * per_channel + n_out)
    if op == _CONV_BACKWARD:  # a convolution per gradient asked for (input, weight), a sum for the bias
        per_channel = math.prod(int(s) for s in bound["weight"].shape[1:])
        one = 2 * max(int(bound["grad_output"].numel()), int(bound["input"].numel())) * per_channel
        mask = [bool(m) for m in bound["output_mask"]]
        return max(1, one * (int(mask[0]) + int(mask[1])) + int(bound["grad_output"].numel()))
    if op in _SORT_OPS:
        x = bound["self"]
        along = int(x.shape[int(bound["dim"]) % x.dim()]) if x.dim() else 1
        return max(1, int(x.numel()) * (math.ceil(math.log2(max(along, 1))) + 1))
    if op in _POOL_OPS:
        size = bound["kernel_size"]
        kernel = [int(k) for k in size] if isinstance(size, (list, tuple)) else [int(size)]
        window = math.prod(kernel) if len(kernel) > 1 else kernel[0] ** 2
        return max(1, n_out * window, n_in)
    return max(1, n_in, n_out)


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


def execute(
    spec: JobSpec, blobs: Mapping[bytes, bytes], *, device: str = "cpu", trace: TraceSink | None = None
) -> list[torch.Tensor]:
    """Run ``spec`` on ``device`` with the tensors in ``blobs`` (by digest); return the outputs on the CPU.

    With ``trace``, every node's outputs go into it as the node finishes (:class:`TraceSink`). Call
    :func:`check_memory` first. Raises :class:`JobFormatError` (``missing_tensor``, ``hash_mismatch``,
    ``shape_mismatch``, ``unknown_op``, ``bad_argument``, ``bad_dtype``, ``bad_graph``) or :class:`ExecutionError`
    (``execution_failed``: an op failed on the data, or a validator's data check refused the data before it ran).
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
        for i in range(len(spec.nodes)):
            run.nodes[i] = _call(run, i)
            if trace is not None:
                trace.add(i, run.nodes[i])
            run.free(i)
            if run.last_use[i] == -1:
                run.nodes[i] = None
        return [tensor.to("cpu") for tensor in run.outputs()]


def _call(run: _Run, i: int) -> Any:
    node = run.spec.nodes[i]
    try:
        return run.call(i)
    except (JobFormatError, ExecutionError):  # a validator's refusal, already specific
        raise
    except (TypeError, ValueError) as exc:
        raise JobFormatError(Reason.BAD_ARGUMENT, f"node {i} {node.op}: {str(exc)[:300]}") from exc
    except Exception as exc:
        raise ExecutionError(Reason.EXECUTION_FAILED, f"node {i} {node.op}: {str(exc)[:300]}") from exc


def bind_node(
    spec: JobSpec, index: int, value: Callable[[TensorRef], torch.Tensor], *, device: str = "cpu"
) -> dict[str, Any]:
    """Node ``index``'s arguments by parameter name (defaults filled in), typed and validated as :func:`run_node`
    does before it calls the op; tensors from ``value``. Raises as :func:`execute` does."""
    run = _Run(spec, [], torch.device(device), spec.limits, lookup=value)
    node = spec.nodes[index]
    try:
        run.prepare(index)
    except (JobFormatError, ExecutionError):
        raise
    except (TypeError, ValueError) as exc:
        raise JobFormatError(Reason.BAD_ARGUMENT, f"node {index} {node.op}: {str(exc)[:300]}") from exc
    return dict(run.bound)


def run_node(
    spec: JobSpec, index: int, value: Callable[[TensorRef], torch.Tensor], *, device: str = "cpu"
) -> list[torch.Tensor]:
    """Run node ``index`` of ``spec`` alone, its tensor arguments given by ``value``; return the tensors it returns.

    The arguments are typed against the op's schema and checked by its validators (data checks included) exactly as
    in :func:`execute`, so tensors from an untrusted peer go through the same gate. Raises as :func:`execute` does.
    """
    run = _Run(spec, [], torch.device(device), spec.limits, lookup=value)
    with torch.no_grad():
        return _tensors(_call(run, index))


class TraceSink:
    """Collects a job's committed trace while :func:`execute` runs it (specs/verification.md §10).

    ``leaves`` gets one :class:`TraceLeaf` per node. ``blobs`` keeps the wire bytes of the intermediates, by digest,
    while their total stays within ``budget``; the first tensor that does not fit stops the keeping (the kept ones are
    those of a prefix of the nodes), and ``complete`` tells whether every committed digest not in ``known`` (the
    job's own inputs and constants) was kept. Each kept tensor costs one copy; the others are hashed in place.
    """

    __slots__ = ("blobs", "budget", "complete", "kept_bytes", "known", "leaves")

    def __init__(self, *, budget: int = TRACE_BYTES_BUDGET, known: frozenset[bytes] = frozenset()) -> None:
        if budget < 0:
            raise ValueError("the trace budget must not be negative")
        self.budget = budget
        self.known = known
        self.leaves: list[TraceLeaf] = []
        self.blobs: dict[bytes, bytes] = {}
        self.kept_bytes = 0
        self.complete = True

    def add(self, node: int, value: Any) -> None:
        """Commit the outputs of ``node`` (a tensor, or a tuple/list of them)."""
        metas = []
        for tensor in _tensors(value):
            if tensor.dim() > MAX_DIMS:
                raise JobFormatError(
                    Reason.BAD_GRAPH, f"node {node}: a tensor of {tensor.dim()} dims cannot be committed ({MAX_DIMS})"
                )
            metas.append(self._capture(tensor))
        self.leaves.append(TraceLeaf(node=node, outputs=tuple(metas)))

    def _capture(self, tensor: torch.Tensor) -> TensorMeta:
        nbytes = tensor.numel() * tensor.element_size()
        if self.complete and self.kept_bytes + nbytes <= self.budget:
            meta, blob = tensor_to_blob(tensor)
            if meta.digest not in self.known and meta.digest not in self.blobs:
                self.blobs[meta.digest] = blob
                self.kept_bytes += nbytes
            return meta
        meta = tensor_meta(tensor)
        if meta.digest not in self.known and meta.digest not in self.blobs:
            self.complete = False
        return meta
