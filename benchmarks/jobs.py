"""P1: a network job on loopback at redundancy 1 against local execution of the same program, side by side.

    .venv/bin/python -m benchmarks.jobs [--runs 5] [--tiny-runs 50] [--profile]

(i) a ~1 s job: median network elapsed / median local elapsed (local = ``Job.run_locally()``, the same
interpreter in this process); goal <= 1.05. (ii) round trip of a tiny job, p50/p95; goal p50 <= 15 ms.
One worker peer (real host, real executor child) and a client, in this trio process. The breakdown says where
the time goes: client-side phases from the progress callback, worker-side queue/load/exec from its timings.
``--profile`` runs the tiny jobs again under cProfile (this process: client and worker peer; not the child).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
import trio

from p2pcompute.client import Client, Job, ProgressEvent, RunResult
from p2pcompute.testing.jobs import chain_module, client_of, cluster

RATIO_GOAL = 1.05
RTT_GOAL_MS = 15.0
MAX_PRICE = 1_000_000
PHASES = ("matching", "negotiating", "uploading", "running", "downloading", "received", "done")
# Client-side spans: (label, from phase, to phase); the first event of each phase counts.
SPANS = (
    ("pick+dial+stream", "matching", "negotiating"),
    ("request/offer/accept", "negotiating", "uploading"),
    ("inputs", "uploading", "running"),
    ("worker run", "running", "downloading"),
    ("outputs", "downloading", "received"),
    ("verify+receipt", "received", "done"),
)


def second_job(target_s: float = 1.0) -> Job:
    """A compute-bound job calibrated to about ``target_s`` seconds of local execution."""
    n = 1024
    probe = Job.from_module(chain_module(n, 4), (torch.randn(n, n),))
    probe.run_locally()  # warm-up: first calls pay for allocation and dispatch caches
    start = time.perf_counter()
    probe.run_locally()
    per_step = (time.perf_counter() - start) / 4
    steps = max(1, round(target_s / per_step))
    return Job.from_module(chain_module(n, steps), (torch.randn(n, n),))


def tiny_job() -> Job:
    return Job.from_module(lambda a: a + 1, (torch.ones(4),))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed_run(client: Client, job: Job) -> tuple[float, RunResult, dict[str, float]]:
    marks: dict[str, float] = {}

    def note(event: ProgressEvent) -> None:
        marks.setdefault(event.phase, time.perf_counter())

    start = time.perf_counter()
    marks["matching"] = start
    result = await client.run(job, max_price=MAX_PRICE, deadline=60, redundancy=1, progress=note)
    return (time.perf_counter() - start) * 1000, result, marks


def breakdown(runs: list[tuple[float, RunResult, dict[str, float]]]) -> list[str]:
    lines = []
    for label, a, b in SPANS:
        spans = [(m[b] - m[a]) * 1000 for _, _, m in runs if a in m and b in m]
        if spans:
            lines.append(f"    client {label:<22} median {statistics.median(spans):8.2f} ms")
    for name in ("queue_ms", "load_ms", "exec_ms", "total_ms"):
        values = [float(getattr(r.timings, name)) for _, r, _ in runs]
        lines.append(f"    worker {name:<22} median {statistics.median(values):8.2f} ms")
    return lines


async def main(args: argparse.Namespace) -> None:
    print(f"torch threads here: {torch.get_num_threads()} (the executor child uses its own, see hardware class)")
    big = second_job()
    tiny = tiny_job()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        async with cluster(base, 1) as workers, client_of(workers, base / "client", wait_for=1) as client:
            # Warm-up: connection, the worker's tensor cache (constants), both interpreters.
            await timed_run(client, big)
            await timed_run(client, tiny)
            big.run_locally()

            local_ms, net_runs = [], []
            for _ in range(args.runs):
                start = time.perf_counter()
                big.run_locally()
                local_ms.append((time.perf_counter() - start) * 1000)
                net_runs.append(await timed_run(client, big))
            net_ms = [ms for ms, _, _ in net_runs]
            ratio = statistics.median(net_ms) / statistics.median(local_ms)
            hardware = net_runs[0][1].hardware_class
            print(f"\n(i) ~1 s job, {args.runs} runs each, worker {hardware}")
            print(
                f"    local   median {statistics.median(local_ms):8.1f} ms  ({', '.join(f'{v:.0f}' for v in local_ms)})"
            )
            print(f"    network median {statistics.median(net_ms):8.1f} ms  ({', '.join(f'{v:.0f}' for v in net_ms)})")
            print(
                f"    ratio network/local = {ratio:.3f}   goal <= {RATIO_GOAL}   "
                f"{'MET' if ratio <= RATIO_GOAL else 'MISSED'}"
            )
            print("\n".join(breakdown(net_runs)))

            tiny_runs = [await timed_run(client, tiny) for _ in range(args.tiny_runs)]
            rtt = [ms for ms, _, _ in tiny_runs]
            p50, p95 = pct(rtt, 0.5), pct(rtt, 0.95)
            start = time.perf_counter()
            for _ in range(args.tiny_runs):
                tiny.run_locally()
            local_tiny = (time.perf_counter() - start) * 1000 / args.tiny_runs
            print(
                f"\n(ii) tiny job round trip, {args.tiny_runs} runs: p50 {p50:.2f} ms  p95 {p95:.2f} ms  "
                f"(local {local_tiny:.3f} ms)   goal p50 <= {RTT_GOAL_MS} ms   "
                f"{'MET' if p50 <= RTT_GOAL_MS else 'MISSED'}"
            )
            print("\n".join(breakdown(tiny_runs)))

            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(args.tiny_runs):
                    await timed_run(client, tiny)
                profiler.disable()
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
                stats.print_stats(30)
                print(f"\ncProfile of {args.tiny_runs} tiny jobs (client + worker peer, this process), by tottime:")
                print(out.getvalue())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of the ~1 s job (each: local and network)")
    parser.add_argument("--tiny-runs", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="profile the tiny jobs with cProfile")
    logging.basicConfig(level=logging.WARNING)
    trio.run(main, parser.parse_args())
