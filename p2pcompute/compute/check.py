"""The client's checks of a committed trace: a node against its committed inputs (specs/verification.md §10.5).

A worker's result commits to every intermediate tensor (``core/trace.py``). Given the job, its own inputs and
constants, the committed leaves and the fetched bytes of some intermediates, the client checks chosen nodes, each
against the tensors the worker committed as that node's inputs, so one faked node is caught where it was faked even
when everything downstream of it was computed honestly from the fake:

- **matrix products** (``mm``, ``addmm``, ``bmm``) by Freivalds' check in float64: with ``R`` random ±1 vectors
  ``r``, ``C·r`` against ``A·(B·r)`` (+ ``β·bias·r``) row by row, within the sound error bound of an honest product
  in the output's dtype plus the job's tolerance summed over the row; and ``S`` random elements of ``C`` recomputed
  exactly in float64, each within its own bound (a dense fake just past the tolerance hides in row sums, not there);
- **convolutions** by a random projection over output channels, ``Σ_o r_o·y[o]`` against ``conv(x, Σ_o r_o·w[o])``
  (+ ``Σ_o r_o·bias[o]``), and a few whole output channels recomputed exactly in float64;
- **every other op** by recomputing it on the committed inputs through the interpreter's own call path
  (:func:`~p2pcompute.compute.interpreter.run_node`: typed arguments, validators) and comparing with the job's
  tolerance; integer and bool outputs exactly, except the indices of ``sort``/``topk``/``max``/``min``/``argmax``/
  ``argmin``/max pooling, which may differ on ties as long as they point at the same values;
- ``empty``/``empty_like`` are not checked: any bytes of the right dtype and shape are an honest answer.

**The error bound of an honest product.** A dot product of length ``k`` computed in any order with unit roundoff
``u`` is within ``gamma_k·Σ|a_i·b_i|`` of the exact one, ``gamma_k = k·u / (1 - k·u)`` (Higham, *Accuracy and
Stability of Numerical Algorithms*, §3.1). A worker accumulates in at least float32 (``u = 2⁻²⁴``; float64:
``2⁻⁵³``) and rounds to the output dtype at most :data:`OUTPUT_ROUNDINGS` times (the store, and split-K partial sums
kept in the output dtype: ``u = 2⁻¹¹`` float16, ``2⁻⁸`` bfloat16, ``2⁻²⁴`` float32). So an honest element of ``C``
is within ``(gamma_k(u_acc) + OUTPUT_ROUNDINGS·u_out)·(|A||B|)`` of the exact product, and with ``|r| = 1`` an
honest row of ``C·r`` within the same factor times ``|A|(|B||r|)``. To that the check adds what the job's tolerance
lets a result differ by (``|x - y| ≤ atol + rtol·max(|x|, |y|)`` gives ``|d| ≤ (atol + rtol·|x|) / (1 - rtol)`` for
the committed ``x``), summed over the row for a projection, and the client's own float64 rounding (``gamma`` of the
lengths at ``u = 2⁻⁵³``, doubled). An honest worker on any hardware passes (TF32 and other roundings of the inputs
excepted: the executor turns them off). A fake is caught when an element off by more than its own bound is sampled
(a fake touching a share ``f`` of the elements escapes ``S`` samples with probability ``(1 - f)^S``), or when the
largest error in some row exceeds that row's bound (each ±1 vector then catches it with probability ≥ 1/2).

Randomness: every check draws from a ``torch.Generator`` seeded from the caller's ``seed`` and the node index
(:func:`node_seed`), which the :class:`NodeCheck` records, so anyone can redo a check bit for bit.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from p2pcompute.compute.interpreter import (
    DTYPE_BY_NAME,
    DryRun,
    bind_node,
    blob_to_tensor,
    dry_run,
    run_node,
    tensor_to_blob,
)
from p2pcompute.core.jobspec import OP_SCHEMAS, Arg, ConstRef, InputRef, JobSpec, NodeRef, TensorRef, node_refs
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.core.trace import TraceLeaf, check_trace, meta_of
from p2pcompute.errors import ExecutionError, JobFormatError, P2PComputeError, Reason, TraceError

__all__ = [
    "BLOCK_COLUMNS",
    "ELEMENT_SAMPLES",
    "FREIVALDS_BLOCKS",
    "FREIVALDS_ROUNDS",
    "OUTPUT_ROUNDINGS",
    "PROJECTION_CHANNELS",
    "CheckMethod",
    "Discrepancy",
    "NodeCheck",
    "NodeCost",
    "TraceChecker",
    "build_trace",
    "check_costs",
    "check_nodes",
    "derived_nodes",
    "conv_check",
    "conv_check_flops",
    "freivalds_blocks",
    "matmul_check_flops",
    "matmul_check",
    "method_of",
    "needed_tensors",
    "node_seed",
]

FREIVALDS_ROUNDS = 2
"""Random ±1 vectors per matrix product (and projections per convolution)."""
FREIVALDS_BLOCKS = 8
"""Most runs of columns a matrix product is projected in (each with its own bound)."""
BLOCK_COLUMNS = 64
"""Fewest columns in a run: below 2·64 columns a product is projected whole."""
ELEMENT_SAMPLES = 32
"""Elements of a matrix product recomputed exactly in float64."""
PROJECTION_CHANNELS = 1
"""Output channels of a convolution recomputed exactly in float64."""
OUTPUT_ROUNDINGS = 4
"""Roundings to the output dtype an honest matrix product or convolution may make (the store, split-K partials)."""

_F64 = torch.float64
_U64 = 2.0**-53
_UNITS: Mapping[torch.dtype, tuple[float, float]] = {  # (accumulation, output) unit roundoff
    torch.float64: (2.0**-53, 2.0**-53),
    torch.float32: (2.0**-24, 2.0**-24),
    torch.float16: (2.0**-24, 2.0**-11),
    torch.bfloat16: (2.0**-24, 2.0**-8),
}
_MATMUL_OPS = frozenset({"aten.mm.default", "aten.addmm.default", "aten.bmm.default"})
_CONV_OP = "aten.convolution.default"
_FREE_OPS = frozenset({"aten.empty.memory_format", "aten.empty_like.default"})
# ops whose index output may differ on ties: op -> (index output, values output or None, dim argument name)
_INDEX_OPS: Mapping[str, tuple[int, int | None, str]] = {
    "aten.sort.default": (1, 0, "dim"),
    "aten.topk.default": (1, 0, "dim"),
    "aten.max.dim": (1, 0, "dim"),
    "aten.min.dim": (1, 0, "dim"),
    "aten.argmax.default": (0, None, "dim"),
    "aten.argmin.default": (0, None, "dim"),
    "aten.max_pool2d_with_indices.default": (1, 0, ""),
}


class CheckMethod(StrEnum):
    FREIVALDS = "freivalds"
    PROJECTION = "projection"
    RECOMPUTE = "recompute"
    FREE = "free"
    DERIVED = "derived"  # a view of the job's own tensors: the client derives it and compares the digest


def derived_nodes(spec: JobSpec) -> frozenset[int]:
    """Nodes the client derives itself, exactly and for free: views (an op whose output aliases its input, e.g.
    ``permute`` of a weight) that read only the job's own inputs and constants or other such views. Their committed
    digest must equal the client's; their bytes are never fetched, and a product that reads one (``x @ w.T``) is
    checked against the client's own copy."""
    derived: set[int] = set()
    for i, node in enumerate(spec.nodes):
        schema = OP_SCHEMAS.get(node.op)
        if schema is None or not schema.aliases:
            continue
        refs = _node_refs(spec, i)
        if refs and all(not isinstance(ref, NodeRef) or ref.node in derived for ref in refs):
            derived.add(i)
    return frozenset(derived)


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """What one comparison found: the element with the largest error-to-bound ratio, and the work it took."""

    ok: bool
    error: float
    bound: float
    flops: int
    where: str = ""


@dataclass(frozen=True, slots=True)
class NodeCheck:
    """The outcome of checking one node, and what an offline checker needs to redo it.

    ``error`` and ``bound`` are the discrepancy and its allowance where their ratio is largest (``ok`` is
    ``error <= bound`` everywhere). ``inputs`` are the committed tensors the node read, in argument order (job inputs
    and constants included), ``outputs`` its committed leaf; with the job, their bytes and ``seed`` the check is
    repeatable bit for bit. ``flops`` and ``bytes_read`` are what it cost (bytes of intermediates, not of the job's
    own tensors).
    """

    node: int
    op: str
    ok: bool
    method: CheckMethod
    error: float
    bound: float
    flops: int
    bytes_read: int
    seed: int
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class NodeCost:
    """What checking one node costs the client, beside what the node cost the worker (flops from the dry run)."""

    node: int
    op: str
    method: CheckMethod
    node_flops: int
    check_flops: int
    fetch_bytes: int
    """Bytes of committed intermediates the check reads (its outputs and node inputs), before sharing with others."""


def node_seed(seed: int, node: int) -> int:
    """The generator seed of one node's check: SHA-256 of the caller's seed and the node index, 63 bits."""
    digest = hashlib.sha256(
        b"p2pcompute/check/v1\x00" + (seed % (1 << 64)).to_bytes(8, "big") + node.to_bytes(4, "big")
    )
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def method_of(op: str, dtype: str) -> CheckMethod:
    """How a node of ``op`` whose (first) output has ``dtype`` is checked."""
    floating = dtype in ("float16", "bfloat16", "float32", "float64")
    if op in _FREE_OPS:
        return CheckMethod.FREE
    if op in _MATMUL_OPS and floating:
        return CheckMethod.FREIVALDS
    if op == _CONV_OP and floating:
        return CheckMethod.PROJECTION
    return CheckMethod.RECOMPUTE


# --- the bounds ----------------------------------------------------------------------------------------------------


def _gamma(u: float, n: int) -> float:
    return n * u / (1 - n * u) if n * u < 0.5 else math.inf


def _tolerance(rtol: float, atol: float, count: float | torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """What ``count`` elements whose committed magnitudes sum to ``magnitude`` may differ by within the tolerance."""
    if rtol >= 1:
        return torch.full_like(magnitude, math.inf)
    return (atol * count + rtol * magnitude) / (1 - rtol)


def _worst(diff: torch.Tensor, bound: torch.Tensor, flops: int, where: Callable[[int], str]) -> Discrepancy:
    """The element with the largest ratio diff / bound (NaN differences count as infinitely far)."""
    if diff.numel() == 0:
        return Discrepancy(True, 0.0, 0.0, flops)
    bound = torch.broadcast_to(bound.to(diff.dtype), diff.shape).reshape(-1)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff).reshape(-1)
    ratio = torch.where(bound > 0, diff / bound, torch.where(diff > 0, math.inf, 0.0))
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
    i = int(torch.argmax(ratio))
    error, allowed = float(diff[i]), float(bound[i])
    return Discrepancy(not error > allowed, error, allowed, flops, where(i))


def _both(first: Discrepancy, second: Discrepancy) -> Discrepancy:
    """The failing (or, both passing, the tighter) of two comparisons, with the flops of both."""
    worse = first
    if (not second.ok and first.ok) or (second.ok == first.ok and _ratio(second) > _ratio(first)):
        worse = second
    return Discrepancy(worse.ok, worse.error, worse.bound, first.flops + second.flops, worse.where)


def _ratio(d: Discrepancy) -> float:
    return d.error / d.bound if d.bound > 0 else (math.inf if d.error > 0 else 0.0)


def _rademacher(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).to(_F64).mul_(2).sub_(1)


def _finite(*tensors: torch.Tensor | None) -> bool:
    """No NaN or infinity in any of ``tensors`` (one pass each, nothing allocated: min and max propagate NaN)."""
    for t in tensors:
        if t is not None and t.numel():
            low, high = torch.aminmax(t)
            if not (math.isfinite(float(low)) and math.isfinite(float(high))):
                return False
    return True


# --- matrix products -----------------------------------------------------------------------------------------------


def matmul_check(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    rtol: float,
    atol: float,
    generator: torch.Generator,
    rounds: int = FREIVALDS_ROUNDS,
    samples: int = ELEMENT_SAMPLES,
    blocks: int | None = None,
) -> Discrepancy:
    """Freivalds' check of ``c == beta·bias + alpha·(a @ b)`` (``a`` m x k or b x m x k; any strides), module docstring.

    The columns of ``c`` are cut into ``blocks`` runs (default :func:`freivalds_blocks`) and each row of each run is
    projected on its own, so a row's bound sums the allowances of one run of columns, not all ``n``. All arithmetic is
    in float64 on ``c``'s device; ``a``, ``b``, ``c`` (and ``bias``) must be finite floats.
    """
    batched = a.dim() == 3
    # copies in float64, made absolute in place once their signed values are used
    A, B, C = (t.to(_F64, copy=True) for t in (a, b, c))
    if not batched:
        A, B, C = A[None], B[None], C[None]
    nb, m, k = (int(d) for d in A.shape)
    n = int(B.shape[2])
    width = -(-n // (blocks or freivalds_blocks(n)))
    edges = [*range(0, n, width), n]
    q = len(edges) - 1  # runs of ``width`` columns, the last one shorter

    def project(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(batch, rows, n) by (batch, n, c), run by run: (batch, rows, q·c), column run·c + j (BLAS, no zeros)."""
        return torch.cat([t[:, :, a:b] @ v[:, a:b, :] for a, b in itertools.pairwise(edges)], dim=2)

    u_acc, u_out = _UNITS[c.dtype]
    alpha, beta = float(alpha), float(beta)
    r = _rademacher((nb, n, rounds), generator).to(C.device)
    ones = torch.ones((1, n, 1), dtype=_F64, device=C.device)
    picks = [torch.randint(0, d, (max(samples, 0),), generator=generator).to(C.device) for d in (nb, m, n)]
    bi, ii, jj = picks
    arow, bcol, cij = A[bi, ii, :], B[bi, :, jj], C[bi, ii, jj]  # the sampled elements' rows and columns
    bias64 = bias.to(_F64) if bias is not None and beta != 0 else None
    terms = k if bias64 is None else k + 2

    lhs = project(C, r)  # (nb, m, q·rounds)
    abs_c = project(C.abs_(), ones.expand(nb, n, 1))  # (nb, m, q)
    br = project(B, r)  # (nb, k, q·rounds)
    abs_b = project(B.abs_(), ones.expand(nb, n, 1))
    rhs = alpha * (A @ br)
    s = abs(alpha) * (A.abs_() @ abs_b)  # |alpha|·|A|(|B||r|) per run: the same for every ±1 vector
    bias_at = torch.zeros((), dtype=_F64, device=C.device)
    abs_bias_at = bias_at
    if bias64 is not None:
        full = torch.broadcast_to(bias64, (m, n))
        rows_of_bias = full[:1] if bias64.dim() < 2 or bias64.shape[0] == 1 else full  # one row for all, or each
        rhs = rhs + beta * project(rows_of_bias[None].expand(nb, -1, -1), r)
        s = s + abs(beta) * project(rows_of_bias[None].abs(), ones)
        bias_at = full[ii, jj]
        abs_bias_at = bias_at.abs()
    honest = _gamma(u_acc, terms) + OUTPUT_ROUNDINGS * u_out
    slack = 2 * _gamma(_U64, terms + width + 2) * (s + abs_c)
    bound = honest * s + _tolerance(rtol, atol, width, abs_c) + slack  # (nb, m, q), the same for every round
    flops = matmul_check_flops(nb, m, k, n, rounds, q, 0, bias64 is not None)

    def row_of(i: int) -> str:
        run, row = i % (rounds * q) // rounds, i // (rounds * q)
        return f"row {row % m} of batch {row // m}, columns {edges[run]}..{edges[run + 1] - 1}"

    rows = _worst((lhs - rhs).abs(), bound.repeat_interleave(rounds, dim=2), flops, row_of)
    if samples <= 0:
        return rows
    exact = alpha * (arow * bcol).sum(1) + beta * bias_at
    sabs = abs(alpha) * (arow.abs() * bcol.abs()).sum(1) + abs(beta) * abs_bias_at
    ebound = honest * sabs + _tolerance(rtol, atol, 1, cij.abs()) + 2 * _gamma(_U64, terms + 2) * (sabs + cij.abs())
    picked = [(int(x), int(y), int(z)) for x, y, z in zip(bi, ii, jj, strict=True)]
    elements = _worst((cij - exact).abs(), ebound, 4 * samples * k, lambda i: f"element {picked[i]}")
    return _both(rows, elements)


def freivalds_blocks(n: int) -> int:
    """Runs of columns a matrix product with ``n`` columns is checked in: one per :data:`BLOCK_COLUMNS` columns, at
    most :data:`FREIVALDS_BLOCKS`."""
    return max(1, min(FREIVALDS_BLOCKS, n // BLOCK_COLUMNS))


def matmul_check_flops(
    batch: int, m: int, k: int, n: int, rounds: int, blocks: int, samples: int, bias: bool = False
) -> int:
    """Twice the multiply-adds of :func:`matmul_check`: ``C`` and ``B`` times the ±1 vectors run by run
    (2mn·rounds + 2kn·rounds), ``A`` times the projected runs (2mk·blocks·rounds); the absolute bounds (2mn + 2kn +
    2mk·blocks); the bias' projections; 4k per sampled element."""
    signed = 2 * rounds * (m * n + k * n + m * k * blocks)
    absolute = 2 * (m * n + k * n + m * k * blocks)
    with_bias = 2 * (rounds + 1) * m * n if bias else 0
    return batch * (signed + absolute + with_bias) + 4 * samples * k


# --- convolutions --------------------------------------------------------------------------------------------------


def conv_check(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    *,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    rtol: float,
    atol: float,
    generator: torch.Generator,
    rounds: int = FREIVALDS_ROUNDS,
    channels: int = PROJECTION_CHANNELS,
) -> Discrepancy:
    """Check ``y == convolution(x, w, bias, ...)`` by random projections over output channels (module docstring)."""
    conv = torch.ops.aten.convolution.default
    X, W, Y = (t.to(_F64) for t in (x, w, y))
    Bv = bias.to(_F64) if bias is not None else None
    g = groups
    N, n_out = int(Y.shape[0]), int(Y.shape[1])
    og = n_out // g
    kernel = tuple(int(s) for s in W.shape[2:])
    per_out = (int(W.shape[0]) // g if transposed else int(W.shape[1])) * math.prod(kernel)  # terms per output
    u_acc, u_out = _UNITS[y.dtype]
    r = _rademacher((rounds, g, og), generator).to(Y.device)
    if transposed:  # weight (C_in, n_out/g, *k): input block gi feeds output block gi
        cg = int(W.shape[0]) // g
        wg = W.reshape(g, cg, og, -1)
        w_r = torch.einsum("gcoz,rgo->gcrz", wg, r).reshape(g * cg, rounds, *kernel)
        w_abs = wg.abs().sum(2).reshape(g * cg, 1, *kernel)
    else:  # weight (n_out, C/g, *k)
        wg = W.reshape(g, og, -1)
        w_r = torch.einsum("goz,rgo->grz", wg, r).reshape(g * rounds, *W.shape[1:])
        w_abs = wg.abs().sum(1).reshape(g, *W.shape[1:])
    args = (stride, padding, dilation, transposed, output_padding, g)
    rhs = conv(X, w_r, None, *args)  # (N, g·R, *spatial), channel gi·R + round
    s = conv(X.abs(), w_abs, None, *args).repeat_interleave(rounds, dim=1)
    spatial = tuple(int(d) for d in Y.shape[2:])
    yg = Y.reshape(N, g, og, *spatial)
    lhs = torch.einsum("ngo...,rgo->ngr...", yg, r).reshape(N, g * rounds, *spatial)
    if Bv is not None:
        bg = Bv.reshape(g, og)
        shape = (1, g * rounds) + (1,) * len(spatial)
        rhs = rhs + torch.einsum("go,rgo->gr", bg, r).reshape(shape)
        s = s + bg.abs().sum(1).repeat_interleave(rounds).reshape(shape)
        per_out += 1
    abs_y = yg.abs().sum(2).repeat_interleave(rounds, dim=1)
    honest = _gamma(u_acc, per_out) + OUTPUT_ROUNDINGS * u_out
    bound = honest * s + _tolerance(rtol, atol, og, abs_y) + 2 * _gamma(_U64, per_out + og + 2) * (s + abs_y)
    flops = conv_check_flops(tuple(X.shape), tuple(W.shape), tuple(Y.shape), g, transposed, rounds, 0)
    found = _worst((lhs - rhs).abs(), bound, flops, lambda i: f"projection at flat position {i}")
    for _ in range(channels):
        o = int(torch.randint(0, n_out, (1,), generator=generator))
        gi, oo = divmod(o, og)
        if transposed:
            cg = int(W.shape[0]) // g
            xs, wo = X[:, gi * cg : (gi + 1) * cg], W[gi * cg : (gi + 1) * cg, oo : oo + 1]
        else:
            cg = int(W.shape[1])
            xs, wo = X[:, gi * cg : (gi + 1) * cg], W[o : o + 1]
        one = (stride, padding, dilation, transposed, output_padding, 1)
        exact = conv(xs, wo, None if Bv is None else Bv[o : o + 1], *one)
        sabs = conv(xs.abs(), wo.abs(), None if Bv is None else Bv[o : o + 1].abs(), *one)
        yo = Y[:, o : o + 1]
        ebound = honest * sabs + _tolerance(rtol, atol, 1, yo.abs()) + 2 * _gamma(_U64, per_out + 2) * (sabs + yo.abs())
        cost = conv_check_flops(tuple(X.shape), tuple(W.shape), tuple(Y.shape), g, transposed, 0, 1)
        found = _both(found, _worst((yo - exact).abs(), ebound, cost, _in_channel(o)))
    return found


def conv_check_flops(
    x: tuple[int, ...],
    w: tuple[int, ...],
    y: tuple[int, ...],
    groups: int,
    transposed: bool,
    rounds: int,
    channels: int,
) -> int:
    """Twice the multiply-adds of :func:`conv_check` with ``rounds`` projections and ``channels`` exact channels: a
    convolution's cost scales with its output channels, of which the check computes ``g·(rounds + 1) + 2·channels``
    (projected values, their absolute bound, each exact channel with its bound), plus the projections of ``y``."""
    kernel = math.prod(w[2:])
    n_out = y[1] if len(y) > 1 else 1
    if transposed:  # each input element feeds (output channels per group)·kernel outputs
        per_channel = 2 * math.prod(x) * kernel // max(groups, 1)
    else:  # each output element sums (input channels per group)·kernel products
        per_channel = 2 * (math.prod(y) // max(n_out, 1)) * w[1] * kernel
    computed = groups * (rounds + 1) + 2 * channels
    return per_channel * computed + (2 * rounds + 1) * math.prod(y) * (1 if rounds else 0)


def _in_channel(o: int) -> Callable[[int], str]:
    return lambda i: f"channel {o}, position {i}"


# --- recomputation -------------------------------------------------------------------------------------------------


def _compare(committed: torch.Tensor, recomputed: torch.Tensor, rtol: float, atol: float, where: str) -> Discrepancy:
    """Tolerance comparison (specs/verification.md §3) of one committed output with its recomputation.

    Equal bits pass at once; otherwise only the elements that differ are compared, in float64.
    """
    n = committed.numel()
    if committed.dtype != recomputed.dtype or committed.shape != recomputed.shape:
        return Discrepancy(False, math.inf, 0.0, n, f"{where}: recomputed {recomputed.dtype}{list(recomputed.shape)}")
    x, y = committed.to("cpu"), recomputed.to("cpu")
    if torch.equal(x, y):
        return Discrepancy(True, 0.0, atol if x.is_floating_point() else 0.0, n)
    differ = (x != y).reshape(-1).nonzero().reshape(-1)  # NaN differs from NaN here; sorted out below
    xs, ys = x.reshape(-1)[differ].to(_F64), y.reshape(-1)[differ].to(_F64)

    def element(i: int) -> str:
        return f"{where}: element {int(differ[i])} ({len(differ)} of {n} differ)"

    if not x.is_floating_point():
        return _worst((xs - ys).abs(), torch.zeros(()), 2 * n, element)
    same_special = (torch.isnan(xs) & torch.isnan(ys)) | (torch.isinf(xs) & (xs == ys))
    diff = torch.where(same_special, torch.zeros_like(xs), (xs - ys).abs())
    bound = atol + rtol * torch.maximum(xs.abs(), ys.abs())
    bound = torch.where(torch.isfinite(bound), bound, torch.zeros_like(bound))
    return _worst(diff, bound, 2 * n + 8 * len(differ), element)


def _same_choice(
    op: str, values: Mapping[str, Any], committed: Sequence[torch.Tensor], recomputed: Sequence[torch.Tensor]
) -> bool:
    """Do the committed indices of a tie-prone op pick the same values as the recomputed ones?"""
    index_item, _, dim_name = _INDEX_OPS[op]
    x = values["self"].to("cpu")
    ci, ri = committed[index_item].to("cpu"), recomputed[index_item].to("cpu")
    try:
        if op == "aten.max_pool2d_with_indices.default":
            flat = x.flatten(-2)
            picked = flat.gather(-1, ci.flatten(-2))
            return torch.equal(picked, recomputed[0].to("cpu").flatten(-2)) or _nan_equal(
                picked, recomputed[0].to("cpu").flatten(-2)
            )
        dim = values.get(dim_name)
        if dim is None:  # argmax/argmin over the flattened tensor
            flat = x.reshape(-1)
            return _nan_equal(flat[ci.reshape(-1)], flat[ri.reshape(-1)])
        dim = int(dim) % max(x.dim(), 1)
        keep = bool(values.get("keepdim", True)) or op in ("aten.sort.default", "aten.topk.default")
        cj, rj = (ci, ri) if keep or x.dim() == 0 else (ci.unsqueeze(dim), ri.unsqueeze(dim))
        if x.dim() == 0:
            return bool((ci == 0).all())
        picked, wanted = x.gather(dim, cj), x.gather(dim, rj)
        if not _nan_equal(picked, wanted):
            return False
        if op == "aten.sort.default":  # a permutation along dim
            return torch.equal(cj.sort(dim).values, rj.sort(dim).values)
        if op == "aten.topk.default":  # distinct indices along dim
            ordered = cj.sort(dim).values
            return ordered.shape[dim] < 2 or bool((ordered.diff(dim=dim) != 0).all())
        return True
    except (RuntimeError, IndexError):  # indices out of range: not a choice among the inputs
        return False


def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    same = a == b
    if a.is_floating_point():
        same |= torch.isnan(a) & torch.isnan(b)
    return bool(same.all())


# --- the checker ---------------------------------------------------------------------------------------------------


def _node_refs(spec: JobSpec, index: int) -> list[TensorRef]:
    return node_refs(spec.nodes[index])


def _named(spec: JobSpec, index: int) -> dict[str, Arg]:
    node = spec.nodes[index]
    params = [p for p in OP_SCHEMAS[node.op].params if not p.kwarg_only]
    named: dict[str, Arg] = {p.name: value for p, value in zip(params, node.args, strict=False)}
    named.update(dict(node.kwargs))
    return named


_meta_of = meta_of


def needed_tensors(spec: JobSpec, leaves: Sequence[TraceLeaf], nodes: Iterable[int]) -> set[bytes]:
    """Digests of the committed intermediates a client must fetch to check ``nodes``: each node's outputs and the
    outputs of earlier nodes it reads. The job's own inputs and constants are left out (the client has them)."""
    own = {meta.digest for meta in spec.inputs + spec.constants}
    derived = derived_nodes(spec)
    own.update(meta.digest for i in derived for meta in leaves[i].outputs)
    wanted: set[bytes] = set()
    for i in nodes:
        leaf = leaves[i]
        if i in derived or method_of(spec.nodes[i].op, leaf.outputs[0].dtype) is CheckMethod.FREE:
            continue
        wanted.update(meta.digest for meta in leaf.outputs)
        wanted.update(_meta_of(spec, leaves, ref).digest for ref in _node_refs(spec, i) if isinstance(ref, NodeRef))
    return wanted - own


def check_costs(
    spec: JobSpec,
    plan: DryRun | None = None,
    *,
    rounds: int = FREIVALDS_ROUNDS,
    samples: int = ELEMENT_SAMPLES,
    channels: int = PROJECTION_CHANNELS,
) -> tuple[NodeCost, ...]:
    """The cost model of checking each node, from the shapes of a dry run (``plan``, run here when not given)."""
    plan = plan if plan is not None else dry_run(spec)
    shapes: list[tuple[tuple[str, tuple[int, ...]], ...]] = list(plan.node_outputs)

    def shape(ref: Arg) -> tuple[str, tuple[int, ...]]:
        match ref:
            case InputRef(index=index):
                return spec.inputs[index].dtype, spec.inputs[index].shape
            case ConstRef(index=index):
                return spec.constants[index].dtype, spec.constants[index].shape
            case NodeRef(node=node, item=item):
                return shapes[node][0 if item is None else item]
        raise AssertionError(ref)

    costs = []
    derived = derived_nodes(spec)
    for i, node in enumerate(spec.nodes):
        outs = shapes[i]
        method = CheckMethod.DERIVED if i in derived else method_of(node.op, outs[0][0])
        out_numel = sum(math.prod(s) for _, s in outs)
        fetch = sum(math.prod(s) * _itemsize(d) for d, s in outs)
        fetch += sum(
            math.prod(shape(ref)[1]) * _itemsize(shape(ref)[0])
            for ref in _node_refs(spec, i)
            if isinstance(ref, NodeRef)
        )
        node_flops = plan.node_flops[i]
        fetch -= sum(
            math.prod(shape(ref)[1]) * _itemsize(shape(ref)[0])
            for ref in _node_refs(spec, i)
            if isinstance(ref, NodeRef) and ref.node in derived
        )
        if method in (CheckMethod.FREE, CheckMethod.DERIVED):
            check, fetch = 0, 0
        elif method is CheckMethod.FREIVALDS:
            named = _named(spec, i)
            a = shape(named["mat1" if node.op == "aten.addmm.default" else "self"])[1]
            b = shape(named["mat2"])[1]
            nb = a[0] if len(a) == 3 else 1
            m, k, n = a[-2], a[-1], b[-1]
            blocks = -(-n // -(-n // freivalds_blocks(n)))
            check = matmul_check_flops(nb, m, k, n, rounds, blocks, samples, node.op == "aten.addmm.default")
        elif method is CheckMethod.PROJECTION:
            named = _named(spec, i)
            groups = named.get("groups", 1)
            g = groups if isinstance(groups, int) and groups > 0 else 1
            transposed = named.get("transposed") is True
            x, w = shape(named["input"])[1], shape(named["weight"])[1]
            check = conv_check_flops(x, w, outs[0][1], g, transposed, rounds, 0)
            check += channels * conv_check_flops(x, w, outs[0][1], g, transposed, 0, 1)
        else:
            check = node_flops + 4 * out_numel
        costs.append(NodeCost(i, node.op, method, node_flops, check, fetch))
    return tuple(costs)


def _itemsize(dtype: str) -> int:
    return DTYPE_BY_NAME[dtype].itemsize if dtype in DTYPE_BY_NAME else 8


class _Invalid(Exception):
    """A committed tensor whose bytes match its digest but are not a valid tensor (bool bytes other than 0/1)."""


class TraceChecker:
    """Checks nodes of one committed trace of ``spec``. The leaves are checked against the job once, here: one per
    node in order (``core.trace.check_trace``), each stating the dtypes and shapes the dry run gives
    (:class:`TraceError` ``bad_trace`` otherwise), so no fetched tensor is larger than the job allows."""

    def __init__(
        self, spec: JobSpec, blobs: Mapping[bytes, bytes], leaves: Sequence[TraceLeaf], *, device: str = "cpu"
    ) -> None:
        check_trace(spec, leaves)
        self.plan = dry_run(spec)
        for i, (leaf, expected) in enumerate(zip(leaves, self.plan.node_outputs, strict=True)):
            stated = tuple((meta.dtype, meta.shape) for meta in leaf.outputs)
            if stated != expected:
                raise TraceError(
                    Reason.BAD_TRACE, f"node {i}: the leaf states {stated[:4]}, the job gives {expected[:4]}"
                )
        self.spec = spec
        self.leaves = tuple(leaves)
        self.device = device
        self._costs: tuple[NodeCost, ...] | None = None
        self.derived = derived_nodes(spec)
        self.blobs, self._derived_bad = self._derive(blobs)

    def _derive(self, blobs: Mapping[bytes, bytes]) -> tuple[dict[bytes, bytes], dict[int, str]]:
        """Compute the derived nodes (views of the job's own tensors) here; a committed digest that differs from
        the client's is a faked node. Their bytes join the job's own, so nothing that reads them is fetched."""
        own = dict(blobs)
        bad: dict[int, str] = {}
        values: dict[int, list[torch.Tensor]] = {}

        def lookup(ref: TensorRef) -> torch.Tensor:
            if isinstance(ref, NodeRef):
                return values[ref.node][0 if ref.item is None else ref.item]
            meta = _meta_of(self.spec, self.leaves, ref)
            return blob_to_tensor(meta, own[meta.digest]).to(self.device)

        for i in sorted(self.derived):
            if any(isinstance(r, NodeRef) and r.node not in values for r in _node_refs(self.spec, i)):
                continue  # reads a derived node that was faked: checked as such below
            try:
                outs = run_node(self.spec, i, lookup, device=self.device)
            except (KeyError, P2PComputeError) as exc:
                bad[i] = f"the client cannot derive it: {exc}"
                continue
            pairs = [tensor_to_blob(t) for t in outs]
            if tuple(meta for meta, _ in pairs) != self.leaves[i].outputs:
                bad[i] = "its committed digest is not the view of the job's own tensors"
                continue
            values[i] = outs
            for meta, data in pairs:
                own[meta.digest] = data
        return own, bad

    def needed(self, nodes: Iterable[int]) -> set[bytes]:
        return needed_tensors(self.spec, self.leaves, nodes)

    def costs(self) -> tuple[NodeCost, ...]:
        if self._costs is None:
            self._costs = check_costs(self.spec, self.plan)
        return self._costs

    def check(
        self,
        nodes: Iterable[int],
        fetched: Mapping[bytes, bytes],
        *,
        seed: int,
        rounds: int = FREIVALDS_ROUNDS,
        samples: int = ELEMENT_SAMPLES,
        channels: int = PROJECTION_CHANNELS,
    ) -> list[NodeCheck]:
        """Check each of ``nodes`` against its committed inputs. ``fetched`` holds the bytes of intermediates by
        digest (:meth:`needed`). Raises :class:`JobFormatError` when a tensor it needs is missing
        (``missing_tensor``) or its bytes do not match the committed meta (``shape_mismatch``, ``hash_mismatch``):
        what was fetched is not what was committed. A committed value that is wrong is a :class:`NodeCheck` with
        ``ok=False``, never an exception."""
        cache: dict[tuple[bytes, str, tuple[int, ...]], torch.Tensor] = {}
        return [self._check_one(i, fetched, cache, node_seed(seed, i), rounds, samples, channels) for i in nodes]

    def _tensor(
        self, meta: TensorMeta, fetched: Mapping[bytes, bytes], cache: dict[tuple[bytes, str, tuple[int, ...]], Any]
    ) -> torch.Tensor:
        key = (meta.digest, meta.dtype, meta.shape)
        if key not in cache:
            data = self.blobs.get(meta.digest)
            if data is None:
                data = fetched.get(meta.digest)
            if data is None:
                raise JobFormatError(Reason.MISSING_TENSOR, f"tensor {meta.digest.hex()[:16]} was not fetched")
            try:
                cache[key] = blob_to_tensor(meta, data).to(self.device)  # checks length and hash first
            except JobFormatError as exc:
                if exc.reason is not Reason.BAD_ARGUMENT:
                    raise
                raise _Invalid(exc.detail) from exc  # the committed bytes themselves are not a valid tensor
        tensor: torch.Tensor = cache[key]
        return tensor

    def _check_one(
        self,
        i: int,
        fetched: Mapping[bytes, bytes],
        cache: dict[tuple[bytes, str, tuple[int, ...]], Any],
        seed: int,
        rounds: int,
        samples: int,
        channels: int,
    ) -> NodeCheck:
        spec, leaves = self.spec, self.leaves
        node = spec.nodes[i]
        leaf = leaves[i]
        refs = _node_refs(spec, i)
        inputs = tuple(_meta_of(spec, leaves, ref) for ref in refs)
        own = {meta.digest for meta in spec.inputs + spec.constants}
        read = {m.digest: m.nbytes for m in (*inputs, *leaf.outputs) if m.digest not in own}
        method = method_of(node.op, leaf.outputs[0].dtype)

        def result(found: Discrepancy, used: CheckMethod, detail: str = "") -> NodeCheck:
            return NodeCheck(
                node=i,
                op=node.op,
                ok=found.ok,
                method=used,
                error=found.error,
                bound=found.bound,
                flops=found.flops,
                bytes_read=sum(read.values()) if used is not CheckMethod.FREE else 0,
                seed=seed,
                inputs=inputs,
                outputs=leaf.outputs,
                detail=detail or found.where,
            )

        if method is CheckMethod.FREE:
            return result(Discrepancy(True, 0.0, 0.0, 0), method)
        if i in self.derived:
            why = self._derived_bad.get(i)
            if why is None and any(isinstance(r, NodeRef) and r.node in self._derived_bad for r in refs):
                why = "it reads a faked view"
            found = Discrepancy(why is None, 0.0 if why is None else math.inf, 0.0, 0)
            return NodeCheck(
                node=i, op=node.op, ok=why is None, method=CheckMethod.DERIVED, error=found.error, bound=0.0,
                flops=0, bytes_read=0, seed=seed, inputs=inputs, outputs=leaf.outputs, detail=why or "",
            )  # fmt: skip
        try:
            committed = [self._tensor(meta, fetched, cache) for meta in leaf.outputs]
            lookup: Callable[[TensorRef], torch.Tensor] = lambda ref: self._tensor(  # noqa: E731
                _meta_of(spec, leaves, ref), fetched, cache
            )
            values = bind_node(spec, i, lookup, device=self.device)
        except _Invalid as exc:
            return result(Discrepancy(False, math.inf, 0.0, 0), method, f"a committed tensor is invalid: {exc}")
        except (JobFormatError, ExecutionError) as exc:
            if exc.reason in (Reason.MISSING_TENSOR, Reason.HASH_MISMATCH, Reason.SHAPE_MISMATCH):
                raise
            return result(Discrepancy(False, math.inf, 0.0, 0), method, f"the op refuses its committed inputs: {exc}")
        rtol, atol = spec.compare.rtol, spec.compare.atol
        generator = torch.Generator().manual_seed(seed)
        if method is CheckMethod.FREIVALDS:
            a = values["mat1"] if node.op == "aten.addmm.default" else values["self"]
            bias = values["self"] if node.op == "aten.addmm.default" else None
            beta = float(values.get("beta", 1)) if bias is not None else 0.0
            if _finite(a, values["mat2"], committed[0], bias if beta != 0 else None):
                found = matmul_check(
                    a,
                    values["mat2"],
                    committed[0],
                    bias=bias,
                    alpha=float(values.get("alpha", 1)),
                    beta=beta,
                    rtol=rtol,
                    atol=atol,
                    generator=generator,
                    rounds=rounds,
                    samples=samples,
                )
                return result(found, method)
        elif method is CheckMethod.PROJECTION:
            x, w, b = values["input"], values["weight"], values["bias"]
            if _finite(x, w, b, committed[0]):
                found = conv_check(
                    x,
                    w,
                    b,
                    committed[0],
                    stride=[int(s) for s in values["stride"]],
                    padding=[int(p) for p in values["padding"]],
                    dilation=[int(d) for d in values["dilation"]],
                    transposed=bool(values["transposed"]),
                    output_padding=[int(p) for p in values["output_padding"]],
                    groups=int(values["groups"]),
                    rtol=rtol,
                    atol=atol,
                    generator=generator,
                    rounds=rounds,
                    channels=channels,
                )
                return result(found, method)
        return self._recompute(i, lookup, values, committed, result)

    def _recompute(
        self,
        i: int,
        lookup: Callable[[TensorRef], torch.Tensor],
        values: Mapping[str, Any],
        committed: list[torch.Tensor],
        result: Callable[..., NodeCheck],
    ) -> NodeCheck:
        spec = self.spec
        op = spec.nodes[i].op
        method = CheckMethod.RECOMPUTE
        try:
            recomputed = run_node(spec, i, lookup, device=self.device)
        except P2PComputeError as exc:
            return result(Discrepancy(False, math.inf, 0.0, 0), method, f"the op fails on its committed inputs: {exc}")
        flops = self.plan.node_flops[i]
        if len(recomputed) != len(committed):
            return result(
                Discrepancy(False, math.inf, 0.0, flops),
                method,
                f"{len(recomputed)} outputs, {len(committed)} committed",
            )
        found: Discrepancy | None = None
        rtol, atol = spec.compare.rtol, spec.compare.atol
        for j, (c, r) in enumerate(zip(committed, recomputed, strict=True)):
            one = _compare(c, r, rtol, atol, f"output {j}")
            if (
                not one.ok
                and op in _INDEX_OPS
                and j == _INDEX_OPS[op][0]
                and _same_choice(op, values, committed, recomputed)
            ):
                one = Discrepancy(True, 0.0, 0.0, one.flops, f"output {j}: ties chosen otherwise")
            found = one if found is None else _both(found, one)
        assert found is not None  # every node returns at least one tensor (the dry run refuses others)
        return result(Discrepancy(found.ok, found.error, found.bound, found.flops + flops, found.where), method)


def check_nodes(
    spec: JobSpec,
    blobs: Mapping[bytes, bytes],
    leaves: Sequence[TraceLeaf],
    fetched: Mapping[bytes, bytes],
    nodes: Iterable[int],
    *,
    seed: int,
    rounds: int = FREIVALDS_ROUNDS,
    samples: int = ELEMENT_SAMPLES,
    channels: int = PROJECTION_CHANNELS,
    device: str = "cpu",
) -> list[NodeCheck]:
    """Check ``nodes`` of a committed trace (:class:`TraceChecker`; raises as its constructor and ``check`` do)."""
    checker = TraceChecker(spec, blobs, leaves, device=device)
    return checker.check(nodes, fetched, seed=seed, rounds=rounds, samples=samples, channels=channels)


# --- reference traces (tests, benchmarks, adversaries) -------------------------------------------------------------

Fake = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def build_trace(
    spec: JobSpec,
    blobs: Mapping[bytes, bytes],
    *,
    fakes: Mapping[int, Fake] | None = None,
    device: str = "cpu",
) -> tuple[tuple[TraceLeaf, ...], dict[bytes, bytes], list[torch.Tensor]]:
    """Run ``spec`` node by node (:func:`run_node`) and return its trace, the bytes of every intermediate and the
    outputs. ``fakes`` replaces the outputs of some nodes (node → function of the honest outputs) before anything
    downstream reads them, so the trace is self-consistent except at those nodes: what a careful cheater commits."""
    fakes = fakes or {}
    own: dict[TensorRef, torch.Tensor] = {}
    for index, meta in enumerate(spec.inputs):
        own[InputRef(index)] = blob_to_tensor(meta, blobs[meta.digest]).to(device)
    for index, meta in enumerate(spec.constants):
        own[ConstRef(index)] = blob_to_tensor(meta, blobs[meta.digest]).to(device)
    values: list[list[torch.Tensor]] = []

    def lookup(ref: TensorRef) -> torch.Tensor:
        if isinstance(ref, NodeRef):
            return values[ref.node][0 if ref.item is None else ref.item]
        return own[ref]

    leaves: list[TraceLeaf] = []
    kept: dict[bytes, bytes] = {}
    for i in range(len(spec.nodes)):
        outs = run_node(spec, i, lookup, device=device)
        if i in fakes:
            outs = fakes[i](outs)
        values.append(outs)
        metas = []
        for tensor in outs:
            meta, data = tensor_to_blob(tensor)
            kept[meta.digest] = data
            metas.append(meta)
        leaves.append(TraceLeaf(node=i, outputs=tuple(metas)))
    outputs = [lookup(ref).to("cpu") for ref in spec.outputs]
    return tuple(leaves), kept, outputs
