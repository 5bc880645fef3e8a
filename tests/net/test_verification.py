"""Redundant verification end to end: real worker peers (some cheating), a real client, evidence over gossip.

Workers run in-process with :func:`p2pcompute.node.serve` (``p2pcompute.testing.jobs``); the tests look at them
from outside, as any operator would: their SQLite store (jobs, ledger, reputation) and their ``/metrics``.

Which workers a job goes to is made deterministic by what the client's market holds: a job with redundancy k
goes to all k workers the client knows, and further (honest) workers are started *isolated* (no bootstrap,
unknown to anyone) and joined to the client only once the first ones are asked. Escalation then has to wait for
their adverts (``client.ESCALATION_WAIT_S``), the path a real network takes when workers come and go.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import torch
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pcompute.client import DEFAULT_MAX_WORKERS, Client, Job, ProgressEvent
from p2pcompute.config import NodeConfig
from p2pcompute.core.envelope import open_envelope
from p2pcompute.core.identity import PeerId
from p2pcompute.core.ledger import LedgerRole, verify_chain
from p2pcompute.core.messages import CheatingEvidence, JobReceipt, JobRejection
from p2pcompute.core.reputation import PeerReputation
from p2pcompute.errors import NoWorkersError, Reason, VerificationError
from p2pcompute.net.gossip import Gossip, GossipConfig
from p2pcompute.net.host import connect
from p2pcompute.net.protocols import EVIDENCE_TOPIC
from p2pcompute.store import STORE_FILE, JobRecord, JobRole, JobState, open_store
from p2pcompute.testing import net
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


def _cheats(modes: dict[int, str]) -> Callable[[int, NodeConfig], NodeConfig]:
    def configure(index: int, config: NodeConfig) -> NodeConfig:
        return replace(config, cheat_mode=modes[index]) if index in modes else config

    return configure


async def _start_isolated(
    nursery: trio.Nursery, base: Path, indices: Sequence[int], modes: dict[int, str] | None = None
) -> dict[int, WorkerPeer]:
    """Workers with no bootstrap: running, but unknown to every other peer until someone dials them."""
    configs = {i: worker_config(base, i, cheat_mode=(modes or {}).get(i, "")) for i in indices}
    await trio.to_thread.run_sync(write_hardware_cache, [c.data_dir for c in configs.values()])
    peers: dict[int, WorkerPeer] = {}

    async def start(i: int) -> None:
        peers[i] = await start_worker(nursery, i, configs[i])

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
    base: Path, count: int, *, cheaters: dict[int, str], isolated: dict[int, str] | None = None
) -> AsyncIterator[_Net]:
    """``count`` workers (``cheaters``: index -> cheat mode) known to a client, plus ``isolated`` ones."""
    async with trio.open_nursery() as nursery:
        extra = await _start_isolated(nursery, base, sorted(isolated or {}), isolated or {})
        async with (
            cluster(base, count, configure=_cheats(cheaters)) as workers,
            client_of(workers, base / "client", wait_for=count) as client,
        ):
            yield _Net(workers, extra, client, nursery)
        nursery.cancel_scope.cancel()


async def test_cheater_is_caught_rejected_reported_and_unverified_results_are_never_paid(tmp_path: Path) -> None:
    """Worker 1 returns zeros. Two results that disagree, with nobody else to ask, are never paid; with two more
    honest workers joining, the honest majority is accepted, only it is paid, and the evidence against the
    cheater lowers its reputation on another worker. Forged evidence over gossip changes nothing."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _network(tmp_path, 2, cheaters={1: "zeros"}, isolated={2: "", 3: ""}) as net_:
            client = net_.client
            (h1, c), h2, h3 = net_.workers, net_.isolated[2], net_.isolated[3]

            # 1. Only the honest worker and the cheater are known, and their results disagree. With no third result
            # allowed (max_workers=2) the verdict fails at once; by default escalation looks for more workers, finds
            # none within ESCALATION_WAIT_S and gives up. Either way nothing is accepted and nobody is paid.
            for k, max_workers, error, reason in (
                (1, 2, VerificationError, Reason.NO_QUORUM),
                (2, DEFAULT_MAX_WORKERS, NoWorkersError, Reason.ALL_ATTEMPTS_FAILED),
            ):
                unverified = _model_job(k)
                asked = _Asked()
                with pytest.raises(error) as failure:
                    await client.run(
                        unverified, max_price=MAX_PRICE, deadline=DEADLINE_S, redundancy=2, max_workers=max_workers,
                        progress=asked,
                    )  # fmt: skip
                assert failure.value.reason is reason
                assert set(asked.workers) == {h1.peer, c.peer}
                for worker in (h1, c):
                    _assert_rejected(await _settled(worker, unverified), client, worker, Reason.NO_QUORUM.value)
                    assert _ledger_entries(worker) == []
            assert len(client.ledger) == 0
            assert client.store.jobs(JobRole.CLIENT) == []
            assert client.evidence_published == []
            assert not client.node.reputation.get(c.peer).flagged  # no verdict: nobody was judged

            # 2. Again with both, but two honest workers join while they compute: the disagreement escalates to
            # them and the honest majority (quorum + 1 = 3 of 4) is accepted.
            job = _model_job(3)
            asked = _Asked()

            async def join_when_asked() -> None:
                await asked.wait_for([h1.peer, c.peer])
                await _join(client, [h2, h3])

            net_.nursery.start_soon(join_when_asked)
            before = _reputation(h1, c.peer)
            result = await client.run(job, max_price=MAX_PRICE, deadline=DEADLINE_S, redundancy=2, progress=asked)
            assert set(asked.workers[:2]) == {h1.peer, c.peer}
            assert set(asked.workers) == {h1.peer, c.peer, h2.peer, h3.peer}
            assert torch.equal(result.outputs[0], job.run_locally()[0])
            assert result.disagreeing == (c.peer,)
            assert set(result.agreeing) == {h1.peer, h2.peer, h3.peer}
            assert len(result.workers) == 4 and not result.spot_check

            # Paid: exactly the agreeing workers, each a receipt in its verified hash chain and in the client's.
            for worker in (h1, h2, h3):
                assert (await _settled(worker, job)).state is JobState.PAID
                receipts = [r for r in _ledger_entries(worker) if r.job_digest == job.digest]
                assert [(r.client, r.worker) for r in receipts] == [(client.peer_id, worker.peer)]
            verify_chain(client.ledger.entries, owner=client.peer_id, role=LedgerRole.CLIENT)
            paid = {r.message.worker for r in client.ledger.receipts}
            assert paid == {h1.peer, h2.peer, h3.peer}
            assert {r.message.job_digest for r in client.ledger.receipts} == {job.digest}

            # Rejected: the cheater holds a signed rejection and no receipt.
            _assert_rejected(await _settled(c, job), client, c, "verification_failed")
            assert _ledger_entries(c) == []

            # Reported: the client flagged the cheater and gossiped evidence, which another worker (neither the
            # client nor the cheater) checked and counted against the cheater.
            assert client.node.reputation.get(c.peer).flagged
            assert len(client.evidence_published) == 1
            evidence = open_envelope(client.evidence_published[0], expect=CheatingEvidence).message
            assert (evidence.reporter, evidence.accused, evidence.job_digest) == (client.peer_id, c.peer, job.digest)
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
                counts = await _wait_counts(http, h1, lambda counts: counts.get("counted", 0) >= 1)
                after = _reputation(h1, c.peer)
                assert after.reports == 1 and after.score < before.score
                assert after.score < 0 and not after.flagged  # one report: distrusted; flagged after more
                assert _reputation(h1, h2.peer).reports == 0

                # 3. Forged evidence (the genuine bytes with a flipped signature bit) from a peer that joins the
                # gossip mesh: the worker rejects it and nothing changes.
                forged = bytearray(client.evidence_published[0])
                forged[-5] ^= 1
                async with _attacker(tmp_path.name, h1) as attacker:
                    await attacker.publish(EVIDENCE_TOPIC, bytes(forged))
                    forged_counts = await _wait_counts(http, h1, lambda now: now.get("bad_signature", 0) >= 1)
            assert forged_counts == {**counts, "bad_signature": 1.0}
            assert _reputation(h1, c.peer) == after


async def test_colluding_pair_is_outvoted_by_the_honest_majority(tmp_path: Path) -> None:
    """Workers 1 and 2 collude (identical wrong outputs, so they agree with each other). The client first asks an
    honest worker and a colluder; escalation asks the other colluder and an honest worker, which ties the
    clusters 2-2; a fifth result breaks the tie for the honest cluster (3 of 5, and quorum + 1)."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _network(tmp_path, 2, cheaters={1: "collude"}, isolated={2: "collude", 3: "", 4: ""}) as net_:
            client = net_.client
            (h1, x1), (x2, h2, h3) = net_.workers, (net_.isolated[2], net_.isolated[3], net_.isolated[4])
            job = _model_job(4)
            asked = _Asked()

            async def join_in_turn() -> None:
                await asked.wait_for([h1.peer, x1.peer])
                await _join(client, [x2, h2])
                await asked.wait_for([x2.peer, h2.peer])
                await _join(client, [h3])

            net_.nursery.start_soon(join_in_turn)
            result = await client.run(job, max_price=MAX_PRICE, deadline=DEADLINE_S, redundancy=2, progress=asked)
            assert set(asked.workers[:2]) == {h1.peer, x1.peer}
            assert torch.equal(result.outputs[0], job.run_locally()[0])
            assert set(result.disagreeing) == {x1.peer, x2.peer}
            assert set(result.agreeing) == {h1.peer, h2.peer, h3.peer}
            assert len(result.workers) == 5  # escalated well past the quorum of 2
            digests = {w.worker: w.result.message.output_digest for w in result.workers}
            assert digests[x1.peer] == digests[x2.peer] != result.output_digest  # they did collude
            for colluder in (x1, x2):
                _assert_rejected(await _settled(colluder, job), client, colluder, "verification_failed")
                assert _ledger_entries(colluder) == []
                assert client.node.reputation.get(colluder.peer).flagged
            accused = {open_envelope(e, expect=CheatingEvidence).message.accused for e in client.evidence_published}
            assert accused == {x1.peer, x2.peer}
