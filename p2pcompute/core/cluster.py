"""Many tasks on many workers: the client's view of free capacity and the sizing of shards (sans-I/O).

specs/verification.md §13. Each task is verified by its own :class:`~p2pcompute.core.scheduler.JobScheduler`
(the same policy as one ``client.run``); what this module adds is *where there is room*:

:class:`Capacity`
    How many of this client's tasks each worker may hold at once: the slots its advert offers plus ``queue_places``
    (a worker admits one queued job beyond its slots: negotiation.md §7 rule 5; it waits for an executor, so the
    worker never idles between one job's receipt and the next one's admission), capped by ``max_per_worker`` (a
    worker that claims 1,000 slots gets no more than a few tasks at a time), minus the tasks of this client in
    flight there. A worker that declines ``busy`` (its slots are taken by other clients) is held back for a while
    that doubles with each busy answer in a row and resets when it accepts; one that declines a queued task (this
    client held its slots' worth there) gets no queued task again. A task is launched only on a worker with room;
    the rest wait in the client, so a batch never fails for "busy".
:meth:`Capacity.placeable`
    Which workers with room should take a task *now*, given how many tasks wait (``backlog``): each waiting task,
    in turn, would go where it finishes first (the worker's expected run time after its next free slot: earliest
    finish time, list scheduling); with that schedule's finishing time ``T`` for the last waiting task, a worker
    with room takes a task now only if it would finish one by ``T``, or within ``(1 + slack)`` times the best
    finish of any (so that with one task waiting, work still spreads over comparable workers). With many tasks
    waiting every useful slot is used; at the tail of a batch a worker ten times slower than a busy fast one is
    left idle rather than given the last task.
:func:`shard_sizes`
    Splits a batch of ``total`` rows over workers in proportion to their measured speed, in whole ``granule`` s, so
    that all shards finish at about the same time; :func:`makespan` is the finishing time of such a split.

Time is an argument (milliseconds); nothing here does I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from p2pcompute.core.identity import PeerId
from p2pcompute.core.matching import Candidate
from p2pcompute.errors import ConfigError

__all__ = ["Capacity", "CapacityPolicy", "makespan", "shard_sizes"]

MAX_BACKLOG = 1024  # placeable schedules at most this many waiting tasks (beyond, every useful slot is used anyway)


@dataclass(frozen=True, slots=True)
class CapacityPolicy:
    """Parameters (defaults in specs/verification.md §13)."""

    max_per_worker: int = 8  # tasks of this client in flight on one worker, whatever its advert claims
    queue_places: int = 1  # tasks beyond the advertised slots (the worker queues them; the spec's reference depth)
    busy_hold_ms: int = 1_000  # a worker that answered busy is not asked again for this long ...
    max_busy_hold_ms: int = 16_000  # ... doubling with each busy answer in a row, up to this
    slack: float = 1.0  # placeable: a worker with room may finish up to (1 + slack) x later than the best finish

    def __post_init__(self) -> None:
        if self.max_per_worker < 1 or self.queue_places < 0:
            raise ConfigError("max_per_worker must be at least 1 and queue_places not negative")
        if not 0 <= self.busy_hold_ms <= self.max_busy_hold_ms:
            raise ConfigError("need 0 <= busy_hold_ms <= max_busy_hold_ms")
        if self.slack < 0:
            raise ConfigError("slack must not be negative")


@dataclass
class Capacity:
    """Tasks of this client in flight per worker, and the workers held back after a busy answer."""

    policy: CapacityPolicy = field(default_factory=CapacityPolicy)
    _in_flight: dict[PeerId, int] = field(default_factory=dict)
    _held_until: dict[PeerId, int] = field(default_factory=dict)
    _busy_in_a_row: dict[PeerId, int] = field(default_factory=dict)
    _ends: dict[PeerId, list[int]] = field(default_factory=dict)  # expected end (ms) of each task in flight
    _no_queue: set[PeerId] = field(default_factory=set)  # answered busy with only its slots taken by this client
    waiting: int = 0  # tasks of this client waiting for room (the runner counts them)

    def limit(self, candidate: Candidate) -> int:
        """The most tasks of this client ``candidate`` may hold at once."""
        queue = 0 if candidate.peer in self._no_queue else self.policy.queue_places
        return max(1, min(candidate.advert.slots_total + queue, self.policy.max_per_worker))

    def free(self, candidate: Candidate, now_ms: int) -> int:
        """Tasks ``candidate`` may take now (0 while it is held back after a busy answer)."""
        if self._held_until.get(candidate.peer, 0) > now_ms:
            return 0
        return max(0, self.limit(candidate) - self._in_flight.get(candidate.peer, 0))

    def with_room(self, candidates: Iterable[Candidate], now_ms: int) -> list[Candidate]:
        """The candidates that may take a task now, in the order given."""
        return [c for c in candidates if self.free(c, now_ms) > 0]

    def room(self, candidates: Iterable[Candidate], now_ms: int) -> int:
        """Tasks the given workers may take now, all together (each worker counted once)."""
        seen: dict[PeerId, int] = {}
        for c in candidates:
            seen[c.peer] = self.free(c, now_ms)
        return sum(seen.values())

    def in_flight(self, peer: PeerId | None = None) -> int:
        """Tasks in flight on ``peer`` (or on every worker)."""
        if peer is None:
            return sum(self._in_flight.values())
        return self._in_flight.get(peer, 0)

    def take(self, peer: PeerId, now_ms: int = 0, expected_ms: int = 0) -> None:
        """A task was launched on ``peer``, expected to take ``expected_ms`` from ``now_ms``."""
        self._in_flight[peer] = self._in_flight.get(peer, 0) + 1
        heapq.heappush(self._ends.setdefault(peer, []), now_ms + expected_ms)

    def release(self, peer: PeerId, *, accepted: bool) -> None:
        """A task on ``peer`` ended (answered, failed or cancelled); ``accepted``: the worker had taken the job."""
        left = self._in_flight.get(peer, 0) - 1
        ends = self._ends.get(peer)
        if ends:
            heapq.heappop(ends)  # the earliest expected end: which task ended is not known, nor needed
        if left > 0:
            self._in_flight[peer] = left
        else:
            self._in_flight.pop(peer, None)
            self._ends.pop(peer, None)
        if accepted:
            self._busy_in_a_row.pop(peer, None)
            self._held_until.pop(peer, None)

    def busy(self, peer: PeerId, now_ms: int, *, queued: bool = False) -> int:
        """``peer`` declined busy: hold it back; returns until when (ms). ``queued``: the task asked for one of its
        queue places (this client already held its slots' worth there): it has none for this client, and is not
        asked for one again."""
        if queued:
            self._no_queue.add(peer)
        row = self._busy_in_a_row.get(peer, 0) + 1
        self._busy_in_a_row[peer] = row
        hold = min(self.policy.max_busy_hold_ms, self.policy.busy_hold_ms << min(row - 1, 20))
        until = now_ms + hold
        self._held_until[peer] = until
        return until

    def placeable(self, candidates: Sequence[Candidate], now_ms: int, backlog: int = 1) -> list[Candidate]:
        """The candidates with room that should take a task now while ``backlog`` tasks wait (see the module
        docstring); never empty while any candidate has room and nobody busy would finish sooner."""
        workers = {c.peer: c for c in candidates}
        roomy = [c for c in workers.values() if self.free(c, now_ms) > 0]
        if not roomy:
            return []
        # each slot's next free time: now for a free slot, the expected end of a task in flight otherwise (a task
        # overdue by more than its expected time says nothing: that slot is left out)
        slots: list[tuple[int, int, int]] = []  # (next free ms, busy now, worker number)
        order = list(workers)
        for number, (peer, c) in enumerate(workers.items()):
            if self._held_until.get(peer, 0) > now_ms:
                continue
            run = max(1, c.expected_ms)
            free = self.free(c, now_ms)
            slots.extend((now_ms + run, 0, number) for _ in range(min(free, backlog)))
            for end in sorted(self._ends.get(peer, ()))[: max(0, backlog)]:
                if end + run >= now_ms:
                    slots.append((max(now_ms, end) + run, 1, number))
        if not slots:
            return roomy
        heapq.heapify(slots)
        first = slots[0][0]  # the earliest any waiting task could finish
        finish = first
        for _ in range(min(max(1, backlog), MAX_BACKLOG)):  # earliest-finish list scheduling of the backlog
            finish, busy, number = heapq.heappop(slots)
            heapq.heappush(slots, (finish + max(1, workers[order[number]].expected_ms), busy, number))
        # a free worker takes a task now when the schedule would use it (it finishes one by the last waiting
        # task's finish), or when it is within (1 + slack) of the best finish (work stays spread when few wait)
        bound = max(finish, now_ms + (1.0 + self.policy.slack) * (first - now_ms))
        return [c for c in roomy if now_ms + c.expected_ms <= bound]

    def next_change_ms(self, now_ms: int) -> int | None:
        """When the next hold ends (None: no worker is held back)."""
        later = [t for t in self._held_until.values() if t > now_ms]
        return min(later) if later else None


def shard_sizes(total: int, speeds: Sequence[float], granule: int = 1) -> list[int]:
    """Split ``total`` rows over workers of the given relative ``speeds`` (> 0), in multiples of ``granule``
    except the last non-empty shard, so that the shards finish at about the same time.

    The rows go out in whole granules by largest remainder of each worker's exact share (ties to the faster, then
    the earlier worker); a worker whose share rounds to nothing gets an empty shard (0). Deterministic."""
    if total < 0 or granule < 1:
        raise ConfigError("need total >= 0 and granule >= 1")
    if not speeds or any(not s > 0 for s in speeds):
        raise ConfigError("need at least one worker and every speed > 0")
    units, rest = divmod(total, granule)
    whole = units + (1 if rest else 0)  # granules to hand out; the last one may be partial
    weight = sum(speeds)
    exact = [whole * s / weight for s in speeds]
    counts = [int(e) for e in exact]
    order = sorted(range(len(speeds)), key=lambda i: (-(exact[i] - counts[i]), -speeds[i], i))
    for i in order[: whole - sum(counts)]:
        counts[i] += 1
    sizes = [c * granule for c in counts]
    if rest:  # one granule is short: take the shortfall from the largest shard (the one that finishes last)
        last = max(range(len(sizes)), key=lambda i: (sizes[i] / speeds[i], i))
        sizes[last] -= granule - rest
    return sizes


def makespan(sizes: Sequence[int], speeds: Sequence[float], overhead: float = 0.0) -> float:
    """When the last shard finishes: each worker runs its ``sizes[i]`` rows at ``speeds[i]`` rows per unit time,
    after ``overhead`` (a non-empty shard only)."""
    return max((overhead + n / s for n, s in zip(sizes, speeds, strict=True) if n > 0), default=0.0)
