"""The op fuzzer: every allow-listed op with adversarial arguments, run the way a worker runs a job, in children.

A *case* is made from ``(seed, index)`` alone (:func:`make_case`), so a finding is reproduced by its two numbers.
Case ``index`` exercises op ``OPS[index % len(OPS)]``: arguments typed from the op's schema, often plausible (shapes
that fit each other, as a model would give), then mutated toward the adversarial: ``INT64_MIN``, -1, 0, huge sizes,
related arguments of mismatched lengths (batch norm's statistics against its channels), empty, strided and
overlapping (expanded) views, integer dtypes where floats are expected, wrong types (a raw int as a dtype) and wrong
arities. A case goes through the job path: a :class:`JobSpec` is built, encoded (packed raw when the encoder refuses
it, as a hostile client would), decoded, dry-run on the meta device and executed with the interpreter, so the
validators are what is exercised.

**Canary reads.** Every tensor argument is a view into a larger input tensor whose elements outside the view hold a
canary value; each case is executed twice, with canary A and canary B. The view's own data is the same in both, so
any difference between the two runs (output bytes, or an error in one run only) is a read past the view.

**Sacrificial children.** :func:`run_fuzz` runs cases in child processes (``python -m p2pcompute.testing.fuzz_ops
--child``) that read index ranges on stdin and write one JSON line per case on stdout. A child that dies by a signal
is a *crash* of the case after its last reported one; a child silent for ``case_timeout`` seconds is killed (a
*timeout*). Either way a fresh child goes on from the next case.

Testing code: it imports torch and ``random`` and is never reachable from a job.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from p2pcompute.compute.interpreter import DTYPE_BY_NAME, dry_run, execute, tensor_to_blob
from p2pcompute.core import codec
from p2pcompute.core.jobspec import (
    ALLOWED_OPS,
    LAYOUTS,
    MEMORY_FORMATS,
    OP_SCHEMAS,
    Arg,
    ArgType,
    Comparison,
    Device,
    DType,
    InputRef,
    JobLimits,
    JobSpec,
    Layout,
    MemoryFormat,
    Node,
    NodeRef,
    OpSchema,
    Param,
    TensorRef,
    _spec_to_wire,
    decode_job,
    encode_job,
)
from p2pcompute.core.tensors import DTYPES, TensorMeta
from p2pcompute.errors import ExecutionError, JobFormatError, LocalProtocolError, P2PComputeError

__all__ = [
    "FINDING_KINDS",
    "FUZZ_LIMITS",
    "OPS",
    "Case",
    "FuzzReport",
    "Outcome",
    "TensorArg",
    "make_case",
    "run_case",
    "run_fuzz",
]

OPS: tuple[str, ...] = tuple(sorted(ALLOWED_OPS))
MIB = 1 << 20
FUZZ_LIMITS = JobLimits(
    max_ops=64, max_tensor_bytes=16 * MIB, max_output_bytes=16 * MIB, memory_bytes=64 * MIB, wall_time_ms=10_000
)
"""Small limits, so a case the validators wrongly pass cannot take the machine down with it."""
CASE_TIMEOUT_S = 20.0
CHUNK = 64
CHILD_ADDRESS_SPACE = 3 << 30  # bytes of address space a child may add after importing torch

FINDING_KINDS = ("crash", "canary", "timeout", "died", "error", "mismatch", "inconsistent")
"""Outcome kinds that are findings (each one a bug to fix); the others are ``ran``, ``refused`` and ``failed``."""

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
_HUGE = (1 << 31) - 1, 1 << 31, 1 << 32, 1 << 40, 1 << 62, I64_MAX, I64_MIN, -(1 << 31), -(1 << 40)
_EDGE_INTS = (0, -1, -2, 1, *_HUGE)
_SCALARS: tuple[bool | int | float, ...] = (
    0, 1, -1, 2, 3, 0.5, -2.5, 1e-3, math.inf, -math.inf, 1e308, -0.0, True, False, I64_MIN, I64_MAX, 1 << 31,
)  # fmt: skip
_FLOATS = (1e-5, 0.1, 0.0, -1.0, math.inf, 1e308, 1.0, -1e-5)
_DTYPE_WEIGHTS = {
    "float32": 30,
    "float64": 8,
    "float16": 6,
    "bfloat16": 6,
    "int64": 12,
    "int32": 8,
    "int16": 3,
    "int8": 4,
    "uint8": 4,
    "bool": 5,
}
_FLOATING = ("float32", "float64", "float16", "bfloat16")
_UNINITIALISED = frozenset({"aten.empty.memory_format", "aten.empty_like.default"})
_CANARY_INT = {"int64": 0x5A5A5A5A5A5A5A5A, "int32": 0x5A5A5A5A, "int16": 0x5A5A, "int8": 0x5A, "uint8": 0xA5}


# --- cases -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument to build: its dtype and shape, how its view sits in its storage, and its data."""

    dtype: str
    shape: tuple[int, ...]
    layout: str = "contiguous"  # contiguous | strided (every other element) | expanded (stride 0) | permuted
    data: str = "normal"  # normal | special (inf, nan, extremes) | index (ints in [low, high))
    low: int = 0
    high: int = 4


Value = Any  # an Arg, a TensorArg, or a tuple of them (Tensor[] / Tensor?[])


@dataclass
class Case:
    """One fuzz case: the op node's arguments, and the two jobs (canary A and B) that run it."""

    seed: int
    index: int
    op: str
    args: tuple[Value, ...]
    kwargs: tuple[tuple[str, Value], ...]
    specs: tuple[JobSpec, JobSpec] = field(init=False)
    blobs: tuple[dict[bytes, bytes], dict[bytes, bytes]] = field(init=False)

    def describe(self) -> str:
        kw = ", ".join(f"{k}={_show(v)}" for k, v in self.kwargs)
        return f"{self.op}({', '.join(_show(a) for a in self.args)}{', ' if kw and self.args else ''}{kw})"


def _show(value: Value) -> str:
    if isinstance(value, TensorArg):
        return f"{value.dtype}{list(value.shape)}/{value.layout}/{value.data}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def make_case(seed: int, index: int) -> Case:
    """The case ``index`` of ``seed``: deterministic, whatever ran before it."""
    rng = random.Random(f"p2pcompute-fuzz-ops/{seed}/{index}")
    op = OPS[index % len(OPS)]
    case = Case(seed, index, op, *_Gen(rng, OP_SCHEMAS[op]).values())
    data_seed = rng.getrandbits(62)
    specs, blobs = [], []
    for variant in (0, 1):  # the same data in the views, canary A or B around them
        spec, variant_blobs = _Materialise(case, variant, torch.Generator().manual_seed(data_seed)).build()
        specs.append(spec)
        blobs.append(variant_blobs)
    case.specs = (specs[0], specs[1])
    case.blobs = (blobs[0], blobs[1])
    return case


class _Gen:
    """Arguments for one op: plausible first (when the op has a recipe), then mutated toward the adversarial."""

    def __init__(self, rng: random.Random, schema: OpSchema) -> None:
        self.rng = rng
        self.schema = schema
        self.rank = rng.choice((0, 1, 1, 2, 2, 3, 3, 4, 4, 5))
        self.shape = tuple(self.dim_size() for _ in range(self.rank))
        self.dtype = self.pick_dtype()

    def dim_size(self) -> int:
        return self.rng.choice((1, 2, 2, 3, 3, 4, 4, 5, 8, 0))

    def pick_dtype(self) -> str:
        names = list(_DTYPE_WEIGHTS)
        return self.rng.choices(names, weights=[_DTYPE_WEIGHTS[n] for n in names])[0]

    def tensor(self, shape: Sequence[int] | None = None, dtype: str | None = None, **kw: Any) -> TensorArg:
        layout = self.rng.choice(("contiguous", "contiguous", "strided", "expanded", "permuted"))
        data = self.rng.choice(("normal", "normal", "normal", "special"))
        kw.setdefault("layout", layout)
        kw.setdefault("data", data)
        return TensorArg(dtype or self.dtype, tuple(self.shape if shape is None else shape), **kw)

    def index_tensor(self, shape: Sequence[int], size: int, dtype: str = "int64") -> TensorArg:
        low = -size if self.rng.random() < 0.2 else 0
        high = size + (1 if self.rng.random() < 0.1 else 0)
        return self.tensor(shape, dtype, data="index", low=low, high=max(high, 1))

    def values(self) -> tuple[tuple[Value, ...], tuple[tuple[str, Value], ...]]:
        recipe = _RECIPES.get(self.schema.name)
        plausible = recipe(self) if recipe is not None and self.rng.random() < 0.7 else {}
        chosen: dict[str, Value] = {}
        for param in self.schema.params:
            if param.name in plausible:
                chosen[param.name] = plausible[param.name]
            elif param.default is None or self.rng.random() < 0.5:
                if param.type is ArgType.STR:
                    if param.optional:
                        chosen[param.name] = None
                    continue
                chosen[param.name] = self.value(param)
        for _ in range(self.rng.choice((0, 1, 1, 2)) if plausible else 1):
            self.mutate(chosen)
        return self.split(chosen)

    def split(self, chosen: dict[str, Value]) -> tuple[tuple[Value, ...], tuple[tuple[str, Value], ...]]:
        positional = [p for p in self.schema.params if not p.kwarg_only]
        args: list[Value] = []
        for param in positional:  # positional while the run of given parameters lasts, then by keyword
            if param.name not in chosen or self.rng.random() < 0.15:
                break
            args.append(chosen.pop(param.name))
        kwargs = sorted(chosen.items())
        roll = self.rng.random()
        if roll < 0.02 and args:  # wrong arity: a positional argument too many or one missing
            if self.rng.random() < 0.5:
                args.append(args[-1])
            else:
                args.pop()
        elif roll < 0.03:
            kwargs.append(("not_a_parameter", 1))
        return tuple(args), tuple(kwargs)

    # values by schema type

    def value(self, param: Param) -> Value:
        if param.optional and self.rng.random() < 0.2:
            return None
        if param.is_list:
            if param.type is ArgType.TENSOR:
                items: list[TensorArg | None] = [self.tensor() for _ in range(self.rng.choice((0, 1, 2, 2, 3)))]
                if param.item_optional:
                    items = [None if self.rng.random() < 0.3 else self.index_tensor((2,), 3) for _ in items]
                return tuple(items)
            n = param.size or self.rng.choice((self.rank, self.rank, 1, 2, 0, 3))
            if param.size is not None and self.rng.random() < 0.3:
                return self.item(param)
            return tuple(self.item(param) for _ in range(self.rng.choice((n, n, n, max(n - 1, 0), n + 1))))
        return self.item(param)

    def item(self, param: Param) -> Value:
        rng = self.rng
        match param.type:
            case ArgType.TENSOR:
                return self.tensor(self.related_shape(), self.dtype if rng.random() < 0.7 else None)
            case ArgType.INT | ArgType.SYMINT:
                return self.int_for(param.name)
            case ArgType.FLOAT:
                return rng.choice(_FLOATS)
            case ArgType.BOOL:
                return rng.random() < 0.3
            case ArgType.SCALAR:
                return rng.choice(_SCALARS)
            case ArgType.SCALAR_TYPE:
                return DType(self.pick_dtype())
            case ArgType.LAYOUT:
                return Layout(rng.choice(sorted(LAYOUTS)))
            case ArgType.DEVICE:
                return Device()
            case ArgType.MEMORY_FORMAT:
                return MemoryFormat(rng.choice(sorted(MEMORY_FORMATS)))
        return None

    def related_shape(self) -> tuple[int, ...]:
        roll = self.rng.random()
        if roll < 0.5 or not self.shape:
            return self.shape
        if roll < 0.65:
            keep = self.rng.randint(0, len(self.shape))
            return tuple(1 if self.rng.random() < 0.4 else s for s in self.shape[len(self.shape) - keep :])
        if roll < 0.75 and len(self.shape) > 1:
            return (self.shape[1],)
        if roll < 0.85:
            return (self.shape[-1],)
        return tuple(self.dim_size() for _ in range(self.rng.randint(0, 3)))

    def int_for(self, name: str) -> int:
        rng = self.rng
        if rng.random() < 0.2:
            return rng.choice(_EDGE_INTS)
        if name in ("dim", "dims"):
            return rng.randint(-max(self.rank, 1), max(self.rank, 1) - 1)
        if self.shape and rng.random() < 0.4:
            return rng.choice(self.shape)
        return rng.choice((0, 1, 1, 2, 2, 3, 4, -1))

    # mutations

    def mutate(self, chosen: dict[str, Value]) -> None:
        if not chosen:
            return
        name = self.rng.choice(sorted(chosen))
        param = next(p for p in self.schema.params if p.name == name)
        value = chosen[name]
        roll = self.rng.random()
        if roll < 0.08:  # a wrong type: the type checker's work
            chosen[name] = self.rng.choice((9, 12, 1.5, True, (1, 2), DType("int64"), Layout("strided"), Device()))
        elif isinstance(value, TensorArg):
            chosen[name] = self.mutate_tensor(value)
        elif isinstance(value, tuple) and any(isinstance(v, TensorArg) for v in value):
            i = self.rng.choice([i for i, v in enumerate(value) if isinstance(v, TensorArg)])
            chosen[name] = (*value[:i], self.mutate_tensor(value[i]), *value[i + 1 :])
        elif isinstance(value, tuple):
            items = list(value)
            if items and self.rng.random() < 0.6:
                items[self.rng.randrange(len(items))] = self.rng.choice(_EDGE_INTS)
            elif items and self.rng.random() < 0.5:
                items.pop()
            else:
                items.append(self.rng.choice((1, 2, -1, 0)))
            chosen[name] = tuple(items)
        else:
            chosen[name] = self.value(param) if self.rng.random() < 0.3 else self.edge_like(value)

    def edge_like(self, value: Value) -> Value:
        if isinstance(value, bool):
            return not value
        if isinstance(value, int):
            return self.rng.choice(_EDGE_INTS)
        if isinstance(value, float):
            return self.rng.choice((*_FLOATS, -math.inf))
        if isinstance(value, DType):
            return DType(self.pick_dtype())
        return value

    def mutate_tensor(self, t: TensorArg) -> TensorArg:
        rng = self.rng
        roll = rng.random()
        shape = list(t.shape)
        if roll < 0.35 and shape:  # a related length off by some: the batch-norm class
            i = rng.randrange(len(shape))
            shape[i] = rng.choice((0, 1, max(shape[i] - 1, 0), shape[i] + 1, shape[i] * 2 + 3))
            return TensorArg(t.dtype, tuple(shape), t.layout, t.data, t.low, t.high)
        if roll < 0.5:
            return TensorArg(t.dtype, (1,) if rng.random() < 0.5 else (), t.layout, t.data, t.low, t.high)
        if roll < 0.7:  # another dtype: integers where floats are expected, and the reverse
            return TensorArg(self.pick_dtype(), t.shape, t.layout, t.data, t.low, t.high)
        if roll < 0.8:
            return TensorArg(t.dtype, t.shape, t.layout, "special", t.low, t.high)
        if roll < 0.9 and t.data == "index":  # indices out of range
            return TensorArg(t.dtype, t.shape, t.layout, t.data, t.low - rng.choice((1, 1000)), t.high + 1)
        return TensorArg(t.dtype, (*t.shape, rng.choice((1, 2))), t.layout, t.data, t.low, t.high)


# --- plausible arguments for ops whose arguments relate to each other -----------------------------------------------


def _norm_params(g: _Gen, c: int, dtype: str) -> TensorArg:
    return g.tensor((c,), dtype)


def _batch_norm(g: _Gen) -> dict[str, Value]:
    n, c = g.rng.choice((1, 2, 3)), g.rng.choice((1, 2, 3, 4, 8))
    shape = (n, c, *(g.dim_size() or 1 for _ in range(g.rng.choice((0, 1, 2, 3)))))
    dtype = g.rng.choice(_FLOATING)
    params = dtype if dtype in ("float32", "float64") or g.rng.random() < 0.5 else "float32"
    out: dict[str, Value] = {"input": g.tensor(shape, dtype), "momentum": 0.1, "eps": 1e-5}
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[name] = _norm_params(g, c, params)
    return out


def _layer_norm(g: _Gen) -> dict[str, Value]:
    shape = tuple(g.dim_size() or 1 for _ in range(g.rng.randint(1, 4)))
    k = g.rng.randint(1, len(shape))
    dtype = g.rng.choice(_FLOATING)
    norm = shape[len(shape) - k :]
    return {
        "input": g.tensor(shape, dtype),
        "normalized_shape": norm,
        "weight": g.tensor(norm, dtype),
        "bias": g.tensor(norm, dtype) if g.rng.random() < 0.7 else None,
        "eps": 1e-5,
    }


def _group_norm(g: _Gen) -> dict[str, Value]:
    group = g.rng.choice((1, 2, 3))
    n, c, hw = g.rng.choice((1, 2)), group * g.rng.choice((1, 2)), g.rng.choice((1, 2, 4))
    dtype = g.rng.choice(_FLOATING)
    return {
        "input": g.tensor((n, c, hw), dtype),
        "weight": _norm_params(g, c, dtype),
        "bias": _norm_params(g, c, dtype),
        "N": n,
        "C": c,
        "HxW": hw,
        "group": group,
        "eps": 1e-5,
    }


def _convolution(g: _Gen) -> dict[str, Value]:
    k = g.rng.choice((1, 2, 2, 3))
    groups = g.rng.choice((1, 1, 2))
    cin, cout = groups * g.rng.choice((1, 2)), groups * g.rng.choice((1, 2))
    kernel = [g.rng.choice((1, 2, 3)) for _ in range(k)]
    spatial = [g.rng.choice((3, 4, 5, 6)) for _ in range(k)]
    transposed = g.rng.random() < 0.3
    stride = [g.rng.choice((1, 2)) for _ in range(k)]
    weight = (cin, cout // groups, *kernel) if transposed else (cout, cin // groups, *kernel)
    dtype = g.rng.choice(("float32", "float32", "float64", "bfloat16"))
    return {
        "input": g.tensor((g.rng.choice((1, 2)), cin, *spatial), dtype),
        "weight": g.tensor(weight, dtype),
        "bias": g.tensor((cout,), dtype) if g.rng.random() < 0.7 else None,
        "stride": tuple(stride),
        "padding": tuple(g.rng.choice((0, 1)) for _ in range(k)),
        "dilation": tuple(g.rng.choice((1, 1, 2)) for _ in range(k)),
        "transposed": transposed,
        "output_padding": tuple(g.rng.randint(0, s - 1) if transposed else 0 for s in stride),
        "groups": groups,
    }


def _pool(g: _Gen, *, dilation: bool, avg: bool) -> dict[str, Value]:
    shape = (*((g.rng.choice((1, 2)),) if g.rng.random() < 0.7 else ()), g.rng.choice((1, 2)), 4, 5)
    kernel = (g.rng.choice((1, 2, 3)), g.rng.choice((1, 2)))
    out: dict[str, Value] = {
        "self": g.tensor(shape, g.rng.choice(_FLOATING) if g.rng.random() < 0.7 else "int64", data="special"),
        "kernel_size": kernel,
        "stride": g.rng.choice(((), kernel, (1, 1), (2, 1))),
        "padding": tuple(g.rng.randint(0, k // 2) for k in kernel),
        "ceil_mode": g.rng.random() < 0.4,
    }
    if dilation:
        out["dilation"] = (g.rng.choice((1, 2)), 1)
    if avg:
        out["count_include_pad"] = g.rng.random() < 0.5
        out["divisor_override"] = g.rng.choice((None, None, 1, 2, -1, 0))
    return out


def _adaptive_pool(g: _Gen) -> dict[str, Value]:
    shape = (g.rng.choice((1, 2)), g.rng.choice((1, 2)), g.rng.choice((3, 4, 5)), g.rng.choice((3, 4)))
    return {"self": g.tensor(shape, g.rng.choice(_FLOATING)), "output_size": (g.rng.randint(1, 4), g.rng.randint(1, 3))}


def _embedding(g: _Gen) -> dict[str, Value]:
    rows, width = g.rng.choice((1, 3, 5, 10)), g.rng.choice((1, 2, 4))
    return {
        "weight": g.tensor((rows, width), g.rng.choice(_FLOATING)),
        "indices": g.index_tensor((g.rng.randint(0, 2), g.rng.randint(1, 4)), rows, g.rng.choice(("int64", "int32"))),
        "padding_idx": g.rng.choice((-1, 0, rows - 1)),
    }


def _gather(g: _Gen) -> dict[str, Value]:
    shape = tuple(g.dim_size() or 1 for _ in range(g.rng.randint(1, 3)))
    dim = g.rng.randrange(len(shape))
    index_shape = tuple(g.rng.randint(1, s) for s in shape)
    return {"self": g.tensor(shape), "dim": dim, "index": g.index_tensor(index_shape, shape[dim])}


def _index_select(g: _Gen) -> dict[str, Value]:
    shape = tuple(g.dim_size() or 1 for _ in range(g.rng.randint(1, 3)))
    dim = g.rng.randrange(len(shape))
    return {"self": g.tensor(shape), "dim": dim, "index": g.index_tensor((g.rng.randint(0, 4),), shape[dim])}


def _index(g: _Gen) -> dict[str, Value]:
    shape = tuple(g.dim_size() or 1 for _ in range(g.rng.randint(1, 3)))
    count = g.rng.randint(1, len(shape))
    idx_shape = (g.rng.randint(1, 3),)
    indices = tuple(
        None if g.rng.random() < 0.25 else g.index_tensor(idx_shape, shape[i], g.rng.choice(("int64", "int64", "bool")))
        for i in range(count)
    )
    return {"self": g.tensor(shape), "indices": indices}


def _cat(g: _Gen) -> dict[str, Value]:
    shape = list(g.shape or (2,))
    dim = g.rng.randrange(len(shape))
    parts = []
    for _ in range(g.rng.randint(1, 3)):
        shape[dim] = g.rng.choice((0, 1, 2))
        parts.append(g.tensor(shape))
    return {"tensors": tuple(parts), "dim": dim}


def _matmul(g: _Gen, batch: bool, add: bool) -> dict[str, Value]:
    b, n, k, m = (g.rng.choice((1, 2, 3, 4)) for _ in range(4))
    dtype = g.rng.choice(("float32", "float32", "float64", "bfloat16", "int64"))
    lead = (b,) if batch else ()
    out: dict[str, Value] = {}
    if add:
        out = {"self": g.tensor(g.rng.choice(((n, m), (m,), (1, m))), dtype), "mat1": g.tensor((n, k), dtype)}
        out["mat2"] = g.tensor((k, m), dtype)
        return out
    return {"self": g.tensor((*lead, n, k), dtype), "mat2": g.tensor((*lead, k, m), dtype)}


def _where(g: _Gen) -> dict[str, Value]:
    return {"condition": g.tensor(g.shape, "bool"), "self": g.tensor(), "other": g.tensor(g.related_shape())}


def _split(g: _Gen) -> dict[str, Value]:
    shape = g.shape or (4,)
    return {"self": g.tensor(shape), "split_size": g.rng.choice((1, 2, 3)), "dim": g.rng.randrange(len(shape))}


def _split_with_sizes(g: _Gen) -> dict[str, Value]:
    shape = g.shape or (4,)
    dim = g.rng.randrange(len(shape))
    cut = g.rng.randint(0, shape[dim])
    return {"self": g.tensor(shape), "split_sizes": (cut, shape[dim] - cut), "dim": dim}


def _reshape(g: _Gen) -> dict[str, Value]:
    shape = list(g.shape)
    g.rng.shuffle(shape)
    if shape and g.rng.random() < 0.3:
        shape[g.rng.randrange(len(shape))] = -1
    return {"self": g.tensor(), "size": tuple(shape)}


def _expand(g: _Gen) -> dict[str, Value]:
    base = tuple(1 if g.rng.random() < 0.5 else s for s in g.shape)
    size = tuple(-1 if b != 1 and g.rng.random() < 0.3 else s for b, s in zip(base, g.shape, strict=True))
    return {"self": g.tensor(base), "size": (*((g.rng.choice((1, 2)),) if g.rng.random() < 0.3 else ()), *size)}


def _repeat(g: _Gen) -> dict[str, Value]:
    return {"self": g.tensor(), "repeats": tuple(g.rng.choice((1, 2, 3)) for _ in range(g.rank + g.rng.randint(0, 1)))}


def _pad(g: _Gen) -> dict[str, Value]:
    pad = tuple(g.rng.choice((0, 1, 2, -1)) for _ in range(2 * g.rng.randint(0, g.rank)))
    return {"self": g.tensor(), "pad": pad, "value": g.rng.choice(_SCALARS)}


def _sized(g: _Gen) -> dict[str, Value]:
    return {"size": g.shape}


def _arange(g: _Gen) -> dict[str, Value]:
    return {"start": g.rng.choice((0, 1, -3, 0.5)), "end": g.rng.choice((5, 10, 2.5, -1)), "step": g.rng.choice((1, 2))}


def _topk(g: _Gen) -> dict[str, Value]:
    shape = g.shape or (3,)
    dim = g.rng.randrange(len(shape))
    return {"self": g.tensor(shape), "k": g.rng.randint(0, shape[dim]), "dim": dim}


def _forward_shape(op: Callable[..., Any], *args: Any) -> tuple[int, ...] | None:
    """The output shape of a forward op on meta tensors (None when it refuses): a backward op's ``grad_output``."""
    meta = [torch.empty(a.shape, dtype=DTYPE_BY_NAME[a.dtype], device="meta") if isinstance(a, TensorArg) else a
            for a in args]  # fmt: skip
    try:
        out = op(*meta)
    except Exception:
        return None
    return tuple((out[0] if isinstance(out, tuple) else out).shape)


def _grad_for(g: _Gen, shape: tuple[int, ...] | None, dtype: str) -> TensorArg:
    """A gradient of the forward's output shape, or (the forward refused) of some shape."""
    return g.tensor(shape if shape is not None else g.shape, dtype)


def _convolution_backward(g: _Gen) -> dict[str, Value]:
    out = _convolution(g)
    x, w = out["input"], out["weight"]
    assert isinstance(x, TensorArg) and isinstance(w, TensorArg)
    names = ("stride", "padding", "dilation", "transposed", "output_padding", "groups")
    shape = _forward_shape(torch.ops.aten.convolution.default, x, w, None, *(out[n] for n in names))
    cout = shape[1] if shape else 1
    mask = tuple(g.rng.random() < 0.7 for _ in range(3))
    return {
        "grad_output": _grad_for(g, shape, x.dtype),
        "input": x,
        "weight": w,
        "bias_sizes": (cout,) if mask[2] or g.rng.random() < 0.5 else None,
        **{n: out[n] for n in names},
        "output_mask": mask,
    }


def _max_pool_backward(g: _Gen) -> dict[str, Value]:
    out = _pool(g, dilation=True, avg=False)
    x = out["self"]
    assert isinstance(x, TensorArg)
    x = TensorArg(g.rng.choice(_FLOATING), x.shape, x.layout, x.data)
    out["self"] = x
    out["stride"] = out["stride"] or out["kernel_size"]
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    shape = _forward_shape(torch.ops.aten.max_pool2d_with_indices.default, x, *(out[n] for n in names))
    plane = x.shape[-1] * x.shape[-2]
    out["grad_output"] = _grad_for(g, shape, x.dtype)
    out["indices"] = g.index_tensor(shape if shape is not None else g.shape, plane)
    return out


def _avg_pool_backward(g: _Gen) -> dict[str, Value]:
    out = _pool(g, dilation=False, avg=True)
    x = out["self"]
    assert isinstance(x, TensorArg)
    x = TensorArg(g.rng.choice(_FLOATING), x.shape, x.layout, x.data)
    out["self"] = x
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    shape = _forward_shape(torch.ops.aten.avg_pool2d.default, x, *(out[n] for n in names))
    out["grad_output"] = _grad_for(g, shape, x.dtype)
    return out


def _adaptive_pool_backward(g: _Gen) -> dict[str, Value]:
    out = _adaptive_pool(g)
    x, size = out["self"], out["output_size"]
    assert isinstance(x, TensorArg) and isinstance(size, tuple)
    return {"grad_output": g.tensor((*x.shape[:-2], *size), x.dtype), "self": x}


def _scatter(g: _Gen, *, src: bool) -> dict[str, Value]:
    out = _gather(g)
    x, index = out["self"], out["index"]
    assert isinstance(x, TensorArg) and isinstance(index, TensorArg)
    if src:
        out["src"] = g.tensor(index.shape if g.rng.random() < 0.5 else x.shape, x.dtype)
    else:
        out["value"] = g.rng.choice(_SCALARS)
    return out


def _index_put(g: _Gen) -> dict[str, Value]:
    out = _index(g)
    x, indices = out["self"], out["indices"]
    assert isinstance(x, TensorArg) and isinstance(indices, tuple)
    lead = next((i.shape for i in indices if isinstance(i, TensorArg)), ())
    rest = x.shape[len(indices) :]
    values = (*lead, *rest) if g.rng.random() < 0.7 else ()
    out["values"] = g.tensor(values, x.dtype)
    out["accumulate"] = g.rng.random() < 0.5
    return out


def _slice_scatter(g: _Gen) -> dict[str, Value]:
    shape = g.shape or (4,)
    dim = g.rng.randrange(len(shape))
    start, end, step = g.rng.choice((None, 0, 1, -2)), g.rng.choice((None, 3, -1, I64_MAX)), g.rng.choice((1, 1, 2))
    x = g.tensor(shape)
    src = _forward_shape(torch.ops.aten.slice.Tensor, x, dim, start, end, step)
    return {"self": x, "src": _grad_for(g, src, x.dtype), "dim": dim, "start": start, "end": end, "step": step}


def _upsample(g: _Gen, *, bilinear: bool) -> dict[str, Value]:
    shape = (g.rng.choice((1, 2)), g.rng.choice((1, 3)), g.rng.choice((1, 3, 4)), g.rng.choice((2, 5)))
    dtype = g.rng.choice(_FLOATING) if bilinear or g.rng.random() < 0.7 else g.pick_dtype()
    out: dict[str, Value] = {"input": g.tensor(shape, dtype), "output_size": None, "scale_factors": None}
    if g.rng.random() < 0.5:
        out["output_size"] = (g.rng.randint(1, 9), g.rng.randint(1, 9))
    else:
        out["scale_factors"] = (g.rng.choice((0.5, 1.0, 2.0, 2.5, 3.0)), g.rng.choice((1.0, 2.0, 1.5)))
    if bilinear:
        out["align_corners"] = g.rng.random() < 0.5
    return out


_RECIPES: Mapping[str, Callable[[_Gen], dict[str, Value]]] = {
    "aten._native_batch_norm_legit_no_training.default": _batch_norm,
    "aten.native_layer_norm.default": _layer_norm,
    "aten.native_group_norm.default": _group_norm,
    "aten.convolution.default": _convolution,
    "aten.avg_pool2d.default": lambda g: _pool(g, dilation=False, avg=True),
    "aten.max_pool2d_with_indices.default": lambda g: _pool(g, dilation=True, avg=False),
    "aten._adaptive_avg_pool2d.default": _adaptive_pool,
    "aten.embedding.default": _embedding,
    "aten.gather.default": _gather,
    "aten.index_select.default": _index_select,
    "aten.index.Tensor": _index,
    "aten.cat.default": _cat,
    "aten.mm.default": lambda g: _matmul(g, False, False),
    "aten.bmm.default": lambda g: _matmul(g, True, False),
    "aten.addmm.default": lambda g: _matmul(g, False, True),
    "aten.where.self": _where,
    "aten.split.Tensor": _split,
    "aten.split_with_sizes.default": _split_with_sizes,
    "aten.view.default": _reshape,
    "aten._unsafe_view.default": _reshape,
    "aten.expand.default": _expand,
    "aten.repeat.default": _repeat,
    "aten.constant_pad_nd.default": _pad,
    "aten.full.default": _sized,
    "aten.empty.memory_format": _sized,
    "aten.arange.start_step": _arange,
    "aten.topk.default": _topk,
    "aten.convolution_backward.default": _convolution_backward,
    "aten.max_pool2d_with_indices_backward.default": _max_pool_backward,
    "aten.avg_pool2d_backward.default": _avg_pool_backward,
    "aten._adaptive_avg_pool2d_backward.default": _adaptive_pool_backward,
    "aten.scatter.value": lambda g: _scatter(g, src=False),
    "aten.scatter.src": lambda g: _scatter(g, src=True),
    "aten.scatter_add.default": lambda g: _scatter(g, src=True),
    "aten.index_put.default": _index_put,
    "aten.slice_scatter.default": _slice_scatter,
    "aten.upsample_nearest2d.vec": lambda g: _upsample(g, bilinear=False),
    "aten.upsample_bilinear2d.vec": lambda g: _upsample(g, bilinear=True),
}


# --- building the job: views into canaried storages ------------------------------------------------------------------


class _Materialise:
    """The job of a case: each tensor argument a view into an input storage whose other elements hold a canary."""

    def __init__(self, case: Case, variant: int, gen: torch.Generator) -> None:
        self.case = case
        self.variant = variant
        self.gen = gen
        self.metas: list[TensorMeta] = []
        self.blobs: dict[bytes, bytes] = {}
        self.nodes: list[Node] = []

    def build(self) -> tuple[JobSpec, dict[bytes, bytes]]:
        args = tuple(self.arg(v) for v in self.case.args)
        kwargs = tuple((k, self.arg(v)) for k, v in self.case.kwargs)
        self.nodes.append(Node(op=self.case.op, args=args, kwargs=kwargs))
        index = len(self.nodes) - 1
        arity = OP_SCHEMAS[self.case.op].outputs
        outputs: tuple[TensorRef, ...]
        if arity == 1:
            outputs = (NodeRef(index),)
        else:
            outputs = tuple(NodeRef(index, j) for j in range(arity if arity > 0 else 1))
        spec = JobSpec(
            inputs=tuple(self.metas),
            nodes=tuple(self.nodes),
            outputs=outputs,
            limits=FUZZ_LIMITS,
            compare=Comparison(),
        )
        return spec, self.blobs

    def arg(self, value: Value) -> Arg:
        if isinstance(value, TensorArg):
            return self.tensor(value)
        if isinstance(value, tuple):
            return tuple(self.tensor(v) if isinstance(v, TensorArg) else v for v in value)
        return value  # type: ignore[no-any-return]

    def node(self, op: str, *args: Arg) -> NodeRef:
        self.nodes.append(Node(op=op, args=args))
        return NodeRef(len(self.nodes) - 1)

    def tensor(self, t: TensorArg) -> TensorRef:
        shape = list(t.shape)
        layout = t.layout if shape else "contiguous"
        if layout == "expanded":
            base = [1 if i % 2 == 0 or s == 0 else s for i, s in enumerate(shape)]
        elif layout == "permuted":
            order = list(range(len(shape)))[::-1]
            base = [shape[i] for i in order]
        else:
            base = shape
        numel = math.prod(base)
        step = 2 if layout == "strided" else 1
        pre, post = 3, 5
        data = self.data(t, numel)
        storage = torch.full((pre + step * numel + post,), _canary(t.dtype, self.variant), dtype=DTYPE_BY_NAME[t.dtype])
        storage[pre : pre + step * numel : step] = data
        meta, blob = tensor_to_blob(storage)
        self.metas.append(meta)
        self.blobs[meta.digest] = blob
        ref: TensorRef = InputRef(len(self.metas) - 1)
        ref = self.node("aten.slice.Tensor", ref, 0, pre, pre + step * numel)
        if layout == "strided":
            ref = self.node("aten.view.default", ref, (*base[:-1], 2 * base[-1]))
            ref = self.node("aten.slice.Tensor", ref, -1, 0, I64_MAX, 2)
        else:
            ref = self.node("aten.view.default", ref, tuple(base))
        if layout == "expanded":
            ref = self.node("aten.expand.default", ref, tuple(shape))
        elif layout == "permuted":
            ref = self.node("aten.permute.default", ref, tuple(order))
        return ref

    def data(self, t: TensorArg, numel: int) -> torch.Tensor:
        gen, dtype = self.gen, DTYPE_BY_NAME[t.dtype]
        if t.dtype == "bool":
            return torch.randint(0, 2, (numel,), generator=gen).bool()
        if t.data == "index" or not dtype.is_floating_point:
            low, high = (t.low, max(t.high, t.low + 1)) if t.data == "index" else (-3, 4)
            if t.dtype == "uint8":
                low, high = max(low, 0), max(min(high, 256), 1)
            values = torch.randint(low, high, (numel,), generator=gen, dtype=torch.int64)
        else:
            values = torch.randn(numel, generator=gen, dtype=torch.float64)
        if t.data == "special" and numel:
            if dtype.is_floating_point:
                specials = [math.inf, -math.inf, math.nan, 0.0, -0.0, 1e30, -1e30, 1e-40]
            else:
                info = torch.iinfo(dtype)
                specials = [info.min, info.max, -1, 0]
            picks = torch.randint(0, len(specials), (numel,), generator=gen)
            mask = torch.rand(numel, generator=gen) < 0.3
            values = values.to(torch.float64 if dtype.is_floating_point else torch.int64)
            values[mask] = torch.tensor(specials, dtype=values.dtype)[picks][mask]
        if dtype.is_floating_point:
            return values.to(dtype)
        if t.dtype == "uint8" or t.data == "special":
            return values.to(dtype)
        info = torch.iinfo(dtype)
        return values.clamp(info.min, info.max).to(dtype)


def _canary(dtype: str, variant: int) -> bool | int | float:
    """The value outside every view: A (variant 0) is a pattern, B (variant 1) an ordinary small value."""
    if dtype == "bool":
        return variant == 0
    if dtype in _CANARY_INT:
        return _CANARY_INT[dtype] if variant == 0 else 1
    return 7777.0 if variant == 0 else -5555.0


# --- running a case --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one case did: ``ran``, ``refused`` (with the stage and reason), ``failed`` (an op raised on the data), or a
    finding (:data:`FINDING_KINDS`)."""

    kind: str
    stage: str = ""
    reason: str = ""
    detail: str = ""


def _wire_bytes(spec: JobSpec) -> bytes:
    """The spec's bytes: the encoder's, or (when the encoder refuses) the raw wire form a hostile client would send."""
    try:
        return encode_job(spec)
    except LocalProtocolError:
        return codec.pack(_spec_to_wire(spec))


def _execute(spec: JobSpec, blobs: Mapping[bytes, bytes]) -> tuple[str, str, list[tuple[TensorMeta, bytes]]]:
    try:
        outputs = execute(spec, blobs)
    except JobFormatError as exc:
        return "refused", exc.reason.value, []
    except ExecutionError as exc:
        return "failed", exc.reason.value, []
    return "ran", "", [tensor_to_blob(t) for t in outputs]


def run_case(case: Case) -> Outcome:
    """Run one case the way a worker runs a job, twice (canaries A and B); classify what happened."""
    try:
        return _run_case(case)
    except P2PComputeError as exc:  # an error of ours where none was expected
        return Outcome("error", "harness", exc.reason.value, str(exc)[:300])
    except Exception as exc:
        return Outcome("error", "harness", type(exc).__name__, str(exc)[:300])


def _run_case(case: Case) -> Outcome:
    decoded = []
    for spec in case.specs:
        try:
            decoded.append(decode_job(_wire_bytes(spec), FUZZ_LIMITS))
        except JobFormatError as exc:
            try:  # the interpreter's own check (a JobSpec built in-process skips decoding) must agree
                dry_run(spec, limits=FUZZ_LIMITS)
            except JobFormatError:
                return Outcome("refused", "decode", exc.reason.value, exc.detail[:200])
            return Outcome("inconsistent", "decode", exc.reason.value, "decode refused, the dry run accepted")
    try:
        plan = dry_run(decoded[0], limits=FUZZ_LIMITS)
    except JobFormatError as exc:
        return Outcome("refused", "dry_run", exc.reason.value, exc.detail[:200])
    kind_a, reason_a, out_a = _execute(decoded[0], case.blobs[0])
    if case.op in _UNINITIALISED:  # its outputs are whatever memory held: no second run to compare
        kind_b, reason_b, out_b = kind_a, reason_a, out_a
    else:
        kind_b, reason_b, out_b = _execute(decoded[1], case.blobs[1])
    if (kind_a, reason_a) != (kind_b, reason_b) or [b for _, b in out_a] != [b for _, b in out_b]:
        literal = any(_has_canary(meta, blob) for meta, blob in out_a)
        detail = f"A: {kind_a} {reason_a}, B: {kind_b} {reason_b}; canary A literally in an output: {literal}"
        return Outcome("canary", "execute", "", detail)
    if kind_a != "ran":
        return Outcome(kind_a, "execute", reason_a)
    shapes = tuple((meta.dtype, meta.shape) for meta, _ in out_a)
    predicted = [math.prod(shape) * DTYPES[dtype] for dtype, shape in plan.outputs]
    if len(shapes) != len(predicted) or any(meta.nbytes > n for (meta, _), n in zip(out_a, predicted, strict=False)):
        return Outcome("mismatch", "execute", "", f"dry run {plan.outputs}, execution {shapes}")
    if shapes != plan.outputs:  # smaller than the dry run said: sound, but the meta kernel differs (counted)
        return Outcome("ran", "execute", "meta_differs", f"dry run {plan.outputs}, execution {shapes}")
    return Outcome("ran")


def _has_canary(meta: TensorMeta, blob: bytes) -> bool:
    if meta.dtype in ("bool", "uint8", "int8"):  # one-byte canaries are too common to search for
        return False
    canary = torch.tensor([_canary(meta.dtype, 0)], dtype=DTYPE_BY_NAME[meta.dtype])
    return tensor_to_blob(canary)[1] in blob


# --- sacrificial children --------------------------------------------------------------------------------------------


def _child_main(seed: int, selftest_signal: int | None) -> int:
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from torch or C libraries go to stderr, never into the protocol
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open("/proc/self/statm") as f:
        vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsize + CHILD_ADDRESS_SPACE, resource.RLIM_INFINITY))
    proto_out.write("ready\n")
    for line in sys.stdin:
        start, stop = (int(x) for x in line.split())
        for index in range(start, stop):
            if index == selftest_signal:
                os.kill(os.getpid(), signal.SIGSEGV)
            case = make_case(seed, index)
            outcome = run_case(case)
            record: dict[str, Any] = {
                "i": index,
                "kind": outcome.kind,
                "stage": outcome.stage,
                "reason": outcome.reason,
            }
            if outcome.kind in FINDING_KINDS:
                record["detail"] = outcome.detail
                record["case"] = case.describe()[:500]
            proto_out.write(json.dumps(record) + "\n")
        proto_out.write("done\n")
    return 0


@dataclass
class Finding:
    index: int
    op: str
    kind: str
    detail: str


@dataclass
class FuzzReport:
    """Totals of a fuzz run."""

    seed: int
    cases: int
    seconds: float
    children: int
    per_op: dict[str, collections.Counter[str]] = field(default_factory=dict)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: list[Finding] = field(default_factory=list)
    respawns: int = 0

    def count(self, kind: str) -> int:
        return sum(c[kind] for c in self.per_op.values())

    def format(self) -> str:
        ops = len(self.per_op)
        lines = [
            f"ops x cases: {ops} ops x {self.cases} cases ({self.cases // max(ops, 1)} per op), seed {self.seed}, "
            f"{self.children} children, {self.seconds:.1f} s ({self.cases / max(self.seconds, 1e-9):.0f} cases/s)",
            f"crashes (deaths by signal): {self.count('crash')}",
            f"canary reads: {self.count('canary')}",
            f"timeouts: {self.count('timeout')}; other deaths: {self.count('died')}; unexpected errors: "
            f"{self.count('error')}; dry-run mismatches: {self.count('mismatch')}; decode/dry-run disagreements: "
            f"{self.count('inconsistent')}; child respawns: {self.respawns}",
            f"ran: {self.count('ran')}; refused: {self.count('refused')}; failed on data: {self.count('failed')}",
            "refusals and failures by stage and reason: "
            + ", ".join(f"{k} {n}" for k, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])),
            "",
            f"{'op':<52} {'cases':>6} {'ran':>6} {'refused':>7} {'failed':>6} {'crash':>5} {'canary':>6} {'other':>5}",
        ]
        for op in sorted(self.per_op):
            c = self.per_op[op]
            other = sum(c[k] for k in ("timeout", "died", "error", "mismatch", "inconsistent"))
            lines.append(
                f"{op:<52} {c.total():>6} {c['ran']:>6} {c['refused']:>7} {c['failed']:>6} {c['crash']:>5} "
                f"{c['canary']:>6} {other:>5}"
            )
        if self.findings:
            lines += ["", "findings (reproduce one: python -m benchmarks.fuzz_ops --seed SEED --case INDEX):"]
            lines += [f"  case {f.index} {f.op}: {f.kind}: {f.detail}" for f in self.findings[:200]]
        return "\n".join(lines)


class _Child:
    """One sacrificial child and the range of cases it is working through."""

    def __init__(self, seed: int, selftest_signal: int | None, quiet: bool) -> None:
        command = [sys.executable, "-m", "p2pcompute.testing.fuzz_ops", "--child", "--seed", str(seed)]
        if selftest_signal is not None:
            command += ["--selftest-signal", str(selftest_signal)]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.next = 0  # the next case index expected in this chunk
        self.stop = 0
        self.last_seen = time.monotonic()

    def give(self, start: int, stop: int) -> None:
        self.next, self.stop = start, stop
        self.stdin.write(f"{start} {stop}\n".encode())
        self.stdin.flush()
        self.last_seen = time.monotonic()

    def lines(self) -> Iterator[str]:
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            raise EOFError
        self.last_seen = time.monotonic()
        self.buffer += data
        *complete, self.buffer = self.buffer.split(b"\n")
        for line in complete:
            yield line.decode()

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by its process object
        code = self.proc.wait()
        self.stdin.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def run_fuzz(
    *,
    cases: int,
    seed: int,
    children: int = 1,
    start: int = 0,
    case_timeout: float = CASE_TIMEOUT_S,
    selftest_signal: int | None = None,
    quiet: bool = True,
    progress: Callable[[int], None] | None = None,
) -> FuzzReport:
    """Run cases ``start`` .. ``start + cases - 1`` of ``seed`` in ``children`` sacrificial child processes."""
    began = time.monotonic()
    report = FuzzReport(seed=seed, cases=cases, seconds=0.0, children=children)
    pending = collections.deque((i, min(i + CHUNK, start + cases)) for i in range(start, start + cases, CHUNK))
    selector = selectors.DefaultSelector()
    done = 0

    def record(index: int, kind: str, stage: str = "", reason: str = "", detail: str = "") -> None:
        nonlocal done
        op = OPS[index % len(OPS)]
        report.per_op.setdefault(op, collections.Counter())[kind] += 1
        if kind in ("refused", "failed") or reason == "meta_differs":
            report.reasons[f"{stage}:{reason}"] += 1
        if kind in FINDING_KINDS:
            report.findings.append(Finding(index, op, kind, detail))
        done += 1
        if progress is not None:
            progress(done)

    def spawn() -> None:
        child = _Child(seed, selftest_signal, quiet)
        selector.register(child.fd, selectors.EVENT_READ, child)

    def replace(child: _Child, kind: str, detail: str) -> None:
        """The child died or hung in case ``child.next``: record it, go on from the next case in a new child."""
        selector.unregister(child.fd)
        code = child.kill()
        if not child.ready:
            raise RuntimeError(f"a fuzz child died before it was ready (exit status {code})")
        if kind == "died" and code < 0:
            kind, detail = "crash", f"killed by {signal.Signals(-code).name}"
        elif kind == "died":
            detail = f"exit status {code}"
        if child.next < child.stop:
            record(child.next, kind, detail=detail)
            if child.next + 1 < child.stop:
                pending.appendleft((child.next + 1, child.stop))
        report.respawns += 1
        spawn()

    try:
        for _ in range(min(children, len(pending))):
            spawn()
        while done < cases:
            events = selector.select(timeout=1.0)
            for key, _ in events:
                child: _Child = key.data
                try:
                    for line in child.lines():
                        if line == "ready":
                            child.ready = True
                        elif line == "done":
                            child.stop = child.next = 0
                        else:
                            item = json.loads(line)
                            record(item["i"], item["kind"], item["stage"], item["reason"], item.get("detail", ""))
                            if item["kind"] in FINDING_KINDS:
                                report.findings[-1].detail += f" :: {item.get('case', '')}"
                            child.next = item["i"] + 1
                except EOFError:
                    replace(child, "died", "")
                    continue
            now = time.monotonic()
            for key in list(selector.get_map().values()):
                child = key.data
                busy = child.next < child.stop
                if busy and now - child.last_seen > case_timeout:
                    replace(child, "timeout", f"no answer in {case_timeout:.0f} s")
                elif child.ready and not busy and pending:
                    child.give(*pending.popleft())
    finally:
        for key in list(selector.get_map().values()):
            child = key.data
            selector.unregister(child.fd)
            child.kill()
        selector.close()
    report.seconds = time.monotonic() - began
    report.findings.sort(key=lambda f: f.index)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pcompute.testing.fuzz_ops")
    parser.add_argument("--child", action="store_true", help="serve cases on stdin/stdout (the fuzzer's children)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--selftest-signal", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child_main(args.seed, args.selftest_signal)
    parser.error("run the fuzzer with: python -m benchmarks.fuzz_ops")
    return 2


if __name__ == "__main__":
    sys.exit(main())
