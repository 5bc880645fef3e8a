"""The client's verification scheduler (core.scheduler): its decisions step by step, and a deterministic simulation
of hundreds of workers with each adversary of issue 10 (p2pcompute.testing.simulate)."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.matching import Candidate
from p2pcompute.core.reputation import Outcome, Reputation
from p2pcompute.core.scheduler import (
    Abandon,
    Accuse,
    Action,
    Bisect,
    Check,
    CheckLevel,
    CheckOutcome,
    Done,
    JobScheduler,
    Launch,
    Record,
    SchedulerPolicy,
    Settle,
    TaskFacts,
)
from p2pcompute.core.verification import ComparisonMode
from p2pcompute.testing.simulate import NOW, Behaviour, SimConfig, _advert, _claim, _Trust, _Worker, simulate

JOB = hashlib.sha256(b"scheduled job").digest()
TRUTH, WRONG = b"truth", b"wrong"
WORKERS = [_Worker(KeyPair.from_seed(bytes([i + 1]) * 32), f"10.0.{i}.1", Behaviour.HONEST) for i in range(8)]


def facts(trace_bytes: int = 1 << 20, flops: int = 10**9) -> TaskFacts:
    return TaskFacts(
        digest=JOB, flops=flops, nodes=6, trace_bytes=trace_bytes, check_flops=flops // 20, mode=ComparisonMode.EXACT
    )


def candidates(workers: list[_Worker] = WORKERS) -> list[Candidate]:
    return [
        Candidate(
            peer=w.peer, advert=_advert(w.pair, w.group), device=_advert(w.pair, w.group).devices[0],
            group=f"ip4:{w.group}", expected_ms=100, price=1000,
        )
        for w in workers
    ]  # fmt: skip


def scheduler(reputation: Reputation | None = None, **kw: object) -> JobScheduler:
    return JobScheduler(
        facts=kw.pop("facts", facts()),  # type: ignore[arg-type]
        policy=kw.pop("policy", SchedulerPolicy()),  # type: ignore[arg-type]
        trust=_Trust(reputation or Reputation()),
        rng=random.Random(kw.pop("seed", 1)),  # type: ignore[arg-type]
        agree=lambda a, b: a.key == b.key,
        **kw,  # type: ignore[arg-type]
    )


def worker_of(peer: PeerId) -> _Worker:
    return next(w for w in WORKERS if w.peer == peer)


def only(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def result(s: JobScheduler, peer: PeerId, value: bytes = TRUTH, traced: bool = True) -> list[Action]:
    return s.on_result(peer, _claim(worker_of(peer), JOB, value), traced=traced)


def test_a_job_within_the_check_budget_runs_once_and_is_checked_in_full() -> None:
    s = scheduler()
    (launch,) = s.start(candidates())
    assert isinstance(launch, Launch) and s.plan is not None
    assert s.plan.level is CheckLevel.FULL and s.plan.quorum == 1
    peer = launch.candidate.peer
    assert result(s, peer) == [Check(peer, None)]
    actions = s.on_check(peer, CheckOutcome(ok=True, flops=123, bytes=456))
    assert Record(peer, Outcome.VALID, 10**9) in actions  # checked work earns trust, by its flops
    assert Settle(peer, pay=True) in actions
    (done,) = only(actions, Done)
    assert done.verdict.accepted is not None and done.verdict.accepted.worker == peer
    assert (done.check_flops, done.check_bytes) == (123, 456)
    assert s.finished


def test_a_failed_check_rejects_accuses_and_asks_another() -> None:
    s = scheduler()
    (first,) = s.start(candidates())
    bad = first.candidate.peer
    result(s, bad, WRONG)
    actions = s.on_check(bad, CheckOutcome(ok=False, node=5, detail="freivalds", evidence="draft"))
    assert Settle(bad, pay=False, reason="check_failed", detail="node 5: freivalds") in actions
    assert Record(bad, Outcome.INVALID) in actions
    assert Accuse(bad, check="draft") in actions
    (again,) = only(actions, Launch)
    good = again.candidate.peer
    assert good != bad
    result(s, good)
    (done,) = only(s.on_check(good, CheckOutcome(ok=True)), Done)
    assert done.verdict.accepted is not None and done.verdict.accepted.worker == good


def test_a_result_without_its_trace_is_refused_without_evidence() -> None:
    s = scheduler()
    (first,) = s.start(candidates())
    peer = first.candidate.peer
    actions = result(s, peer, traced=False)
    assert Settle(peer, pay=False, reason="trace_refused", detail="the result commits to no trace") in actions
    assert Record(peer, Outcome.DECLINED_AFTER_ACCEPT) in actions
    assert not only(actions, Accuse)
    assert len(only(actions, Launch)) == 1


def test_over_budget_an_unproven_worker_is_replicated_with_a_probation_partner() -> None:
    reputation = Reputation()
    proven = WORKERS[0]
    reputation.record(proven.peer, Outcome.VALID, NOW, flops=10**12, group=f"ip4:{proven.group}")
    s = scheduler(reputation, facts=facts(trace_bytes=1 << 40), seed=3)
    launches = only(s.start(candidates()), Launch)
    assert s.plan is not None and s.plan.level is CheckLevel.SAMPLE
    assert launches[0].candidate.peer == proven.peer  # unchecked work goes to proven workers first
    if s.plan.quorum == 2:
        assert reputation.checked_flops(launches[1].candidate.peer) == 0  # the extra replica: a probation worker


def test_over_budget_nobody_proven_means_two_replicas() -> None:
    s = scheduler(facts=facts(trace_bytes=1 << 40))
    launches = only(s.start(candidates()), Launch)
    assert s.plan is not None and s.plan.quorum == 2 and len(launches) == 2
    assert launches[0].candidate.group != launches[1].candidate.group


def test_a_lone_sampled_result_is_paid_but_earns_only_its_checked_share() -> None:
    reputation = Reputation()
    for w in WORKERS:
        reputation.record(w.peer, Outcome.VALID, NOW, flops=10**15)
        for i in range(200):
            reputation.record(w.peer, Outcome.VALID, NOW + i, flops=10**9)
    s = scheduler(reputation, facts=facts(trace_bytes=1 << 40), seed=5, policy=SchedulerPolicy(spot_check_rate=0.0))
    (launch,) = s.start(candidates())
    assert s.plan is not None and s.plan.quorum == 1
    peer = launch.candidate.peer
    (check,) = result(s, peer)
    assert isinstance(check, Check) and check.nodes is not None and 5 in check.nodes  # sampled, output included
    actions = s.on_check(peer, CheckOutcome(ok=True))
    assert Settle(peer, pay=True) in actions
    (record,) = only(actions, Record)
    assert record.flops == 10**9 * len(check.nodes) // 6  # a sampled check earns only the sampled share


def test_disagreement_is_bisected_and_the_faker_retracted() -> None:
    s = scheduler(facts=facts(trace_bytes=1 << 40), policy=SchedulerPolicy(spot_check_rate=0.0))
    a, b = (launch.candidate.peer for launch in only(s.start(candidates()), Launch))
    (check,) = result(s, a, TRUTH)
    assert isinstance(check, Check) and check.peer == a and check.nodes is not None
    s.on_check(a, CheckOutcome(ok=True))
    result(s, b, WRONG)
    actions = s.on_check(b, CheckOutcome(ok=True))  # the sample missed b's faked node
    assert actions == [Bisect(a, b)]
    assert s.on_check(a, CheckOutcome(ok=True)) == []
    actions = s.on_check(b, CheckOutcome(ok=False, node=2, detail="recomputed"))
    assert Record(b, Outcome.INVALID) in actions and Accuse(b, check=None) in actions
    (more,) = only(actions, Launch)  # a's result still needs a second agreeing one
    c = more.candidate.peer
    result(s, c, TRUTH)
    actions = s.on_check(c, CheckOutcome(ok=True))
    (done,) = only(actions, Done)
    assert set(done.verdict.agreeing_workers) == {a, c}
    assert Record(a, Outcome.VALID, 10**9) in actions  # corroborated by another worker: trust earned


def test_a_flagged_group_gets_no_unchecked_work() -> None:
    reputation = Reputation()
    cheater, newcomer = WORKERS[0], _Worker(KeyPair.from_seed(b"\x77" * 32), WORKERS[0].group, Behaviour.SYBIL)
    reputation.record(cheater.peer, Outcome.INVALID, NOW, group=f"ip4:{cheater.group}")
    reputation.record(newcomer.peer, Outcome.VALID, NOW, flops=10**15, group=f"ip4:{newcomer.group}")
    s = scheduler(reputation, facts=facts(trace_bytes=1 << 40))
    assert not s._proven(candidates([newcomer])[0])


def test_every_worker_gone_is_no_workers() -> None:
    s = scheduler()
    (first,) = s.start(candidates(WORKERS[:1]))
    actions = s.on_failure(first.candidate.peer, Outcome.TIMEOUT, after_accept=True)
    assert Record(first.candidate.peer, Outcome.TIMEOUT) in actions
    assert actions[-1].__class__.__name__ == "NeedCandidates"
    (abandon,) = only(s.give_up(), Abandon)
    assert "no further eligible worker" in str(abandon.error)


# --- the simulation -----------------------------------------------------------------------------------------------

GOAL_WRONG = 0.001
GOAL_COMPUTE = 1.3
GOAL_CLEAN = 1.10


@pytest.mark.parametrize(
    "config",
    [
        SimConfig(behaviour=Behaviour.SLEEPER, honest_jobs=15),
        SimConfig(behaviour=Behaviour.SLEEPER, honest_jobs=45),
        SimConfig(behaviour=Behaviour.RING),
        SimConfig(behaviour=Behaviour.RING, unreplicated_rate=0.1),
        SimConfig(behaviour=Behaviour.SYBIL),
        SimConfig(behaviour=Behaviour.SYBIL, new_group=True),
        SimConfig(workers=300, adversaries=90, behaviour=Behaviour.SLEEPER, honest_jobs=2, jobs=1000),
    ],
    ids=lambda c: f"{c.behaviour.value}-{c.workers}w-k{c.honest_jobs}-u{c.unreplicated_rate}-g{int(c.new_group)}",
)
def test_patient_adversaries_at_30_percent_get_nothing_through(config: SimConfig) -> None:
    report = simulate(config)
    assert report.accepted == config.jobs and report.honest_flagged == 0
    assert report.wrong_rate <= GOAL_WRONG, report.summary()
    assert report.compute() <= GOAL_COMPUTE, report.summary()
    if report.cheats:
        assert report.caught, "whoever cheated was caught"
    if config.behaviour is Behaviour.SYBIL:
        # each fresh key cheats at most once before it is flagged again: re-entry buys one wasted job
        assert report.cheated_after_reentry <= report.reentries


def test_clean_steady_state_overhead() -> None:
    report = simulate(SimConfig(behaviour=Behaviour.HONEST, adversaries=0, jobs=500, decline_rate=0.05))
    assert report.wrong_accepted == 0 and report.failed == 0
    assert report.compute(len(report.per_job) // 2) <= GOAL_CLEAN, report.summary()


def test_over_budget_a_random_faked_node_is_caught_by_sampling_and_bisection() -> None:
    """Jobs too big to check in full: replication, sampled nodes, bisection. Wrong results may slip through
    while a ring is unobserved, but every cheat that meets an honest replica is caught, and nobody honest is
    flagged."""
    report = simulate(
        SimConfig(behaviour=Behaviour.SLEEPER, trace_bytes=1 << 40, fake_last_node=False, jobs=600, seed=4)
    )
    assert report.honest_flagged == 0
    assert len(report.caught) == 3, report.summary()
    assert report.wrong_rate <= 0.01, report.summary()


def test_the_simulation_is_deterministic() -> None:
    config = SimConfig(behaviour=Behaviour.RING, unreplicated_rate=0.1, jobs=200, seed=9)
    assert simulate(config).summary() == simulate(config).summary()
