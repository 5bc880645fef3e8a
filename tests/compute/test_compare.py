"""Tolerance comparison of output tensors, and the Verifier driven by real tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.compute.compare import (
    TORCH_DTYPES,
    blobs_agree,
    first_disagreement,
    make_agree,
    tensors_agree,
    to_tensor,
)
from p2pcompute.core.messages import ComparisonMode
from p2pcompute.core.tensors import DTYPES, TensorMeta, tensor_digest
from p2pcompute.core.verification import Accepted, QuorumPolicy, ResultClaim, Verifier
from p2pcompute.errors import JobFormatError, Reason
from tests.core.test_verification import HW_A, HW_B, JOB, W, result

RTOL, ATOL = 1e-3, 1e-6


def blob_of(t: torch.Tensor) -> tuple[TensorMeta, bytes]:
    data = bytes(t.contiguous().untyped_storage())
    name = next(k for k, v in TORCH_DTYPES.items() if v == t.dtype)
    return TensorMeta(digest=tensor_digest(data), dtype=name, shape=tuple(t.shape)), data


def test_dtype_table_matches_the_wire_dtypes() -> None:
    assert set(TORCH_DTYPES) == set(DTYPES)
    for name, dtype in TORCH_DTYPES.items():
        assert torch.empty((), dtype=dtype).element_size() == DTYPES[name]


def test_equal_and_within_tolerance_agree() -> None:
    a = torch.linspace(-10, 10, 101)
    assert tensors_agree([a], [a.clone()], RTOL, ATOL)
    assert tensors_agree([a], [a * (1 + 5e-4)], RTOL, ATOL)
    assert not tensors_agree([a], [a * (1 + 5e-3)], RTOL, ATOL)
    assert "beyond tolerance" in (first_disagreement([a], [a + 1], RTOL, ATOL) or "")


def test_shapes_dtypes_and_counts_must_match_exactly() -> None:
    a = torch.zeros(4)
    assert "shape" in (first_disagreement([a], [a.reshape(2, 2)], RTOL, ATOL) or "")
    assert "dtype" in (first_disagreement([a], [a.double()], RTOL, ATOL) or "")
    assert "outputs" in (first_disagreement([a], [a, a], RTOL, ATOL) or "")
    with pytest.raises(ValueError):
        tensors_agree([a], [a], -1.0, 0.0)


def test_integers_and_bools_must_be_equal() -> None:
    a = torch.arange(10, dtype=torch.int64)
    assert tensors_agree([a], [a.clone()], 0.5, 10.0)
    assert not tensors_agree([a], [a + 1], 0.5, 10.0)
    assert not tensors_agree([a > 3], [a > 4], 0.5, 10.0)


def test_nan_agrees_only_with_nan_at_the_same_place_and_inf_with_the_same_inf() -> None:
    nan, inf = math.nan, math.inf
    assert tensors_agree([torch.tensor([nan, 1.0])], [torch.tensor([nan, 1.0])], RTOL, ATOL)
    assert not tensors_agree([torch.tensor([nan, 1.0])], [torch.tensor([1.0, nan])], RTOL, ATOL)
    assert not tensors_agree([torch.tensor([nan])], [torch.tensor([0.0])], 1e9, 1e9)
    assert tensors_agree([torch.tensor([inf, -inf])], [torch.tensor([inf, -inf])], RTOL, ATOL)
    assert not tensors_agree([torch.tensor([inf])], [torch.tensor([-inf])], 1e9, 1e9)
    assert not tensors_agree([torch.tensor([inf])], [torch.tensor([1e38])], 1.0, 1e9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_floats_compare_without_overflow(dtype: torch.dtype) -> None:
    a = torch.tensor([60000.0 if dtype == torch.float16 else 1e30, 1.0], dtype=dtype)
    assert tensors_agree([a], [a.clone()], RTOL, ATOL)
    assert not tensors_agree([a], [-a], RTOL, ATOL)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@given(xs=st.lists(st.tuples(finite, finite), min_size=1, max_size=16), rtol=st.floats(0, 0.1), atol=st.floats(0, 1))
def test_agreement_is_symmetric(xs: list[tuple[float, float]], rtol: float, atol: float) -> None:
    a = torch.tensor([x for x, _ in xs])
    b = torch.tensor([y for _, y in xs])
    assert tensors_agree([a], [b], rtol, atol) == tensors_agree([b], [a], rtol, atol)


def test_blobs_are_checked_against_their_metas() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    meta, blob = blob_of(t)
    assert torch.equal(to_tensor(meta, blob), t)
    assert blobs_agree([meta], [blob], [meta], [blob], RTOL, ATOL)
    with pytest.raises(JobFormatError) as bad:
        to_tensor(meta, blob[:-1] + b"\x00")
    assert bad.value.reason is Reason.HASH_MISMATCH
    with pytest.raises(JobFormatError):
        blobs_agree([meta], [], [meta], [blob], RTOL, ATOL)
    other_meta, other_blob = blob_of(t.reshape(3, 2))
    assert not blobs_agree([meta], [blob], [other_meta], [other_blob], RTOL, ATOL)
    empty_meta, empty_blob = blob_of(torch.empty(0, 3))
    assert to_tensor(empty_meta, empty_blob).shape == (0, 3)


def test_verifier_with_real_tensors_accepts_across_hardware_and_flags_a_cheater() -> None:
    honest = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    outputs = {
        "a1": honest,
        "a2": honest.clone(),
        "b1": honest * (1 + 1e-5),  # another hardware class: different bits, within tolerance
        "cheat": honest * 1.1,
    }
    blobs = {key: [blob_of(t)[1]] for key, t in outputs.items()}
    metas = {key: (blob_of(t)[0],) for key, t in outputs.items()}
    claims = {
        key: ResultClaim(result(W[i], 0.0, hw, outputs=metas[key]).opened, key=key)
        for i, (key, hw) in enumerate([("cheat", HW_A), ("a1", HW_A), ("b1", HW_B), ("a2", HW_A)])
    }
    v = Verifier(QuorumPolicy(quorum=2), job_digest=JOB, mode=ComparisonMode.EXACT, agree=make_agree(blobs, RTOL, ATOL))
    status = None
    for key in ("cheat", "a1", "b1", "a2"):
        status = v.add_claim(claims[key])
    assert isinstance(status, Accepted)
    assert status.verdict.disagreeing_workers == (W[0].peer_id,)
    assert set(status.verdict.agreeing_workers) == {W[1].peer_id, W[2].peer_id, W[3].peer_id}
    [accusation] = status.verdict.accusations
    assert accusation.mode is ComparisonMode.EXACT  # two workers of the cheater's class attest the same bits
    # a result whose blobs are missing agrees with nothing
    assert not make_agree({}, RTOL, ATOL)(claims["a1"], claims["b1"])
