"""Helpers for job tests and benchmarks: worker peers started in-process with :func:`p2pcompute.node.serve`.

Every worker listens on its own loopback IP (``127.0.0.<i+1>``) so the matcher sees distinct address groups;
worker 0 is the bootstrap peer of the others and of the client. Workers start under the caller's nursery
(structured: ``nursery.start``), each in its own cancel scope, so a test can stop one mid-job
(:meth:`WorkerPeer.stop`) and start it again on the same data directory (:func:`start_worker`).
Every wait here is bounded by a named timeout.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pcompute.client import Client, open_client
from p2pcompute.config import NodeConfig
from p2pcompute.core import codec
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.jobspec import job_digest
from p2pcompute.core.messages import Requirements
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.net.negotiate import PreparedJob, WorkerResult, open_session
from p2pcompute.node import NodeInfo, serve

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from p2pcompute.client import Job
    from p2pcompute.testing.adversary import CheatSettings

__all__ = [
    "WORKER_START_TIMEOUT_S",
    "WORKER_STOP_TIMEOUT_S",
    "WorkerPeer",
    "cluster",
    "prepared_from_wire",
    "run_on",
    "spec_wire",
    "start_worker",
    "worker_config",
    "write_hardware_cache",
]

WORKER_START_TIMEOUT_S = 90.0  # a cold executor child imports torch: seconds, more on a loaded 2-core machine
WORKER_STOP_TIMEOUT_S = 15.0  # host close (~0.2 s per connection) and killing the executor children
MARKET_TIMEOUT_S = 20.0  # until a client's market lists the workers it should
SESSION_TIMEOUT_S = 120.0  # one direct negotiation with a chosen worker
ADVERTISE_INTERVAL_S = 1.0
ADVERT_TTL_S = 30.0
HARDWARE_CACHE_FILE = "hardware.json"  # = p2pcompute.compute.gpu.CACHE_FILE


def write_hardware_cache(data_dirs: Sequence[Path]) -> None:
    """Probe this machine once (in this process, no benchmark) and store the report in each data dir.

    ``serve`` otherwise probes in a child process per worker, which imports torch (seconds each).
    """
    from p2pcompute.compute.gpu import CACHE_FILE, probe

    text = json.dumps(probe(benchmark=False).to_json(), indent=2)
    for directory in data_dirs:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        (directory / CACHE_FILE).write_text(text)


def worker_config(base: Path, index: int, bootstrap: Sequence[str] = (), **changes: Any) -> NodeConfig:
    """The config of worker ``index``: data dir ``base/w<index>``, listening on ``127.0.0.<index+1>``."""
    config = NodeConfig(
        data_dir=base / f"w{index}",
        listen=(f"/ip4/127.0.0.{index + 1}/tcp/0",),
        bootstrap=tuple(bootstrap),
        status_port=0,
        probe_benchmark=False,
        advertise_interval=ADVERTISE_INTERVAL_S,
        advert_ttl=ADVERT_TTL_S,
    )
    return replace(config, **changes).validate()


@dataclass(frozen=True)
class WorkerPeer:
    """A running worker: its config, what ``serve`` reported, the scope that stops it, how it cheats (if it does)."""

    index: int
    config: NodeConfig
    info: NodeInfo
    scope: trio.CancelScope
    stopped: trio.Event
    cheat: CheatSettings | None = None

    @property
    def peer(self) -> PeerId:
        return PeerId.from_base58(self.info.peer_id)

    @property
    def addr(self) -> str:
        """The first listen address, with ``/p2p/<id>`` (a bootstrap address)."""
        return self.info.addrs[0]

    def stop_now(self) -> None:
        """Cancel the worker's ``serve`` (usable from a sync callback); :meth:`stop` also waits for the end."""
        self.scope.cancel()

    async def stop(self) -> None:
        self.scope.cancel()
        with trio.fail_after(WORKER_STOP_TIMEOUT_S):
            await self.stopped.wait()


async def _run_worker(
    index: int, config: NodeConfig, cheat: CheatSettings | None, *, task_status: TaskStatus[WorkerPeer]
) -> None:
    stopped = trio.Event()
    wrap = cheat.validate().wrap_executor if cheat is not None else None
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(functools.partial(serve, wrap_executor=wrap), config)
                task_status.started(WorkerPeer(index, config, info, scope, stopped, cheat))
    finally:
        stopped.set()


async def start_worker(
    nursery: trio.Nursery, index: int, config: NodeConfig, *, cheat: CheatSettings | None = None
) -> WorkerPeer:
    """Start one worker in ``nursery``; returns once it listens and has published its first advert.

    With ``cheat`` the worker is an adversary (``serve(..., wrap_executor=cheat.wrap_executor)``): a fresh cheater
    per start, as a restarted process would have.
    """
    with trio.fail_after(WORKER_START_TIMEOUT_S):
        peer: WorkerPeer = await nursery.start(_run_worker, index, config, cheat)
    return peer


@asynccontextmanager
async def cluster(
    base: Path,
    count: int,
    *,
    configure: Callable[[int, NodeConfig], NodeConfig] = lambda index, config: config,
    cheats: Mapping[int, CheatSettings] | None = None,
) -> AsyncIterator[list[WorkerPeer]]:
    """``count`` workers under ``base``: worker 0 first, then the others (bootstrapping from it) at once.

    ``configure(index, config)`` may change a worker's config (price, slots, ...); ``cheats`` makes the workers it
    names cheat (:func:`start_worker`). All are stopped on exit.
    """
    cheats = cheats or {}
    configs = [worker_config(base, i) for i in range(count)]
    await trio.to_thread.run_sync(write_hardware_cache, [c.data_dir for c in configs])
    async with trio.open_nursery() as nursery:
        first = await start_worker(nursery, 0, configure(0, configs[0]), cheat=cheats.get(0))
        peers: list[WorkerPeer | None] = [first] + [None] * (count - 1)

        async def start(i: int) -> None:
            config = configure(i, replace(configs[i], bootstrap=(first.addr,)))
            peers[i] = await start_worker(nursery, i, config, cheat=cheats.get(i))

        async with trio.open_nursery() as starting:
            for i in range(1, count):
                starting.start_soon(start, i)
        try:
            yield [p for p in peers if p is not None]
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(workers: Sequence[WorkerPeer], data_dir: Path, *, wait_for: int = 0) -> AsyncIterator[Client]:
    """A client bootstrapped from worker 0 only; with ``wait_for``, wait until that many adverts are known."""
    async with open_client([workers[0].addr], data_dir=data_dir, listen=("/ip4/127.0.0.200/tcp/0",)) as client:
        if wait_for:
            with trio.fail_after(MARKET_TIMEOUT_S):
                await client.node.wait_for(lambda: len(client.node.market) >= wait_for)
        yield client


async def wait_for_advert(client: Client, worker: WorkerPeer) -> None:
    """Wait until the client's market holds an advert of ``worker`` naming its current address."""

    def known() -> bool:
        return any(
            e.peer_id == worker.peer and worker.addr in e.advert.addrs
            for e in client.node.market.adverts(client.clock())
        )

    with trio.fail_after(MARKET_TIMEOUT_S):
        await client.node.wait_for(known)


async def run_on(
    client: Client,
    worker: WorkerPeer,
    job: PreparedJob,
    *,
    max_price: int = 1_000_000,
    deadline_s: float = 60.0,
    pay: bool = True,
    job_id: bytes | None = None,
) -> WorkerResult:
    """Negotiate ``job`` with one chosen worker directly (no matching); pays for the result when ``pay``."""
    with trio.fail_after(SESSION_TIMEOUT_S):
        async with open_session(
            client.node.host,
            client.keypair,
            worker.peer,
            worker.info.addrs,
            job,
            max_price=max_price,
            deadline=client.clock() + int(deadline_s * 1000),
            seen=client.seen,
            clock=client.clock,
            job_id=job_id,
        ) as session:
            result = await session.run()
            if pay:
                await session.pay()
            else:
                await session.reject("test", "not paying")
            return result


def spec_wire(job: Job) -> dict[str, Any]:
    """The job's spec as a mutable wire map (to build hostile variants that ``encode_job`` would refuse)."""
    wire: dict[str, Any] = codec.unpack(job.spec_bytes, codec.DecodeLimits(max_array_len=1 << 20, max_depth=16))
    return wire


def prepared_from_wire(
    wire: object | bytes,
    *,
    tensors: Sequence[TensorMeta] = (),
    blobs: dict[bytes, bytes] | None = None,
    requirements: Requirements | None = None,
) -> PreparedJob:
    """A :class:`PreparedJob` from a wire map (packed canonically) or raw spec bytes, with no checks at all."""
    spec_bytes = wire if isinstance(wire, bytes) else codec.pack(wire)
    return PreparedJob(
        spec_bytes=spec_bytes,
        digest=job_digest(spec_bytes),
        tensors=tuple(tensors),
        blobs=blobs or {},
        requirements=requirements
        or Requirements(
            device_kind=None,
            memory_bytes=1 << 20,
            input_bytes=sum(m.nbytes for m in tensors),
            output_bytes=1 << 10,
            op_count=1,
            flops=1,
        ),
    )


def client_key(name: str) -> KeyPair:
    """A fixed client key per name (stable peer ids across runs)."""
    import hashlib

    return KeyPair.from_seed(hashlib.sha256(f"p2pcompute-tests/client/{name}".encode()).digest())


def chain_module(n: int, steps: int) -> Any:
    """A compute-bound test program, ``steps`` rounds of ``tanh(x @ w)`` on an n-by-n input (values stay bounded)."""
    import torch  # only tests and benchmarks that build jobs need it

    class Chain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(n, n) / n**0.5, requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(steps):
                x = torch.tanh(x @ self.w)
            return x

    return Chain()
