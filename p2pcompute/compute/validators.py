"""Kernel argument validators: an op's arguments are checked here before they reach ATen (specs/job-format.md §12).

ATen kernels assume honest callers: a kernel that indexes one argument by another's length, or that divides by an
argument, trusts the caller to have checked. The job format's types (``jobspec.check_args``) keep the wrong *kinds*
of values out; the validators in :data:`VALIDATORS`, keyed by op name, check the relationships and ranges:

- **static checks** (shapes, dtypes, ranges of int arguments, sizes an op would create, the number of outputs of
  list-valued ops) run before the op in both the meta-device dry run and execution, and raise
  :class:`JobFormatError` (``bad_argument``, or ``tensor_too_large`` for a creation over ``max_tensor_bytes``);
- **data checks** (index ranges, integer division of the type's minimum by -1) run at execution only, on the real
  tensors, in one pass over the index or divisor tensor, and raise :class:`ExecutionError` ``execution_failed``
  (like an op that fails on the data).

Every class of crash or out-of-bounds read the op fuzzer (``benchmarks/fuzz_ops.py``) finds gets a validator here or
its op leaves the allow-list. This module imports torch and runs in the executor's child process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from p2pcompute.core.jobspec import ALLOWED_OPS, MAX_TUPLE_OUTPUTS, OP_SCHEMAS, ArgType, JobLimits
from p2pcompute.core.tensors import MAX_DIM
from p2pcompute.errors import ExecutionError, JobFormatError, Reason

__all__ = ["MAX_DIM", "MAX_NUMEL", "VALIDATORS", "Call", "Validator", "validate"]

MAX_NUMEL = 1 << 40
"""Most elements of any tensor an op may create, views included (so no element count or byte offset overflows)."""

_INDEX_DTYPES = frozenset({torch.int64, torch.int32})
_SELF_DIM_OPS = frozenset(
    name
    for name, schema in OP_SCHEMAS.items()
    if name != "aten.unsqueeze.default"  # its dim may be one past the last
    and any(p.name == "self" and p.type is ArgType.TENSOR for p in schema.params)
    and any(p.name == "dim" and p.type is ArgType.INT and not p.is_list for p in schema.params)
)
"""Ops whose ``int dim`` indexes the dimensions of ``self``: it must be in [-max(ndim, 1), max(ndim, 1))."""
_REDUCED = frozenset({torch.float16, torch.bfloat16})


@dataclass(frozen=True, slots=True)
class Call:
    """One op call about to happen: every parameter by name (the given value or the schema's default)."""

    op: str
    where: str
    values: Mapping[str, Any]
    meta: bool
    limits: JobLimits

    def refuse(self, detail: str, reason: Reason = Reason.BAD_ARGUMENT) -> NoReturn:
        raise JobFormatError(reason, f"{self.where}: {detail}")

    def fail(self, detail: str) -> NoReturn:
        """A data check failed at execution: the op would misbehave on these values."""
        raise ExecutionError(Reason.EXECUTION_FAILED, f"{self.where}: {detail} (refused before the kernel)")

    def tensor(self, name: str) -> torch.Tensor:
        value = self.values[name]
        if not isinstance(value, torch.Tensor):  # pragma: no cover - check_args types every argument first
            self.refuse(f"{name} is not a tensor")
        return value

    def maybe_tensor(self, name: str) -> torch.Tensor | None:
        value = self.values.get(name)
        return value if isinstance(value, torch.Tensor) else None

    def ints(self, name: str, size: int | None = None) -> list[int]:
        """An ``int[]`` argument as a list; a bare int of an ``int[N]`` argument repeated ``size`` times."""
        value = self.values[name]
        if isinstance(value, int):
            return [value] * (size or 1)
        return [int(v) for v in value]


Validator = Callable[[Call], None]


def validate(call: Call) -> None:
    """Run the checks every op gets, then the op's own validators."""
    if call.values.get("pin_memory") is True:
        call.refuse("pin_memory=True is not allowed (page-locked host memory is the worker's)")
    if call.op in _SELF_DIM_OPS and call.values.get("dim") is not None:
        # some meta kernels (sort's) take any dim; the CPU kernels refuse it; refuse it in the dry run too
        _wrap_dim(call, int(call.values["dim"]), call.tensor("self").dim())
    for check in VALIDATORS.get(call.op, ()):
        check(call)


# --- helpers ---------------------------------------------------------------------------------------------------------


def _in_range(call: Call, name: str, values: Sequence[int], low: int, high: int = MAX_DIM) -> None:
    for v in values:
        if not low <= v <= high:
            call.refuse(f"{name} {v} is outside [{low}, {high}]")


def _numel(call: Call, sizes: Sequence[int], what: str) -> int:
    numel = math.prod(sizes)
    if numel > MAX_NUMEL:
        call.refuse(f"{what} would have {numel} elements, limit {MAX_NUMEL}")
    return numel


def _creates(call: Call, numel: int, itemsize: int, what: str) -> None:
    nbytes = numel * itemsize
    if nbytes > call.limits.max_tensor_bytes:
        call.refuse(f"{what} would take {nbytes} bytes, limit {call.limits.max_tensor_bytes}", Reason.TENSOR_TOO_LARGE)


def _wrap_dim(call: Call, dim: int, ndim: int, name: str = "dim") -> int:
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        call.refuse(f"{name} {dim} is out of range for a tensor of {ndim} dimensions")
    return dim % rank


def _floating(call: Call, name: str) -> torch.Tensor:
    tensor = call.tensor(name)
    if not tensor.dtype.is_floating_point:
        call.refuse(f"{name} must be a floating tensor, not {tensor.dtype}")
    return tensor


def _param_dtype(call: Call, name: str, like: torch.Tensor) -> None:
    """A normalisation parameter: the input's dtype, or float32 with a float16/bfloat16 input."""
    param = call.maybe_tensor(name)
    if (
        param is not None
        and param.dtype != like.dtype
        and not (like.dtype in _REDUCED and param.dtype == torch.float32)
    ):
        call.refuse(f"{name} is {param.dtype}, the input {like.dtype}")


def _channel_vector(call: Call, name: str, channels: int, like: torch.Tensor, *, required: bool = False) -> None:
    """A per-channel parameter: a contiguous 1-D tensor of exactly ``channels`` elements.

    The kernels read one element per channel from the parameter's data pointer, some ignoring its strides."""
    param = call.maybe_tensor(name)
    if param is None:
        if required:
            call.refuse(f"{name} is required")
        return
    if param.dim() != 1 or param.numel() != channels:
        call.refuse(f"{name} has shape {list(param.shape)}, expected [{channels}] (one per channel)")
    _contiguous(call, name, param)
    _param_dtype(call, name, like)


def _contiguous(call: Call, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        call.refuse(f"{name} must be contiguous (strides {list(tensor.stride())}); a clone makes it so")


def _dims(call: Call, name: str, tensor: torch.Tensor, allowed: tuple[int, ...]) -> None:
    if tensor.dim() not in allowed:
        call.refuse(f"{name} has {tensor.dim()} dimensions, expected one of {list(allowed)}")


def _window(call: Call, name: str, size: int, *, low: int, allow_empty: bool = False) -> list[int]:
    """An ``int[N]`` window argument (kernel, stride, padding, dilation): 1 or ``size`` values in range."""
    values = call.ints(name, size)
    if allow_empty and not values:
        return values
    if len(values) not in (1, size):
        call.refuse(f"{name} has {len(values)} values, expected 1 or {size}")
    _in_range(call, name, values, low)
    return values * size if len(values) == 1 else values


# --- data checks (execution only) ------------------------------------------------------------------------------------


def _index_range(call: Call, name: str, index: torch.Tensor, size: int, *, negative: bool) -> None:
    if call.meta or index.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(index))
    if low < (-size if negative else 0) or high >= size:
        call.fail(f"{name} holds {low if low < 0 else high}, out of range for a size of {size}")


def _index_dtype(call: Call, name: str, index: torch.Tensor, dtypes: frozenset[torch.dtype] = _INDEX_DTYPES) -> None:
    if index.dtype not in dtypes:
        call.refuse(f"{name} must be int64 or int32, not {index.dtype}")


# --- validators by op ------------------------------------------------------------------------------------------------


def _batch_norm(call: Call) -> None:
    x = _floating(call, "input")
    if x.dim() < 2:
        call.refuse(f"input has {x.dim()} dimensions, expected at least 2")
    channels = x.shape[1]
    for name in ("weight", "bias"):
        _channel_vector(call, name, channels, x)
    for name in ("running_mean", "running_var"):
        _channel_vector(call, name, channels, x, required=True)


def _layer_norm(call: Call) -> None:
    x = _floating(call, "input")
    shape = call.ints("normalized_shape")
    if not 1 <= len(shape) <= x.dim() or list(x.shape[x.dim() - len(shape) :]) != shape:
        call.refuse(f"normalized_shape {shape} does not end the input's shape {list(x.shape)}")
    for name in ("weight", "bias"):
        param = call.maybe_tensor(name)
        if param is not None and list(param.shape) != shape:
            call.refuse(f"{name} has shape {list(param.shape)}, expected {shape}")
        if param is not None:
            _contiguous(call, name, param)
        _param_dtype(call, name, x)


def _group_norm(call: Call) -> None:
    x = _floating(call, "input")
    n, c, hxw, group = (int(call.values[k]) for k in ("N", "C", "HxW", "group"))
    if x.dim() < 2 or x.shape[0] != n or x.shape[1] != c or n * c * hxw != x.numel():
        call.refuse(f"N={n}, C={c}, HxW={hxw} do not describe the input's shape {list(x.shape)}")
    if not 1 <= group <= max(c, 1) or c % group:
        call.refuse(f"{group} groups do not divide {c} channels")
    for name in ("weight", "bias"):
        _channel_vector(call, name, c, x)


def _convolution(call: Call) -> None:
    _conv_output_shape(call)


def _conv_output_shape(call: Call) -> list[int]:
    """Check a convolution's ``input``, ``weight``, windows and groups; return the output's shape."""
    x = _floating(call, "input")
    weight = call.tensor("weight")
    _dims(call, "input", x, (3, 4, 5))
    if weight.dim() != x.dim() or weight.dtype != x.dtype:
        call.refuse(f"weight {weight.dtype}{list(weight.shape)} does not match input {x.dtype}{list(x.shape)}")
    k = x.dim() - 2
    stride = _window(call, "stride", k, low=1)
    padding = _window(call, "padding", k, low=0)
    dilation = _window(call, "dilation", k, low=1)
    output_padding = _window(call, "output_padding", k, low=0)
    groups = int(call.values["groups"])
    _in_range(call, "groups", [groups], 1)
    transposed = bool(call.values["transposed"])
    kernel = list(weight.shape[2:])
    if min(kernel, default=1) < 1:
        call.refuse(f"weight has an empty kernel {kernel}")
    in_channels = x.shape[1]
    if transposed:
        out_channels = weight.shape[1] * groups
        ok = weight.shape[0] == in_channels and in_channels % groups == 0
        if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation, strict=True)):
            call.refuse(f"output_padding {output_padding} must be smaller than stride or dilation")
        spatial = [
            (i - 1) * s - 2 * p + d * (kk - 1) + op + 1
            for i, s, p, d, kk, op in zip(x.shape[2:], stride, padding, dilation, kernel, output_padding, strict=True)
        ]
    else:
        out_channels = weight.shape[0]
        ok = weight.shape[1] * groups == in_channels and out_channels % groups == 0
        if any(output_padding):
            call.refuse("output_padding is only for transposed convolutions")
        spatial = [
            (i + 2 * p - d * (kk - 1) - 1) // s + 1
            for i, s, p, d, kk in zip(x.shape[2:], stride, padding, dilation, kernel, strict=True)
        ]
    if not ok or out_channels == 0:
        call.refuse(f"weight {list(weight.shape)} and {groups} groups do not fit {in_channels} input channels")
    if min(spatial) < 1:
        call.refuse(f"the output would have spatial size {spatial}")
    shape = [x.shape[0], out_channels, *spatial]
    _numel(call, shape, "the output")
    bias = call.maybe_tensor("bias")
    if bias is not None and (bias.dim() != 1 or bias.numel() != out_channels or bias.dtype != x.dtype):
        call.refuse(f"bias {bias.dtype}{list(bias.shape)} does not fit {out_channels} output channels of {x.dtype}")
    return shape


def _convolution_backward(call: Call) -> None:
    """The gradients of a convolution: ``grad_output`` must be exactly the output the forward arguments give (the
    kernels index it by the shape they compute from ``input`` and ``weight``)."""
    shape = _conv_output_shape(call)
    _matches(call, "grad_output", shape, call.tensor("input").dtype)
    mask = [bool(m) for m in call.values["output_mask"]]
    if len(mask) != 3:
        call.refuse(f"output_mask has {len(mask)} values, expected 3")
    bias_sizes = call.values["bias_sizes"]
    sizes = [int(v) for v in bias_sizes] if bias_sizes is not None else None
    if mask[2] and sizes != [shape[1]]:  # the bias gradient is made of this shape, then summed into
        call.refuse(f"bias_sizes {sizes} do not fit {shape[1]} output channels (output_mask[2] asks for it)")
    if sizes is not None and (len(sizes) > 1 or not all(0 <= v <= MAX_DIM for v in sizes)):
        call.refuse(f"bias_sizes {sizes[:4]} is not one size")  # unused without the bias gradient ([0]: no bias)


def _matches(call: Call, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A gradient argument: exactly ``shape`` and ``dtype`` (the shape of the forward op's output)."""
    grad = call.tensor(name)
    if list(grad.shape) != list(shape) or grad.dtype != dtype:
        call.refuse(f"{name} is {grad.dtype}{list(grad.shape)}, the forward output is {dtype}{list(shape)}")
    return grad


def _pool_input(call: Call, *, floating: bool) -> torch.Tensor:
    x = _floating(call, "self") if floating else call.tensor("self")
    _dims(call, "self", x, (3, 4))
    if min(x.shape[-3:]) < 1:  # batch may be empty; channels and spatial dims may not
        call.refuse(f"self has an empty dimension {list(x.shape)}")
    return x


def _pool_windows(call: Call, x: torch.Tensor, *, dilation: list[int]) -> None:
    kernel = _window(call, "kernel_size", 2, low=1)
    stride = _window(call, "stride", 2, low=1, allow_empty=True) or kernel
    padding = _window(call, "padding", 2, low=0)
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        call.refuse(f"padding {padding} is over half the kernel {kernel}")
    ceil_mode = bool(call.values["ceil_mode"])
    for i, s, p, d, k in zip(x.shape[-2:], stride, padding, dilation, kernel, strict=True):
        span = i + 2 * p - d * (k - 1) - 1
        if span < 0:
            call.refuse(f"kernel {kernel} (dilation {dilation}) is larger than the padded input {list(x.shape)}")
        _in_range(call, "output size", [span // s + 1 + int(ceil_mode)], 1)


def _avg_pool2d(call: Call) -> None:
    # Integer inputs are refused: their window sums are divided in integer arithmetic (INT64_MIN / -1 traps).
    x = _pool_input(call, floating=True)
    _pool_windows(call, x, dilation=[1, 1])
    divisor = call.values["divisor_override"]
    if divisor is not None:
        _in_range(call, "divisor_override", [int(divisor)], 1)


def _max_pool2d(call: Call) -> None:
    x = _pool_input(call, floating=False)
    _pool_windows(call, x, dilation=_window(call, "dilation", 2, low=1))


def _adaptive_avg_pool2d(call: Call) -> None:
    x = _pool_input(call, floating=True)
    size = call.ints("output_size", 2)
    if len(size) != 2:
        call.refuse(f"output_size has {len(size)} values, expected 2")
    _in_range(call, "output_size", size, 1)
    _numel(call, [*x.shape[:-2], *size], "the output")


def _forward_shape(call: Call, forward: torch._ops.OpOverload, names: Sequence[str]) -> list[int]:
    """The output shape of the forward op ``forward`` (its arguments already validated) from its meta kernel: the
    shape the backward kernel assumes for ``grad_output``."""
    meta = [v.to("meta") if isinstance(v, torch.Tensor) else v for v in (call.values[n] for n in names)]
    try:
        out = forward(*meta)
    except Exception as exc:  # the forward refuses these arguments: so does its backward
        call.refuse(f"the forward {forward} refuses these arguments: {str(exc)[:200]}")
    return list((out[0] if isinstance(out, tuple) else out).shape)


_MAX_POOL_ARGS = ("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
_AVG_POOL_ARGS = ("self", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _max_pool2d_backward(call: Call) -> None:
    """Scatters ``grad_output`` into the input's shape at ``indices``: ``grad_output`` and ``indices`` the forward's
    output shape; execution: every index inside its input plane (the kernel writes there unchecked)."""
    x = _pool_input(call, floating=True)
    _pool_windows(call, x, dilation=_window(call, "dilation", 2, low=1))
    shape = _forward_shape(call, torch.ops.aten.max_pool2d_with_indices.default, _MAX_POOL_ARGS)
    _matches(call, "grad_output", shape, x.dtype)
    indices = _matches(call, "indices", shape, torch.int64)
    _index_range(call, "indices", indices, x.shape[-1] * x.shape[-2], negative=False)


def _avg_pool2d_backward(call: Call) -> None:
    x = _pool_input(call, floating=True)
    _pool_windows(call, x, dilation=[1, 1])
    divisor = call.values["divisor_override"]
    if divisor is not None:
        _in_range(call, "divisor_override", [int(divisor)], 1)
    _matches(call, "grad_output", _forward_shape(call, torch.ops.aten.avg_pool2d.default, _AVG_POOL_ARGS), x.dtype)


def _adaptive_avg_pool2d_backward(call: Call) -> None:
    """Any output size of at least 1 is a forward's: ``grad_output`` has ``self``'s leading shape and dtype."""
    x = _pool_input(call, floating=True)
    grad = call.tensor("grad_output")
    if grad.dim() != x.dim() or grad.shape[:-2] != x.shape[:-2] or min(grad.shape[-2:]) < 1 or grad.dtype != x.dtype:
        call.refuse(f"grad_output {grad.dtype}{list(grad.shape)} is no adaptive pooling of {x.dtype}{list(x.shape)}")


def _upsample(call: Call, *, floating: bool) -> None:
    """``input`` 4-D with channels and spatial sizes >= 1; exactly one of ``output_size`` (2 sizes in [1, MAX_DIM])
    and ``scale_factors`` (2 finite factors > 0 giving sizes in [1, MAX_DIM]); the output within the limits."""
    x = _floating(call, "input") if floating else call.tensor("input")
    _dims(call, "input", x, (4,))
    if min(x.shape[1:]) < 1:
        call.refuse(f"input has an empty dimension {list(x.shape)}")
    size, scales = call.values["output_size"], call.values["scale_factors"]
    if (size is None) == (scales is None):
        call.refuse("exactly one of output_size and scale_factors must be given")
    if size is not None:
        out = [int(v) for v in size]
        if len(out) != 2:
            call.refuse(f"output_size has {len(out)} values, expected 2")
    else:
        factors = [float(v) for v in scales]
        if len(factors) != 2 or not all(math.isfinite(f) and f > 0 for f in factors):
            call.refuse(f"scale_factors {factors} must be 2 finite factors > 0")
        if any(f * i > MAX_DIM for f, i in zip(factors, x.shape[2:], strict=True)):
            call.refuse(f"scale_factors {factors} make sizes over {MAX_DIM}")
        out = [math.floor(f * i) for f, i in zip(factors, x.shape[2:], strict=True)]
    _in_range(call, "output size", out, 1)
    numel = _numel(call, [*x.shape[:2], *out], "the output")
    _creates(call, numel, x.element_size(), "the output")


def _scatter(call: Call) -> None:
    """Writes into a copy of ``self`` at ``index`` along ``dim``: ``index`` int64 with ``self``'s dimensions, no
    larger than ``self`` outside ``dim`` (and than ``src`` anywhere); execution: values in [0, size(dim))."""
    x = call.tensor("self")
    index = call.tensor("index")
    _index_dtype(call, "index", index, frozenset({torch.int64}))
    src = call.maybe_tensor("src")
    if src is not None and (src.dim() != x.dim() or src.dtype != x.dtype):
        call.refuse(f"src {src.dtype}{list(src.shape)} does not match self {x.dtype}{list(x.shape)}")
    dim = _wrap_dim(call, int(call.values["dim"]), x.dim())
    if index.numel() > 0:
        if index.dim() != x.dim():
            call.refuse(f"index has {index.dim()} dimensions, self {x.dim()}")
        for d in range(index.dim()):
            if (d != dim and index.shape[d] > x.shape[d]) or (src is not None and index.shape[d] > src.shape[d]):
                call.refuse(f"index {list(index.shape)} is larger than self {list(x.shape)} or src at dimension {d}")
    _index_range(call, "index", index, x.shape[dim] if x.dim() else 1, negative=False)


def _index_put(call: Call) -> None:
    """As ``index.Tensor`` for the indices (the kernel writes where they point); ``values`` of ``self``'s dtype."""
    _index(call)
    values = call.tensor("values")
    if values.dtype != call.tensor("self").dtype:
        call.refuse(f"values are {values.dtype}, self {call.tensor('self').dtype}")


def _slice_scatter(call: Call) -> None:
    """``src`` has exactly the shape of the slice it replaces; ``step`` >= 1."""
    x = call.tensor("self")
    if x.dim() == 0:
        call.refuse("slice_scatter of a 0-dimensional tensor")
    step = int(call.values["step"])
    _in_range(call, "step", [step], 1)
    shape = _forward_shape(call, torch.ops.aten.slice.Tensor, ("self", "dim", "start", "end", "step"))
    src = call.tensor("src")
    if list(src.shape) != shape:
        call.refuse(f"src has shape {list(src.shape)}, the slice {shape}")


def _creation_dtype(call: Call, default: torch.dtype) -> torch.dtype:
    dtype = call.values.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) else default


def _scalar_dtype(value: object) -> torch.dtype:
    if isinstance(value, bool):
        return torch.bool
    if isinstance(value, int):
        return torch.int64
    return torch.get_default_dtype()


def _sized_creation(call: Call, fill: object) -> None:
    sizes = call.ints("size")
    _in_range(call, "size", sizes, 0)
    dtype = _creation_dtype(call, _scalar_dtype(fill))
    _creates(call, _numel(call, sizes, "the tensor"), dtype.itemsize, "the tensor")


def _full(call: Call) -> None:
    _sized_creation(call, call.values["fill_value"])


def _empty(call: Call) -> None:
    _sized_creation(call, 0.0)


def _arange(call: Call) -> None:
    start, end, step = call.values.get("start", 0), call.values["end"], call.values.get("step", 1)
    numbers = [float(v) for v in (start, end, step)]
    if not all(math.isfinite(v) for v in numbers):
        call.refuse(f"arange({start}, {end}, {step}) needs finite bounds")
    if step == 0:
        call.refuse("arange step 0")
    if all(isinstance(v, int) for v in (start, end, step)):
        count = -((start - end) // step)
        dtype = torch.int64
    else:
        quotient = (numbers[1] - numbers[0]) / numbers[2]
        if not math.isfinite(quotient):
            call.refuse(f"arange({start}, {end}, {step}) has no finite length")
        count = math.ceil(quotient)
        dtype = torch.get_default_dtype()
    if count < 0:
        call.refuse(f"arange({start}, {end}, {step}): the step's sign does not lead from start to end")
    _creates(call, _numel(call, [count], "the range"), _creation_dtype(call, dtype).itemsize, "the range")


def _view(call: Call) -> None:
    _in_range(call, "size", call.ints("size"), -1)


def _expand(call: Call) -> None:
    x = call.tensor("self")
    sizes = call.ints("size")
    _in_range(call, "size", sizes, -1)
    if len(sizes) < x.dim():
        call.refuse(f"expand to {len(sizes)} dimensions of a tensor of {x.dim()}")
    lead = len(sizes) - x.dim()
    result = [x.shape[i - lead] if s == -1 and i >= lead else s for i, s in enumerate(sizes)]
    if min(result, default=0) < 0:
        call.refuse(f"-1 in a new leading dimension of expand {sizes}")
    _numel(call, result, "the expanded view")


def _repeat(call: Call) -> None:
    x = call.tensor("self")
    repeats = call.ints("repeats")
    _in_range(call, "repeats", repeats, 0)
    if len(repeats) < x.dim():
        call.refuse(f"{len(repeats)} repeats for a tensor of {x.dim()} dimensions")
    shape = [1] * (len(repeats) - x.dim()) + list(x.shape)
    numel = _numel(call, [s * r for s, r in zip(shape, repeats, strict=True)], "the repeated tensor")
    _creates(call, numel, x.element_size(), "the repeated tensor")


def _constant_pad_nd(call: Call) -> None:
    x = call.tensor("self")
    pad = call.ints("pad")
    _in_range(call, "pad", pad, -MAX_DIM)
    if len(pad) % 2 or len(pad) > 2 * x.dim():
        call.refuse(f"pad of {len(pad)} values for a tensor of {x.dim()} dimensions")
    shape = list(x.shape)
    for i in range(len(pad) // 2):
        shape[-1 - i] += pad[2 * i] + pad[2 * i + 1]
    if min(shape, default=0) < 0:
        call.refuse(f"pad {pad} makes a negative size from {list(x.shape)}")
    _creates(call, _numel(call, shape, "the padded tensor"), x.element_size(), "the padded tensor")


def _outputs(call: Call, count: int) -> None:
    if count > MAX_TUPLE_OUTPUTS:
        call.refuse(f"{count} outputs, limit {MAX_TUPLE_OUTPUTS}")


def _split(call: Call) -> None:
    x = call.tensor("self")
    if x.dim() == 0:
        call.refuse("split of a 0-dimensional tensor")
    size = x.shape[_wrap_dim(call, int(call.values["dim"]), x.dim())]
    split_size = int(call.values["split_size"])
    if split_size < 0 or (split_size == 0 and size > 0):
        call.refuse(f"split_size {split_size} for a dimension of {size}")
    _outputs(call, 1 if size == 0 else -(-size // split_size))


def _split_with_sizes(call: Call) -> None:
    sizes = call.ints("split_sizes")
    _in_range(call, "split_sizes", sizes, 0)
    _outputs(call, len(sizes))


def _unbind(call: Call) -> None:
    x = call.tensor("self")
    if x.dim() == 0:
        call.refuse("unbind of a 0-dimensional tensor")
    _outputs(call, x.shape[_wrap_dim(call, int(call.values["dim"]), x.dim())])


def _topk(call: Call) -> None:
    x = call.tensor("self")
    size = x.shape[_wrap_dim(call, int(call.values["dim"]), x.dim())] if x.dim() else 1
    _in_range(call, "k", [int(call.values["k"])], 0, size)


def _diagonal(call: Call) -> None:
    _in_range(call, "diagonal", [int(call.values["diagonal"])], -MAX_DIM)


def _index(call: Call) -> None:
    x = call.tensor("self")
    indices = call.values["indices"]
    if len(indices) > x.dim():
        call.refuse(f"{len(indices)} indices for a tensor of {x.dim()} dimensions")
    for i, index in enumerate(indices):
        if index is None:
            continue
        # bool and uint8 masks are refused: the output's size would depend on the data (not known in the dry run)
        _index_dtype(call, f"indices[{i}]", index)
        _index_range(call, f"indices[{i}]", index, x.shape[i], negative=True)


def _index_select(call: Call) -> None:
    x = call.tensor("self")
    index = call.tensor("index")
    _index_dtype(call, "index", index)
    if index.dim() > 1:
        call.refuse(f"index has {index.dim()} dimensions, expected at most 1")
    size = x.shape[_wrap_dim(call, int(call.values["dim"]), x.dim())] if x.dim() else 1
    _index_range(call, "index", index, size, negative=False)


def _gather(call: Call) -> None:
    x = call.tensor("self")
    index = call.tensor("index")
    _index_dtype(call, "index", index, frozenset({torch.int64}))
    if index.dim() != x.dim() and index.numel() > 0:
        call.refuse(f"index has {index.dim()} dimensions, self {x.dim()}")
    dim = _wrap_dim(call, int(call.values["dim"]), x.dim())
    for d in range(index.dim()):
        if d != dim and index.numel() > 0 and index.shape[d] > x.shape[d]:
            call.refuse(f"index shape {list(index.shape)} is larger than self {list(x.shape)} at dimension {d}")
    _index_range(call, "index", index, x.shape[dim] if x.dim() else 1, negative=False)


def _embedding(call: Call) -> None:
    weight = call.tensor("weight")
    indices = call.tensor("indices")
    if weight.dim() != 2:
        call.refuse(f"weight has {weight.dim()} dimensions, expected 2")
    _index_dtype(call, "indices", indices)
    rows = weight.shape[0]
    padding_idx = int(call.values["padding_idx"])
    if padding_idx != -1:
        _in_range(call, "padding_idx", [padding_idx], -rows, rows - 1)
    _index_range(call, "indices", indices, rows, negative=False)


def _integer_division(call: Call) -> None:
    """remainder/fmod on integers: the type's minimum by -1 traps (SIGFPE) on x86; checked on the data."""
    x = call.tensor("self")
    other = call.values["other"]
    dtype = torch.result_type(x, other)
    if call.meta or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return
    low = torch.iinfo(dtype).min
    if isinstance(other, torch.Tensor):
        bad = bool(((x == low) & (other == -1)).any())
    else:
        bad = other == -1 and bool((x == low).any())
    if bad:
        call.fail(f"integer division of {low} by -1")


VALIDATORS: Mapping[str, tuple[Validator, ...]] = {
    # normalisation: per-channel parameters are read at every channel
    "aten._native_batch_norm_legit_no_training.default": (_batch_norm,),
    "aten.native_layer_norm.default": (_layer_norm,),
    "aten.native_group_norm.default": (_group_norm,),
    # convolution and pooling: windows, strides, paddings, groups
    "aten.convolution.default": (_convolution,),
    "aten.convolution_backward.default": (_convolution_backward,),
    "aten.avg_pool2d.default": (_avg_pool2d,),
    "aten.max_pool2d_with_indices.default": (_max_pool2d,),
    "aten._adaptive_avg_pool2d.default": (_adaptive_avg_pool2d,),
    "aten.max_pool2d_with_indices_backward.default": (_max_pool2d_backward,),
    "aten.avg_pool2d_backward.default": (_avg_pool2d_backward,),
    "aten._adaptive_avg_pool2d_backward.default": (_adaptive_avg_pool2d_backward,),
    # upsampling: output sizes from int or float arguments, bounded before the kernel allocates
    "aten.upsample_nearest2d.vec": (lambda call: _upsample(call, floating=False),),
    "aten.upsample_bilinear2d.vec": (lambda call: _upsample(call, floating=True),),
    # indexing: index dtypes statically, index ranges on the data
    "aten.index.Tensor": (_index,),
    "aten.index_select.default": (_index_select,),
    "aten.gather.default": (_gather,),
    "aten.embedding.default": (_embedding,),
    # writes at indices: index dtypes and shapes statically, index ranges on the data
    "aten.scatter.value": (_scatter,),
    "aten.scatter.src": (_scatter,),
    "aten.scatter_add.default": (_scatter,),
    "aten.index_put.default": (_index_put,),
    "aten.slice_scatter.default": (_slice_scatter,),
    # integer division
    "aten.remainder.Scalar": (_integer_division,),
    "aten.remainder.Tensor": (_integer_division,),
    "aten.fmod.Scalar": (_integer_division,),
    "aten.fmod.Tensor": (_integer_division,),
    # sizes bounded before the kernel computes them
    "aten.full.default": (_full,),
    "aten.empty.memory_format": (_empty,),
    "aten.arange.default": (_arange,),
    "aten.arange.start": (_arange,),
    "aten.arange.start_step": (_arange,),
    "aten.view.default": (_view,),
    "aten._unsafe_view.default": (_view,),
    "aten.expand.default": (_expand,),
    "aten.repeat.default": (_repeat,),
    "aten.constant_pad_nd.default": (_constant_pad_nd,),
    "aten.tril.default": (_diagonal,),
    "aten.triu.default": (_diagonal,),
    "aten.topk.default": (_topk,),
    # list-valued ops: the number of outputs, before any is made
    "aten.split.Tensor": (_split,),
    "aten.split_with_sizes.default": (_split_with_sizes,),
    "aten.unbind.int": (_unbind,),
}
"""The validators of each op, run in order before it is called (dry run and execution)."""

assert set(VALIDATORS) <= ALLOWED_OPS
