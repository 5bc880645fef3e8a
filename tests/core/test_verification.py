"""Quorum verdicts, escalation, tolerance, spot checks, and evidence of cheating (forged, malformed, replayed)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.core import codec
from p2pcompute.core.envelope import Opened, open_envelope, seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import (
    MAX_EVIDENCE_RESULTS,
    MAX_RESULT_ENVELOPE_SIZE,
    CheatingEvidence,
    ComparisonMode,
    JobReceipt,
    JobResult,
    Timings,
)
from p2pcompute.core.replay import SeenCache
from p2pcompute.core.reputation import Outcome
from p2pcompute.core.schema import to_wire
from p2pcompute.core.tensors import TensorMeta, outputs_digest
from p2pcompute.core.verification import (
    MAX_EVIDENCE_SIZE,
    Accepted,
    EvidenceInbox,
    EvidenceStrength,
    Failed,
    KnownAnswer,
    NeedMore,
    QuorumPolicy,
    ResultClaim,
    Verifier,
    check_evidence,
    make_evidence,
)
from p2pcompute.errors import (
    ConfigError,
    DecodeError,
    LocalProtocolError,
    P2PComputeError,
    Reason,
    ReplayError,
    SchemaError,
    SignatureError,
    VerificationError,
)
from tests.core.strategies import sign_raw

NOW = 1_800_000_000_000
CLIENT = KeyPair.from_seed(b"c" * 32)
OTHER_CLIENT = KeyPair.from_seed(b"o" * 32)
W = [KeyPair.from_seed(bytes([i + 1]) * 32) for i in range(12)]
JOB = hashlib.sha256(b"job").digest()
HW_A = "cuda/NVIDIA H100/9.0/torch2.13/cu12.4"
HW_B = "cpu/x86_64/torch2.13"
TOL = 0.01


def metas(value: float, shape: tuple[int, ...] = (2, 2), dtype: str = "float32") -> tuple[TensorMeta, ...]:
    """Output metas for a result whose (pretend) tensors all hold ``value``."""
    return (TensorMeta(digest=hashlib.sha256(repr((value, shape, dtype)).encode()).digest(), dtype=dtype, shape=shape),)


def result(
    pair: KeyPair,
    value: float = 1.0,
    hw: str = HW_A,
    *,
    client: KeyPair = CLIENT,
    job: bytes = JOB,
    outputs: tuple[TensorMeta, ...] | None = None,
    **changes: Any,
) -> ResultClaim:
    """A signed result of ``pair`` for ``job``; its comparison key is ``value``."""
    outs = outputs if outputs is not None else metas(value)
    fields: dict[str, Any] = dict(
        id=hashlib.sha256(pair.public_key + job).digest()[:16], nonce=1, expires_at=NOW + 60_000,
        worker=pair.peer_id, client=client.peer_id, accept_hash=hashlib.sha256(pair.public_key).digest(),
        job_digest=job, output_digest=outputs_digest(outs), outputs=outs, hardware_class=hw,
        timings=Timings(queue_ms=0, load_ms=1, exec_ms=2, total_ms=3), trace_root=bytes(32), trace_length=0,
    )  # fmt: skip
    fields.update(changes)
    opened: Opened[JobResult] = open_envelope(seal(pair, JobResult(**fields)), expect=JobResult)
    return ResultClaim(opened, key=value)


def value_agree(a: ResultClaim | KnownAnswer, b: ResultClaim | KnownAnswer) -> bool:
    """Pure stand-in for the tensor comparison: keys are the values, tolerance TOL."""
    ka, kb = a.key, b.key
    assert isinstance(ka, float) and isinstance(kb, float)
    return abs(ka - kb) <= TOL and a.outputs[0].shape == b.outputs[0].shape


def never_called(a: ResultClaim | KnownAnswer, b: ResultClaim | KnownAnswer) -> bool:
    raise AssertionError("tolerance comparison must not run here")


def verifier(q: int = 2, max_workers: int = 5, mode: ComparisonMode = ComparisonMode.EXACT, **kw: Any) -> Verifier:
    return Verifier(
        QuorumPolicy(quorum=q, max_workers=max_workers, max_attempts=kw.pop("max_attempts", 8)),
        job_digest=JOB,
        mode=mode,
        agree=kw.pop("agree", value_agree),
        **kw,
    )


def feed(v: Verifier, *claims: ResultClaim) -> Any:
    """Add claims until the verdict is final."""
    status: Any = v.status()
    for claim in claims:
        status = v.add_claim(claim)
        if not isinstance(status, NeedMore):
            break
    return status


# --- quorum ---------------------------------------------------------------------------------------------------


def test_quorum_of_agreeing_results_accepts() -> None:
    v = verifier(agree=never_called)
    assert v.status() == NeedMore(count=2, waiting=0)
    v.assign(W[0].peer_id)
    assert v.status() == NeedMore(count=1, waiting=1)
    assert v.add_claim(result(W[0])) == NeedMore(count=1, waiting=0)
    status = v.add_claim(result(W[1]))
    assert isinstance(status, Accepted)
    verdict = status.verdict
    assert verdict.agreeing_workers == (W[0].peer_id, W[1].peer_id)
    assert verdict.disagreeing == () and verdict.accusations == ()
    assert verdict.output_digest == result(W[0]).output_digest
    assert verdict.accepted is not None and verdict.accepted.worker == W[0].peer_id
    assert verdict.outcomes() == {W[0].peer_id: Outcome.VALID, W[1].peer_id: Outcome.VALID}
    assert v.comparisons == 0


def test_quorum_of_one_accepts_a_single_result() -> None:
    status = feed(verifier(q=1, agree=never_called), result(W[0]))
    assert isinstance(status, Accepted)
    assert status.verdict.agreeing_workers == (W[0].peer_id,)


def test_disagreement_escalates_and_the_majority_with_quorum_plus_one_wins() -> None:
    v = verifier(agree=never_called)
    assert feed(v, result(W[0], 9.0), result(W[1])) == NeedMore(count=2, waiting=0)
    assert v.add_claim(result(W[2])) == NeedMore(count=1, waiting=0)
    status = v.add_claim(result(W[3]))
    assert isinstance(status, Accepted)
    assert status.verdict.agreeing_workers == (W[1].peer_id, W[2].peer_id, W[3].peer_id)
    assert status.verdict.disagreeing_workers == (W[0].peer_id,)
    assert status.verdict.outcomes()[W[0].peer_id] is Outcome.INVALID
    [accusation] = status.verdict.accusations
    assert accusation.accused.worker == W[0].peer_id
    assert accusation.mode is ComparisonMode.EXACT


def test_colluding_pair_does_not_beat_one_honest_worker() -> None:
    # C1 and C2 return the same wrong result; H1 disagrees: 2 against 1 is not enough once disagreement is seen.
    v = verifier()
    c1, c2, h1, h2, h3 = result(W[0], 7.0), result(W[1], 7.0), result(W[2]), result(W[3]), result(W[4])
    assert isinstance(feed(v, c1, h1, c2), NeedMore)
    assert isinstance(v.add_claim(h2), NeedMore)  # 2 against 2
    status = v.add_claim(h3)
    assert isinstance(status, Accepted)
    assert status.verdict.output_digest == h1.output_digest
    assert set(status.verdict.disagreeing_workers) == {W[0].peer_id, W[1].peer_id}
    assert len(status.verdict.accusations) == 2


def test_gives_up_with_an_error_naming_what_disagreed() -> None:
    v = verifier(q=2, max_workers=4)
    status = feed(v, result(W[0], 1.0), result(W[1], 2.0), result(W[2], 3.0))
    assert isinstance(status, Failed)
    error = status.error()
    assert isinstance(error, VerificationError) and error.reason is Reason.NO_QUORUM
    for claim in (result(W[0], 1.0), result(W[1], 2.0), result(W[2], 3.0)):
        assert claim.output_digest.hex()[:16] in status.detail
        assert str(claim.worker)[-8:] in status.detail
    assert status.outcomes() == {}
    assert v.status() is status
    with pytest.raises(LocalProtocolError) as info:
        v.add_claim(result(W[3]))
    assert info.value.reason is Reason.BAD_TRANSITION


def test_gives_up_early_when_the_bound_cannot_reach_a_verdict() -> None:
    status = feed(verifier(q=2, max_workers=3), result(W[0], 1.0), result(W[1], 2.0))
    assert isinstance(status, Failed)
    assert "at most 1 possible" in status.detail


# --- comparison modes -----------------------------------------------------------------------------------------


def test_exact_same_class_mismatch_never_asks_the_tolerance_callback() -> None:
    v = verifier(agree=never_called)
    assert isinstance(feed(v, result(W[0], 1.0), result(W[1], 1.001)), NeedMore)
    assert v.comparisons == 0


def test_exact_job_across_hardware_classes_goes_through_tolerance() -> None:
    v = verifier()
    status = feed(v, result(W[0], 1.0, HW_A), result(W[1], 1.004, HW_B))
    assert isinstance(status, Accepted)
    assert status.verdict.disagreeing == ()
    assert v.comparisons == 1


def test_tolerance_job_clusters_by_tolerance() -> None:
    v = verifier(mode=ComparisonMode.TOLERANCE)
    status = feed(v, result(W[0], 1.0), result(W[1], 1.5), result(W[2], 1.005), result(W[3], 0.998))
    assert isinstance(status, Accepted)
    assert status.verdict.disagreeing_workers == (W[1].peer_id,)
    [accusation] = status.verdict.accusations
    assert accusation.mode is ComparisonMode.TOLERANCE
    assert accusation.accepted_output_digest == result(W[0], 1.0).output_digest


@given(
    values=st.lists(
        st.tuples(st.sampled_from([HW_A, HW_B, "rocm/MI300/torch2.13"]), st.floats(-TOL / 2, TOL / 2)),
        min_size=2,
        max_size=5,
    ),
    mode=st.sampled_from(ComparisonMode),
)
def test_honest_workers_on_different_hardware_classes_are_never_flagged(
    values: list[tuple[str, float]], mode: ComparisonMode
) -> None:
    # Honest workers: one bit pattern per hardware class, values within tolerance of each other across classes.
    per_class: dict[str, float] = {}
    claims = []
    for i, (hw, jitter) in enumerate(values):
        value = per_class.setdefault(hw, 1.0 + jitter)
        claims.append(result(W[i], value, hw))
    v = verifier(mode=mode)
    status = feed(v, *claims)
    assert not isinstance(status, Failed)
    if isinstance(status, Accepted):
        assert status.verdict.disagreeing == ()
        assert status.verdict.accusations == ()


@given(order=st.permutations([True] * 4 + [False] * 3), q=st.integers(1, 3))
def test_a_wrong_result_wins_only_without_seen_disagreement_or_by_majority(order: list[bool], q: int) -> None:
    """True = honest, False = a colluder returning the same wrong result."""
    v = verifier(q=q, max_workers=7)
    fed: list[bool] = []
    status: Any = v.status()
    for i, honest in enumerate(order):
        fed.append(honest)
        status = v.add_claim(result(W[i], 1.0 if honest else 5.0))
        if not isinstance(status, NeedMore):
            break
    if isinstance(status, Accepted) and status.verdict.output_digest == result(W[0], 5.0).output_digest:
        cheaters = fed.count(False)
        assert all(not h for h in fed) or (cheaters >= q + 1 and cheaters > fed.count(True))


# --- spot checks and failures ---------------------------------------------------------------------------------


def _known(value: float = 1.0, hw: str = HW_B) -> KnownAnswer:
    outs = metas(value)
    return KnownAnswer(output_digest=outputs_digest(outs), outputs=outs, hardware_class=hw, key=value)


def test_spot_check_known_answer_is_ground_truth() -> None:
    status = feed(verifier(q=1, known=_known()), result(W[0], 3.0))
    assert isinstance(status, Accepted)
    verdict = status.verdict
    assert verdict.known_answer and verdict.accepted is None
    assert verdict.output_digest == _known().output_digest
    assert verdict.outcomes() == {W[0].peer_id: Outcome.INVALID}
    assert verdict.accusations == ()  # nobody else attested: no gossiped evidence


def test_spot_check_passes_an_honest_worker_on_another_class() -> None:
    status = feed(verifier(q=1, known=_known(1.0, HW_B)), result(W[0], 1.002, HW_A))
    assert isinstance(status, Accepted)
    assert status.verdict.outcomes() == {W[0].peer_id: Outcome.VALID}


def test_spot_check_beats_a_colluding_pair() -> None:
    v = verifier(q=3, known=_known(1.0, HW_A))
    status = feed(v, result(W[0], 6.0), result(W[1], 6.0), result(W[2], 1.0))
    assert isinstance(status, Accepted)
    assert status.verdict.agreeing_workers == (W[2].peer_id,)
    assert status.verdict.disagreeing_workers == (W[0].peer_id, W[1].peer_id)


def test_timeouts_are_replaced_up_to_max_attempts() -> None:
    v = verifier(q=2, max_workers=2, max_attempts=3)
    for w in W[:2]:
        v.assign(w.peer_id)
    assert v.add_failure(W[0].peer_id, Outcome.TIMEOUT) == NeedMore(count=1, waiting=1)
    v.assign(W[2].peer_id)
    assert v.add_claim(result(W[1])) == NeedMore(count=0, waiting=1)
    status = v.add_failure(W[2].peer_id, Outcome.DECLINED_AFTER_ACCEPT)
    assert isinstance(status, Failed)
    assert status.outcomes() == {W[0].peer_id: Outcome.TIMEOUT, W[2].peer_id: Outcome.DECLINED_AFTER_ACCEPT}


def test_verdict_reports_failures_as_outcomes() -> None:
    v = verifier()
    v.assign(W[0].peer_id)
    v.add_failure(W[0].peer_id, Outcome.TIMEOUT)
    status = feed(v, result(W[1]), result(W[2]))
    assert isinstance(status, Accepted)
    assert status.verdict.outcomes()[W[0].peer_id] is Outcome.TIMEOUT


def test_bad_inputs_are_refused() -> None:
    v = verifier()
    with pytest.raises(SchemaError) as schema:
        v.add_claim(result(W[0], job=hashlib.sha256(b"other").digest()))
    assert schema.value.reason is Reason.INCONSISTENT
    with pytest.raises(SchemaError):
        v.add_claim(result(W[1], output_digest=bytes(32)))
    v.add_claim(result(W[2]))
    with pytest.raises(LocalProtocolError):
        v.add_claim(result(W[2]))
    with pytest.raises(LocalProtocolError):
        v.assign(W[2].peer_id)
    with pytest.raises(LocalProtocolError):
        v.add_failure(W[5].peer_id, Outcome.TIMEOUT)
    v.assign(W[3].peer_id)
    with pytest.raises(LocalProtocolError):
        v.add_failure(W[3].peer_id, Outcome.VALID)
    # a refused result changes nothing; the caller records it as an invalid answer
    assert v.status() == NeedMore(count=0, waiting=1)
    v.assign(W[1].peer_id)
    assert v.add_failure(W[1].peer_id, Outcome.INVALID) == NeedMore(count=0, waiting=1)
    status = v.add_claim(result(W[3]))
    assert isinstance(status, Accepted)
    assert status.verdict.outcomes()[W[1].peer_id] is Outcome.INVALID


@pytest.mark.parametrize(("q", "max_workers", "max_attempts"), [(0, 5, 8), (3, 2, 8), (2, 5, 4)])
def test_policy_bounds_are_checked(q: int, max_workers: int, max_attempts: int) -> None:
    with pytest.raises(ConfigError):
        QuorumPolicy(quorum=q, max_workers=max_workers, max_attempts=max_attempts)


# --- evidence -------------------------------------------------------------------------------------------------


def _accepted_with_cheater(mode: ComparisonMode = ComparisonMode.EXACT, cheat: float = 9.0) -> Any:
    status = feed(verifier(mode=mode), result(W[0], cheat), result(W[1]), result(W[2]), result(W[3]))
    assert isinstance(status, Accepted)
    return status.verdict


def _evidence_bytes(mode: ComparisonMode = ComparisonMode.EXACT, nonce: int = 1, cheat: float = 9.0) -> bytes:
    [accusation] = _accepted_with_cheater(mode, cheat).accusations
    return make_evidence(CLIENT, accusation, id=b"\x05" * 16, nonce=nonce, expires_at=NOW + 60_000)


def _open(data: bytes) -> Opened[CheatingEvidence]:
    return open_envelope(data, expect=CheatingEvidence)


def test_evidence_from_a_verdict_checks_out() -> None:
    valid = check_evidence(_open(_evidence_bytes()), NOW)
    assert valid.reporter == CLIENT.peer_id
    assert valid.accused == W[0].peer_id
    assert valid.agreeing == (W[1].peer_id, W[2].peer_id, W[3].peer_id)
    assert valid.job_digest == JOB
    assert valid.strength is EvidenceStrength.DIGEST


def test_tolerance_evidence_says_what_it_proves() -> None:
    claimed = check_evidence(_open(_evidence_bytes(ComparisonMode.TOLERANCE)), NOW)
    assert claimed.strength is EvidenceStrength.CLAIMED
    v = verifier(mode=ComparisonMode.TOLERANCE)
    bad_shape = result(W[0], 1.0, outputs=metas(1.0, shape=(4,)))
    status = feed(v, bad_shape, result(W[1]), result(W[2]), result(W[3]))
    assert isinstance(status, Accepted)
    [accusation] = status.verdict.accusations
    data = make_evidence(CLIENT, accusation, id=b"\x05" * 16, nonce=1, expires_at=NOW + 60_000)
    assert check_evidence(_open(data), NOW).strength is EvidenceStrength.SHAPE


def test_cross_class_accused_gets_tolerance_evidence_only() -> None:
    # Exact job; the accused is the only worker of its class, so its bits cannot be compared offline.
    status = feed(verifier(), result(W[0], 9.0, HW_B), result(W[1]), result(W[2]), result(W[3]))
    assert isinstance(status, Accepted)
    [accusation] = status.verdict.accusations
    assert accusation.mode is ComparisonMode.TOLERANCE


def test_make_evidence_refuses_results_of_another_client() -> None:
    [accusation] = _accepted_with_cheater().accusations
    with pytest.raises(LocalProtocolError):
        make_evidence(OTHER_CLIENT, accusation, id=b"\x05" * 16, nonce=1, expires_at=NOW + 60_000)


def _forge(reporter: KeyPair = CLIENT, **changes: Any) -> bytes:
    """Evidence with fields changed, sealed by ``reporter``."""
    good = _open(_evidence_bytes()).message
    return seal(reporter, dataclasses.replace(good, reporter=reporter.peer_id, **changes))


def _reason(data: bytes, error: type[P2PComputeError] = SchemaError) -> str:
    with pytest.raises(error) as info:
        check_evidence(_open(data), NOW)
    assert info.value.reason is Reason.BAD_EVIDENCE
    return str(info.value.detail)


def _env(claim: ResultClaim) -> bytes:
    return claim.opened.envelope


def test_forged_accused_result_is_rejected() -> None:
    good = _open(_evidence_bytes()).message
    tampered = bytearray(good.accused_result)
    tampered[-5] ^= 1  # inside the signature
    assert "accused result: bad_signature" in _reason(_forge(accused_result=bytes(tampered)), SignatureError)
    # the accused result of someone else, blamed on an innocent peer
    assert "signer_mismatch" in _reason(_forge(accused=W[5].peer_id), SignatureError)


def test_forged_agreeing_result_is_rejected() -> None:
    good = _open(_evidence_bytes()).message
    tampered = bytearray(good.agreeing_results[1])
    tampered[-5] ^= 1
    agreeing = (good.agreeing_results[0], bytes(tampered))
    assert "agreeing result 1: bad_signature" in _reason(_forge(agreeing_results=agreeing), SignatureError)


def test_an_evidence_envelope_of_another_type_is_rejected() -> None:
    receipt = JobReceipt(
        id=b"\x01" * 16, nonce=1, expires_at=NOW + 1, client=CLIENT.peer_id, worker=W[1].peer_id,
        result_hash=bytes(32), job_digest=JOB, output_digest=bytes(32), price=1, issued_at=NOW,
    )  # fmt: skip
    agreeing = (seal(CLIENT, receipt), _env(result(W[2])))
    assert "unexpected_payload_type" in _reason(_forge(agreeing_results=agreeing), SignatureError)


def test_evidence_whose_result_names_a_dtype_outside_the_table_is_rejected() -> None:
    # A worker-signed result with a `float8` output used to pass as evidence; TensorMeta's schema now refuses it.
    wire = to_wire(result(W[0], 9.0).opened.message)
    wire["outputs"][0]["dtype"] = "float8"
    accused = sign_raw(W[0], JobResult, codec.pack(wire))
    detail = _reason(_forge(accused_result=accused))
    assert detail.startswith("accused result: bad_dtype")


def test_malformed_embedded_bytes_are_rejected() -> None:
    detail = _reason(_forge(agreeing_results=(b"\xc1garbage", _env(result(W[2])))))
    assert detail.startswith("agreeing result 0:")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (lambda: {"accused": CLIENT.peer_id, "accused_result": _env(result(CLIENT, 9.0))}, "accuses itself"),
        (lambda: {"agreeing_results": (_env(result(W[1])), _env(result(W[1])))}, "appears twice"),
        (lambda: {"agreeing_results": (_env(result(W[0])), _env(result(W[1])))}, "is the accused"),
        (lambda: {"agreeing_results": (_env(result(W[1])), _env(result(W[2], job=bytes(32))))}, "another job"),
        (lambda: {"accused_result": _env(result(W[0], 9.0, job=bytes(32)))}, "another job"),
        (lambda: {"accused_result": _env(result(W[0], 9.0, client=OTHER_CLIENT))}, "another client"),
        (lambda: {"agreeing_results": (_env(result(W[1])), _env(result(W[2], client=OTHER_CLIENT)))}, "another client"),
        (lambda: {"agreeing_results": (_env(result(W[1])), _env(result(W[2], 3.0)))}, "accepted output digest"),
        (lambda: {"agreeing_results": (_env(result(W[1])), _env(result(W[2], hw=HW_B)))}, "hardware classes"),
        (lambda: {"accused_result": _env(result(W[0], 1.0))}, "attested the accepted"),
        (lambda: {"agreeing_results": (_env(result(W[1])), _env(result(W[2], output_digest=bytes(32))))}, "match its"),
        (lambda: {"accepted_output_digest": bytes(32), "comparison": ComparisonMode.TOLERANCE}, "no agreeing result"),
        (lambda: {"accused_result": _env(result(W[0], 1.0)), "comparison": ComparisonMode.TOLERANCE}, "same outputs"),
        (
            lambda: {
                "agreeing_results": (_env(result(W[1])), _env(result(W[2], outputs=metas(1.0, shape=(3,))))),
                "comparison": ComparisonMode.TOLERANCE,
            },
            "shapes",
        ),
    ],
)
def test_inconsistent_evidence_is_rejected(changes: Any, expected: str) -> None:
    assert expected in _reason(_forge(**changes()))


def test_forged_outer_signature_is_rejected() -> None:
    data = bytearray(_evidence_bytes())
    data[-5] ^= 1
    with pytest.raises(SignatureError) as info:
        EvidenceInbox().receive(bytes(data), NOW)
    assert info.value.reason is Reason.BAD_SIGNATURE


def test_expired_evidence_is_rejected() -> None:
    with pytest.raises(ReplayError) as info:
        check_evidence(_open(_evidence_bytes()), NOW + 60_000)
    assert info.value.reason is Reason.EXPIRED


def test_replayed_evidence_is_rejected() -> None:
    inbox = EvidenceInbox(seen=SeenCache(capacity=16))
    data = _evidence_bytes(nonce=1)
    assert inbox.receive(data, NOW).accused == W[0].peer_id
    with pytest.raises(ReplayError) as same:
        inbox.receive(data, NOW + 1)
    assert same.value.reason is Reason.REPLAYED
    # the same accusation re-wrapped with a fresh nonce is counted once only
    with pytest.raises(ReplayError) as rewrapped:
        inbox.receive(_evidence_bytes(nonce=2), NOW + 2)
    assert rewrapped.value.reason is Reason.REPLAYED


def test_rejected_evidence_is_not_remembered() -> None:
    inbox = EvidenceInbox()
    bad = _forge(accused_result=_env(result(W[0], 1.0)))
    with pytest.raises(SchemaError):
        inbox.receive(bad, NOW)
    assert inbox.receive(_evidence_bytes(), NOW).accused == W[0].peer_id


def test_keys_of_claims_are_opaque() -> None:
    key: Hashable = ("blob-set", 3)
    claim = ResultClaim(result(W[0]).opened, key=key)
    assert claim.key == key and claim.worker == W[0].peer_id and claim.hardware_class == HW_A


def test_evidence_at_its_schema_bounds_fits_the_size_cap() -> None:
    big = tuple(
        TensorMeta(digest=hashlib.sha256(bytes([i])).digest(), dtype="bfloat16", shape=(2**40,) * 8) for i in range(64)
    )
    accused_claim = result(W[0], hw="x" * 256, outputs=big[::-1], nonce=2**64 - 1)
    agreeing = tuple(_env(result(W[i], hw="x" * 256, outputs=big, nonce=2**64 - 1)) for i in range(1, 9))
    data = _forge(
        accused_result=_env(accused_claim),
        agreeing_results=agreeing,
        accepted_output_digest=result(W[1], hw="x" * 256, outputs=big).output_digest,
    )
    assert len(data) <= MAX_EVIDENCE_SIZE
    assert (1 + MAX_EVIDENCE_RESULTS) * MAX_RESULT_ENVELOPE_SIZE + 1024 <= MAX_EVIDENCE_SIZE  # any schema-valid one
    assert EvidenceInbox().receive(data, NOW).strength is EvidenceStrength.DIGEST
    with pytest.raises(DecodeError) as info:
        EvidenceInbox().receive(data + bytes(MAX_EVIDENCE_SIZE - len(data) + 1), NOW)
    assert info.value.reason is Reason.TOO_LARGE


def test_two_reporters_of_one_cheater_are_both_counted() -> None:
    inbox = EvidenceInbox()
    assert inbox.receive(_evidence_bytes(), NOW).reporter == CLIENT.peer_id
    claims = [result(W[0], 9.0, client=OTHER_CLIENT)] + [result(W[i], client=OTHER_CLIENT) for i in (4, 5, 6)]
    status = feed(verifier(), *claims)
    assert isinstance(status, Accepted)
    [accusation] = status.verdict.accusations
    data = make_evidence(OTHER_CLIENT, accusation, id=b"\x06" * 16, nonce=1, expires_at=NOW + 60_000)
    assert inbox.receive(data, NOW).reporter == OTHER_CLIENT.peer_id
