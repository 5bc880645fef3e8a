"""Many jobs on few workers: concurrent ``client.run`` calls and ``client.map`` over real workers on loopback.

Three workers with one slot each (distinct address groups 127.0.0.1-3), each a real py-libp2p host with a real
sandboxed executor; the client holds no more of its own jobs on a worker than it offers (its slot and the one
queue place a worker keeps beyond its slots), so extra jobs wait in the client instead of failing on ``busy``
(specs/verification.md §13).
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
        async with (
            cluster(tmp_path, 3, configure=one_slot) as workers,
            client_of(workers, tmp_path / "client", wait_for=3) as client,
        ):

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
    assert max(most_in_flight.values()) <= 2  # never more of its jobs on a worker than its slot and queue place
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
        async with (
            cluster(tmp_path, 3, configure=one_slot) as workers,
            client_of(workers, tmp_path / "client", wait_for=3) as client,
            client.map(job, inputs(), max_price=MAX_PRICE, progress=events.append) as results,
        ):
            async for result in results:
                seen.append(result.index)
                x = torch.randn(8, 16, generator=torch.Generator().manual_seed(result.index))
                with torch.no_grad():
                    assert torch.equal(result.outputs[0], model(x)), result.index
                assert result.verdict is not None and result.price > 0
                most_in_flight = max(most_in_flight, max(client.capacity.in_flight(w.peer) for w in workers))
    assert seen == list(range(200))
    assert most_in_flight <= 2  # one slot and one queue place
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
        async with (
            cluster(tmp_path, 3, configure=one_slot) as workers,
            client_of(workers, tmp_path / "client", wait_for=3) as client,
        ):
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


async def test_a_task_that_cannot_be_done_raises_with_its_index_after_the_ones_before(tmp_path: Path) -> None:
    from p2pcompute.errors import TaskFailed

    _, job = small_job()
    inputs = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    inputs[3] = torch.randn(9, 16)  # not the job's input shape
    seen: list[int] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with cluster(tmp_path, 2) as workers, client_of(workers, tmp_path / "client", wait_for=2) as client:
            try:
                async with client.map(job, inputs, max_price=MAX_PRICE) as results:
                    async for result in results:
                        seen.append(result.index)
            except TaskFailed as failed:
                error = failed
            else:
                raise AssertionError("the map did not fail")
    assert error.index == 3 and error.cause.reason.value == "shape_mismatch"
    assert seen == [0, 1, 2]  # every task before the failed one came first: nothing accepted is lost


async def test_leaving_a_map_early_pays_only_for_accepted_results(tmp_path: Path) -> None:
    from p2pcompute.store import JobRole, JobState

    _, job = small_job()
    inputs = (torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(100))
    taken = 0
    with trio.fail_after(TEST_TIMEOUT_S):
        async with cluster(tmp_path, 2) as workers, client_of(workers, tmp_path / "client", wait_for=2) as client:
            async with client.map(job, inputs, max_price=MAX_PRICE, ordered=False) as results:
                async for _ in results:
                    taken += 1
                    if taken == 5:
                        break
            accepted = results.stats.done
            paid = client.store.count_jobs(JobRole.CLIENT, JobState.PAID)
            spent = sum(r.price for r in client.store.jobs(JobRole.CLIENT))
            await trio.sleep(0.5)  # nothing more is paid once the map is left
            assert client.store.count_jobs(JobRole.CLIENT, JobState.PAID) == paid
    assert taken == 5 and 5 <= accepted < 100
    assert paid == accepted  # each accepted task paid once; the cancelled ones nothing
    assert spent == results.stats.credits


def advertised_tflops(index: int, config: NodeConfig) -> NodeConfig:
    """Worker 1 advertises 0.4 TFLOPS, the others 0.1 (their hardware probe's cache, as an operator's would be)."""
    import json

    cache = config.data_dir / "hardware.json"
    report = json.loads(cache.read_text())
    for device in report["devices"]:
        device["tflops"] = 0.4 if index == 1 else 0.1
    cache.write_text(json.dumps(report))
    return config


async def test_map_batch_shards_by_speed_and_equals_the_whole_batch(tmp_path: Path) -> None:
    """Three workers, one advertising 4x the TFLOPS of the others: its shard is four times bigger and it is asked
    first for it; the concatenated outputs equal the model on the whole batch (within the job's tolerance)."""
    model, job = small_job()
    batch = torch.randn(60, 16, generator=torch.Generator().manual_seed(7))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            cluster(tmp_path, 3, configure=advertised_tflops) as workers,
            client_of(workers, tmp_path / "client", wait_for=3) as client,
        ):
            result = await client.map_batch(job, batch, max_price=MAX_PRICE)
    assert list(result.rows) == [40, 10, 10]
    assert result.results[0].worker == workers[1].peer  # the shard sized for it ran there
    with torch.no_grad():
        expected = model(batch)
    torch.testing.assert_close(result.outputs[0], expected, rtol=1e-5, atol=1e-5)
    assert all(r.verdict is not None and r.price > 0 for r in result.results)
    assert result.price == sum(r.price for r in result.results)
