"""Tolerance comparison of output tensors (specs/verification.md §3), the torch side of verification.

Rules: shapes and dtypes must match exactly. Integer and bool tensors must be equal. Floating tensors agree
when every element satisfies the *symmetric* test ``|a - b| <= atol + rtol * max(|a|, |b|)`` (computed in
float64), so ``agree(a, b) == agree(b, a)``. NaN agrees only with NaN at the same position; ±inf agrees only
with the same infinity. The callback for :class:`p2pcompute.core.verification.Verifier` is built by
:func:`make_agree`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar, cast

import torch

from p2pcompute.compute.interpreter import DTYPE_BY_NAME, blob_to_tensor
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.core.verification import KnownAnswer, ResultClaim
from p2pcompute.errors import JobFormatError, Reason

K = TypeVar("K", bound=Hashable)

__all__ = ["TORCH_DTYPES", "blobs_agree", "first_disagreement", "make_agree", "tensors_agree", "to_tensor"]

TORCH_DTYPES = DTYPE_BY_NAME  # one table of wire dtypes (compute/interpreter.py)


def first_disagreement(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], rtol: float, atol: float) -> str | None:
    """Describe the first output that differs beyond the tolerance, or ``None`` when all agree."""
    if rtol < 0 or atol < 0:
        raise ValueError("rtol and atol must not be negative")
    if len(a) != len(b):
        return f"{len(a)} outputs against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.dtype != y.dtype:
            return f"output {i}: dtype {x.dtype} against {y.dtype}"
        if x.shape != y.shape:
            return f"output {i}: shape {list(x.shape)} against {list(y.shape)}"
        x, y = x.detach().cpu(), y.detach().cpu()
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return f"output {i}: {int((x != y).sum())} of {x.numel()} elements differ"
            continue
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        x_nan, y_nan = torch.isnan(x64), torch.isnan(y64)
        if not torch.equal(x_nan, y_nan):
            return f"output {i}: NaN at different positions"
        x_inf, y_inf = torch.isinf(x64), torch.isinf(y64)
        if not torch.equal(x_inf, y_inf) or not torch.equal(x64[x_inf], y64[y_inf]):
            return f"output {i}: infinities differ"
        finite = ~(x_nan | x_inf)
        xf, yf = x64[finite], y64[finite]
        diff = (xf - yf).abs()
        bound = atol + rtol * torch.maximum(xf.abs(), yf.abs())
        bad = diff > bound
        if bool(bad.any()):
            worst = float((diff - bound).max())
            return f"output {i}: {int(bad.sum())} of {x.numel()} elements beyond tolerance (worst by {worst:.3g})"
    return None


def tensors_agree(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], rtol: float, atol: float) -> bool:
    """Do two output lists agree within the tolerance (module docstring)?"""
    return first_disagreement(a, b, rtol, atol) is None


def to_tensor(meta: TensorMeta, blob: bytes) -> torch.Tensor:
    """Check a raw blob against its meta (dtype, length, hash) and build the tensor (a copy: the blob stays intact)."""
    return blob_to_tensor(meta, blob)


def blobs_agree(
    metas_a: Sequence[TensorMeta],
    blobs_a: Sequence[bytes],
    metas_b: Sequence[TensorMeta],
    blobs_b: Sequence[bytes],
    rtol: float,
    atol: float,
) -> bool:
    """:func:`tensors_agree` over raw blobs named by metas (each blob checked against its meta first)."""
    if len(metas_a) != len(blobs_a) or len(metas_b) != len(blobs_b):
        raise JobFormatError(Reason.MISSING_TENSOR, "a blob is missing for an output meta")
    if [(m.dtype, m.shape) for m in metas_a] != [(m.dtype, m.shape) for m in metas_b]:
        return False
    a = [to_tensor(m, blob) for m, blob in zip(metas_a, blobs_a, strict=True)]
    b = [to_tensor(m, blob) for m, blob in zip(metas_b, blobs_b, strict=True)]
    return tensors_agree(a, b, rtol, atol)


def make_agree(
    blobs: Mapping[K, Sequence[bytes]], rtol: float, atol: float
) -> Callable[[ResultClaim | KnownAnswer, ResultClaim | KnownAnswer], bool]:
    """The ``agree`` callback for a Verifier: claims' ``key`` looks up their output blobs in ``blobs``.

    A result whose blobs are not there (or do not match its metas) agrees with nothing.
    """

    def agree(x: ResultClaim | KnownAnswer, y: ResultClaim | KnownAnswer) -> bool:
        bx, by = blobs.get(cast(K, x.key)), blobs.get(cast(K, y.key))
        if bx is None or by is None:
            return False
        try:
            return blobs_agree(x.outputs, bx, y.outputs, by, rtol, atol)
        except JobFormatError:
            return False

    return agree
