"""Evidence from the client's own checks: made by the client that caught a faked node, redone by any peer.

:func:`make_check_evidence` packs what a peer that never saw the job needs to redo one failed node check
(``core.messages.CheckEvidence``: the accused's signed result, the job spec, the node's leaf and those of the nodes it
reads with Merkle proofs, the tensors, the check's seed). :func:`recheck` redoes the check with the same code and
seed (``compute/check.py``); the evidence is confirmed only when the node fails again. A client runs it in a thread;
a worker's node process never imports torch, so it runs it in its executor's sandboxed estimator child.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from p2pcompute.compute.check import NodeCheck, TraceChecker
from p2pcompute.compute.interpreter import dry_run
from p2pcompute.core.envelope import Opened, seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.jobspec import NodeRef, decode_job
from p2pcompute.core.messages import (
    MAX_CHECK_EVIDENCE_LEAVES,
    MAX_CHECK_EVIDENCE_SPEC,
    MAX_CHECK_EVIDENCE_TENSORS,
    CheckEvidence,
    JobResult,
    LeafProof,
)
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.core.trace import TraceLeaf, leaf_hashes, merkle_proof
from p2pcompute.core.verification import MAX_EVIDENCE_SIZE, ValidCheckEvidence
from p2pcompute.errors import P2PComputeError

__all__ = ["make_check_evidence", "recheck"]

_ZERO = bytes(32)


def make_check_evidence(
    keypair: KeyPair,
    result: Opened[JobResult],
    spec_bytes: bytes,
    leaves: Sequence[TraceLeaf],
    tensors: Mapping[bytes, bytes],
    failed: NodeCheck,
    seed: int,
    *,
    id: bytes,
    nonce: int,
    expires_at: int,
    max_size: int = MAX_EVIDENCE_SIZE,
) -> bytes | None:
    """The sealed evidence of ``failed`` (a node check of ``result`` that failed), or None when it cannot travel:
    the spec, the leaves or the tensors are over the message's bounds (a big job: the client acts on its own
    check, but cannot hand the proof to others by gossip)."""
    spec = decode_job(spec_bytes)
    if len(spec_bytes) > MAX_CHECK_EVIDENCE_SPEC:
        return None
    node = failed.node
    wanted = {node}
    for arg in (*spec.nodes[node].args, *(value for _, value in spec.nodes[node].kwargs)):
        for ref in arg if isinstance(arg, tuple) else (arg,):
            if isinstance(ref, NodeRef):
                wanted.add(ref.node)
    if len(wanted) > MAX_CHECK_EVIDENCE_LEAVES:
        return None
    hashes = leaf_hashes(leaves)
    proofs = tuple(LeafProof(leaf=leaves[i], proof=merkle_proof(hashes, i)) for i in sorted(wanted))
    digests: dict[bytes, None] = {}
    for meta in (*failed.inputs, *failed.outputs):
        digests[meta.digest] = None
    if len(digests) > MAX_CHECK_EVIDENCE_TENSORS or any(d not in tensors for d in digests):
        return None
    evidence = CheckEvidence(
        id=id,
        nonce=nonce,
        expires_at=expires_at,
        reporter=keypair.peer_id,
        accused=result.message.worker,
        job_digest=result.message.job_digest,
        accused_result=result.envelope,
        spec=spec_bytes,
        node=node,
        leaves=proofs,
        tensors=tuple(tensors[d] for d in digests),
        seed=seed,
    )
    try:
        data = seal(keypair, evidence)
    except P2PComputeError:
        return None
    return data if len(data) <= max_size else None


def recheck(valid: ValidCheckEvidence) -> tuple[bool, str]:
    """Redo the evidence's node check; ``(True, detail)`` when the node fails again (the evidence is confirmed)."""
    spec = valid.spec
    plan = dry_run(spec)
    leaves: list[TraceLeaf] = []
    for i, outputs in enumerate(plan.node_outputs):
        leaf = valid.leaves.get(i)
        if leaf is None:  # a node the check does not read: only its dtypes and shapes are needed
            leaf = TraceLeaf(node=i, outputs=tuple(TensorMeta(digest=_ZERO, dtype=d, shape=s) for d, s in outputs))
        leaves.append(leaf)
    own = {
        meta.digest: valid.tensors[meta.digest]
        for meta in (*spec.inputs, *spec.constants)
        if meta.digest in valid.tensors
    }
    try:
        checker = TraceChecker(spec, own, leaves)
        (check,) = checker.check([valid.node], valid.tensors, seed=valid.evidence.message.seed)
    except P2PComputeError as exc:
        return False, f"the check could not be redone: {exc.reason.value}: {exc.detail}"
    if check.ok:
        return False, f"node {valid.node} {check.op} passes its check (error {check.error:.3g} ≤ {check.bound:.3g})"
    return True, f"node {valid.node} {check.op} ({check.method.value}): error {check.error:.3g} over {check.bound:.3g}"
