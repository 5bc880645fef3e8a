"""Many tasks on many workers (core.cluster): the client's view of room on each worker, shard sizing, and a
deterministic simulation of hundreds of workers of different speeds that fail, answer busy and cheat, each task
verified by a real JobScheduler (p2pcompute.testing.simulate_cluster)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from p2pcompute.core.cluster import Capacity, CapacityPolicy, makespan, shard_sizes
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.matching import Candidate
from p2pcompute.core.scheduler import Launch, NeedCandidates
from p2pcompute.errors import ConfigError
from p2pcompute.testing.simulate import Behaviour, _advert, _Worker
from p2pcompute.testing.simulate_cluster import ClusterSimConfig, simulate_cluster
from tests.core.test_scheduler import WORKERS, candidates, only, scheduler


def candidate(slots: int, index: int = 0) -> Candidate:
    w = _Worker(KeyPair.from_seed(bytes([index + 50]) * 32), f"10.9.{index}.1", Behaviour.HONEST)
    advert = replace(_advert(w.pair, w.group), slots_total=slots, slots_free=slots)
    return Candidate(
        peer=w.peer, advert=advert, device=advert.devices[0], group=f"ip4:{w.group}", expected_ms=100, price=1
    )


def test_room_is_the_advertised_slots_and_a_queue_place_less_this_clients_tasks() -> None:
    capacity = Capacity()
    two = candidate(2)
    assert capacity.limit(two) == 3  # two slots and the one queue place a worker keeps beyond them
    assert capacity.free(two, 0) == 3
    for _ in range(3):
        capacity.take(two.peer)
    assert capacity.free(two, 0) == 0 and capacity.with_room([two], 0) == []
    capacity.release(two.peer, accepted=True)
    assert capacity.free(two, 0) == 1 and capacity.in_flight() == 2


def test_a_worker_without_a_queue_place_for_us_is_not_asked_to_queue_again() -> None:
    capacity = Capacity(CapacityPolicy(busy_hold_ms=0))
    one = candidate(1)
    assert capacity.limit(one) == 2
    capacity.busy(one.peer, 0, queued=False)  # busy with other clients' work: no conclusion about its queue
    assert capacity.limit(one) == 2
    capacity.busy(one.peer, 0, queued=True)  # it declined the task that asked for its queue place
    assert capacity.limit(one) == 1


def test_an_advert_claiming_many_slots_gets_no_more_than_the_cap() -> None:
    capacity = Capacity(CapacityPolicy(max_per_worker=3))
    greedy = candidate(1024)
    assert capacity.limit(greedy) == 3
    for _ in range(3):
        capacity.take(greedy.peer)
    assert capacity.free(greedy, 0) == 0


def test_busy_holds_a_worker_back_doubling_until_it_accepts() -> None:
    capacity = Capacity(CapacityPolicy(busy_hold_ms=100, max_busy_hold_ms=350, queue_places=0))
    one = candidate(1)
    assert capacity.busy(one.peer, 1_000) == 1_100
    assert capacity.free(one, 1_050) == 0 and capacity.next_change_ms(1_050) == 1_100
    assert capacity.free(one, 1_100) == 1
    assert capacity.busy(one.peer, 2_000) == 2_200  # twice as long
    assert capacity.busy(one.peer, 3_000) == 3_350  # capped
    capacity.take(one.peer)
    capacity.release(one.peer, accepted=True)  # it took a job: the next busy answer starts over
    assert capacity.busy(one.peer, 4_000) == 4_100


def test_a_busy_answer_is_not_a_failed_attempt() -> None:
    """on_busy forgets the worker for this job (it may be asked again later) and asks another; when none is
    left with room the runner is asked for candidates instead of the job failing."""
    s = scheduler()
    first = only(s.start(candidates(WORKERS[:2])), Launch)[0].candidate.peer
    actions = s.on_busy(first)
    second = only(actions, Launch)[0].candidate.peer
    assert second != first and first not in s.asked
    assert only(s.on_busy(second), NeedCandidates)
    again = only(s.offer(candidates(WORKERS[:2])), Launch)
    assert again  # the busy workers may be asked again, any number of times
    for _ in range(20):
        peer = only(s.asked and [Launch(c) for c in candidates(WORKERS[:2]) if c.peer in s.asked], Launch)[0]
        actions = s.on_busy(peer.candidate.peer)
        if not only(actions, Launch):
            actions = s.offer(candidates(WORKERS[:2]))
        assert only(actions, Launch) and not s.finished


@pytest.mark.parametrize("total", [1, 7, 100, 1000, 4097])
@pytest.mark.parametrize("granule", [1, 8])
def test_shards_cover_the_batch_in_granules(total: int, granule: int) -> None:
    speeds = [1.0, 2.5, 10.0, 3.0]
    sizes = shard_sizes(total, speeds, granule)
    assert sum(sizes) == total and all(n >= 0 for n in sizes)
    assert sum(1 for n in sizes if n % granule) <= 1  # at most one partial granule
    assert sizes == shard_sizes(total, speeds, granule)  # deterministic


def test_shards_sized_to_speed_finish_together() -> None:
    """Speeds 1x..10x: the makespan of the sized split is within 1.1x of the ideal (rows over total speed), where
    an equal split is bound by the slowest worker."""
    speeds = [float(s) for s in range(1, 11)]
    rows = 10_000
    ideal = rows / sum(speeds)
    sized = makespan(shard_sizes(rows, speeds), speeds)
    equal = makespan([rows // len(speeds)] * len(speeds), speeds)
    assert sized <= 1.1 * ideal
    assert equal > 5 * ideal
    rng = random.Random(3)
    for _ in range(50):
        speeds = [rng.uniform(1, 10) for _ in range(rng.randint(1, 30))]
        rows = rng.randint(len(speeds) * 20, 50_000)
        assert makespan(shard_sizes(rows, speeds), speeds) <= 1.1 * rows / sum(speeds) + max(1 / s for s in speeds)


def test_shard_sizes_refuse_nonsense() -> None:
    with pytest.raises(ConfigError):
        shard_sizes(10, [])
    with pytest.raises(ConfigError):
        shard_sizes(10, [1.0, 0.0])
    with pytest.raises(ConfigError):
        shard_sizes(-1, [1.0])


def test_hundreds_of_workers_every_task_done_within_limits() -> None:
    """300 workers of speeds 1x..10x with 1-4 slots: every task done once, verified, never over a worker's limit;
    placing by earliest finish keeps the slow workers from holding up the tail."""
    config = ClusterSimConfig(workers=300, tasks=1200, seed=1)
    report = simulate_cluster(config)
    assert report.done == 1200 and report.failed == 0
    assert report.over_limit == 0 and report.wrong_accepted == 0
    assert report.placements == 1200  # one verified run each: every task fits the full check
    anywhere = simulate_cluster(replace(config, placement=False))  # any worker with room
    assert anywhere.done == 1200
    assert report.makespan < 0.75 * anywhere.makespan


def test_failures_busy_answers_and_cheats_lose_no_task() -> None:
    """5% of placements die mid-task, 10% are answered busy, 30 of 300 workers cheat on every result: every task
    is placed again until it is done and verified; no wrong result is accepted; every cheater that served a
    result and no honest worker is flagged; a busy answer never fails a task."""
    config = ClusterSimConfig(workers=300, tasks=800, seed=2, fail_rate=0.05, busy_rate=0.10, cheaters=30)
    report = simulate_cluster(config)
    assert report.deaths > 20 and report.busy > 50
    assert report.done == 800 and report.failed == 0
    assert report.wrong_accepted == 0 and report.over_limit == 0
    assert report.cheaters_served >= 25  # (placing by speed may leave a slow one without work)
    assert report.cheaters_flagged == report.cheaters_served and report.honest_flagged == 0


def test_the_cluster_simulation_is_deterministic() -> None:
    config = ClusterSimConfig(workers=50, tasks=200, seed=5, fail_rate=0.05, busy_rate=0.05, cheaters=5)
    assert simulate_cluster(config).summary() == simulate_cluster(config).summary()


def test_placeable_leaves_a_slow_worker_idle_at_the_tail_but_spreads_work_when_many_wait() -> None:
    capacity = Capacity(CapacityPolicy(queue_places=0))
    fast, slow = replace(candidate(1, 1), expected_ms=100), replace(candidate(1, 2), expected_ms=1_000)
    capacity.take(fast.peer, 0, 100)  # the fast one is busy until 100 ms
    assert capacity.placeable([fast, slow], 50, backlog=1) == []  # the last task waits for the fast worker
    assert capacity.placeable([fast, slow], 50, backlog=20) == [slow]  # many wait: the slow one helps
    capacity.release(fast.peer, accepted=True)
    both = capacity.placeable([fast, replace(slow, expected_ms=150)], 0, backlog=1)
    assert len(both) == 2  # comparable workers (within 1 + slack) both take work
