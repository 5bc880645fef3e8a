"""A testnet's client process: runs verified jobs from its own network namespace and reports each one.

``p2pcompute testnet --netns`` starts it inside the client's namespace (``ip netns exec``), so it reaches the
workers only through the namespaces' links (NAT routers, relays, fault proxies)::

    python -m p2pcompute.testing.netclient --bootstrap /ip4/10.77.0.2/tcp/4001/p2p/12D3KooW... \\
        --data-dir DIR --listen /ip4/10.77.0.5/tcp/4001 --workers 2 --jobs 20 --workload mlp --report out.json

It opens a client (:func:`p2pcompute.client.open_client`), waits (bounded) until it knows ``--workers`` eligible
workers, each ``--expect`` peer among them (and, for each ``--wait-relayed`` peer, an advert with a relayed
address), then runs jobs: ``--jobs N`` in
all, or for ``--duration S`` seconds, ``--concurrency`` at a time; with ``--each-worker`` the jobs go to each worker
in turn (``client.run(only=...)``), one at a time per worker, so figures come per worker (a relayed one beside a
hole-punched one); a worker the client flagged gets no more (``not sent``). Every job's inputs are fresh (seeded by
``--seed`` and the job's index), and every accepted result is compared with local execution of the same module: an
accepted result that differs is a **wrong result accepted**.

Standard output carries JSON lines, one per event, for the testnet to act on (it kills a worker mid-job on
``phase``)::

    {"event": "ready", "peer_id": ..., "open_s": ...}
    {"event": "market", "workers": {peer: [addrs...]}}
    {"event": "phase", "job": 3, "worker": peer, "phase": "running", "t": 12.345}
    {"event": "job", ... one JobRecord ...}
    {"event": "done", "jobs": N}

and ``--report FILE`` gets the whole run as one JSON document (:class:`ClientReport`). Each job record says whether
the result was accepted and right, which workers were paid, how long it took to the result (``first_result_s``:
from ``client.run`` to the accepted result's arrival) and in all, how fast its inputs went up (``upload_rate_bps``,
bytes per second from the ``uploading`` to the ``running`` phase), and whether the connection the result came over
was relayed (:func:`p2pcompute.net.reach.is_relayed`), and how far the result is from local execution
(``max_abs_diff``); a wrong result accepted is saved beside its inputs and the truth (``wrong-<job>.pt`` in
``--data-dir``). The client's ledger (its SQLite store in ``--data-dir``)
records what it paid; the testnet checks it against the workers' ledgers after the run.

Workloads (``--workload``): ``mlp`` (the demo MLP, 64 -> 128 -> 128 -> 10, batch 32: milliseconds of work),
``chain`` (tanh(x @ w) 12 times on 384 x 384: long enough that a worker killed on ``running`` dies mid-job) and
``bulk`` (tanh(x).mean(0) of a 4 MiB input: a transfer-rate figure).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
import trio

if TYPE_CHECKING:
    import torch

    from p2pcompute.client import Client, Job, ProgressEvent

__all__ = ["WORKLOADS", "ClientReport", "JobRecord", "Workload", "main", "make_workload"]

log = logging.getLogger(__name__)

WORKLOADS: Final = ("mlp", "chain", "bulk")
CHAIN_N: Final = 384  # chain: n x n input and weight ...
CHAIN_STEPS: Final = 12  # ... this many tanh(x @ w) rounds (~0.1-0.5 s on one CPU core)
BULK_SHAPE: Final = (1024, 1024)  # bulk: a 4 MiB float32 input
MAX_PRICE: Final = "0.05"  # credits per job
MARKET_WAIT_S: Final = 60.0  # until --workers eligible workers are known (and relayed adverts seen)
LINGER_S: Final = 3.0  # after the last job, before leaving: receipts still on their way arrive
TRUTH_RTOL: Final = 1e-4  # an accepted result further than this from local execution is wrong
TRUTH_ATOL: Final = 1e-5
ERROR_CHARS: Final = 400


@dataclass
class JobRecord:
    """One job as the client saw it."""

    index: int
    job_digest: str = ""
    accepted: bool = False  # client.run returned a result
    wrong: bool = False  # ... and it differs from local execution
    worker: str = ""  # the worker whose result was returned
    paid: list[str] = field(default_factory=list)  # workers that got a receipt (the agreeing ones)
    price: int = 0  # micro-credits paid to the returned worker
    asked: list[str] = field(default_factory=list)  # every worker that got this job, in order
    only: str = ""  # --each-worker: the worker it was meant for
    elapsed_s: float = 0.0  # client.run, end to end
    first_result_s: float | None = None  # client.run until the accepted worker's result arrived
    upload_bytes: int = 0  # input tensors' bytes
    upload_s: float | None = None  # the accepted worker's "uploading" to "running" phase
    relayed: bool | None = None  # the connection the result came over went through a relay
    max_abs_diff: float | None = None  # the accepted result against local execution
    plan: str = ""
    error: str = ""

    @property
    def upload_rate_bps(self) -> float | None:
        if not self.upload_s or self.upload_s <= 0 or not self.upload_bytes:
            return None
        return self.upload_bytes / self.upload_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["upload_rate_bps"] = None if self.upload_rate_bps is None else round(self.upload_rate_bps, 1)
        for key in ("elapsed_s", "first_result_s", "upload_s"):
            if data[key] is not None:
                data[key] = round(data[key], 4)
        return data


@dataclass
class ClientReport:
    peer_id: str = ""
    workload: str = ""
    open_s: float = 0.0  # open_client until the market held --workers eligible workers
    first_verified_s: float | None = None  # client start to the first accepted, right result
    workers: dict[str, list[str]] = field(default_factory=dict)  # the market's workers and their addresses
    jobs: list[JobRecord] = field(default_factory=list)
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "workload": self.workload,
            "open_s": round(self.open_s, 3),
            "first_verified_s": None if self.first_verified_s is None else round(self.first_verified_s, 3),
            "workers": self.workers,
            "jobs": [j.to_json() for j in self.jobs],
            "error": self.error,
        }


@dataclass(frozen=True)
class Workload:
    """A job template and how to make each job's inputs and the truth it must match."""

    name: str
    template: Job
    inputs: Callable[[int], tuple[torch.Tensor, ...]]  # job index -> its inputs
    truth: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


def make_workload(name: str, seed: int) -> Workload:
    """The job of a workload, exported once; each job gets fresh inputs of the same shape (``Job.with_inputs``)."""
    with warnings.catch_warnings():  # torch's noise on a CPU-only install without numpy, and from torch.export
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        warnings.filterwarnings("ignore", category=FutureWarning)
        import torch

        from p2pcompute.client import Job

        module: Any
        shape: tuple[int, ...]
        if name == "mlp":
            from p2pcompute.testnet import demo_module

            module, (example,) = demo_module()
            shape = tuple(example.shape)
        elif name == "chain":
            from p2pcompute.testing.jobs import chain_module

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = chain_module(CHAIN_N, CHAIN_STEPS).eval()
            shape = (CHAIN_N, CHAIN_N)
        elif name == "bulk":

            def module(x: torch.Tensor) -> torch.Tensor:
                return torch.tanh(x).mean(dim=0)

            shape = BULK_SHAPE
        else:
            raise click.BadParameter(f"workload must be one of {', '.join(WORKLOADS)}, got {name!r}")
        example = torch.zeros(shape)
        template = Job.from_module(module, (example,))

    def inputs(index: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return (torch.randn(shape, generator=generator),)

    def truth(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            return module(*args)  # type: ignore[no-any-return]

    return Workload(name, template, inputs, truth)


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


@dataclass
class _Options:
    workers: int
    expect: tuple[str, ...]
    wait_relayed: tuple[str, ...]
    jobs: int
    duration_s: float
    each_worker: bool
    only: tuple[str, ...]
    concurrency: int
    redundancy: int | None
    deadline_s: float
    market_wait_s: float = MARKET_WAIT_S
    linger_s: float = LINGER_S


class _Runner:
    def __init__(self, client: Client, workload: Workload, options: _Options, report: ClientReport) -> None:
        self.client = client
        self.workload = workload
        self.options = options
        self.report = report
        self.started = time.monotonic()
        self.next_index = 0
        self.evidence_dir: Path | None = None  # wrong results accepted are saved here

    def _t(self) -> float:
        return round(time.monotonic() - self.started, 4)

    async def wait_for_market(self) -> None:
        from p2pcompute.core.reach import is_circuit_address

        client, options = self.client, self.options
        max_price = _micro(MAX_PRICE)
        wanted = set(options.wait_relayed)

        def ready() -> bool:
            candidates = {str(c.peer) for c in client.candidates(self.workload.template, max_price)}
            if len(candidates) < options.workers or not set(options.expect) <= candidates:
                return False
            adverts = {str(e.advert.peer_id): e.advert for e in client.node.market.adverts(client.clock())}
            return all(p in adverts and any(is_circuit_address(a) for a in adverts[p].addrs) for p in wanted)

        with trio.move_on_after(options.market_wait_s):
            await client.node.wait_for(ready)
        self.report.workers = {
            str(e.advert.peer_id): list(e.advert.addrs) for e in client.node.market.adverts(client.clock())
        }
        if not ready():
            raise click.ClickException(
                f"the market did not hold {max(options.workers, len(options.expect))} eligible worker(s)"
                + (f" with relayed addresses for {', '.join(sorted(wanted))}" if wanted else "")
                + f" within {options.market_wait_s:.0f} s (it holds {len(self.report.workers)})"
            )

    async def run_all(self) -> None:
        """``--concurrency`` loops taking the next job until ``--jobs`` or ``--duration``; with ``--each-worker``
        one loop per worker instead, each sending its worker every ``len(workers)``-th job, one at a time (so a
        worker's figures are its own, not time spent queueing behind another of its jobs)."""
        options = self.options
        deadline = trio.current_time() + options.duration_s if options.duration_s > 0 else None

        def more(index: int) -> bool:
            if deadline is not None and trio.current_time() >= deadline:
                return False
            return not options.jobs or index < options.jobs

        async def shared_loop() -> None:
            while more(self.next_index):
                index = self.next_index
                self.next_index += 1
                await self.one(index, None)

        async def worker_loop(slot: int, targets: list[str]) -> None:
            index = slot
            while more(index):
                await self.one(index, targets[slot])
                index += len(targets)

        async with trio.open_nursery() as nursery:
            if options.each_worker:
                targets = list(options.only) or sorted(self.report.workers)
                for slot in range(len(targets)):
                    nursery.start_soon(worker_loop, slot, targets)
            else:
                for _ in range(max(1, options.concurrency)):
                    nursery.start_soon(shared_loop)

    async def one(self, index: int, target: str | None) -> None:
        import torch
        from libp2p.peer.id import ID

        from p2pcompute.core.identity import PeerId
        from p2pcompute.errors import P2PComputeError
        from p2pcompute.net.reach import is_relayed

        client, workload = self.client, self.workload
        args = workload.inputs(index)
        job = workload.template.with_inputs(args)
        record = JobRecord(index=index, job_digest=job.digest.hex(), only=target or "")
        record.upload_bytes = sum(t.numel() * t.element_size() for t in args)
        phase_at: dict[tuple[str, str], float] = {}
        relayed_at: dict[str, bool] = {}
        run_started = time.monotonic()

        def progress(event: ProgressEvent) -> None:
            if event.worker is None:
                return
            worker = str(event.worker)
            if worker not in record.asked:
                record.asked.append(worker)
            key = (worker, event.phase)
            if key in phase_at:
                return
            phase_at[key] = time.monotonic()
            _emit("phase", job=index, worker=worker, phase=event.phase, t=self._t())
            if event.phase == "received":
                relayed_at[worker] = is_relayed(client.node.host, ID(event.worker.raw))

        only = None if target is None else (PeerId.from_base58(target),)
        options = self.options
        if only is not None and not client.node.reputation.eligible(only[0]):
            # A worker this client caught cheating (or was told of) is never asked again: the job is not sent.
            record.error = "not sent: the worker is flagged"
            self.report.jobs.append(record)
            _emit("job", **record.to_json())
            return
        try:
            result = await client.run(
                job,
                max_price=MAX_PRICE,
                deadline=options.deadline_s,
                redundancy=options.redundancy,
                progress=progress,
                only=only,
            )
        except (P2PComputeError, trio.TooSlowError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
        else:
            record.accepted = True
            record.worker = str(result.worker)
            record.paid = [str(p) for p in result.agreeing]
            record.price = result.price
            record.plan = result.plan
            truth = workload.truth(args)
            output = result.outputs[0].cpu()
            record.wrong = output.shape != truth.shape or not torch.allclose(
                output, truth, rtol=TRUTH_RTOL, atol=TRUTH_ATOL
            )
            if output.shape == truth.shape:
                record.max_abs_diff = float((output.double() - truth.double()).abs().max())
            if record.wrong and self.evidence_dir is not None:
                # What was accepted, beside what it should have been: for whoever looks into it.
                torch.save(
                    {"inputs": args, "output": output, "truth": truth, "summary": result.summary()},
                    self.evidence_dir / f"wrong-{index}.pt",
                )
            received = phase_at.get((record.worker, "received"))
            if received is not None:
                record.first_result_s = received - run_started
            up, running = phase_at.get((record.worker, "uploading")), phase_at.get((record.worker, "running"))
            if up is not None and running is not None:
                record.upload_s = running - up
            record.relayed = relayed_at.get(record.worker)
            if record.relayed is None:
                record.relayed = is_relayed(client.node.host, ID(result.worker.raw))
            if not record.wrong and self.report.first_verified_s is None:
                self.report.first_verified_s = time.monotonic() - self.started
        record.elapsed_s = time.monotonic() - run_started
        self.report.jobs.append(record)
        _emit("job", **record.to_json())


def _micro(price: str) -> int:
    from p2pcompute.config import parse_price

    return parse_price(price)


async def run_client(
    bootstrap: tuple[str, ...],
    data_dir: Path,
    listen: tuple[str, ...],
    workload_name: str,
    seed: int,
    options: _Options,
    report: ClientReport,
) -> None:
    from p2pcompute.client import open_client

    started = time.monotonic()
    workload = await trio.to_thread.run_sync(make_workload, workload_name, seed)
    report.workload = workload_name
    async with open_client(bootstrap, data_dir=data_dir, listen=listen) as client:
        report.peer_id = str(client.peer_id)
        runner = _Runner(client, workload, options, report)
        runner.started = started
        runner.evidence_dir = data_dir
        await runner.wait_for_market()
        report.open_s = time.monotonic() - started
        _emit("ready", peer_id=report.peer_id, open_s=round(report.open_s, 3))
        _emit("market", workers=report.workers)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                await runner.run_all()
                # The last receipts may still be on their way (a faulty link holds bytes for seconds): a client
                # that stays a moment, as a long-running one does, lets them arrive.
                await trio.sleep(options.linger_s)
                nursery.cancel_scope.cancel()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bootstrap", multiple=True, required=True, help="Peer to join through (repeatable).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--listen", multiple=True, default=("/ip4/0.0.0.0/tcp/0",), show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Wait for this many.")
@click.option("--expect", multiple=True, help="Wait until this worker is in the market (repeatable).")
@click.option("--wait-relayed", multiple=True, help="Wait until this peer's advert carries a relayed address.")
@click.option("--jobs", type=click.IntRange(min=0), default=10, show_default=True, help="0: until --duration.")
@click.option("--duration", type=click.FloatRange(min=0), default=0.0, help="Stop starting jobs after S seconds.")
@click.option("--each-worker", is_flag=True, help="Jobs go to each worker (--only, else every one) in turn.")
@click.option("--only", multiple=True, help="With --each-worker: these workers (repeatable).")
@click.option("--workload", type=click.Choice(WORKLOADS), default="mlp", show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--redundancy", type=click.IntRange(min=1), default=None, help="Quorum [default: the client's plan].")
@click.option("--deadline", type=click.FloatRange(min=1), default=120.0, show_default=True, help="Per job, s.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--market-wait", type=click.FloatRange(min=0), default=MARKET_WAIT_S, show_default=True)
@click.option("--linger", type=click.FloatRange(min=0), default=LINGER_S, show_default=True, help="After the jobs.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning")
def main(
    bootstrap: tuple[str, ...],
    data_dir: Path,
    listen: tuple[str, ...],
    workers: int,
    expect: tuple[str, ...],
    wait_relayed: tuple[str, ...],
    jobs: int,
    duration: float,
    each_worker: bool,
    only: tuple[str, ...],
    workload: str,
    concurrency: int,
    redundancy: int | None,
    deadline: float,
    seed: int,
    market_wait: float,
    linger: float,
    report_path: Path,
    log_level: str,
) -> None:
    """Run verified jobs from this namespace; JSON lines on stdout, the whole run in --report."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("libp2p.kad_dht").setLevel(logging.ERROR)
    if not jobs and not duration:
        raise click.UsageError("give --jobs N or --duration S")
    options = _Options(
        workers,
        expect,
        wait_relayed,
        jobs,
        duration,
        each_worker,
        only,
        concurrency,
        redundancy,
        deadline,
        market_wait,
        linger,
    )
    report = ClientReport()
    try:
        trio.run(run_client, bootstrap, data_dir, listen, workload, seed, options, report)
    except BaseException as exc:
        leaf = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, click.ClickException):
            report.error = leaf.format_message()
        else:
            report.error = f"{type(leaf).__name__}: {leaf}"[:ERROR_CHARS]
        log.debug("the client failed", exc_info=exc)
    finally:
        report_path.write_text(json.dumps(report.to_json(), indent=1))
        _emit("done", jobs=len(report.jobs), error=report.error)
    if report.error:
        raise click.ClickException(report.error)


if __name__ == "__main__":  # pragma: no cover
    main()
