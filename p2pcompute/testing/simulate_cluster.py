"""A deterministic simulation of many tasks on many workers: the client's placement (``core.cluster.Capacity``) and
verification (one real ``core.scheduler.JobScheduler`` per task) under time, with workers of different speeds and
slots that fail, answer busy, or cheat.

Discrete events, no network, no torch, no clock: a task's run on a worker takes ``flops / speed`` time units plus
``overhead``; a worker may die mid-task (``fail_rate``: it answers with a failure after half the run and is gone
for ``down_for``), answer busy (``busy_rate``: its slots are taken by another client), or cheat (``cheaters``
workers fake one node of every result; a full check covers every node, so each is caught). The real scheduler, a
real :class:`Capacity` and a real :class:`Reputation` decide everything; the simulation only moves time.

It measures what ``client.map`` promises: every task done (re-placed after a failure, never failed for busy),
never more in flight on a worker than its limit, no wrong result accepted, and the makespan against the ideal
(every slot busy to the end: tasks over the sum of each slot's task rate).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field, replace
from typing import Any

from p2pcompute.core.cluster import Capacity, CapacityPolicy
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.matching import Candidate
from p2pcompute.core.reputation import Outcome, Reputation
from p2pcompute.core.scheduler import (
    Abandon,
    Action,
    Bisect,
    Check,
    CheckOutcome,
    Done,
    JobScheduler,
    Launch,
    NeedCandidates,
    Record,
    ReputationTrust,
    SchedulerPolicy,
    Settle,
    TaskFacts,
)
from p2pcompute.core.verification import ComparisonMode
from p2pcompute.testing.simulate import NOW, Behaviour, _advert, _claim, _Worker

__all__ = ["ClusterSimConfig", "ClusterSimReport", "simulate_cluster"]


@dataclass(frozen=True, slots=True)
class ClusterSimConfig:
    workers: int = 200
    tasks: int = 2000
    seed: int = 0
    speeds: tuple[float, float] = (1.0, 10.0)  # each worker's speed, uniform in this range (work units per time)
    speed_list: tuple[float, ...] = ()  # when given, worker i's speed is speed_list[i % len] (instead of a draw)
    slots: tuple[int, int] = (1, 4)  # each worker's advertised slots, uniform in this range
    flops: float = 10.0  # work units per task
    overhead: float = 0.5  # time per placement besides the run (negotiation, transfers, checks)
    fail_rate: float = 0.0  # a placement on which the worker dies mid-task
    down_for: float = 50.0  # how long a dead worker stays away
    busy_rate: float = 0.0  # a placement the worker declines busy (another client's work)
    cheaters: int = 0  # workers that fake a node of every result
    retries: int = 2  # a task abandoned by its scheduler is placed again this many times
    placement: bool = True  # Capacity.placeable (earliest finish); False: any worker with room
    capacity: CapacityPolicy = field(default_factory=lambda: CapacityPolicy(queue_places=0))  # no queues simulated
    policy: SchedulerPolicy = field(default_factory=SchedulerPolicy)


@dataclass
class ClusterSimReport:
    tasks: int = 0
    done: int = 0
    failed: int = 0
    wrong_accepted: int = 0
    placements: int = 0
    busy: int = 0
    deaths: int = 0
    replaced: int = 0  # tasks placed again after their scheduler gave up
    over_limit: int = 0  # launches beyond a worker's limit (must stay 0)
    cheaters_flagged: int = 0
    cheaters_served: int = 0  # cheaters that returned at least one result
    honest_flagged: int = 0
    makespan: float = 0.0
    ideal: float = 0.0
    busy_time: float = 0.0  # slot-time spent running placements
    slot_time: float = 0.0  # total slots x makespan

    @property
    def ratio(self) -> float:
        return self.makespan / self.ideal if self.ideal else float("nan")

    @property
    def utilisation(self) -> float:
        return self.busy_time / self.slot_time if self.slot_time else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "done": self.done,
            "failed": self.failed,
            "wrong_accepted": self.wrong_accepted,
            "placements": self.placements,
            "busy_answers": self.busy,
            "deaths": self.deaths,
            "replaced": self.replaced,
            "over_limit": self.over_limit,
            "cheaters_flagged": self.cheaters_flagged,
            "cheaters_served": self.cheaters_served,
            "honest_flagged": self.honest_flagged,
            "makespan": round(self.makespan, 3),
            "ideal": round(self.ideal, 3),
            "makespan_over_ideal": round(self.ratio, 4),
            "utilisation": round(self.utilisation, 4),
        }


@dataclass
class _SimWorker:
    base: _Worker
    speed: float
    slots: int
    cheat: bool
    down_until: float = 0.0
    results: int = 0
    candidate: Candidate | None = None


@dataclass
class _Task:
    index: int
    digest: bytes
    scheduler: JobScheduler | None = None
    tries: int = 0
    waiting: bool = False  # its scheduler asked for candidates and none had room
    answers: dict[PeerId, bool] = field(default_factory=dict)  # peer -> its result was true


def simulate_cluster(config: ClusterSimConfig) -> ClusterSimReport:
    """Run ``config.tasks`` tasks through real schedulers over simulated time; deterministic for a seed."""
    rng = random.Random(config.seed)
    reputation = Reputation()
    capacity = Capacity(config.capacity)
    report = ClusterSimReport(tasks=config.tasks)
    workers: dict[PeerId, _SimWorker] = {}
    for i in range(config.workers):
        pair = KeyPair.from_seed(hashlib.sha256(f"cluster {config.seed}/{i}".encode()).digest())
        group = f"10.{i // 250}.{i % 250}.1"
        slots = rng.randint(*config.slots)
        speed = rng.uniform(*config.speeds)  # drawn even when a speed_list overrides it: the same rng sequence
        if config.speed_list:
            speed = config.speed_list[i % len(config.speed_list)]
        w = _SimWorker(_Worker(pair, group, Behaviour.HONEST), speed, slots, cheat=i < config.cheaters)
        advert = replace(_advert(pair, group), slots_total=slots, slots_free=slots)
        w.candidate = Candidate(
            peer=pair.peer_id,
            advert=advert,
            device=advert.devices[0],
            group=f"ip4:{group}",
            expected_ms=max(1, int(1000 * (config.overhead + config.flops / speed))),
            price=1,
        )
        workers[pair.peer_id] = w
    trust = ReputationTrust(reputation)
    rate = sum(
        capacity.limit(w.candidate) / (config.overhead + config.flops / w.speed)
        for w in workers.values()
        if w.candidate is not None
    )
    report.ideal = config.tasks / rate
    report.slot_time = 0.0
    events: list[tuple[float, int, str, int, int, PeerId]] = []
    seq = 0
    now = 0.0
    tasks = [_Task(i, hashlib.sha256(f"task {config.seed}/{i}".encode()).digest()) for i in range(config.tasks)]
    queue = list(range(config.tasks))  # tasks not yet started, in order
    queue.reverse()
    waiting: list[int] = []  # started tasks whose scheduler waits for room
    finished = 0

    def push(at: float, kind: str, task: _Task, peer: PeerId) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, task.index, task.tries, peer))

    def with_room() -> list[Candidate]:
        ms = int(now * 1000)
        alive = [w.candidate for w in workers.values() if w.candidate is not None and w.down_until <= now]
        eligible = [c for c in alive if reputation.eligible(c.peer)]
        if not config.placement:
            return capacity.with_room(eligible, ms)
        return capacity.placeable(eligible, ms, backlog=max(1, len(queue) + len(waiting)))

    def facts(task: _Task) -> TaskFacts:
        return TaskFacts(
            digest=task.digest,
            flops=int(config.flops * 1e9),
            nodes=6,
            trace_bytes=1 << 20,
            check_flops=int(config.flops * 5e7),
            mode=ComparisonMode.EXACT,
        )

    def do(task: _Task, actions: list[Action]) -> None:
        nonlocal finished
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            scheduler = task.scheduler
            assert scheduler is not None
            if isinstance(action, Launch):
                peer = action.candidate.peer
                w = workers[peer]
                if capacity.free(action.candidate, int(now * 1000)) < 1:
                    # chosen from candidates that had room when the scheduler got them: full now, so it is
                    # handed back like a busy answer, without asking the worker (what the client's runner does)
                    pending.extend(scheduler.on_busy(peer))
                    continue
                if capacity.in_flight(peer) >= capacity.limit(action.candidate):
                    report.over_limit += 1
                capacity.take(peer, int(now * 1000), action.candidate.expected_ms)
                report.placements += 1
                roll = rng.random()
                if roll < config.busy_rate:
                    report.busy += 1
                    capacity.release(peer, accepted=False)
                    capacity.busy(peer, int(now * 1000))
                    push(now + 0.01, "busy", task, peer)
                elif roll < config.busy_rate + config.fail_rate:
                    report.deaths += 1
                    w.down_until = now + config.overhead + config.flops / w.speed / 2 + config.down_for
                    push(now + config.overhead + config.flops / w.speed / 2, "died", task, peer)
                else:
                    run = config.overhead + config.flops / w.speed
                    report.busy_time += run
                    push(now + run, "result", task, peer)
            elif isinstance(action, Check):
                true = task.answers[action.peer]
                outcome = CheckOutcome(ok=true, flops=int(config.flops * 5e7), node=None if true else 5, detail="sim")
                pending.extend(scheduler.on_check(action.peer, outcome))
            elif isinstance(action, Bisect):
                for peer in (action.first, action.second):
                    true = task.answers[peer]
                    outcome = CheckOutcome(ok=true, flops=1, node=None if true else 5, detail="bisected")
                    pending.extend(scheduler.on_check(peer, outcome))
            elif isinstance(action, Settle):
                if action.peer in task.answers:  # answered: its slot is free once settled
                    capacity.release(action.peer, accepted=True)
            elif isinstance(action, Record):
                known = workers[action.peer].candidate
                group = known.group if known is not None else ""
                reputation.record(action.peer, action.outcome, NOW + int(now * 1000), flops=action.flops, group=group)
            elif isinstance(action, NeedCandidates):
                room = [c for c in with_room() if c.peer not in scheduler.asked]
                if room:
                    pending.extend(scheduler.offer(room))
                elif not task.waiting:
                    task.waiting = True
                    waiting.append(task.index)
            elif isinstance(action, Done):
                accepted = action.verdict.accepted
                if accepted is not None and accepted.key != b"truth":
                    report.wrong_accepted += 1
                report.done += 1
                finished += 1
            elif isinstance(action, Abandon):
                if task.tries < config.retries:
                    task.tries += 1
                    report.replaced += 1
                    task.scheduler = None
                    task.answers.clear()
                    queue.append(task.index)
                else:
                    report.failed += 1
                    finished += 1

    def start(task: _Task) -> bool:
        room = with_room()
        if not room:
            return False
        task.scheduler = JobScheduler(
            facts=facts(task),
            policy=config.policy,
            trust=trust,
            rng=rng,
            agree=lambda a, b: a.key == b.key,
        )
        do(task, task.scheduler.start(room))
        return True

    def pump() -> None:
        # first the started tasks waiting for room, then new ones, while any worker has room
        while waiting and with_room():
            task = tasks[waiting.pop(0)]
            task.waiting = False
            scheduler = task.scheduler
            if scheduler is None or scheduler.finished:
                continue
            room = [c for c in with_room() if c.peer not in scheduler.asked]
            if room:
                do(task, scheduler.offer(room))
            else:
                do(task, scheduler.give_up())
        while queue and with_room():
            if not start(tasks[queue[-1]]):
                break
            queue.pop()

    pump()
    while finished < config.tasks:
        if not events:
            # nothing running: wait for the next worker to come back or a busy hold to end
            later = [w.down_until for w in workers.values() if w.down_until > now]
            hold = capacity.next_change_ms(int(now * 1000))
            if hold is not None:
                later.append(hold / 1000)
            if not later:
                break
            now = min(later) + 1e-6
            pump()
            continue
        at, _, kind, index, generation, peer = heapq.heappop(events)
        now = at
        task = tasks[index]
        scheduler = task.scheduler
        stale = generation != task.tries or scheduler is None or peer not in scheduler.asked
        if stale or scheduler is None or scheduler.finished:
            if kind in ("result", "died") and (stale or peer not in task.answers):
                capacity.release(peer, accepted=True)  # cancelled while it ran: its slot frees when it ends
            pump()
            continue
        w = workers[peer]
        if kind == "result":
            true = not w.cheat
            w.results += 1
            task.answers[peer] = true
            value = b"truth" if true else hashlib.sha256(b"wrong" + task.digest).digest()
            do(task, scheduler.on_result(peer, _claim(w.base, task.digest, value), traced=True))
        elif kind == "died":
            capacity.release(peer, accepted=True)
            do(task, scheduler.on_failure(peer, Outcome.DECLINED_AFTER_ACCEPT, after_accept=True))
        elif kind == "busy":
            do(task, scheduler.on_busy(peer))
        pump()
    report.makespan = now
    report.slot_time = now * sum(capacity.limit(w.candidate) for w in workers.values() if w.candidate is not None)
    report.cheaters_served = sum(1 for w in workers.values() if w.cheat and w.results)
    for w in workers.values():
        if not reputation.eligible(w.base.peer):
            if w.cheat:
                report.cheaters_flagged += 1
            else:
                report.honest_flagged += 1
    return report
