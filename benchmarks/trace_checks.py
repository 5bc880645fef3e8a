"""Committed traces: what they cost the worker and the client, and how often a faked node is caught.

    .venv/bin/python -m benchmarks.trace_checks [--runs 7] [--trials 10] [--threads 1] [--executor] [--skip-memory]

Jobs: the MLP of ``p2pcompute/trial.py`` (4x32 → 64 → 8), ``chain_module(512, 8)`` (8 x ``tanh(x @ w)``), a small
conv net, and (costs only) ``chain_module(1024, 4)``; all float32 with the default tolerance (rtol 1e-4, atol 1e-5).

**Worker** (this process, the interpreter the executor child runs): median time of ``execute`` with no trace,
with digests only (``TraceSink(budget=0)``), and with the default trace (bytes kept up to 64 MiB); the peak RSS each
adds (a fresh process per variant, after a warm-up run); with ``--executor`` also through a real executor child
(``exec_ms``, and ``total_ms``, which includes sending the kept bytes over the pipe).

**Client**: checking every node against its committed inputs (Freivalds for matrix products, projections for
convolutions, recomputation for the rest) against running the whole job again: time, flops, bytes fetched.

**Detection**: for each node, a self-consistent fake (the node's output changed, everything downstream computed
honestly from it) checked at every node, ``--trials`` times with fresh check seeds: every element off by 10x and by
2x what the tolerance allows, one element off by 10x and by 1000x, and every element off by 0.5x (within the
tolerance: must pass). Caught means: the faked node fails its check, and no other node does.

Timings use ``--threads`` intra-op threads (default 1: on a shared 2-core machine OpenMP barriers under load make
multi-threaded timings of small kernels meaningless).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from p2pcompute.compute.check import CheckMethod, TraceChecker, build_trace, check_costs
from p2pcompute.compute.executor import open_executor
from p2pcompute.compute.export import ExportedJob, export_job
from p2pcompute.compute.interpreter import TraceSink, dry_run, execute
from p2pcompute.core.jobspec import Comparison
from p2pcompute.core.trace import TRACE_BYTES_BUDGET
from p2pcompute.testing.jobs import chain_module

MIB = 1 << 20


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(y.mean((2, 3)))


def jobs() -> dict[str, ExportedJob]:
    from p2pcompute.trial import _demo_model  # the trial's job: the same model and input shape

    torch.manual_seed(0)
    return {
        "mlp (trial)": export_job(_demo_model(0), (torch.randn(4, 32),)),
        "chain 512x8": export_job(chain_module(512, 8), (torch.randn(512, 512),)),
        "conv net": export_job(ConvNet().eval(), (torch.randn(8, 3, 32, 32),)),
        "chain 1024x4": export_job(chain_module(1024, 4), (torch.randn(1024, 1024),)),
    }


DETECTION_JOBS = ("mlp (trial)", "chain 512x8", "conv net")  # every node faked in turn: the small ones


def _median_s(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- worker ----------------------------------------------------------------------------------------------------------


@dataclass
class WorkerCost:
    plain_s: float
    digests_s: float
    trace_s: float
    committed_bytes: int
    kept_bytes: int
    complete: bool


def worker_cost(job: ExportedJob, runs: int) -> WorkerCost:
    plain = _median_s(lambda: execute(job.spec, job.blobs), runs)
    digests = _median_s(lambda: execute(job.spec, job.blobs, trace=TraceSink(budget=0)), runs)
    trace = _median_s(lambda: execute(job.spec, job.blobs, trace=TraceSink()), runs)
    sink = TraceSink()
    execute(job.spec, job.blobs, trace=sink)
    committed = sum(m.nbytes for leaf in sink.leaves for m in leaf.outputs)
    return WorkerCost(plain, digests, trace, committed, sink.kept_bytes, sink.complete)


def _probe_memory(bundle: str, variant: str) -> None:
    """In a fresh process (no export in it): the peak RSS one run of ``variant`` adds to the RSS after warm-up runs
    (the high-water mark reset through ``/proc/self/clear_refs``)."""
    from pathlib import Path

    from p2pcompute.core.jobspec import decode_bundle, decode_job

    spec_bytes, blobs = decode_bundle(Path(bundle).read_bytes())
    spec = decode_job(spec_bytes)
    for _ in range(2):
        execute(spec, blobs)
        execute(spec, blobs, trace=TraceSink())
    sink = {"plain": None, "digests": TraceSink(budget=0), "trace": TraceSink()}[variant]
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    execute(spec, blobs, trace=sink)
    print(json.dumps({"added_kib": _status_kib("VmHWM") - before}))


def _status_kib(field: str) -> int:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_cost(job: ExportedJob, threads: int) -> dict[str, int]:
    import tempfile
    from pathlib import Path

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "job.bundle"
        bundle.write_bytes(job.bundle())
        for variant in ("plain", "digests", "trace"):
            out[variant] = _probe(str(bundle), variant, threads)
    return out


def _probe(bundle: str, variant: str, threads: int) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.trace_checks", "--threads", str(threads), "--probe", bundle, variant],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["added_kib"]) * 1024


async def executor_cost(job: ExportedJob, runs: int, threads: int) -> dict[str, float]:
    import trio

    variants = {"plain": (False, 0), "digests": (True, 0), "trace": (True, TRACE_BYTES_BUDGET)}
    results: dict[str, list[tuple[int, int]]] = {name: [] for name in variants}
    async with open_executor(workers=1, device="cpu", threads=threads) as executor:
        for round_ in range(runs + 1):  # the first round warms up
            for name, (trace, budget) in variants.items():
                with trio.fail_after(120):
                    result = await executor.run(job.spec_bytes, job.blobs, trace=trace, trace_budget=budget)
                if round_:
                    results[name].append((result.timings.exec_ms, result.timings.total_ms))
    out = {}
    for name in variants:
        out[f"{name}_exec_ms"] = statistics.median(e for e, _ in results[name])
        out[f"{name}_total_ms"] = statistics.median(t for _, t in results[name])
    return out


# --- client ----------------------------------------------------------------------------------------------------------


@dataclass
class ClientCost:
    rerun_s: float
    job_flops: int
    setup_s: float
    check_s: float
    check_flops: int
    fetch_bytes: int
    output_bytes: int
    by_method: dict[str, tuple[int, int, int]]  # method -> (nodes, node flops, check flops)


def client_cost(job: ExportedJob, runs: int) -> ClientCost:
    leaves, kept, _ = build_trace(job.spec, job.blobs)
    nodes = range(len(leaves))
    rerun = _median_s(lambda: execute(job.spec, job.blobs), runs)
    setup = _median_s(lambda: TraceChecker(job.spec, job.blobs, leaves), runs)
    checker = TraceChecker(job.spec, job.blobs, leaves)
    needed = checker.needed(nodes)
    fetched = {d: kept[d] for d in needed}
    check = _median_s(lambda: checker.check(nodes, fetched, seed=1), runs)
    checks = checker.check(nodes, fetched, seed=1)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    plan = dry_run(job.spec)
    by_method: dict[str, tuple[int, int, int]] = {}
    for cost, done in zip(check_costs(job.spec, plan), checks, strict=True):
        n, node_flops, check_flops = by_method.get(cost.method.value, (0, 0, 0))
        by_method[cost.method.value] = (n + 1, node_flops + cost.node_flops, check_flops + done.flops)
    return ClientCost(
        rerun_s=rerun,
        job_flops=plan.flops,
        setup_s=setup,
        check_s=check,
        check_flops=sum(c.flops for c in checks),
        fetch_bytes=sum(len(kept[d]) for d in needed),
        output_bytes=plan.output_bytes,
        by_method=by_method,
    )


# --- detection -------------------------------------------------------------------------------------------------------

Fake = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _dense(factor: float, compare: Comparison) -> Fake:
    def fake(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        first = outs[0]
        if first.is_floating_point():
            step = (compare.atol + compare.rtol * first.abs().to(torch.float64)) * factor
            first = (first.to(torch.float64) + step).to(first.dtype)
        else:
            first = first.clone(memory_format=torch.contiguous_format)
            flat = first.view(-1)
            flat[0] = ~flat[0] if first.dtype == torch.bool else flat[0] + 1
        return [first, *outs[1:]]

    return fake


def _one(factor: float, compare: Comparison, where: int) -> Fake:
    def fake(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        first = outs[0].clone(memory_format=torch.contiguous_format)
        flat = first.view(-1)
        i = where % max(1, flat.numel())
        if first.is_floating_point():
            x = float(flat[i])
            flat[i] = x + factor * (compare.atol + compare.rtol * abs(x))
        elif first.dtype == torch.bool:
            flat[i] = ~flat[i]
        else:
            flat[i] += 1
        return [first, *outs[1:]]

    return fake


KINDS: dict[str, tuple[Callable[[Comparison, int], Fake], bool]] = {  # name -> (fake, should be caught)
    "all elements 10x tol": (lambda c, w: _dense(10.0, c), True),
    "all elements 2x tol": (lambda c, w: _dense(2.0, c), True),
    "one element 1000x tol": (lambda c, w: _one(1000.0, c, w), True),
    "one element 10x tol": (lambda c, w: _one(10.0, c, w), True),
    "all elements 0.5x tol": (lambda c, w: _dense(0.5, c), False),
}


@dataclass
class Detection:
    trials: int = 0
    caught: int = 0
    blamed_elsewhere: int = 0
    by_method: dict[str, list[int]] | None = None  # method -> [trials, caught]


def detection(job: ExportedJob, trials: int) -> dict[str, Detection]:
    out: dict[str, Detection] = {}
    spec = job.spec
    honest, _, _ = build_trace(spec, job.blobs)
    for kind, (make, should) in KINDS.items():
        found = Detection(by_method={})
        for node in range(len(spec.nodes)):
            leaves, kept, _ = build_trace(spec, job.blobs, fakes={node: make(spec.compare, 7919 * node + 13)})
            if leaves[node] == honest[node]:
                continue  # the fake changes nothing at this node (e.g. rounded away)
            checker = TraceChecker(spec, job.blobs, leaves)
            method = checker.costs()[node].method.value
            assert found.by_method is not None
            tally = found.by_method.setdefault(method, [0, 0])
            for trial in range(trials):
                checks = checker.check(range(len(leaves)), kept, seed=1000 * trial + node)
                failed = {c.node for c in checks if not c.ok}
                hit = failed == {node} if should else not failed
                found.trials += 1
                tally[0] += 1
                if hit:
                    found.caught += 1
                    tally[1] += 1
                if failed - {node}:
                    found.blamed_elsewhere += 1
        out[kind] = found
    return out


# --- report ----------------------------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1000:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median) [7]")
    parser.add_argument("--trials", type=int, default=10, help="check seeds per faked node [10]")
    parser.add_argument("--executor", action="store_true", help="also time trace on/off in a real executor child")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-RSS probes (a process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads here and in the child [1]")
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        _probe_memory(*args.probe)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    all_jobs = jobs()
    names = list(all_jobs)
    col = 16

    def row(label: str, cells: list[str]) -> None:
        print(f"{label:44}" + "".join(f"{c:>{col}}" for c in cells))

    print("\n== worker: committing to every intermediate ==")
    row("", names)
    workers = {n: worker_cost(all_jobs[n], args.runs) for n in names}
    row("execute, no trace", [_ms(workers[n].plain_s) for n in names])
    row("execute, digests only (budget 0)", [_ms(workers[n].digests_s) for n in names])
    row("execute, trace (bytes kept <= 64 MiB)", [_ms(workers[n].trace_s) for n in names])
    row("  ratio digests / no trace", [f"{workers[n].digests_s / workers[n].plain_s:.3f}" for n in names])
    row("  ratio trace / no trace", [f"{workers[n].trace_s / workers[n].plain_s:.3f}" for n in names])
    row("bytes committed (all intermediates)", [f"{workers[n].committed_bytes / MIB:.2f} MiB" for n in names])
    row("bytes kept / complete", [f"{workers[n].kept_bytes / MIB:.2f} MiB {workers[n].complete}" for n in names])
    if not args.skip_memory:
        memory = {n: memory_cost(all_jobs[n], args.threads) for n in names}
        for variant in ("plain", "digests", "trace"):
            row(f"peak RSS added by one run, {variant}", [f"{memory[n][variant] / MIB:.1f} MiB" for n in names])
    if args.executor:
        import trio

        timed = {n: trio.run(executor_cost, all_jobs[n], args.runs, args.threads) for n in names}
        for key in ("exec", "total"):
            for variant in ("plain", "digests", "trace"):
                row(f"executor child {key}_ms, {variant}", [f"{timed[n][f'{variant}_{key}_ms']:.0f} ms" for n in names])
        for variant in ("digests", "trace"):
            row(
                f"  ratio total_ms, {variant} / no trace",
                [f"{timed[n][f'{variant}_total_ms'] / max(1.0, timed[n]['plain_total_ms']):.3f}" for n in names],
            )

    print("\n== client: checking every node against its committed inputs ==")
    row("", names)
    clients = {n: client_cost(all_jobs[n], args.runs) for n in names}
    row("re-running the job", [_ms(clients[n].rerun_s) for n in names])
    row("checker setup (dry run, leaves vs shapes)", [_ms(clients[n].setup_s) for n in names])
    row("checking all nodes", [_ms(clients[n].check_s) for n in names])
    row("  ratio check time / re-run", [f"{clients[n].check_s / clients[n].rerun_s:.3f}" for n in names])
    row("job flops (dry run)", [f"{clients[n].job_flops / 1e6:.2f} M" for n in names])
    row("check flops, all nodes", [f"{clients[n].check_flops / 1e6:.2f} M" for n in names])
    row("  ratio check flops / job flops", [f"{clients[n].check_flops / clients[n].job_flops:.3f}" for n in names])
    for method in CheckMethod:
        cells = []
        for n in names:
            count, node_flops, check_flops = clients[n].by_method.get(method.value, (0, 0, 0))
            cells.append(f"{count}: {check_flops / max(1, node_flops):.3f}" if count else "-")
        row(f"  {method.value} nodes: check/node flops", cells)
    row("bytes fetched, all nodes", [f"{clients[n].fetch_bytes / MIB:.2f} MiB" for n in names])
    row("  ratio fetched / job outputs", [f"{clients[n].fetch_bytes / clients[n].output_bytes:.0f}" for n in names])

    print(f"\n== detection: one faked node, all nodes checked, {args.trials} check seeds per faked node ==")
    names = [n for n in names if n in DETECTION_JOBS]
    row("", names)
    found = {n: detection(all_jobs[n], args.trials) for n in names}
    for kind, (_, should) in KINDS.items():
        label = f"{kind} ({'caught at it' if should else 'passes'})"
        row(label, [f"{found[n][kind].caught}/{found[n][kind].trials}" for n in names])
        for method in CheckMethod:
            cells = []
            for n in names:
                tally = (found[n][kind].by_method or {}).get(method.value)
                cells.append(f"{tally[1]}/{tally[0]}" if tally else "-")
            if any(c != "-" for c in cells):
                row(f"  {method.value} nodes", cells)
        blamed = [found[n][kind].blamed_elsewhere for n in names]
        if any(blamed):
            row("  another node failed too", [str(b) for b in blamed])


if __name__ == "__main__":
    main()
