"""Committed traces: leaf hashes, the RFC 6962 tree against a naive implementation, proofs, tampering, the spec's
test vectors, and the checks of a trace against its job."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.core import codec
from p2pcompute.core.jobspec import MAX_TUPLE_OUTPUTS, InputRef, JobLimits, JobSpec, Node, NodeRef
from p2pcompute.core.schema import U32_MAX, TInt, fields_of, from_wire, to_wire
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.core.trace import (
    EMPTY_ROOT,
    MAX_LEAF_OUTPUTS,
    MAX_PROOF_LENGTH,
    MAX_TRACE_LEAVES,
    TraceLeaf,
    check_trace,
    first_divergence,
    interior_hash,
    leaf_hash,
    leaf_hashes,
    merkle_proof,
    merkle_root,
    trace_outputs,
    trace_root,
    verify_proof,
)
from p2pcompute.errors import LocalProtocolError, Reason, SchemaError, TraceError

SPEC = Path(__file__).resolve().parents[2] / "specs" / "verification.md"


# --- a naive RFC 6962 implementation (§2.1), straight from the definitions ------------------------------------------


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def naive_root(hashes: list[bytes]) -> bytes:
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return hashlib.sha256(b"\x01" + naive_root(hashes[:k]) + naive_root(hashes[k:])).digest()


def naive_path(m: int, hashes: list[bytes]) -> list[bytes]:
    """RFC 6962 §2.1.1 PATH(m, D[n])."""
    if len(hashes) == 1:
        return []
    k = _split(len(hashes))
    if m < k:
        return [*naive_path(m, hashes[:k]), naive_root(hashes[k:])]
    return [*naive_path(m - k, hashes[k:]), naive_root(hashes[:k])]


def hashes_of(n: int, salt: bytes = b"") -> list[bytes]:
    return [hashlib.sha256(salt + i.to_bytes(4, "big")).digest() for i in range(n)]


def meta(i: int, dtype: str = "float32", shape: tuple[int, ...] = (2, 2)) -> TensorMeta:
    return TensorMeta(digest=hashlib.sha256(i.to_bytes(4, "big")).digest(), dtype=dtype, shape=shape)


def leaf(node: int, *outputs: TensorMeta) -> TraceLeaf:
    return TraceLeaf(node=node, outputs=outputs or (meta(node),))


# --- the tree --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 18))
def test_root_and_every_proof_agree_with_the_naive_rfc_6962_tree(n: int) -> None:
    hashes = hashes_of(n)
    root = merkle_root(hashes)
    assert root == naive_root(hashes)
    for i in range(n):
        proof = merkle_proof(hashes, i)
        assert list(proof) == naive_path(i, hashes)
        assert len(proof) <= max(1, (n - 1).bit_length())
        verify_proof(root, n, i, hashes[i], proof)


def test_empty_and_single_trees() -> None:
    assert merkle_root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    (h,) = hashes_of(1)
    assert merkle_root([h]) == h and merkle_proof([h], 0) == ()
    verify_proof(h, 1, 0, h, ())
    assert trace_root([]) == EMPTY_ROOT


def test_leaf_and_interior_hashes_are_domain_separated() -> None:
    one = leaf(0)
    packed = codec.pack(to_wire(one))
    assert leaf_hash(one) == hashlib.sha256(b"\x00p2pcompute/trace-leaf/v1\x00" + packed).digest()
    a, b = hashes_of(2)
    assert interior_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    # a two-leaf root is never a leaf hash of the same bytes, and the order of leaves matters
    assert merkle_root([a, b]) != merkle_root([b, a])
    assert leaf_hashes([one, leaf(1)]) == (leaf_hash(one), leaf_hash(leaf(1)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 17])
def test_tampered_proofs_leaves_indices_and_counts_are_refused(n: int) -> None:
    hashes = hashes_of(n)
    root = merkle_root(hashes)
    for i in range(n):
        proof = merkle_proof(hashes, i)
        for j in range(len(proof)):  # any flipped bit of any sibling
            bad = list(proof)
            bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
            with pytest.raises(TraceError) as info:
                verify_proof(root, n, i, hashes[i], bad)
            assert info.value.reason is Reason.BAD_PROOF
        with pytest.raises(TraceError):  # another leaf at this index
            verify_proof(root, n, i, hashes_of(1, b"other")[0], proof)
        for other in range(n):  # the leaf claimed at another index
            if other != i and hashes[other] != hashes[i]:
                with pytest.raises(TraceError):
                    verify_proof(root, n, other, hashes[i], proof)
        with pytest.raises(TraceError):  # a sibling dropped or added
            verify_proof(root, n, i, hashes[i], proof[:-1] if proof else (hashes[0],))
        with pytest.raises(TraceError):
            verify_proof(root, n, i, hashes[i], (*proof, hashes[0]))
        for count in range(1, 40):  # another tree size with a path of another length
            if count != n and i < count and len(naive_path(i, hashes_of(count))) != len(proof):
                with pytest.raises(TraceError):
                    verify_proof(root, count, i, hashes[i], proof)
        with pytest.raises(TraceError):  # another root
            verify_proof(merkle_root(hashes_of(n, b"x")), n, i, hashes[i], proof)


def test_bounds_of_proofs_and_trees() -> None:
    h = hashes_of(1)[0]
    with pytest.raises(TraceError) as info:
        verify_proof(h, 2, 0, h, (h,) * (MAX_PROOF_LENGTH + 1))
    assert info.value.reason is Reason.BAD_PROOF
    for index, count in [(0, 0), (-1, 3), (3, 3), (0, MAX_TRACE_LEAVES + 1)]:
        with pytest.raises(TraceError):
            verify_proof(h, count, index, h, ())
    with pytest.raises(TraceError):  # hashes of the wrong size
        verify_proof(h[:31], 1, 0, h, ())
    with pytest.raises(TraceError):
        verify_proof(h, 2, 0, h, (h[:31],))
    with pytest.raises(LocalProtocolError):
        merkle_proof([h], 1)
    with pytest.raises(LocalProtocolError):
        merkle_root([h[:16]])
    # the bounds are the job format's: a node per op, a leaf per tensor a node may return
    max_ops = dict(fields_of(JobLimits))["max_ops"]
    assert isinstance(max_ops, TInt) and max_ops.hi == MAX_TRACE_LEAVES
    assert MAX_LEAF_OUTPUTS == MAX_TUPLE_OUTPUTS
    assert (MAX_TRACE_LEAVES - 1).bit_length() <= MAX_PROOF_LENGTH


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70), st.data())
def test_proofs_verify_and_any_bit_flip_is_refused(hashes: list[bytes], data: st.DataObject) -> None:
    n = len(hashes)
    root = merkle_root(hashes)
    assert root == naive_root(hashes)
    i = data.draw(st.integers(0, n - 1))
    proof = merkle_proof(hashes, i)
    verify_proof(root, n, i, hashes[i], proof)
    target = data.draw(st.integers(0, len(proof)))  # a proof element, or the leaf itself
    bit = data.draw(st.integers(0, 255))
    if target == len(proof):
        flipped = bytearray(hashes[i])
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(TraceError):
            verify_proof(root, n, i, bytes(flipped), proof)
    else:
        bad = [bytearray(p) for p in proof]
        bad[target][bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(TraceError):
            verify_proof(root, n, i, hashes[i], [bytes(p) for p in bad])


# --- leaves on the wire ----------------------------------------------------------------------------------------------


def test_trace_leaf_schema() -> None:
    one = leaf(7, meta(1), meta(2, "int64", (3,)))
    assert from_wire(TraceLeaf, codec.unpack(codec.pack(to_wire(one)))) == one
    wire = to_wire(one)
    cases = [
        ({**wire, "outputs": []}, Reason.OUT_OF_RANGE),
        ({**wire, "outputs": [wire["outputs"][0]] * (MAX_LEAF_OUTPUTS + 1)}, Reason.TOO_LONG),
        ({**wire, "node": U32_MAX + 1}, Reason.OUT_OF_RANGE),
        ({**wire, "node": -1}, Reason.OUT_OF_RANGE),
        ({**wire, "extra": 1}, Reason.UNKNOWN_FIELD),
        ({"node": 1}, Reason.MISSING_FIELD),
        ({**wire, "outputs": [{**wire["outputs"][0], "dtype": "complex64"}]}, Reason.BAD_DTYPE),
    ]
    for value, reason in cases:
        with pytest.raises(SchemaError) as info:
            from_wire(TraceLeaf, value)
        assert info.value.reason is reason, value


def test_first_divergence() -> None:
    a = [leaf(i) for i in range(5)]
    assert first_divergence(a, list(a)) is None
    assert first_divergence([], []) is None
    b = [*a[:3], leaf(3, meta(99)), a[4]]
    assert first_divergence(a, b) == 3 == first_divergence(b, a)
    assert first_divergence(a, a[:4]) == 4
    c = [leaf(0, meta(0, shape=(4,))), *a[1:]]  # same digest, another shape
    assert first_divergence(a, c) == 0
    assert first_divergence(a, b) is not None and trace_root(a) != trace_root(b)


# --- a trace against its job -----------------------------------------------------------------------------------------


def _spec() -> JobSpec:
    x = InputRef(0)
    nodes = (
        Node(op="aten.relu.default", args=(x,)),
        Node(op="aten.max.dim", args=(NodeRef(0), 1)),
        Node(op="aten.split.Tensor", args=(NodeRef(0), 1)),
        Node(op="aten.add.Tensor", args=(NodeRef(1, 0), NodeRef(2, 1))),
    )
    return JobSpec(inputs=(meta(100),), nodes=nodes, outputs=(NodeRef(3), NodeRef(1, 1), x))


def test_check_trace_against_the_job() -> None:
    spec = _spec()
    leaves = [leaf(0), leaf(1, meta(10), meta(11)), leaf(2, meta(20), meta(21)), leaf(3)]
    outputs = (meta(3), meta(11), meta(100))
    assert trace_outputs(spec, leaves) == outputs
    check_trace(spec, leaves, outputs)
    check_trace(spec, leaves)
    bad_traces = [
        leaves[:3],  # a leaf missing
        [*leaves, leaf(4)],  # one too many
        [leaves[1], leaves[0], *leaves[2:]],  # out of order
        [leaves[0], leaf(1, meta(10)), *leaves[2:]],  # max.dim returns two tensors
        [*leaves[:2], leaf(2, meta(20)), leaves[3]],  # node 3 uses split's second tensor
    ]
    for bad in bad_traces:
        with pytest.raises(TraceError) as info:
            check_trace(spec, bad, outputs)
        assert info.value.reason is Reason.BAD_TRACE
    with pytest.raises(TraceError):  # the result names other outputs than the trace
        check_trace(spec, leaves, (meta(3), meta(10), meta(100)))


# --- the spec's test vectors (specs/verification.md §10.7) -----------------------------------------------------------


def vector_trace() -> list[TraceLeaf]:
    """The fixed trace of the spec's test vectors."""
    zeros = TensorMeta(digest=hashlib.sha256(bytes(16)).digest(), dtype="float32", shape=(2, 2))
    ramp = TensorMeta(digest=hashlib.sha256(bytes(range(16))).digest(), dtype="float32", shape=(4,))
    values = TensorMeta(digest=hashlib.sha256(b"a" * 8).digest(), dtype="float64", shape=(1,))
    indices = TensorMeta(digest=hashlib.sha256(b"b" * 8).digest(), dtype="int64", shape=(1,))
    return [TraceLeaf(node=0, outputs=(zeros,)), TraceLeaf(node=1, outputs=(ramp,)),
            TraceLeaf(node=2, outputs=(values, indices))]  # fmt: skip


def vector_values() -> dict[str, str]:
    leaves = vector_trace()
    hashes = leaf_hashes(leaves)
    return {
        "leaf 0 (msgpack)": codec.pack(to_wire(leaves[0])).hex(),
        "leaf 0 hash": hashes[0].hex(),
        "leaf 1 hash": hashes[1].hex(),
        "leaf 2 hash": hashes[2].hex(),
        "root": trace_root(leaves).hex(),
        "proof of leaf 1": " ".join(p.hex() for p in merkle_proof(hashes, 1)),
        "proof of leaf 2": " ".join(p.hex() for p in merkle_proof(hashes, 2)),
    }


def test_the_spec_s_test_vectors_are_the_code_s() -> None:
    text = SPEC.read_text(encoding="utf-8")
    stated = dict(re.findall(r"^\| (leaf [^|]+|root|proof of leaf \d) \| `([0-9a-f ]+)` \|$", text, re.MULTILINE))
    assert stated == vector_values()
    leaves = vector_trace()
    root = bytes.fromhex(stated["root"])
    for i in (1, 2):
        proof = [bytes.fromhex(h) for h in stated[f"proof of leaf {i}"].split()]
        verify_proof(root, 3, i, leaf_hash(leaves[i]), proof)


def spec_parameters() -> dict[str, int]:
    """The §10.7 parameter table: `NAME` → its default (thousands separated by commas; KiB/MiB)."""
    found = {}
    for name, value in re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", SPEC.read_text(encoding="utf-8"), re.MULTILINE):
        number, _, unit = value.strip().partition(" ")
        found[name] = int(number.replace(",", "")) * {"": 1, "KiB": 1 << 10, "MiB": 1 << 20}[unit]
    return found


def test_the_spec_s_trace_parameters_are_the_code_s() -> None:
    from p2pcompute.core.trace import TRACE_BYTES_BUDGET

    stated = spec_parameters()
    assert stated["MAX_TRACE_LEAVES"] == MAX_TRACE_LEAVES
    assert stated["MAX_LEAF_OUTPUTS"] == MAX_LEAF_OUTPUTS
    assert stated["MAX_PROOF_LENGTH"] == MAX_PROOF_LENGTH
    assert stated["TRACE_BYTES_BUDGET"] == TRACE_BYTES_BUDGET
