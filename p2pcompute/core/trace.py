"""Committed traces: one leaf per graph node, a Merkle tree over them, proofs (specs/verification.md §10).

A worker that runs a job commits to every intermediate tensor it computed. Node *i* of the graph gives the leaf
``TraceLeaf(node=i, outputs=(meta, ...))``: the :class:`TensorMeta` (SHA-256 of the raw bytes, dtype, shape) of each
tensor the node returned, in order (an op that returns a tuple gives several). The leaves, in node order, are the
leaves of a Merkle tree of the RFC 6962 / RFC 9162 shape, and its root is the **trace root** a signed result names::

    leaf_hash(leaf)  = SHA-256(0x00 ‖ "p2pcompute/trace-leaf/v1\\0" ‖ canonical msgpack of the leaf)
    MTH([h])         = h
    MTH(h[0:n])      = SHA-256(0x01 ‖ MTH(h[0:k]) ‖ MTH(h[k:n]))   k = the largest power of two < n
    MTH([])          = SHA-256("")

An inclusion proof of leaf *i* among *n* is RFC 9162's audit path (§2.1.3): the sibling hashes from the leaf up,
checked by :func:`verify_proof`. Two traces of one job are compared leaf by leaf (:func:`first_divergence`): the first
node whose leaves differ is where two workers' computations part, and only it needs recomputing.

Pure: hashing and msgpack only (``compute/interpreter.py`` builds leaves from tensors, ``compute/check.py`` checks
nodes against them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

from p2pcompute.core import codec
from p2pcompute.core.jobspec import TUPLE_OPS, ConstRef, InputRef, JobLimits, JobSpec, NodeRef, TensorRef
from p2pcompute.core.schema import U32_MAX, Range, Size, Struct, fields_of, to_wire
from p2pcompute.core.tensors import DIGEST_SIZE, TensorMeta
from p2pcompute.errors import LocalProtocolError, Reason, TraceError

__all__ = [
    "EMPTY_ROOT",
    "INTERIOR_PREFIX",
    "LEAF_DOMAIN",
    "LEAF_PREFIX",
    "MAX_LEAF_OUTPUTS",
    "MAX_PROOF_LENGTH",
    "MAX_TRACE_LEAVES",
    "TRACE_BYTES_BUDGET",
    "TraceLeaf",
    "check_trace",
    "first_divergence",
    "interior_hash",
    "leaf_hash",
    "leaf_hashes",
    "merkle_proof",
    "merkle_root",
    "meta_of",
    "trace_outputs",
    "trace_root",
    "verify_proof",
]

LEAF_PREFIX = b"\x00"
INTERIOR_PREFIX = b"\x01"
LEAF_DOMAIN = b"p2pcompute/trace-leaf/v1\x00"
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of a trace with no leaves (a job whose outputs are its inputs), as RFC 6962 defines it."""

MAX_TRACE_LEAVES = 1_000_000
"""Most leaves a trace has: one per node, and a job has at most ``JobLimits.max_ops``'s upper bound of nodes."""
MAX_LEAF_OUTPUTS = 1024
"""Most tensors in one leaf: the most one node may return (``jobspec.MAX_TUPLE_OUTPUTS``)."""
MAX_PROOF_LENGTH = 64
"""Most hashes in an inclusion proof. A tree of at most :data:`MAX_TRACE_LEAVES` leaves needs 20; a proof of more
than 64 (a tree of 2⁶⁴ leaves) is refused before any hashing."""

TRACE_BYTES_BUDGET = 64 << 20
"""Most bytes of intermediate tensors a worker keeps by default to answer a client's checks (64 MiB); past it, it keeps
digests only and says its trace is incomplete."""

_max_ops = dict(fields_of(JobLimits))["max_ops"]
assert getattr(_max_ops, "hi", None) == MAX_TRACE_LEAVES, "MAX_TRACE_LEAVES must be JobLimits.max_ops' bound"


@dataclass(frozen=True, kw_only=True)
class TraceLeaf(Struct):
    """What a worker commits for one node: the node's index and the meta of each tensor it returned, in order."""

    node: Annotated[int, Range(0, U32_MAX)]
    outputs: Annotated[tuple[TensorMeta, ...], Size(1, MAX_LEAF_OUTPUTS)]


def leaf_hash(leaf: TraceLeaf) -> bytes:
    """SHA-256 of ``0x00``, the leaf domain and the leaf's canonical msgpack (raises LocalProtocolError if invalid)."""
    return hashlib.sha256(LEAF_PREFIX + LEAF_DOMAIN + codec.pack(to_wire(leaf))).digest()


def leaf_hashes(leaves: Sequence[TraceLeaf]) -> tuple[bytes, ...]:
    return tuple(leaf_hash(leaf) for leaf in leaves)


def interior_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256 of ``0x01 ‖ left ‖ right``: an interior node of the tree."""
    return hashlib.sha256(INTERIOR_PREFIX + left + right).digest()


def _check_hashes(hashes: Sequence[bytes]) -> None:
    if len(hashes) > MAX_TRACE_LEAVES:
        raise LocalProtocolError(Reason.TOO_LONG, f"{len(hashes)} leaves, limit {MAX_TRACE_LEAVES}")
    for h in hashes:
        if len(h) != DIGEST_SIZE:
            raise LocalProtocolError(Reason.OUT_OF_RANGE, f"a leaf hash of {len(h)} bytes, not {DIGEST_SIZE}")


def _next_level(level: Sequence[bytes]) -> list[bytes]:
    """Pair neighbours left to right; an odd last node moves up unchanged (this is RFC 6962's shape)."""
    up = [interior_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        up.append(level[-1])
    return up


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    """The RFC 6962 Merkle tree hash of ``hashes`` (leaf hashes, in order); :data:`EMPTY_ROOT` for none."""
    _check_hashes(hashes)
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def trace_root(leaves: Sequence[TraceLeaf]) -> bytes:
    """The trace root of ``leaves`` (in node order): the Merkle tree hash of their leaf hashes."""
    return merkle_root(leaf_hashes(leaves))


def merkle_proof(hashes: Sequence[bytes], index: int) -> tuple[bytes, ...]:
    """The inclusion proof (RFC 9162 audit path) of leaf ``index``: sibling hashes from the bottom up."""
    _check_hashes(hashes)
    if not 0 <= index < len(hashes):
        raise LocalProtocolError(Reason.OUT_OF_RANGE, f"leaf {index} of {len(hashes)}")
    proof: list[bytes] = []
    level = list(hashes)
    i = index
    while len(level) > 1:
        sibling = i ^ 1
        if sibling < len(level):  # else: the last node of an odd level, moved up without a sibling
            proof.append(level[sibling])
        level = _next_level(level)
        i //= 2
    return tuple(proof)


def verify_proof(root: bytes, count: int, index: int, leaf: bytes, proof: Sequence[bytes]) -> None:
    """Check that ``leaf`` (a leaf hash) is leaf ``index`` of the ``count``-leaf tree whose root is ``root``.

    RFC 9162 §2.1.3.2. Raises :class:`TraceError` (``bad_proof``): an index outside the tree, a proof longer than
    :data:`MAX_PROOF_LENGTH` or of the wrong length for the tree, a hash that is not 32 bytes, or a path that does
    not lead to ``root``.
    """
    if len(proof) > MAX_PROOF_LENGTH:
        raise TraceError(Reason.BAD_PROOF, f"a proof of {len(proof)} hashes, limit {MAX_PROOF_LENGTH}")
    if not 0 <= index < count or count > MAX_TRACE_LEAVES:
        raise TraceError(Reason.BAD_PROOF, f"leaf {index} of {count}")
    if len(root) != DIGEST_SIZE or len(leaf) != DIGEST_SIZE or any(len(p) != DIGEST_SIZE for p in proof):
        raise TraceError(Reason.BAD_PROOF, f"a hash that is not {DIGEST_SIZE} bytes")
    fn, sn, r = index, count - 1, leaf
    for p in proof:
        if sn == 0:
            raise TraceError(Reason.BAD_PROOF, f"a proof longer than the path of leaf {index} of {count}")
        if fn & 1 or fn == sn:
            r = interior_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = interior_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise TraceError(Reason.BAD_PROOF, f"a proof shorter than the path of leaf {index} of {count}")
    if r != root:
        raise TraceError(Reason.BAD_PROOF, f"the proof of leaf {index} of {count} does not lead to the root")


def first_divergence(a: Sequence[TraceLeaf], b: Sequence[TraceLeaf]) -> int | None:
    """The first node whose leaves differ in two traces of one job (a leaf missing from one counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


def meta_of(spec: JobSpec, leaves: Sequence[TraceLeaf] | Mapping[int, TraceLeaf], ref: TensorRef) -> TensorMeta:
    """The meta of a tensor a node reads: a job input or constant as the spec names it, a node's output as its leaf
    does. Raises :class:`TraceError` (``bad_trace``) when the leaf is missing or has no such output."""
    match ref:
        case InputRef(index=index):
            return spec.inputs[index]
        case ConstRef(index=index):
            return spec.constants[index]
        case NodeRef(node=node, item=item):
            leaf = leaves.get(node) if isinstance(leaves, Mapping) else (leaves[node] if node < len(leaves) else None)
            position = 0 if item is None else item
            if leaf is None or position >= len(leaf.outputs):
                raise TraceError(Reason.BAD_TRACE, f"no leaf names output {position} of node {node}")
            return leaf.outputs[position]
    raise AssertionError(ref)


def trace_outputs(spec: JobSpec, leaves: Sequence[TraceLeaf]) -> tuple[TensorMeta, ...]:
    """The metas of the job's outputs as the trace names them (inputs and constants as the spec does)."""
    return tuple(meta_of(spec, leaves, ref) for ref in spec.outputs)


def check_trace(spec: JobSpec, leaves: Sequence[TraceLeaf], outputs: Sequence[TensorMeta] | None = None) -> None:
    """Check that ``leaves`` can be a trace of ``spec`` and, when given, that it names the result's ``outputs``.

    One leaf per node, in order, each with the number of tensors its op returns (a list-valued op: at least as many
    as the job refers to). Shapes and dtypes are checked against the dry run by ``compute/check.py``. Raises
    :class:`TraceError` (``bad_trace``).
    """
    if len(leaves) != len(spec.nodes):
        raise TraceError(Reason.BAD_TRACE, f"{len(leaves)} leaves for {len(spec.nodes)} nodes")
    for i, (leaf, node) in enumerate(zip(leaves, spec.nodes, strict=True)):
        if leaf.node != i:
            raise TraceError(Reason.BAD_TRACE, f"leaf {i} names node {leaf.node}")
        arity = TUPLE_OPS.get(node.op, 1)
        if arity >= 0 and len(leaf.outputs) != arity:
            raise TraceError(
                Reason.BAD_TRACE, f"node {i} {node.op} returns {arity} tensors, its leaf has {len(leaf.outputs)}"
            )
        for arg in (*node.args, *(value for _, value in node.kwargs)):
            for ref in arg if isinstance(arg, tuple) else (arg,):
                if isinstance(ref, NodeRef) and ref.item is not None and ref.item >= len(leaves[ref.node].outputs):
                    raise TraceError(
                        Reason.BAD_TRACE,
                        f"node {i} uses output {ref.item} of node {ref.node}, "
                        f"whose leaf has {len(leaves[ref.node].outputs)}",
                    )
    named = trace_outputs(spec, leaves)
    if outputs is not None and tuple(outputs) != named:
        raise TraceError(Reason.BAD_TRACE, "the result's outputs are not the ones its trace names")
