"""Redundant verification end to end: real worker peers (some cheating), a real client, evidence over gossip.

Workers run in-process with :func:`p2pcompute.node.serve` (``p2pcompute.testing.jobs``); the tests look at them
from outside, as any operator would: their SQLite store (jobs, ledger, reputation) and their ``/metrics``.

Which workers a job goes to is made deterministic by what the client's market holds: a job with redundancy k
goes to all k workers the client knows, and further (honest) workers are started *isolated* (no bootstrap,
unknown to anyone) and joined to the client only once the first ones are asked. Escalation then has to wait for
their adverts (``client.ESCALATION_WAIT_S``), the path a real network takes when workers come and go.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import torch
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pcompute.client import Client, Job, ProgressEvent
from p2pcompute.config import NodeConfig
from p2pcompute.core.envelope import open_envelope
from p2pcompute.core.identity import PeerId
from p2pcompute.core.ledger import LedgerRole, verify_chain
from p2pcompute.core.messages import CheckEvidence, JobReceipt, JobRejection
from p2pcompute.core.reputation import PeerReputation
from p2pcompute.core.throughput import ThroughputLedger, ThroughputPolicy
from p2pcompute.errors import NoWorkersError, Reason, RemoteProtocolError
from p2pcompute.net.gossip import Gossip, GossipConfig
from p2pcompute.net.host import connect
from p2pcompute.net.protocols import EVIDENCE_TOPIC
from p2pcompute.store import STORE_FILE, JobRecord, JobRole, JobState, open_store
from p2pcompute.testing import net
from p2pcompute.testing.adversary import CheatSettings
from p2pcompute.testing.jobs import (
    WorkerPeer,
    client_of,
    cluster,
    start_worker,
    wait_for_advert,
    worker_config,
    write_hardware_cache,
)

MAX_PRICE = 1_000_000  # micro-credits: 1 credit per job and worker
CHEAP = 5_000  # a max_price worker 0 (priced out by EXPENSIVE) never fits
DEADLINE_S = 60.0
TEST_TIMEOUT_S = 240.0  # a whole test: worker start-up dominates (100 s seen at load average 18 on 2 cores)
HTTP_TIMEOUT_S = 5.0
WAIT_S = 20.0  # one condition (a store write, a gossiped message) on another peer
POLL_S = 0.05  # the peers' stores and metrics announce nothing: bounded polls


def _model_job(seed: int) -> Job:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    torch.manual_seed(seed)
    return Job.from_module(model, (torch.randn(8, 16),))


EXPENSIVE = 10**9  # micro-credits per second: worker 0's price in the check test, so no job fits it


def _priced_out(expensive: Iterable[int]) -> Callable[[int, NodeConfig], NodeConfig]:
    priced_out = set(expensive)

    def configure(index: int, config: NodeConfig) -> NodeConfig:
        return replace(config, price_per_second=EXPENSIVE) if index in priced_out else config

    return configure


def _cheats(modes: dict[int, str]) -> dict[int, CheatSettings]:
    """index -> cheat mode ("" = honest) as the cheaters' settings (``serve``'s ``wrap_executor``)."""
    return {index: CheatSettings(mode) for index, mode in modes.items() if mode}


async def _start_isolated(
    nursery: trio.Nursery, base: Path, indices: Sequence[int], modes: dict[int, str] | None = None
) -> dict[int, WorkerPeer]:
    """Workers with no bootstrap: running, but unknown to every other peer until someone dials them."""
    configs = {i: worker_config(base, i) for i in indices}
    cheats = _cheats(modes or {})
    await trio.to_thread.run_sync(write_hardware_cache, [c.data_dir for c in configs.values()])
    peers: dict[int, WorkerPeer] = {}

    async def start(i: int) -> None:
        peers[i] = await start_worker(nursery, i, configs[i], cheat=cheats.get(i))

    async with trio.open_nursery() as starting:
        for i in indices:
            starting.start_soon(start, i)
    return peers


class _Asked:
    """A progress callback recording the workers a job was sent to; ``changed`` fires on every new one."""

    def __init__(self) -> None:
        self.workers: list[PeerId] = []
        self.changed = trio.Event()

    def __call__(self, event: ProgressEvent) -> None:
        if event.worker is not None and event.worker not in self.workers:
            self.workers.append(event.worker)
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, peers: Iterable[PeerId]) -> None:
        wanted = set(peers)
        with trio.fail_after(WAIT_S):
            while not wanted <= set(self.workers):
                await self.changed.wait()


async def _join(client: Client, workers: Iterable[WorkerPeer]) -> None:
    """Dial isolated workers from the client and fetch their adverts at once (advert sync), so a loaded machine's
    slow gossip cannot outlast the client's escalation wait."""
    for worker in workers:
        peer = await connect(client.node.host, worker.addr)
        await client.node.sync_from(peer)  # 0 when gossip brought the advert first
        await wait_for_advert(client, worker)


def _jobs(worker: WorkerPeer, job: Job) -> list[JobRecord]:
    store = open_store(worker.config.data_dir / STORE_FILE)
    try:
        return [r for r in store.jobs(JobRole.WORKER) if r.job_digest == job.digest]
    finally:
        store.close()


def _ledger_entries(worker: WorkerPeer) -> list[JobReceipt]:
    """The worker's earnings ledger as stored, its hash chain verified."""
    store = open_store(worker.config.data_dir / STORE_FILE)
    try:
        ledger = store.load_ledger(worker.peer, LedgerRole.WORKER)
    finally:
        store.close()
    verify_chain(ledger.entries, owner=worker.peer, role=LedgerRole.WORKER)
    return [r.message for r in ledger.receipts]


def _reputation(observer: WorkerPeer, peer: PeerId) -> PeerReputation:
    store = open_store(observer.config.data_dir / STORE_FILE)
    try:
        return store.load_reputation().get(peer)
    finally:
        store.close()


async def _settled(worker: WorkerPeer, job: Job) -> JobRecord:
    """The worker's record of ``job`` once the client paid or rejected it (the worker stores it on receipt)."""
    with trio.fail_after(WAIT_S):
        while True:
            records = [r for r in _jobs(worker, job) if r.state in (JobState.PAID, JobState.REJECTED)]
            if records:
                assert len(records) == 1
                return records[0]
            await trio.sleep(POLL_S)


async def _evidence_counts(http: httpx.AsyncClient, worker: WorkerPeer) -> dict[str, float]:
    """``p2pcompute_evidence_received_total`` of a worker by ``result`` label, read from its /metrics."""
    url = worker.info.status_url.rsplit("/", 1)[0] + "/metrics"
    text = (await http.get(url)).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "p2pcompute_evidence_received_total":
                counts[sample.labels["result"]] = sample.value
    return counts


async def _wait_counts(
    http: httpx.AsyncClient, worker: WorkerPeer, done: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    with trio.fail_after(WAIT_S):
        while not done(counts := await _evidence_counts(http, worker)):
            await trio.sleep(POLL_S)
    return counts


def _assert_rejected(record: JobRecord, client: Client, worker: WorkerPeer, reason: str) -> None:
    assert record.state is JobState.REJECTED
    assert "receipt" not in record.envelopes
    rejection = open_envelope(record.envelopes["rejection"], expect=JobRejection, signer=client.peer_id)
    assert rejection.message.worker == worker.peer
    assert rejection.message.reason == reason


@asynccontextmanager
async def _attacker(name: str, target: WorkerPeer) -> AsyncIterator[Gossip]:
    """A bare gossip peer in ``target``'s evidence mesh; it validates nothing, so it can publish anything."""
    config = net.NodeConfig(gossip=GossipConfig())
    async with net.open_nodes(f"test_verification/{name}", [config]) as (node,):
        await node.pubsub.subscribe(EVIDENCE_TOPIC)
        await connect(node.host, target.addr)
        await net.wait_until(
            lambda: target.info.peer_id in {str(p) for p in node.pubsub.mesh_peers(EVIDENCE_TOPIC)}, timeout_s=WAIT_S
        )
        yield node.pubsub


@dataclass
class _Net:
    workers: list[WorkerPeer]  # bootstrapped from worker 0, known to the client from the start
    isolated: dict[int, WorkerPeer]  # started with no bootstrap: unknown until dialled (see _join)
    client: Client
    nursery: trio.Nursery


@asynccontextmanager
async def _network(
    base: Path,
    count: int,
    *,
    cheaters: dict[int, str],
    isolated: dict[int, str] | None = None,
    expensive: Iterable[int] = (),
) -> AsyncIterator[_Net]:
    """``count`` workers (``cheaters``: index -> cheat mode) known to a client, plus ``isolated`` ones."""
    async with trio.open_nursery() as nursery:
        extra = await _start_isolated(nursery, base, sorted(isolated or {}), isolated or {})
        async with (
            cluster(base, count, configure=_priced_out(expensive), cheats=_cheats(cheaters)) as workers,
            client_of(workers, base / "client", wait_for=count) as client,
        ):
            yield _Net(workers, extra, client, nursery)
        nursery.cancel_scope.cancel()


async def test_a_cheater_is_caught_by_the_clients_check_and_a_stranger_confirms_the_evidence(tmp_path: Path) -> None:
    """Worker 1 returns zeros under a self-consistent committed trace (only the output node is faked). Worker 0 is
    priced out, so the job goes to the cheater alone: the client's own check of its trace catches the faked node,
    rejects the result (no receipt), flags the cheater and gossips evidence that a peer which never saw the job (a
    second client) redoes and counts. Then an honest worker joins and the job is accepted, checked and paid."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _network(tmp_path, 2, cheaters={1: "zeros"}, isolated={2: ""}, expensive={0}) as net_:
            client = net_.client
            (h0, c), h2 = net_.workers, net_.isolated[2]
            async with client_of(net_.workers, tmp_path / "stranger") as stranger:
                job = _model_job(1)
                asked = _Asked()
                with pytest.raises(NoWorkersError) as failure:
                    await client.run(job, max_price=CHEAP, deadline=DEADLINE_S, progress=asked)
                assert asked.workers == [c.peer]
                assert "check_failed" in failure.value.detail, failure.value
                _assert_rejected(await _settled(c, job), client, c, "check_failed")
                assert _ledger_entries(c) == []
                assert client.node.reputation.get(c.peer).flagged
                (published,) = client.evidence_published
                evidence = open_envelope(published, expect=CheckEvidence).message
                assert (evidence.reporter, evidence.accused, evidence.job_digest) == (
                    client.peer_id,
                    c.peer,
                    job.digest,
                )
                assert evidence.node == len(job.spec.nodes) - 1  # the faked output node, nothing before it

                # A peer that never saw the job redoes the check from the evidence alone and counts it.
                with trio.fail_after(WAIT_S):
                    while stranger.node.reputation.get(c.peer).reports < 1:
                        await trio.sleep(POLL_S)
                assert stranger.node.reputation.get(c.peer).reports == 1
                # ... and so does worker 0, in its executor's sandboxed child (its node process has no torch)
                async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
                    await _wait_counts(http, h0, lambda counts: counts.get("check_counted", 0) >= 1)
                assert _reputation(h0, c.peer).reports == 1

                # Forged evidence (a tensor changed: its digest no longer matches the committed leaf) is refused.
                from p2pcompute.core.verification import check_check_evidence

                opened = open_envelope(published, expect=CheckEvidence)
                forged_tensors = (bytes(len(evidence.tensors[0])), *evidence.tensors[1:])
                forged = replace(opened, message=replace(evidence, tensors=forged_tensors))
                with pytest.raises(RemoteProtocolError) as refused:
                    check_check_evidence(forged, client.clock())
                assert refused.value.reason is Reason.BAD_EVIDENCE

                # An honest worker joins: the job is run there, checked in full and paid.
                await _join(client, [h2])
                result = await client.run(job, max_price=CHEAP, deadline=DEADLINE_S)
                assert result.worker == h2.peer and result.plan == "full" and result.check_flops > 0
                assert torch.equal(result.outputs[0], job.run_locally()[0])
                assert (await _settled(h2, job)).state is JobState.PAID
                assert client.node.reputation.checked_flops(h2.peer) == job.requirements.flops
                assert _ledger_entries(h0) == []


async def test_colluders_over_the_check_budget_are_caught_by_sampled_checks(tmp_path: Path) -> None:
    """A job over the client's check budget is replicated and sampled. Workers 1 and 2 collude (the same wrong
    output, each under a self-consistent trace), so they would agree with each other; each one's sampled check
    (the output node is always sampled) catches it, and the honest results are accepted and paid."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _network(tmp_path, 2, cheaters={1: "collude"}, isolated={2: "collude", 3: "", 4: ""}) as net_:
            client = net_.client
            client.scheduler_policy = replace(client.scheduler_policy, check_bytes_budget=0, spot_check_rate=0.0)
            (h1, x1), (x2, h2, h3) = net_.workers, (net_.isolated[2], net_.isolated[3], net_.isolated[4])
            job = _model_job(4)
            asked = _Asked()

            async def join_in_turn() -> None:
                await asked.wait_for([h1.peer, x1.peer])
                await _join(client, [x2, h2, h3])

            net_.nursery.start_soon(join_in_turn)
            result = await client.run(job, max_price=MAX_PRICE, deadline=DEADLINE_S, redundancy=2, progress=asked)
            assert result.plan == "sample"
            assert torch.equal(result.outputs[0], job.run_locally()[0])
            assert len(result.agreeing) == 2 and x1.peer not in result.agreeing and x2.peer not in result.agreeing
            for colluder in [x for x in (x1, x2) if x.peer in asked.workers]:
                _assert_rejected(await _settled(colluder, job), client, colluder, "check_failed")
                assert _ledger_entries(colluder) == []
                assert client.node.reputation.get(colluder.peer).flagged
            for honest in [w for w in (h1, h2, h3) if w.peer in result.agreeing]:
                assert (await _settled(honest, job)).state is JobState.PAID


async def test_a_worker_claiming_more_tflops_than_it_delivers_is_weighed_at_what_it_delivers(tmp_path: Path) -> None:
    """A worker whose advert claims 1,000 TFLOPS (its hardware report edited) delivers what this machine does. Two
    benchmark jobs (checked and paid like any job) measure it; from then on the client weighs it at what it
    delivered, so the claim wins it nothing."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            config = worker_config(tmp_path, 0)
            await trio.to_thread.run_sync(write_hardware_cache, [config.data_dir])
            report = json.loads((config.data_dir / "hardware.json").read_text())
            for device in report["devices"]:
                device["tflops"] = 1000.0
            (config.data_dir / "hardware.json").write_text(json.dumps(report))
            worker = await start_worker(nursery, 0, config)
            async with client_of([worker], tmp_path / "client", wait_for=1) as client:
                client.throughput = ThroughputLedger(ThroughputPolicy(min_expected_ms=1, min_samples=2))
                (candidate,) = client.candidates_all()
                assert candidate.device.tflops == 1000.0
                before = client._weight(candidate)
                for _ in range(2):
                    delivered = await client.benchmark(worker.peer, max_price=MAX_PRICE)
                    assert 0 < delivered < 1000.0
                assert client.throughput.overclaims(worker.peer, 1000.0)
                assert client._weight(candidate) < before
            nursery.cancel_scope.cancel()
