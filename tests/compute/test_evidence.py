"""Evidence from the client's own checks (specs/verification.md §12): made from a failed node check, checked offline
by a peer that never saw the job (pure checks, then the check redone), refused when anything in it was changed."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from p2pcompute.client import Job
from p2pcompute.compute.check import TraceChecker, build_trace
from p2pcompute.compute.evidence import make_check_evidence, recheck
from p2pcompute.core.envelope import Opened, open_envelope, seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import CheckEvidence, JobResult, LeafProof, Timings
from p2pcompute.core.tensors import outputs_digest
from p2pcompute.core.trace import TraceLeaf, trace_outputs, trace_root
from p2pcompute.core.verification import check_check_evidence
from p2pcompute.errors import Reason, RemoteProtocolError

CLIENT = KeyPair.from_seed(b"\x51" * 32)
WORKER = KeyPair.from_seed(b"\x52" * 32)
NOW = 1_800_000_000_000
SEED = 1234


def _job() -> Job:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    return Job.from_module(model, (torch.randn(8, 16),))


def _signed_result(job: Job, leaves: tuple[TraceLeaf, ...]) -> Opened[JobResult]:
    outputs = trace_outputs(job.spec, leaves)
    message = JobResult(
        id=b"\x01" * 16, nonce=1, expires_at=NOW + 60_000, worker=WORKER.peer_id, client=CLIENT.peer_id,
        accept_hash=b"\x02" * 32, job_digest=job.digest, output_digest=outputs_digest(outputs), outputs=outputs,
        hardware_class="cpu|test", timings=Timings(queue_ms=0, load_ms=0, exec_ms=1, total_ms=1),
        trace_root=trace_root(leaves), trace_length=len(leaves),
    )  # fmt: skip
    return open_envelope(seal(WORKER, message), expect=JobResult)


def _caught(job: Job, node: int) -> tuple[bytes, Opened[JobResult]]:
    """A cheater's trace faked at ``node`` (everything after it honest), the client's failed check, the evidence."""

    def fake(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [outs[0] + 1.0]

    leaves, kept, _ = build_trace(job.spec, job.blobs, fakes={node: fake})
    result = _signed_result(job, leaves)
    checker = TraceChecker(job.spec, job.blobs, leaves)
    (check,) = checker.check([node], kept, seed=SEED)
    assert not check.ok
    data = make_check_evidence(
        CLIENT, result, job.spec_bytes, leaves, {**job.blobs, **kept}, check, SEED,
        id=b"\x03" * 16, nonce=7, expires_at=NOW + 300_000,
    )  # fmt: skip
    assert data is not None
    return data, result


@pytest.mark.parametrize("node", [1, 2, 4])  # a product, the ReLU, the output product
def test_evidence_of_a_faked_node_is_confirmed_by_a_stranger(node: int) -> None:
    job = _job()
    data, _ = _caught(job, node)
    opened = open_envelope(data, expect=CheckEvidence)
    valid = check_check_evidence(opened, NOW)
    assert (valid.reporter, valid.accused, valid.node) == (CLIENT.peer_id, WORKER.peer_id, node)
    confirmed, detail = recheck(valid)
    assert confirmed, detail


def test_evidence_against_an_honest_node_is_refuted() -> None:
    """A reporter that accuses an honest worker (evidence built from an honest trace) is found out by the recheck."""
    job = _job()
    leaves, kept, _ = build_trace(job.spec, job.blobs)
    result = _signed_result(job, leaves)
    (check,) = TraceChecker(job.spec, job.blobs, leaves).check([4], kept, seed=SEED)
    assert check.ok
    lying = dataclasses.replace(check, ok=False)
    data = make_check_evidence(
        CLIENT, result, job.spec_bytes, leaves, {**job.blobs, **kept}, lying, SEED,
        id=b"\x04" * 16, nonce=8, expires_at=NOW + 300_000,
    )  # fmt: skip
    assert data is not None
    confirmed, detail = recheck(check_check_evidence(open_envelope(data, expect=CheckEvidence), NOW))
    assert not confirmed and "passes its check" in detail


def _resealed(data: bytes, **changes: object) -> Opened[CheckEvidence]:
    evidence = open_envelope(data, expect=CheckEvidence).message
    return open_envelope(seal(CLIENT, dataclasses.replace(evidence, **changes)), expect=CheckEvidence)


def test_changed_evidence_is_refused_before_any_recheck() -> None:
    job = _job()
    data, _ = _caught(job, 2)
    evidence = open_envelope(data, expect=CheckEvidence).message
    first = evidence.leaves[0]
    wrong_proof = LeafProof(leaf=first.leaf, proof=tuple(bytes(32) for _ in first.proof) or (bytes(32),))
    other_leaf = LeafProof(
        leaf=TraceLeaf(node=first.leaf.node, outputs=evidence.leaves[-1].leaf.outputs), proof=first.proof
    )
    cases: dict[str, dict[str, object]] = {
        "a tensor's bytes": {"tensors": (bytes(len(evidence.tensors[0])), *evidence.tensors[1:])},
        "a tensor left out": {"tensors": evidence.tensors[1:]},
        "a proof": {"leaves": (wrong_proof, *evidence.leaves[1:])},
        "a leaf": {"leaves": (other_leaf, *evidence.leaves[1:])},
        "the checked node's leaf left out": {"leaves": tuple(p for p in evidence.leaves if p.leaf.node != 2)},
        "another spec": {"spec": evidence.spec + b"\x00"},
        "another node": {"node": 5_000},
        "the accused": {"accused": CLIENT.peer_id},
    }
    for what, changes in cases.items():
        with pytest.raises(RemoteProtocolError) as refused:
            check_check_evidence(_resealed(data, **changes), NOW)
        assert refused.value.reason is Reason.BAD_EVIDENCE, what


def test_evidence_made_for_another_client_is_refused() -> None:
    job = _job()
    data, _ = _caught(job, 4)
    other = KeyPair.from_seed(b"\x53" * 32)
    evidence = open_envelope(data, expect=CheckEvidence).message
    forwarded = dataclasses.replace(evidence, reporter=other.peer_id)
    with pytest.raises(RemoteProtocolError) as refused:
        check_check_evidence(open_envelope(seal(other, forwarded), expect=CheckEvidence), NOW)
    assert refused.value.reason is Reason.BAD_EVIDENCE
    assert hashlib.sha256(evidence.spec).digest() == job.digest
