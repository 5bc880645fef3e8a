"""Reputation scores, adaptive replication, spot checks, ranking, reports and rows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.reputation import (
    Outcome,
    PeerReputation,
    ReportEffect,
    Reputation,
    ReputationPolicy,
)
from p2pcompute.errors import ConfigError, Reason, StoreError

P = [KeyPair.from_seed(bytes([i + 40]) * 32).peer_id for i in range(8)]
JOB = b"\x07" * 32
NOW = 1_800_000_000_000


def trusted(rep: Reputation, peer: PeerId, streak: int) -> None:
    for i in range(streak):
        rep.record(peer, Outcome.VALID, NOW + i, flops=1_000)


def test_unknown_and_untrusted_workers_are_always_replicated() -> None:
    rep = Reputation()
    assert rep.replication_probability(P[0]) == 1.0
    trusted(rep, P[0], rep.policy.trust_streak - 1)
    assert rep.replication_probability(P[0]) == 1.0
    assert rep.should_replicate(P[0], 0.999999)


def test_replication_falls_with_the_streak_to_the_floor() -> None:
    rep = Reputation(ReputationPolicy(trust_streak=10, decay=2.0, min_replication=0.05))
    trusted(rep, P[0], 10)
    assert rep.replication_probability(P[0]) == 1.0
    trusted(rep, P[0], 10)  # streak 20
    assert rep.replication_probability(P[0]) == pytest.approx(0.25)
    assert rep.should_replicate(P[0], 0.2) and not rep.should_replicate(P[0], 0.3)
    trusted(rep, P[0], 30)  # streak 50
    assert rep.replication_probability(P[0]) == 0.05


@given(streaks=st.lists(st.integers(0, 500), min_size=2, max_size=2, unique=True))
def test_replication_probability_never_rises_with_the_streak(streaks: list[int]) -> None:
    lo, hi = sorted(streaks)
    rep = Reputation(peers=[PeerReputation(peer=P[0], streak=lo), PeerReputation(peer=P[1], streak=hi)])
    p_lo, p_hi = rep.replication_probability(P[0]), rep.replication_probability(P[1])
    assert rep.policy.min_replication <= p_hi <= p_lo <= 1.0


def test_invalid_result_resets_trust_and_flags() -> None:
    rep = Reputation()
    trusted(rep, P[0], 40)
    assert rep.replication_probability(P[0]) < 1.0
    rec = rep.record(P[0], Outcome.INVALID, NOW + 100)
    assert rec.streak == 0 and rec.flagged and rec.invalid == 1
    assert rec.score == -rep.policy.invalid_penalty
    assert rep.replication_probability(P[0]) == 1.0
    assert not rep.eligible(P[0])
    assert rec.last_seen == NOW + 100


def test_slow_to_earn_fast_to_lose() -> None:
    pol = ReputationPolicy()
    rep = Reputation(pol)
    trusted(rep, P[0], 10)
    assert rep.get(P[0]).score == 10 * pol.valid_gain
    rep.record(P[0], Outcome.INVALID, NOW)
    # one invalid result costs more than many valid ones earn
    assert rep.get(P[0]).score <= -pol.invalid_penalty < -10 * pol.valid_gain


def test_timeouts_and_walkaways_cost_score_but_keep_the_streak() -> None:
    rep = Reputation()
    trusted(rep, P[0], 12)
    rec = rep.record(P[0], Outcome.TIMEOUT, NOW)
    assert rec.streak == 12 and rec.timeout == 1 and rec.score == 12 - rep.policy.timeout_penalty
    rec = rep.record(P[0], Outcome.DECLINED_AFTER_ACCEPT, NOW)
    assert rec.declined_after_accept == 1 and rec.score == 12 - rep.policy.timeout_penalty - rep.policy.declined_penalty
    assert not rec.flagged


def test_spot_check_rate() -> None:
    rep = Reputation(ReputationPolicy(spot_check_rate=0.1))
    assert rep.spot_check(0.05) and not rep.spot_check(0.1)
    hits = sum(rep.spot_check(i / 1000) for i in range(1000))
    assert hits == 100


def test_rank_prefers_reputable_and_excludes_flagged() -> None:
    rep = Reputation()
    trusted(rep, P[1], 5)
    trusted(rep, P[2], 2)
    rep.record(P[3], Outcome.INVALID, NOW)
    rep.record(P[4], Outcome.TIMEOUT, NOW)
    assert rep.rank([P[0], P[4], P[3], P[2], P[5], P[1]]) == [P[1], P[2], P[0], P[5], P[4]]


def test_reports_weigh_less_than_own_observation() -> None:
    pol = ReputationPolicy(reports_to_flag=2)
    rep = Reputation(pol)
    trusted(rep, P[0], 30)
    assert rep.record_report(P[1], P[0], JOB, NOW) is ReportEffect.COUNTED
    rec = rep.get(P[0])
    assert rec.reports == 1 and rec.streak == 15 and rec.score == 30 - pol.report_penalty and not rec.flagged
    assert pol.report_penalty < pol.invalid_penalty
    assert rep.record_report(P[1], P[0], JOB, NOW) is ReportEffect.IGNORED_DUPLICATE
    assert rep.get(P[0]).reports == 1
    assert rep.record_report(P[2], P[0], JOB, NOW) is ReportEffect.COUNTED
    assert rep.get(P[0]).flagged


def test_reports_from_distrusted_reporters_are_ignored() -> None:
    rep = Reputation()
    rep.record(P[1], Outcome.INVALID, NOW)
    rep.record(P[2], Outcome.BAD_EVIDENCE, NOW)
    assert rep.get(P[2]).bad_evidence == 1 and rep.get(P[2]).score < 0
    for reporter in (P[1], P[2]):
        assert rep.record_report(reporter, P[0], JOB, NOW) is ReportEffect.IGNORED_DISTRUSTED_REPORTER
    assert not rep.known(P[0])


peer_reps = st.builds(
    PeerReputation,
    peer=st.sampled_from(P),
    score=st.floats(-1e6, 1e6),
    streak=st.integers(0, 10**6),
    valid=st.integers(0, 10**9),
    invalid=st.integers(0, 10**9),
    timeout=st.integers(0, 10**9),
    declined_after_accept=st.integers(0, 10**9),
    bad_evidence=st.integers(0, 10**9),
    reports=st.integers(0, 10**9),
    flagged=st.booleans(),
    last_seen=st.integers(0, 2**63 - 1),
)


@given(rec=peer_reps)
def test_rows_round_trip(rec: PeerReputation) -> None:
    assert PeerReputation.from_row(rec.to_row()) == rec
    assert Reputation(peers=[rec]).get(rec.peer) == rec


@pytest.mark.parametrize(
    "change",
    [{"peer": b"short"}, {"peer": "text"}, {"streak": -1}, {"score": "x"}, {"flagged": 2}, {"valid": True}],
)
def test_bad_rows_are_store_errors(change: dict[str, object]) -> None:
    row: dict[str, object] = dict(PeerReputation(peer=P[0]).to_row())
    row.update(change)
    with pytest.raises(StoreError) as info:
        PeerReputation.from_row(row)
    assert info.value.reason is Reason.STORE_FAILED
    row = dict(PeerReputation(peer=P[0]).to_row())
    del row["score"]
    with pytest.raises(StoreError):
        PeerReputation.from_row(row)


def test_the_table_is_bounded_and_forgets_the_longest_unseen_first() -> None:
    rep = Reputation(ReputationPolicy(max_peers=3))
    rep.record(P[0], Outcome.INVALID, NOW)  # flagged: kept longest
    for i, peer in enumerate(P[1:5]):
        rep.record(peer, Outcome.VALID, NOW + i, flops=1_000)
    assert len(rep) == 3
    assert rep.known(P[0]) and rep.known(P[4]) and rep.known(P[3])
    assert len(rep.rows()) == 3


@pytest.mark.parametrize(
    "kwargs",
    [{"valid_gain": -1.0}, {"report_penalty": 100.0}, {"min_replication": 1.5}, {"trust_streak": 0}, {"decay": 0.0}],
)
def test_policy_is_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ReputationPolicy(**kwargs)  # type: ignore[arg-type]


def test_only_checked_results_earn_trust() -> None:
    """Issue 10: a lone result nobody checked used to count as valid, so an undetected cheat raised its streak."""
    rep = Reputation()
    peer = KeyPair.from_seed(b"\x31" * 32).peer_id
    for i in range(50):
        rep.record(peer, Outcome.VALID, NOW + i)  # unchecked: flops 0
    assert rep.get(peer).streak == 0 and rep.get(peer).score == 0 and rep.checked_flops(peer) == 0
    assert rep.replication_probability(peer) == 1.0
    rep.record(peer, Outcome.VALID, NOW + 60, flops=5_000)
    assert rep.get(peer).streak == 1 and rep.checked_flops(peer) == 5_000


def test_a_flagged_peers_group_is_remembered_and_its_proven_work_lost() -> None:
    rep = Reputation()
    peer = KeyPair.from_seed(b"\x32" * 32).peer_id
    rep.record(peer, Outcome.VALID, NOW, flops=10**9, group="ip4:198.51.0.0/16")
    assert rep.checked_flops(peer) == 10**9 and rep.flagged_groups() == frozenset()
    rep.record(peer, Outcome.INVALID, NOW + 1, group="ip4:198.51.0.0/16")
    assert rep.checked_flops(peer) == 0
    assert rep.flagged_groups() == {"ip4:198.51.0.0/16"}
    again = Reputation(peers=[PeerReputation.from_row(r) for r in rep.rows()])  # persisted and loaded
    assert again.flagged_groups() == {"ip4:198.51.0.0/16"}
