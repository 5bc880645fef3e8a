"""P6: many tasks on many workers, side by side in one run.

    .venv/bin/python -m benchmarks.cluster                 # 5 peers, 1,000 tasks, 10 training steps (~2 min here)
    .venv/bin/python -m benchmarks.cluster --quick         # 3 peers, 100 tasks, 3 training steps (~30 s)
    .venv/bin/python -m benchmarks.cluster --peers 8 --tasks 2000 --slots 2 --json p6.json

(a) ``--tasks`` tiny tasks (the testnet's demo MLP, 32x64 -> 128 -> 128 -> 10, ~0.6 MFLOP each, every task verified
    and paid) through ``client.map`` over a testnet of ``--peers`` real peer processes, ``--slots`` each: the path of
    ``p2pcompute testnet --map`` (``testnet.run_map_tasks``). Figures: tasks/s, and worker utilisation = the
    slot-seconds the workers' own counters say they held the client's jobs during the map (status ``jobs.slot_busy_s``:
    from admission to receipt, integrated over time; read just before and just after the map) over sum(slots) x the
    map's wall time; goal >= 80%. Also the share of that slot-time spent in the executors. Real processes, not
    in-process workers (``testing.jobs.cluster``): in one process the client and every worker share one Python
    thread, so the workers' network work would compete with the client's scheduling and the figure would measure that
    thread rather than placement. (On 2 cores the peer processes still compete with the client for CPU.)
(b) the core scheduler on simulated workers of speeds 1x, 2x, ... 10x, no network. (b1) one sharded batch as
    ``map_batch`` splits it: ``core.cluster.shard_sizes`` by speed, one shard per worker, against an equal split;
    makespan (``core.cluster.makespan``) over the ideal (every worker busy to the end: rows / sum of speeds, plus the
    per-shard overhead); goal <= 1.1. (b2) a map of many tasks through real schedulers and a real ``Capacity``
    (``testing.simulate_cluster``: placement by earliest finish against any worker with room), makespan over the ideal
    (every slot busy to the end).
(c) one data-parallel training run (``p2pcompute.train.train``: a 16 -> 32 -> 4 MLP, one shard of 32 rows per peer, SGD
    at the client) on the same testnet against ``train_locally`` (the same step job through ``Job.run_locally`` in this
    process): steps/s side by side, and the final loss and parameters of both (they agree within 1e-4 when the
    network adds nothing but latency).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from p2pcompute.core.cluster import makespan, shard_sizes
from p2pcompute.testing.simulate_cluster import ClusterSimConfig, simulate_cluster
from p2pcompute.testnet import MapReport, PeerProcess, TestnetConfig, run_map_tasks, run_testnet

UTILISATION_GOAL = 0.80
MAKESPAN_GOAL = 1.10
SPEEDS = tuple(float(s) for s in range(1, 11))  # 1x ... 10x
TRAIN_FEATURES, TRAIN_HIDDEN, TRAIN_CLASSES, TRAIN_ROWS = 16, 32, 4, 32
TRAIN_LR = 0.5
TRAIN_RTOL = 1e-4
TRAIN_MAX_PRICE = "0.01"


# -- (b) the scheduler on simulated workers ---------------------------------------------------------------------------


def sharded_batches(
    rows_list: Sequence[int], granules: Sequence[int], overheads: Sequence[float]
) -> list[dict[str, Any]]:
    """(b1): makespan / ideal of a batch split by speed and split equally over workers of speeds 1..10."""
    out = []
    for rows in rows_list:
        for granule in granules:
            for overhead in overheads:
                ideal = overhead + rows / sum(SPEEDS)
                sized = shard_sizes(rows, SPEEDS, granule)
                equal = shard_sizes(rows, [1.0] * len(SPEEDS), granule)
                out.append(
                    {
                        "rows": rows,
                        "granule": granule,
                        "overhead": overhead,
                        "by_speed": makespan(sized, SPEEDS, overhead) / ideal,
                        "equal": makespan(equal, SPEEDS, overhead) / ideal,
                        "shards": sized,
                    }
                )
    return out


def simulated_maps(task_counts: Sequence[int], overhead: float) -> list[dict[str, Any]]:
    """(b2): a map of many tasks on ten one-slot workers of speeds 1..10, through real schedulers."""
    out = []
    for tasks in task_counts:
        config = ClusterSimConfig(
            workers=len(SPEEDS), tasks=tasks, speed_list=SPEEDS, slots=(1, 1), flops=10.0, overhead=overhead
        )
        for placement in (True, False):
            report = simulate_cluster(replace(config, placement=placement))
            out.append(
                {
                    "tasks": tasks,
                    "placement": "earliest finish" if placement else "any with room",
                    "ratio": report.ratio,
                    "utilisation": report.utilisation,
                    "done": report.done,
                }
            )
    return out


# -- (a) and (c) on a testnet ------------------------------------------------------------------------------------------


@dataclass
class TrainFigures:
    steps: int = 0
    shards: int = 0
    remote_s: float = 0.0
    local_s: float = 0.0
    remote_loss: float = math.nan
    local_loss: float = math.nan
    first_loss: float = math.nan
    max_param_diff: float = math.nan
    workers: int = 0
    credits: int = 0
    error: str | None = None

    @property
    def agree(self) -> bool:
        return abs(self.remote_loss - self.local_loss) <= TRAIN_RTOL * abs(self.local_loss) + 1e-6 and (
            self.max_param_diff <= 1e-4
        )


@dataclass
class Testbed:
    map: MapReport | None = None
    train: TrainFigures = field(default_factory=TrainFigures)
    startup_s: float = 0.0


def training_setup(shards: int) -> tuple[Any, Any, list[Any], list[Any]]:
    """The model (fixed initial weights), its step job, its parameters and one shard per worker (Gaussian points
    labelled by the arg-max of a fixed linear map: learnable)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        import torch
        import torch.nn.functional as F
        from torch import nn

        from p2pcompute.client import Job
        from p2pcompute.train import parameters_of

        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shards * TRAIN_ROWS, TRAIN_FEATURES, generator=generator)
        y = (x @ torch.randn(TRAIN_FEATURES, TRAIN_CLASSES, generator=generator)).argmax(dim=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(
                nn.Linear(TRAIN_FEATURES, TRAIN_HIDDEN), nn.ReLU(), nn.Linear(TRAIN_HIDDEN, TRAIN_CLASSES)
            )
        data = [
            (x[i * TRAIN_ROWS : (i + 1) * TRAIN_ROWS], y[i * TRAIN_ROWS : (i + 1) * TRAIN_ROWS]) for i in range(shards)
        ]
        job = Job.from_train_step(model, F.cross_entropy, data[0])
        return model, job, parameters_of(model), data


async def train_on(base: Path, peers: Sequence[PeerProcess], steps: int, figures: TrainFigures) -> None:
    """(c): train over the testnet, then the same steps locally."""
    from p2pcompute.client import open_client
    from p2pcompute.config import parse_price
    from p2pcompute.train import train, train_locally

    _, job, params, data = await trio.to_thread.run_sync(training_setup, len(peers))
    figures.steps, figures.shards = steps, len(data)
    async with open_client(peers[0].addrs[:1], data_dir=base / "client-train", listen=("/ip4/127.0.0.254/tcp/0",)) as c:
        await c.wait_for_workers(job, parse_price(TRAIN_MAX_PRICE), count=len(peers))
        began = time.perf_counter()
        remote = await train(c, job, params, data, steps=steps, lr=TRAIN_LR, max_price=TRAIN_MAX_PRICE)
        figures.remote_s = time.perf_counter() - began
    began = time.perf_counter()
    local = train_locally(job, params, data, steps=steps, lr=TRAIN_LR)
    figures.local_s = time.perf_counter() - began
    figures.first_loss = local.losses[0]
    figures.remote_loss, figures.local_loss = remote.losses[-1], local.losses[-1]
    figures.max_param_diff = max(float((a - b).abs().max()) for a, b in zip(remote.params, local.params, strict=True))
    figures.workers, figures.credits = len(remote.workers), remote.price


async def testbed(args: argparse.Namespace) -> Testbed:
    bed = Testbed()
    config = TestnetConfig(
        peers=args.peers, timeout_s=120.0, extra_args=("--slots", str(args.slots)) if args.slots != 1 else ()
    )

    async def work(base: Path, peers: Sequence[PeerProcess]) -> None:
        print(f"testnet of {len(peers)} peers ready; (a) {args.tasks} tasks ...", flush=True)
        bed.map = await run_map_tasks(base / "client", peers, args.tasks)
        if args.steps:
            print(f"(c) {args.steps} training steps ...", flush=True)
            try:
                await train_on(base, peers, args.steps, bed.train)
            except Exception as exc:  # reported beside the other figures, not raised
                bed.train.error = f"{type(exc).__name__}: {exc}"

    report = await run_testnet(config, then=work)
    bed.startup_s = report.startup_s
    if not report.converged:
        raise SystemExit(f"the testnet did not converge: {report.adverts_per_peer}")
    return bed


# -- printing -------------------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def print_a(bed: Testbed, args: argparse.Namespace) -> dict[str, Any]:
    m = bed.map
    print(f"\n(a) {args.tasks} tiny tasks through client.map, testnet of {args.peers} peers x {args.slots} slot(s)")
    if m is None or m.summary is None:
        print(f"    failed: {m.error if m else 'no map ran'}")
        return {"error": m.error if m else "no map ran"}
    s = m.summary
    print(
        f"    {s.done}/{s.tasks} done, {s.failed} failed, {s.retried} placed again, {s.workers} workers, "
        f"{m.mismatches} differ from local execution; wall {s.wall_s:.2f} s"
    )
    print(f"    throughput   {s.throughput:8.1f} tasks/s   ({s.throughput / m.slots:.1f} per slot)")
    print(
        f"    utilisation  {m.utilisation:8.1%}   of {m.slots} slots x {s.wall_s:.2f} s "
        f"({m.slot_busy_s:.1f} slot-seconds held)   goal >= {UTILISATION_GOAL:.0%}   "
        f"ratio to goal {m.utilisation / UTILISATION_GOAL:.2f}   {verdict(m.utilisation >= UTILISATION_GOAL)}"
    )
    print(f"    executors    {m.exec_share:8.1%}   of the slot-time ({m.exec_s:.1f} s running jobs)")
    return m.to_json()


def print_b(batches: list[dict[str, Any]], maps: list[dict[str, Any]], overhead: float) -> dict[str, Any]:
    print("\n(b1) one sharded batch over 10 workers of speed 1x..10x (map_batch's split): makespan / ideal")
    print("     rows    granule  overhead   by speed   equal split   goal <= 1.1")
    for b in batches:
        print(
            f"     {b['rows']:<7d} {b['granule']:<8d} {b['overhead']:<9g}  {b['by_speed']:8.3f}   {b['equal']:11.3f}"
            f"   {verdict(b['by_speed'] <= MAKESPAN_GOAL)}"
        )
    print(f"     shards by speed for {batches[0]['rows']} rows: {batches[0]['shards']}")
    print(
        f"\n(b2) a map of many tasks on 10 one-slot workers of speed 1x..10x, real schedulers (simulated time; a task"
        f" is 10 units of work + {overhead:g} overhead): makespan / ideal"
    )
    print("     tasks   placement         makespan/ideal   utilisation   goal <= 1.1")
    for m in maps:
        print(
            f"     {m['tasks']:<7d} {m['placement']:<17s} {m['ratio']:14.3f}   {m['utilisation']:11.1%}"
            f"   {verdict(m['ratio'] <= MAKESPAN_GOAL)}"
        )
    return {"sharded_batch": batches, "map": maps}


def print_c(t: TrainFigures) -> dict[str, Any]:
    print(f"\n(c) data-parallel training: {t.steps} SGD steps, {t.shards} shards of {TRAIN_ROWS} rows, one task each")
    if t.error:
        print(f"    failed: {t.error}")
        return {"error": t.error}
    if not t.steps:
        print("    skipped (--steps 0)")
        return {}
    remote_rate, local_rate = t.steps / t.remote_s, t.steps / t.local_s
    print(f"    network  {remote_rate:8.2f} steps/s   final loss {t.remote_loss:.6f}   ({t.workers} workers)")
    print(f"    local    {local_rate:8.2f} steps/s   final loss {t.local_loss:.6f}   (first step {t.first_loss:.6f})")
    print(
        f"    ratio network/local steps/s {remote_rate / local_rate:.3f}; loss differs by "
        f"{abs(t.remote_loss - t.local_loss):.2e}, parameters by at most {t.max_param_diff:.2e}: "
        f"{'agree' if t.agree else 'DIFFER'} (rtol {TRAIN_RTOL:g})"
    )
    return {
        "steps": t.steps,
        "shards": t.shards,
        "network_steps_per_s": remote_rate,
        "local_steps_per_s": local_rate,
        "network_final_loss": t.remote_loss,
        "local_final_loss": t.local_loss,
        "first_loss": t.first_loss,
        "max_param_diff": t.max_param_diff,
        "agree": t.agree,
        "credits_micro": t.credits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 peers, 100 tasks, 3 training steps")
    parser.add_argument("--peers", type=int, help="testnet peer processes, every one a worker [default: 5]")
    parser.add_argument("--tasks", type=int, help="(a) tasks [default: 1000]")
    parser.add_argument("--slots", type=int, default=1, help="slots per peer [default: 1]")
    parser.add_argument("--steps", type=int, help="(c) training steps; 0 skips (c) [default: 10]")
    parser.add_argument("--no-testnet", action="store_true", help="(b) only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.peers = args.peers or (3 if args.quick else 5)
    args.tasks = args.tasks or (100 if args.quick else 1000)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 10)
    logging.basicConfig(level=logging.WARNING)

    overhead = 0.5
    batches = sharded_batches((100, 1000, 100_000), (1,), (0.0,)) + sharded_batches((1000,), (8,), (0.0, 5.0))
    maps = simulated_maps((100, 1000) if not args.quick else (100, 300), overhead)
    figures: dict[str, Any] = {}
    if not args.no_testnet:
        bed = trio.run(testbed, args)
        print(f"\ntestnet start-up {bed.startup_s:.1f} s (not counted)")
        figures["a"] = print_a(bed, args)
    figures["b"] = print_b(batches, maps, overhead)
    if not args.no_testnet:
        figures["c"] = print_c(bed.train)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
