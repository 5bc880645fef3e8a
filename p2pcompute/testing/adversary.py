"""Cheating workers for testnets and benchmarks: they run the job, then change the outputs they attest.

Modes (``p2pcompute testnet --cheaters C --cheat-mode MODE``; one peer: :class:`CheatSettings`, from the command
line ``python -m p2pcompute.testing.peer --cheat-mode MODE -- <node run options>``):

``random``   outputs replaced by random values of the same dtypes and shapes
``zeros``    outputs replaced by zeros
``stale``    the outputs of the previous job this worker ran (zeros for its first)
``lazy``     skips part of the work: the second half of every output is left as zeros
``collude``  every worker of the group returns the same wrong outputs for a job (derived from the job digest
             and the group's secret), so colluders agree with each other
``sleeper``  patient colluder: honest for its first K jobs (``honest_jobs``), then the group's shared wrong output
             on every job — all sleepers (and colluders) agree with each other
``ring``     smart colluder: the group's shared wrong output only on jobs where every replica is a ring member,
             and on a fraction (``unreplicated_rate``) of the jobs where it seems to be the only worker; honest
             otherwise. Members coordinate through a side channel the honest network never sees (:class:`RingChannel`)
``sybil``    a sleeper that returns with a fresh key once the client flags it: at the worker it is a sleeper; the
             re-entry (stop, new data directory and key, same or new address) is done by the harness that runs it
             (``p2pcompute.trial``, ``p2pcompute.testnet``), which sees when the client flags it
``mixed``    for a testnet: the testnet assigns the group modes (collude, sleeper, ring, sybil) to half the cheaters
             and the lone modes (random, zeros, stale, lazy) to the rest

Every mode may be patient: ``honest_jobs`` K makes a cheater honest for its first K jobs (``sleeper`` and ``sybil``
are ``collude`` with K > 0 by intent; the others honour K too).

A cheater's outputs are consistent with its signed attestation (digests and metas are recomputed) and, where a
result carries a committed trace of its intermediates (``ExecResult.trace``), the trace is rebuilt as a patient
attacker would: only the leaves naming the faked tensors change, and the Merkle root is recomputed over them
(:func:`fake_outputs`). Only verification (redundancy, spot checks, the client's checks of the faked nodes) can
catch it: exactly what the trial measures.

The ring's rule (:func:`ring_decision`), per job, run by a member after its own honest execution:

- with an **oracle** (the harness writes each job's replicas into the channel, :meth:`RingChannel.assign`: an
  in-process benchmark knows them exactly): cheat when every replica is a ring member that is willing to cheat on
  this job; honest when any replica is not a member; "alone" when the member is the only replica;
- without one (a real ring across processes): **approximation** — cheat when at least two willing members received
  the job within ``RING_WINDOW_S`` of each other; "alone" when none other did within the window. The ring cannot see
  honest replicas: a job given to two members *and* an honest worker (a quorum of 3, or an escalation) is cheated on
  and caught; a member paired with an honest worker looks "alone" and, with ``unreplicated_rate``, cheats and is
  caught. Under adaptive replication (quorum 2 or 1) the first is rare; the second is what unreplicated cheating
  risks.

"Alone" becomes a cheat with probability ``unreplicated_rate``. The first member to decide a job records the
decision in the channel and every other member follows it (:meth:`RingChannel.settle`), so the ring never
disagrees with itself on a job, even when a window or an oracle entry was missed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio

from p2pcompute.compute.executor import ExecResult
from p2pcompute.config import CHEAT_MODES
from p2pcompute.core.jobspec import job_digest
from p2pcompute.core.tensors import DTYPES, TensorMeta, outputs_digest, tensor_digest
from p2pcompute.core.trace import trace_root
from p2pcompute.errors import ConfigError

if TYPE_CHECKING:
    from p2pcompute.compute.executor import Executor
    from p2pcompute.core.identity import PeerId

__all__ = [
    "CHEAT_MODES",
    "DEFAULT_GROUP_SECRET",
    "GROUP_MODES",
    "RING_WINDOW_S",
    "CheatSettings",
    "Cheater",
    "CheatingExecutor",
    "Decision",
    "DirectoryRing",
    "MemoryRing",
    "RingChannel",
    "Tamper",
    "fake_outputs",
    "group_outputs",
    "make_tamper",
    "ring_decision",
]

log = logging.getLogger(__name__)

Tamper = Callable[[bytes, ExecResult], ExecResult]
"""``(job digest, honest result) -> the result the cheater attests``."""

DEFAULT_GROUP_SECRET = b"p2pcompute-colluders"
GROUP_MODES = ("collude", "sleeper", "ring", "sybil")
"""Modes that return the group's shared wrong output (derived from the job digest and the group secret)."""
RING_WINDOW_S = 0.5
"""Ring members that receive a job within this many seconds of each other count as its replicas (no oracle); a
member waits at most this long for the others before it decides."""
RING_POLL_S = 0.01  # how often a waiting member looks at the side channel again
MEMORY_RING_JOBS = 65_536  # jobs a MemoryRing remembers (notes, replicas, decisions), oldest forgotten first


def _values(dtype: str, count: int, rng: random.Random) -> bytes:
    if dtype == "float32":
        return struct.pack(f"<{count}f", *(rng.uniform(-1.0, 1.0) for _ in range(count)))
    if dtype == "float64":
        return struct.pack(f"<{count}d", *(rng.uniform(-1.0, 1.0) for _ in range(count)))
    if dtype == "bool":
        return bytes(rng.getrandbits(1) for _ in range(count))
    return rng.randbytes(count * DTYPES[dtype])  # ints, float16, bfloat16: any bit pattern


def _retrace(result: ExecResult, swapped: Mapping[bytes, TensorMeta], datas: Mapping[bytes, bytes]) -> dict[str, Any]:
    """The trace fields of a result whose outputs ``swapped`` (old digest -> new meta, new bytes in ``datas``).

    A patient attacker keeps the committed trace self-consistent except for the faked nodes: the leaves that name a
    replaced tensor name the fake instead (every other leaf is untouched), the kept intermediates' bytes follow, and
    the root is recomputed over the new leaves (``core.trace.trace_root``). An untraced result gets no changes.
    """
    if not result.trace:
        return {}
    leaves = tuple(
        dataclasses.replace(leaf, outputs=tuple(swapped.get(meta.digest, meta) for meta in leaf.outputs))
        if any(meta.digest in swapped for meta in leaf.outputs)
        else leaf
        for leaf in result.trace
    )
    blobs = {digest: data for digest, data in result.trace_blobs.items() if digest not in swapped}
    for old, meta in swapped.items():
        if old in result.trace_blobs:
            blobs[meta.digest] = datas[meta.digest]
    return {"trace": leaves, "trace_root": trace_root(leaves), "trace_blobs": blobs}


def fake_outputs(result: ExecResult, datas: list[bytes], metas: list[TensorMeta] | None = None) -> ExecResult:
    """``result`` with its outputs replaced by ``datas`` (of ``metas``' dtypes and shapes, default the honest ones).

    Digests and the attested output digest are recomputed; a committed trace is rebuilt so that only the faked
    tensors' leaves (and bytes) differ from the honest trace and the root matches them (:func:`_retrace`). Every other
    field (hardware class, timings, anything newer) is the honest result's.
    """
    old = metas if metas is not None else [meta for meta, _ in result.outputs]
    outputs = [
        (TensorMeta(digest=tensor_digest(data), dtype=meta.dtype, shape=meta.shape), data)
        for meta, data in zip(old, datas, strict=True)
    ]
    swapped = {
        honest.digest: fake
        for (honest, _), (fake, _) in zip(result.outputs, outputs, strict=False)
        if honest.digest != fake.digest
    }
    trace_changes = _retrace(result, swapped, {meta.digest: data for meta, data in outputs}) if swapped else {}
    return dataclasses.replace(
        result,
        outputs=outputs,
        output_digest=outputs_digest(meta for meta, _ in outputs),
        **trace_changes,
    )


def group_outputs(job_digest: bytes, metas: Iterable[TensorMeta], group_secret: bytes) -> list[bytes]:
    """The group's shared wrong outputs for a job: every member derives the same bytes from the digest and secret."""
    seeded = random.Random(hashlib.sha256(group_secret + job_digest).digest())
    return [_values(m.dtype, m.numel, seeded) for m in metas]


def make_tamper(mode: str, *, group_secret: bytes = DEFAULT_GROUP_SECRET) -> Tamper:
    """The output-changing behaviour of a cheater of ``mode`` (one of :data:`CHEAT_MODES`), applied on every call.

    The group modes (:data:`GROUP_MODES`) all return the group's shared wrong output; *when* they cheat (patience,
    the ring's rule) is :class:`Cheater`'s business.
    """
    if mode not in CHEAT_MODES:
        raise ConfigError(f"cheat mode must be one of {', '.join(CHEAT_MODES)}, got {mode!r}")
    rng = random.Random()
    previous: list[ExecResult] = []

    def tamper(job_digest: bytes, result: ExecResult) -> ExecResult:
        metas = [meta for meta, _ in result.outputs]
        if mode == "random":
            return fake_outputs(result, [_values(m.dtype, m.numel, rng) for m in metas])
        if mode == "zeros":
            return fake_outputs(result, [bytes(m.nbytes) for m in metas])
        if mode == "lazy":
            datas = [data[: len(data) // 2] + bytes(len(data) - len(data) // 2) for _, data in result.outputs]
            return fake_outputs(result, datas)
        if mode in GROUP_MODES:
            return fake_outputs(result, group_outputs(job_digest, metas, group_secret))
        # stale: the previous job's outputs, attested for this job
        stale = previous[-1] if previous else None
        previous[:] = [result]
        if stale is None or stale.output_digest == result.output_digest:
            return fake_outputs(result, [bytes(m.nbytes) for m in metas])
        return stale

    return tamper


# --- the ring's side channel and rule ---


class Decision(StrEnum):
    """What the ring's rule says about one job."""

    CHEAT = "cheat"  # every replica is a willing ring member
    HONEST = "honest"  # an outsider computes it too (or a member replica is not willing)
    ALONE = "alone"  # this member seems to be the only worker: cheat with probability unreplicated_rate
    WAIT = "wait"  # not yet known: look again


def ring_decision(
    me: str,
    willing: Iterable[str],
    replicas: Iterable[str] | None,
    members: Iterable[str],
    *,
    expired: bool,
) -> Decision:
    """The ring's rule for one job, as member ``me`` sees it (pure).

    ``willing``: members that received the job and would cheat on it (within the window); ``replicas``: the job's
    replicas as an oracle knows them, or ``None`` without one; ``members``: every ring member; ``expired``: the wait
    for the others is over. See the module docstring for the rule and its approximation.
    """
    willing_set, member_set = {*willing, me}, {*members, me}
    if replicas is not None:
        replica_set = {*replicas, me}
        if not replica_set <= member_set:
            return Decision.HONEST
        if replica_set == {me}:
            return Decision.ALONE
        if replica_set <= willing_set:
            return Decision.CHEAT
        return Decision.HONEST if expired else Decision.WAIT
    if len(willing_set) >= 2:
        return Decision.CHEAT
    return Decision.ALONE if expired else Decision.WAIT


class RingChannel(Protocol):
    """The ring's side channel, out of the honest network's sight. Times are ``time.time()`` seconds."""

    def join(self, member: str) -> None:
        """``member`` belongs to the ring."""

    def members(self) -> frozenset[str]: ...

    def note(self, digest: bytes, member: str) -> float:
        """``member`` received job ``digest`` and is willing to cheat on it; returns the time noted."""

    def noted(self, digest: bytes) -> dict[str, float]:
        """The willing members of job ``digest`` and when each noted it."""

    def assign(self, digest: bytes, worker: str) -> None:
        """Oracle (a harness that sees the client's choices): ``worker`` is a replica of job ``digest``."""

    def replicas(self, digest: bytes) -> frozenset[str] | None:
        """The job's replicas as the oracle wrote them, or ``None`` when no oracle wrote any."""

    def settle(self, digest: bytes, cheat: bool) -> bool:
        """Record the ring's decision for the job unless one is recorded; return the decision that stands."""


class MemoryRing:
    """A ring whose members share one process: a shared object (bounded: the oldest jobs are forgotten)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._members: set[str] = set()
        self._noted: OrderedDict[bytes, dict[str, float]] = OrderedDict()
        self._replicas: OrderedDict[bytes, set[str]] = OrderedDict()
        self._decisions: OrderedDict[bytes, bool] = OrderedDict()

    def join(self, member: str) -> None:
        self._members.add(member)

    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def note(self, digest: bytes, member: str) -> float:
        now = self.clock()
        _bounded(self._noted, digest, dict).setdefault(member, now)
        return now

    def noted(self, digest: bytes) -> dict[str, float]:
        return dict(self._noted.get(digest, {}))

    def assign(self, digest: bytes, worker: str) -> None:
        _bounded(self._replicas, digest, set).add(worker)

    def replicas(self, digest: bytes) -> frozenset[str] | None:
        found = self._replicas.get(digest)
        return None if found is None else frozenset(found)

    def settle(self, digest: bytes, cheat: bool) -> bool:
        if digest not in self._decisions:
            self._decisions[digest] = cheat
            while len(self._decisions) > MEMORY_RING_JOBS:
                self._decisions.popitem(last=False)
        return self._decisions[digest]


def _bounded(table: OrderedDict[bytes, Any], key: bytes, factory: Callable[[], Any]) -> Any:
    if key not in table:
        table[key] = factory()
        while len(table) > MEMORY_RING_JOBS:
            table.popitem(last=False)
    return table[key]


class DirectoryRing:
    """A ring across processes: a directory every member (and an oracle harness) can write.

    ``members/<peer>``, ``jobs/<digest>/<peer>`` (the file's mtime is when it was noted), ``replicas/<digest>/<peer>``
    and ``decisions/<digest>`` (``1`` cheat, ``0`` honest; created atomically with a hard link, so the first
    decision stands). A testnet ring writes a few small files per job: nothing is removed while it runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        for sub in ("members", "jobs", "replicas", "decisions"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _touch(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.touch(exist_ok=False)

    def join(self, member: str) -> None:
        self._touch(self.path / "members" / member)

    def members(self) -> frozenset[str]:
        return frozenset(os.listdir(self.path / "members"))

    def note(self, digest: bytes, member: str) -> float:
        path = self.path / "jobs" / digest.hex() / member
        self._touch(path)
        return path.stat().st_mtime

    def noted(self, digest: bytes) -> dict[str, float]:
        folder = self.path / "jobs" / digest.hex()
        out: dict[str, float] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                with contextlib.suppress(FileNotFoundError):
                    out[entry.name] = entry.stat().st_mtime
        return out

    def assign(self, digest: bytes, worker: str) -> None:
        self._touch(self.path / "replicas" / digest.hex() / worker)

    def replicas(self, digest: bytes) -> frozenset[str] | None:
        try:
            return frozenset(os.listdir(self.path / "replicas" / digest.hex()))
        except FileNotFoundError:
            return None

    def settle(self, digest: bytes, cheat: bool) -> bool:
        final = self.path / "decisions" / digest.hex()
        tmp = final.with_name(f".{digest.hex()}.{os.getpid()}.{id(self)}.{random.getrandbits(32):08x}")
        tmp.write_bytes(b"1" if cheat else b"0")
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return final.read_bytes() == b"1"


# --- a cheating worker ---


class Cheater:
    """One cheating worker's behaviour: patience, the ring's rule, and the output it fakes.

    :meth:`run` wraps one honest execution (``execute``) and returns the result the worker attests. Counters
    (``jobs``, ``cheats``, ``decisions``) say what it did.
    """

    def __init__(
        self,
        mode: str,
        *,
        member: str = "",
        honest_jobs: int = 0,
        ring: RingChannel | None = None,
        unreplicated_rate: float = 0.0,
        window_s: float = RING_WINDOW_S,
        rng: random.Random | None = None,
        group_secret: bytes = DEFAULT_GROUP_SECRET,
    ) -> None:
        if mode not in CHEAT_MODES:
            raise ConfigError(f"cheat mode must be one of {', '.join(CHEAT_MODES)}, got {mode!r}")
        if honest_jobs < 0 or not 0.0 <= unreplicated_rate <= 1.0 or window_s < 0:
            raise ConfigError("need honest_jobs >= 0, 0 <= unreplicated_rate <= 1 and window_s >= 0")
        if mode == "ring" and (ring is None or not member):
            raise ConfigError("a ring member needs a side channel (cheat_ring_dir) and its own name")
        self.mode = mode
        self.member = member
        self.honest_jobs = honest_jobs
        self.ring = ring if mode in GROUP_MODES else None
        self.unreplicated_rate = unreplicated_rate
        self.window_s = window_s
        self.rng = rng or random.Random()
        self.tamper = make_tamper(mode, group_secret=group_secret)
        self.jobs = 0
        self.cheats = 0
        self.decisions: Counter[Decision] = Counter()
        if self.ring is not None and member:
            self.ring.join(member)

    @property
    def patient(self) -> bool:
        """Still in its honest phase (the next job is one of its first ``honest_jobs``)."""
        return self.jobs < self.honest_jobs

    async def run(self, digest: bytes, execute: Callable[[], Awaitable[ExecResult]]) -> ExecResult:
        """Run job ``digest`` honestly with ``execute``, then return the result this cheater attests."""
        willing = not self.patient
        self.jobs += 1
        noted_at: float | None = None
        if willing and self.ring is not None and self.member:
            noted_at = self.ring.note(digest, self.member)  # before executing: the others see it early
        result = await execute()
        if not willing:
            return result
        if self.mode == "ring":
            assert self.ring is not None and noted_at is not None
            decision = await self._decide(self.ring, digest, noted_at)
            self.decisions[decision] += 1
            cheat = decision is Decision.CHEAT or (
                decision is Decision.ALONE and self.rng.random() < self.unreplicated_rate
            )
            stands = self.ring.settle(digest, cheat)  # the first member to decide speaks for the ring
            log.debug("ring member %s, job %s: %s -> %s", self.member[-8:], digest.hex()[:16], decision, stands)
            if not stands:
                return result
        self.cheats += 1
        return self.tamper(digest, result)

    async def _decide(self, ring: RingChannel, digest: bytes, noted_at: float) -> Decision:
        deadline = trio.current_time() + self.window_s
        while True:
            expired = trio.current_time() >= deadline
            willing = [m for m, t in ring.noted(digest).items() if abs(t - noted_at) <= self.window_s]
            decision = ring_decision(self.member, willing, ring.replicas(digest), ring.members(), expired=expired)
            if decision is not Decision.WAIT:
                return decision
            await trio.sleep(RING_POLL_S)  # a member waiting for its accomplices: bounded by the window


class CheatingExecutor:
    """An executor whose every result passes through a :class:`Cheater` before the worker attests it.

    Everything else (dry runs, hardware class, the pool) is the wrapped executor's.
    """

    def __init__(self, inner: Executor, cheater: Cheater) -> None:
        self.inner = inner
        self.cheater = cheater

    async def run(self, spec_bytes: bytes, blobs: Mapping[bytes, bytes], **kwargs: Any) -> ExecResult:
        return await self.cheater.run(job_digest(spec_bytes), lambda: self.inner.run(spec_bytes, blobs, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass(frozen=True)
class CheatSettings:
    """What makes one worker peer a cheater: the hook :func:`p2pcompute.node.serve` takes is :meth:`wrap_executor`.

    Harnesses only (``p2pcompute.testing.peer``, ``p2pcompute.trial``, tests): a node's own config has no cheat
    settings. ``ring_dir`` is the group cheaters' side channel (:class:`DirectoryRing`; ring: required).
    """

    mode: str
    honest_jobs: int = 0  # honest for this many jobs first (sleeper, sybil: K)
    ring_dir: Path | None = None  # coordinating with the other group cheaters here
    unreplicated_rate: float = 0.0  # ring: chance of cheating on a job it seems to run alone

    def validate(self) -> CheatSettings:
        if self.mode not in CHEAT_MODES:
            raise ConfigError(f"cheat_mode must be one of {', '.join(CHEAT_MODES)}")
        if self.mode == "ring" and self.ring_dir is None:
            raise ConfigError("cheat_mode ring needs cheat_ring_dir (the ring's side channel)")
        if self.honest_jobs < 0 or not 0.0 <= self.unreplicated_rate <= 1.0:
            raise ConfigError("cheat_honest_jobs must be >= 0 and cheat_unreplicated_rate 0..1")
        return self

    def cheater(self, member: str) -> Cheater:
        """A fresh cheater (its own counters) for the worker named ``member``, joined to the ring if any."""
        ring = DirectoryRing(self.ring_dir) if self.ring_dir is not None else None
        return Cheater(
            self.mode,
            member=member,
            honest_jobs=self.honest_jobs,
            ring=ring,
            unreplicated_rate=self.unreplicated_rate,
        )

    def wrap_executor(self, executor: Executor, peer: PeerId) -> Executor:
        """``serve(config, wrap_executor=settings.wrap_executor)``: every result passes through a new cheater."""
        return cast("Executor", CheatingExecutor(executor, self.validate().cheater(str(peer))))
