"""The cheating workers of testnets and benchmarks (p2pcompute.testing.adversary): what each one attests, when.

A cheater wraps an honest execution; here the honest results are built directly (real bytes, real digests), and the
ring's side channel is a real :class:`MemoryRing` or :class:`DirectoryRing`. Waits inside the ring (its window) run on
trio's autojump clock: virtual time, no wall-clock waiting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import struct
from pathlib import Path

import pytest
import trio

from p2pcompute.compute.executor import ExecResult
from p2pcompute.config import CHEAT_MODES
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import Timings
from p2pcompute.core.tensors import TensorMeta, outputs_digest, tensor_digest
from p2pcompute.core.trace import TraceLeaf, first_divergence, trace_root
from p2pcompute.errors import ConfigError
from p2pcompute.testing.adversary import (
    GROUP_MODES,
    Cheater,
    CheatingExecutor,
    CheatSettings,
    Decision,
    DirectoryRing,
    MemoryRing,
    make_tamper,
    ring_decision,
)
from p2pcompute.trial import assign_modes

WINDOW_S = 0.5


def _blob(values: list[float]) -> tuple[TensorMeta, bytes]:
    data = struct.pack(f"<{len(values)}f", *values)
    return TensorMeta(digest=tensor_digest(data), dtype="float32", shape=(len(values),)), data


def _honest(seed: int = 0) -> ExecResult:
    """An honest result of a three-node job with its committed trace: two intermediates, then the output."""
    rng = random.Random(seed)
    nodes = [_blob([rng.uniform(-1, 1) for _ in range(8)]) for _ in range(3)]
    out_meta, out_data = nodes[-1]
    leaves = tuple(TraceLeaf(node=i, outputs=(meta,)) for i, (meta, _) in enumerate(nodes))
    return ExecResult(
        outputs=[(out_meta, out_data)],
        output_digest=outputs_digest([out_meta]),
        hardware_class="cpu:test|float32",
        timings=Timings(queue_ms=0, load_ms=0, exec_ms=1, total_ms=1),
        trace=leaves,
        trace_root=trace_root(leaves),
        trace_blobs={meta.digest: data for meta, data in nodes},
        trace_complete=True,
    )


def _digest(n: int) -> bytes:
    return hashlib.sha256(f"job {n}".encode()).digest()


def _consistent(result: ExecResult) -> None:
    """What the worker attests matches the bytes it sends."""
    for meta, data in result.outputs:
        assert tensor_digest(data) == meta.digest
        assert len(data) == meta.nbytes
    assert result.output_digest == outputs_digest(meta for meta, _ in result.outputs)


async def _run(cheater: Cheater, n: int, seed: int | None = None) -> tuple[ExecResult, ExecResult]:
    """(honest, attested) for job ``n``."""
    honest = _honest(n if seed is None else seed)

    async def execute() -> ExecResult:
        return honest

    return honest, await cheater.run(_digest(n), execute)


# --- the output-changing behaviours ---


@pytest.mark.parametrize("mode", CHEAT_MODES)
def test_every_mode_attests_wrong_but_self_consistent_outputs(mode: str) -> None:
    tamper = make_tamper(mode)
    for n in range(3):
        honest = _honest(n)
        faked = tamper(_digest(n), honest)
        _consistent(faked)
        assert faked.output_digest != honest.output_digest
        assert faked.hardware_class == honest.hardware_class


def test_group_modes_share_one_wrong_output_per_job() -> None:
    honest = _honest(1)
    outputs = {mode: make_tamper(mode)(_digest(1), honest).output_digest for mode in GROUP_MODES}
    assert len(set(outputs.values())) == 1
    other_secret = make_tamper("collude", group_secret=b"another ring")(_digest(1), honest)
    assert other_secret.output_digest not in outputs.values()
    assert make_tamper("collude")(_digest(2), honest).output_digest not in outputs.values()


@pytest.mark.parametrize("mode", ["collude", "random", "lazy", "zeros", "sleeper", "ring"])
def test_a_faked_result_keeps_its_trace_consistent_except_the_faked_node(mode: str) -> None:
    honest = _honest(3)
    faked = make_tamper(mode)(_digest(3), honest)
    trace = faked.trace
    assert len(trace) == len(honest.trace)
    assert first_divergence(honest.trace, trace) == len(trace) - 1  # the output node, and only it
    assert trace[:-1] == honest.trace[:-1]
    assert trace[-1].outputs == (faked.outputs[0][0],)
    assert trace_outputs_match(trace, faked)
    assert faked.trace_root == trace_root(trace) != honest.trace_root
    for leaf in trace:  # every kept intermediate is the bytes its leaf names
        (meta,) = leaf.outputs
        assert tensor_digest(faked.trace_blobs[meta.digest]) == meta.digest
    assert honest.outputs[0][0].digest not in faked.trace_blobs
    assert faked.trace_complete


def trace_outputs_match(trace: tuple[TraceLeaf, ...], result: ExecResult) -> bool:
    """The job's output (the last node's) is what the result attests."""
    return trace[-1].outputs == tuple(meta for meta, _ in result.outputs)


def test_an_untraced_result_stays_untraced() -> None:
    honest = dataclasses.replace(_honest(4), trace=(), trace_root=b"", trace_blobs={}, trace_complete=False)
    faked = make_tamper("collude")(_digest(4), honest)
    assert (faked.trace, faked.trace_root, faked.trace_blobs) == ((), b"", {})
    _consistent(faked)


# --- patience ---


async def test_a_sleeper_is_honest_for_exactly_k_jobs_then_cheats_on_every_job() -> None:
    cheater = Cheater("sleeper", honest_jobs=4)
    for n in range(10):
        honest, attested = await _run(cheater, n)
        if n < 4:
            assert attested is honest, n
        else:
            assert attested.output_digest != honest.output_digest, n
            _consistent(attested)
    assert (cheater.jobs, cheater.cheats) == (10, 6)


async def test_sleepers_agree_with_each_other() -> None:
    a, b = Cheater("sleeper", honest_jobs=2), Cheater("sybil", honest_jobs=2)
    for n in range(2):
        await _run(a, 100 + n)
        await _run(b, 200 + n)
    _, from_a = await _run(a, 7, seed=1)
    _, from_b = await _run(b, 7, seed=2)  # another device's honest bytes: the shared fake does not depend on them
    assert from_a.output_digest == from_b.output_digest


# --- the ring ---


@pytest.mark.parametrize(
    ("willing", "replicas", "expired", "decision"),
    [
        ({"a"}, None, False, Decision.WAIT),  # alone so far: wait for the others
        ({"a"}, None, True, Decision.ALONE),  # nobody else within the window
        ({"a", "b"}, None, False, Decision.CHEAT),  # two willing members: taken to be the replicas
        ({"a"}, {"a", "b"}, False, Decision.WAIT),  # the oracle names b, which has not said it is willing yet
        ({"a"}, {"a", "b"}, True, Decision.HONEST),  # ... and never did (b is patient)
        ({"a", "b"}, {"a", "b"}, False, Decision.CHEAT),
        ({"a", "b"}, {"a", "b", "h"}, False, Decision.HONEST),  # an outsider computes it too
        ({"a", "b"}, {"a", "h"}, False, Decision.HONEST),
        ({"a"}, {"a"}, False, Decision.ALONE),  # the only replica
        ({"a"}, set(), False, Decision.ALONE),  # not yet listed itself: it is still a replica
    ],
)
def test_ring_rule(willing: set[str], replicas: set[str] | None, expired: bool, decision: Decision) -> None:
    assert ring_decision("a", willing, replicas, {"a", "b", "c"}, expired=expired) is decision


def _member(ring: MemoryRing, name: str, **kwargs: object) -> Cheater:
    return Cheater("ring", member=name, ring=ring, window_s=WINDOW_S, **kwargs)  # type: ignore[arg-type]


async def _together(cheaters: list[Cheater], n: int) -> list[tuple[ExecResult, ExecResult]]:
    """Job ``n`` given to every one of ``cheaters`` at once (each with its own honest bytes: the same values)."""
    out: list[tuple[ExecResult, ExecResult]] = [None] * len(cheaters)  # type: ignore[list-item]

    async def one(i: int) -> None:
        out[i] = await _run(cheaters[i], n)

    async with trio.open_nursery() as nursery:
        for i in range(len(cheaters)):
            nursery.start_soon(one, i)
    return out


async def test_ring_members_cheat_together_when_they_are_the_only_replicas(autojump_clock: trio.abc.Clock) -> None:
    ring = MemoryRing(clock=trio.current_time)
    a, b, c = (_member(ring, name) for name in "abc")
    (honest, from_a), (_, from_b) = await _together([a, b], 1)  # no oracle: two members within the window
    assert from_a.output_digest == from_b.output_digest != honest.output_digest
    honest, from_c = await _run(c, 1)  # a third member, long after: the ring's decision for the job stands
    assert from_c.output_digest == from_a.output_digest
    assert (a.cheats, b.cheats, c.cheats) == (1, 1, 1)


async def test_ring_stays_honest_beside_an_outsider_and_alone(autojump_clock: trio.abc.Clock) -> None:
    ring = MemoryRing(clock=trio.current_time)
    a, b = _member(ring, "a"), _member(ring, "b")
    for worker in ("a", "b", "honest-worker"):  # the oracle: the job went to a, b and an outsider
        ring.assign(_digest(1), worker)
    for honest, attested in await _together([a, b], 1):
        assert attested is honest
    honest, attested = await _run(a, 2)  # no oracle, nobody else within the window: alone, and rate 0
    assert attested is honest
    ring.assign(_digest(3), "a")  # the oracle: a is the only replica
    honest, attested = await _run(a, 3)
    assert attested is honest
    assert (a.cheats, b.cheats) == (0, 0)
    assert a.decisions == {Decision.HONEST: 1, Decision.ALONE: 2}


async def test_ring_cheats_alone_at_its_unreplicated_rate(autojump_clock: trio.abc.Clock) -> None:
    ring = MemoryRing(clock=trio.current_time)
    always = _member(ring, "a", unreplicated_rate=1.0)
    ring.assign(_digest(1), "a")
    honest, attested = await _run(always, 1)
    assert attested.output_digest != honest.output_digest
    honest, attested = await _run(always, 2)  # no oracle: nobody else within the window
    assert attested.output_digest != honest.output_digest
    sometimes = _member(ring, "b", unreplicated_rate=0.25, rng=random.Random(5))
    for n in range(10, 210):
        ring.assign(_digest(n), "b")
        await _run(sometimes, n)
    assert 20 <= sometimes.cheats <= 80  # 50 expected; the seed fixes it


async def test_a_patient_ring_member_is_not_willing(autojump_clock: trio.abc.Clock) -> None:
    ring = MemoryRing(clock=trio.current_time)
    a, patient = _member(ring, "a"), _member(ring, "p", honest_jobs=5)
    ring.assign(_digest(1), "a")
    ring.assign(_digest(1), "p")
    for honest, attested in await _together([a, patient], 1):
        assert attested is honest  # p is still honest, so a waits for it in vain and stays honest too


async def test_the_first_decision_for_a_job_stands() -> None:
    ring = MemoryRing()
    assert ring.settle(_digest(1), False) is False
    assert ring.settle(_digest(1), True) is False
    assert ring.settle(_digest(2), True) is True


def test_directory_ring_is_shared_between_instances(tmp_path: Path) -> None:
    """Two members in two processes see the same directory: here, two instances on one path."""
    one, two = DirectoryRing(tmp_path / "ring"), DirectoryRing(tmp_path / "ring")
    one.join("a")
    two.join("b")
    assert one.members() == two.members() == {"a", "b"}
    noted = one.note(_digest(1), "a")
    two.note(_digest(1), "b")
    seen = two.noted(_digest(1))
    assert set(seen) == {"a", "b"}
    assert seen["a"] == noted
    assert one.replicas(_digest(1)) is None
    two.assign(_digest(1), "a")
    two.assign(_digest(1), "h")
    assert one.replicas(_digest(1)) == {"a", "h"}
    assert two.settle(_digest(1), True) is True
    assert one.settle(_digest(1), False) is True  # the first decision stands
    assert one.noted(_digest(2)) == {}


# --- configuration ---


def test_cheat_settings_make_the_cheater_and_wrap_the_executor(tmp_path: Path) -> None:
    settings = CheatSettings("ring", honest_jobs=15, ring_dir=tmp_path / "ring", unreplicated_rate=0.1).validate()
    cheater = settings.cheater("me")
    assert (cheater.mode, cheater.honest_jobs, cheater.unreplicated_rate) == ("ring", 15, 0.1)
    assert isinstance(cheater.ring, DirectoryRing)
    assert cheater.ring.members() == {"me"}
    inner = object()
    peer = KeyPair.from_seed(bytes(32)).peer_id
    wrapped = settings.wrap_executor(inner, peer)  # type: ignore[arg-type]
    assert isinstance(wrapped, CheatingExecutor) and wrapped.inner is inner
    assert wrapped.cheater.member == str(peer) and wrapped.cheater is not settings.cheater(str(peer))
    with pytest.raises(ConfigError, match="cheat_ring_dir"):
        CheatSettings("ring").validate()
    with pytest.raises(ConfigError, match="cheat_mode must be one of"):
        CheatSettings("").validate()
    with pytest.raises(ConfigError, match="cheat_honest_jobs"):
        CheatSettings("sleeper", honest_jobs=-1).validate()
    with pytest.raises(ConfigError, match="cheat_unreplicated_rate"):
        CheatSettings("ring", ring_dir=tmp_path, unreplicated_rate=1.5).validate()
    with pytest.raises(ConfigError, match="cheat_ring_dir"):
        CheatSettings("ring").wrap_executor(inner, peer)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Cheater("ring")  # a ring member without a side channel could never coordinate


def test_mixed_covers_every_mode_and_never_the_bootstrap() -> None:
    modes = assign_modes(20, 9, "mixed")
    assert modes[0] == ""
    assert sorted(m for m in modes if m) == sorted(
        ["collude", "sleeper", "ring", "sybil", "random", "zeros", "stale", "lazy", "random"]
    )
    assert assign_modes(10, 3, "sleeper") == ["", "sleeper", "", "", "sleeper", "", "", "sleeper", "", ""]
    assert assign_modes(5, 2, "mixed").count("") == 3
