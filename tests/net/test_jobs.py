"""Jobs end to end on loopback: real hosts, real executor processes, in one trio process.

Workers listen on 127.0.0.<i+1> (distinct address groups); the client knows only worker 0's address and
finds the others through the DHT bootstrap and gossiped adverts (``p2pcompute.testing.jobs``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from p2pcompute.client import Job, ProgressEvent
from p2pcompute.config import NodeConfig
from p2pcompute.core.envelope import open_envelope
from p2pcompute.core.jobspec import JobLimits
from p2pcompute.core.messages import JobAccept, JobRequest
from p2pcompute.errors import NoWorkersError, P2PComputeError, Reason
from p2pcompute.net.negotiate import PreparedJob
from p2pcompute.store import STORE_FILE, JobRole, JobState, open_store
from p2pcompute.testing.jobs import (
    WORKER_STOP_TIMEOUT_S,
    WorkerPeer,
    chain_module,
    client_of,
    cluster,
    prepared_from_wire,
    run_on,
    spec_wire,
    start_worker,
)

MAX_PRICE = 1_000_000  # micro-credits: 1 credit
EXPENSIVE = 10**9  # micro-credits per second: a worker no job under MAX_PRICE can afford
TEST_TIMEOUT_S = 60.0


def mlp_job() -> tuple[torch.nn.Module, torch.Tensor, Job]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    return model, x, Job.from_module(model, (x,))


def heavy_job(*, steps: int = 24, n: int = 1024, limits: JobLimits | None = None) -> Job:
    """About 2 * n**3 * steps FLOPs (~50 GFLOP by default: around a second on this machine's 2 cores)."""
    torch.manual_seed(1)
    return Job.from_module(chain_module(n, steps), (torch.randn(n, n),), limits=limits)


def expensive_first(index: int, config: NodeConfig) -> NodeConfig:
    """Worker 0 (the bootstrap) prices itself out, so jobs must go to workers found through adverts."""
    from dataclasses import replace

    return replace(config, price_per_second=EXPENSIVE) if index == 0 else config


async def test_client_finds_worker_through_adverts_and_matches_local(tmp_path: Path) -> None:
    model, x, job = mlp_job()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            cluster(tmp_path, 2, configure=expensive_first) as workers,
            client_of(workers, tmp_path / "client", wait_for=2) as client,
        ):
            known = {entry.peer_id for entry in client.node.market.adverts(client.clock())}
            assert known == {workers[0].peer, workers[1].peer}
            assert [c.peer for c in client.candidates(job, MAX_PRICE)] == [workers[1].peer]
            result = await client.run(job, max_price=MAX_PRICE, deadline=30, redundancy=1)
    assert result.worker == workers[1].peer
    assert [a.worker for a in result.attempts] == [workers[1].peer]
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(result.outputs[0], expected)
    assert torch.equal(result.outputs[0], job.run_locally()[0])
    assert result.job_digest == job.digest
    assert result.price <= MAX_PRICE


# --- hostile payloads ------------------------------------------------------------------------------------------------


def _expect(exc: P2PComputeError, reason: Reason, *fragments: str) -> None:
    assert exc.reason is reason, exc
    for fragment in fragments:
        assert fragment in exc.detail, exc


def _unknown_op(job: Job) -> PreparedJob:
    wire = spec_wire(job)
    wire["nodes"][0]["op"] = "aten._pickle_loads.default"
    return prepared_from_wire(wire, tensors=job.tensors, blobs=job.blobs, requirements=job.requirements)


def _tampered(job: Job) -> PreparedJob:
    """The real spec, but every tensor's bytes changed (same length, so only the hash gives it away)."""
    blobs = {digest: bytes([data[0] ^ 0xFF]) + data[1:] for digest, data in job.blobs.items()}
    return PreparedJob(
        spec_bytes=job.spec_bytes, digest=job.digest, tensors=job.tensors, blobs=blobs, requirements=job.requirements
    )


def _with_nodes(job: Job, nodes: list[dict[str, Any]]) -> PreparedJob:
    """The job's first input, then ``nodes``; the last node is the output. Claims 1 MiB of memory."""
    wire = spec_wire(job)
    first = job.tensors[0]
    wire.update(inputs=[wire["inputs"][0]], constants=[], nodes=nodes, outputs=[{"node": len(nodes) - 1}])
    return prepared_from_wire(wire, tensors=[first], blobs={first.digest: job.blobs[first.digest]})


def _full(*shape: int) -> dict[str, Any]:
    return {"op": "aten.full.default", "args": [list(shape), 1.0], "kwargs": {"dtype": {"dtype": "float32"}}}


def _huge_alloc(job: Job) -> PreparedJob:
    """``sum(full([10**6, 10**6], 1.0))``: one 4 TB tensor behind a scalar output."""
    return _with_nodes(job, [_full(10**6, 10**6), {"op": "aten.sum.default", "args": [{"node": 0}], "kwargs": {}}])


def _past_memory(job: Job) -> PreparedJob:
    """Five live 1 GiB tensors (each within the tensor limit), 5 GiB in all, summed to a scalar."""
    nodes = [_full(16384, 16384) for _ in range(5)]
    total = 0
    for i in range(1, 5):
        nodes.append({"op": "aten.add.Tensor", "args": [{"node": total}, {"node": i}], "kwargs": {}})
        total = len(nodes) - 1
    nodes.append({"op": "aten.sum.default", "args": [{"node": total}], "kwargs": {}})
    return _with_nodes(job, nodes)


def _too_many_ops(job: Job) -> PreparedJob:
    wire = spec_wire(job)
    relu = {"op": "aten.relu.default", "args": [{"input": 0}], "kwargs": {}}
    wire.update(constants=[], nodes=[relu] * 10_001, outputs=[{"node": 10_000}])
    first = job.tensors[0]
    return prepared_from_wire(wire, tensors=[first], blobs={first.digest: job.blobs[first.digest]})


async def _hostile(worker: WorkerPeer, client: Any, prepared: PreparedJob) -> P2PComputeError:
    with pytest.raises(P2PComputeError) as caught:
        await run_on(client, worker, prepared, max_price=MAX_PRICE)
    return caught.value


async def test_hostile_payloads_are_refused_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    model, x, job = mlp_job()
    big = heavy_job(steps=1, n=512)  # 1 MiB tensors: they travel over the data channel, not inline
    slow = heavy_job(steps=96, limits=JobLimits(wall_time_ms=200))  # ~200 GFLOP: 0.6 s on an AVX-512 core pair
    with torch.no_grad():
        expected = model(x)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with cluster(tmp_path, 1) as workers:
            worker = workers[0]
            async with client_of(workers, tmp_path / "client") as client:

                async def still_serves() -> None:
                    outcome = await run_on(client, worker, job.prepared(), max_price=MAX_PRICE)
                    (meta,) = outcome.result.message.outputs
                    got = torch.frombuffer(bytearray(outcome.outputs[meta.digest]), dtype=torch.float32)
                    assert torch.equal(got.reshape(8, 4), expected)

                await still_serves()

                exc = await _hostile(worker, client, _unknown_op(job))
                _expect(exc, Reason.DECLINED, "bad_job", "unknown_op", "aten._pickle_loads.default")
                await still_serves()

                exc = await _hostile(worker, client, prepared_from_wire(pickle.dumps({"nodes": [print]})))
                _expect(exc, Reason.DECLINED, "bad_job")
                await still_serves()

                exc = await _hostile(worker, client, _too_many_ops(job))
                _expect(exc, Reason.DECLINED, "bad_job", "too_many_ops")
                await still_serves()

                exc = await _hostile(worker, client, _tampered(job))  # inline on the job stream
                _expect(exc, Reason.CANCELLED, "hash_mismatch")
                await still_serves()

                exc = await _hostile(worker, client, _tampered(big))  # over the data channel
                _expect(exc, Reason.HASH_MISMATCH, "hash_mismatch")
                await still_serves()

                # the worker's own dry run (before it offers) finds these, not the executor after an accept
                exc = await _hostile(worker, client, _huge_alloc(job))
                _expect(exc, Reason.DECLINED, "bad_job", "tensor_too_large", "4000000000000 bytes")
                await still_serves()

                exc = await _hostile(worker, client, _past_memory(job))
                _expect(exc, Reason.DECLINED, "bad_job", "memory_limit")
                await still_serves()

                exc = await _hostile(worker, client, slow.prepared())
                _expect(exc, Reason.JOB_FAILED, "wall_time")
                await still_serves()  # on the executor child that replaced the killed one


# --- workers that stop mid-job ---------------------------------------------------------------------------------------


async def test_worker_killed_mid_job_is_replaced_and_remembers_the_job_after_restart(tmp_path: Path) -> None:
    job = heavy_job()
    _, _, small = mlp_job()
    expected = job.run_locally()[0]
    killed: list[WorkerPeer] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with cluster(tmp_path, 2) as workers, trio.open_nursery() as nursery:
            by_peer = {w.peer: w for w in workers}

            def kill_on_running(event: ProgressEvent) -> None:
                if event.phase == "running" and not killed and event.worker is not None:
                    killed.append(by_peer[event.worker])
                    killed[0].stop_now()  # cancels that worker's serve(): host, executor child and all

            async with client_of(workers, tmp_path / "client", wait_for=2) as client:
                result = await client.run(job, max_price=MAX_PRICE, deadline=50, redundancy=1, progress=kill_on_running)
                (victim,) = killed
                (survivor,) = [w for w in workers if w is not victim]
                assert result.worker == survivor.peer
                assert [a.worker for a in result.attempts] == [victim.peer, survivor.peer]
                assert result.attempts[0].outcome == Reason.STREAM_CLOSED.value, result.attempts
                assert torch.equal(result.outputs[0], expected)

                # The same data dir again: same key, and the store still knows the job it accepted.
                with trio.fail_after(WORKER_STOP_TIMEOUT_S):
                    await victim.stopped.wait()
                restarted = await start_worker(nursery, victim.index, victim.config)
                assert restarted.peer == victim.peer
                outcome = await run_on(client, restarted, small.prepared(), max_price=MAX_PRICE)
                assert outcome.worker == restarted.peer

            store = open_store(victim.config.data_dir / STORE_FILE)
            try:
                interrupted = [r for r in store.jobs(JobRole.WORKER) if r.job_digest == job.digest]
            finally:
                store.close()
            nursery.cancel_scope.cancel()
    assert len(interrupted) == 1, interrupted
    (record,) = interrupted
    assert record.peer == client.peer_id.raw
    assert set(record.envelopes) >= {"request", "offer", "accept"}
    request = open_envelope(record.envelopes["request"], expect=JobRequest, signer=client.peer_id)
    assert request.message.job_digest == job.digest
    assert request.message.id == record.id
    accept = open_envelope(record.envelopes["accept"], expect=JobAccept, signer=client.peer_id)
    assert accept.message.job_digest == job.digest
    assert record.state is JobState.INTERRUPTED, record


async def test_client_run_raises_no_workers_error_when_the_only_worker_stops(tmp_path: Path) -> None:
    """``Client.run`` documents :class:`NoWorkersError` when every attempt failed (not an exception group)."""
    job = heavy_job()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with cluster(tmp_path, 1) as workers, client_of(workers, tmp_path / "client", wait_for=1) as client:

            def stop_on_running(event: ProgressEvent) -> None:
                if event.phase == "running":
                    workers[0].stop_now()

            with pytest.raises(NoWorkersError) as caught:
                await client.run(job, max_price=MAX_PRICE, deadline=50, redundancy=1, progress=stop_on_running)
    assert caught.value.reason is Reason.ALL_ATTEMPTS_FAILED
    assert "stream_closed" in caught.value.detail
