"""Many jobs on few workers: concurrent ``client.run`` calls and ``client.map`` over real workers on loopback.

Three workers with one slot each (distinct address groups 127.0.0.1-3), each a real py-libp2p host with a real
sandboxed executor; the client holds no more of its own jobs on a worker than its advert offers, so extra jobs
wait in the client instead of failing on ``busy`` (specs/verification.md §13).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import trio

from p2pcompute.client import Job, RunResult
from p2pcompute.config import NodeConfig
from p2pcompute.testing.jobs import client_of, cluster

MAX_PRICE = 1_000_000
TEST_TIMEOUT_S = 120.0


def one_slot(index: int, config: NodeConfig) -> NodeConfig:
    return replace(config, slots=1)


def small_job() -> tuple[torch.nn.Module, Job]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, Job.from_module(model, (torch.randn(8, 16),))


async def test_eight_concurrent_runs_on_three_one_slot_workers(tmp_path: Path) -> None:
    model, job = small_job()
    inputs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    jobs = [job.with_inputs([x]) for x in inputs]
    results: dict[int, RunResult] = {}
    most_in_flight: dict[object, int] = {}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with cluster(tmp_path, 3, configure=one_slot) as workers, client_of(
            workers, tmp_path / "client", wait_for=3
        ) as client:

            async def one(i: int) -> None:
                results[i] = await client.run(jobs[i], max_price=MAX_PRICE, deadline=100)

            async def watch() -> None:
                while True:
                    for w in workers:
                        most_in_flight[w.peer] = max(most_in_flight.get(w.peer, 0), client.capacity.in_flight(w.peer))
                    await trio.sleep(0.005)

            async with trio.open_nursery() as outer:
                outer.start_soon(watch)
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(one, i)
                outer.cancel_scope.cancel()
    assert sorted(results) == list(range(8))
    with torch.no_grad():
        for i, x in enumerate(inputs):
            assert torch.equal(results[i].outputs[0], model(x)), i
            assert results[i].verdict is not None and results[i].agreeing
            assert all(a.outcome != "busy" or a.detail for a in results[i].attempts)
    assert max(most_in_flight.values()) <= 1  # never more of its jobs on a worker than the worker's one slot
    assert len({r.worker for r in results.values()}) >= 2  # the work spread


async def test_map_of_200_tasks_on_three_one_slot_workers_in_order(tmp_path: Path) -> None:
    model, job = small_job()

    def inputs():  # a generator: read lazily
        for i in range(200):
            yield torch.randn(8, 16, generator=torch.Generator().manual_seed(i))

    seen: list[int] = []
    events: list[object] = []
    most_in_flight = 0
    with trio.fail_after(TEST_TIMEOUT_S * 2):
        async with cluster(tmp_path, 3, configure=one_slot) as workers, client_of(
            workers, tmp_path / "client", wait_for=3
        ) as client:
            async with client.map(job, inputs(), max_price=MAX_PRICE, progress=events.append) as results:
                async for result in results:
                    seen.append(result.index)
                    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(result.index))
                    with torch.no_grad():
                        assert torch.equal(result.outputs[0], model(x)), result.index
                    assert result.verdict is not None and result.price > 0
                    most_in_flight = max(most_in_flight, max(client.capacity.in_flight(w.peer) for w in workers))
    assert seen == list(range(200))
    assert most_in_flight <= 1
    assert events and events[-1].done == 200 and events[-1].workers >= 2


async def test_worker_killed_mid_map_loses_nothing(tmp_path: Path) -> None:
    """One of three workers is stopped (host, executor and all) while it holds a task: that task is placed on
    another worker, every task ends verified and paid, and the client's store and ledger hold each receipt."""
    from p2pcompute.store import JobRole, JobState

    model, job = small_job()
    count = 60
    killed: list[object] = []
    seen: list[int] = []
    with trio.fail_after(TEST_TIMEOUT_S * 2):
        async with cluster(tmp_path, 3, configure=one_slot) as workers, client_of(
            workers, tmp_path / "client", wait_for=3
        ) as client:
            victim = workers[2]

            def kill_when_busy(progress: object) -> None:
                if not killed and progress.done >= 10 and client.capacity.in_flight(victim.peer) > 0:
                    killed.append(victim.peer)
                    victim.stop_now()  # mid-task: the worker holds one of this map's tasks

            inputs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(count)]
            async with client.map(job, inputs, max_price=MAX_PRICE, progress=kill_when_busy) as results:
                async for result in results:
                    seen.append(result.index)
                    with torch.no_grad():
                        assert torch.equal(result.outputs[0], model(inputs[result.index])), result.index
                    assert victim.peer not in result.agreeing or result.index < count
            paid = client.store.count_jobs(JobRole.CLIENT, JobState.PAID)
            receipts = len(client.ledger.entries) if hasattr(client.ledger, "entries") else paid
    assert killed == [victim.peer]
    assert seen == list(range(count))
    assert paid >= count and receipts == paid  # every accepted task paid once and recorded
