"""A worker that no client can crash, starve or underpay (issue 9), against a real worker on loopback.

Each test plays a hostile client at one stage of the job stream and then checks the worker still serves an honest
job: a stream that says nothing, an offer never accepted, inputs that never come (inline and over the data
channel), a result never paid for, requirements that lie about memory and flops, a job over the operator's
memory limit, a reused job id, a message that lives longer than the worker allows, and one peer holding many
accepted jobs without inputs. On the code before the fix, the silent stream and the missing upload were waited on
for 600 s (a slow upload made the node exit), the lies set the price and the memory admitted, and a reused id
overwrote the stored job.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import trio
from libp2p.peer.id import ID

from p2pcompute.client import Client, Job
from p2pcompute.config import NodeConfig
from p2pcompute.core.messages import JobRequest
from p2pcompute.core.negotiation import (
    MESSAGE_TTL_MS,
    Accept,
    ClientNegotiation,
    Decline,
    Offer,
    Request,
    seal_opened,
)
from p2pcompute.errors import NegotiationFailed, P2PComputeError, Reason
from p2pcompute.net.negotiate import Conversation, PreparedJob, _open_stream
from p2pcompute.net.protocols import JOB_PROTOCOL
from p2pcompute.store import STORE_FILE, JobRole, JobState, open_store
from p2pcompute.testing.jobs import WorkerPeer, client_of, cluster, run_on

MAX_PRICE = 1_000_000
TEST_TIMEOUT_S = 120.0
PHASE_S = 1.5  # every phase timeout of the workers under test: hostile waits end in seconds
CLOSE_WAIT_S = PHASE_S + 10.0  # a phase timeout plus generous slack on a loaded machine


def short_phases(index: int, config: NodeConfig) -> NodeConfig:
    return replace(
        config,
        request_timeout=PHASE_S,
        accept_timeout=PHASE_S,
        inputs_timeout=PHASE_S,
        receipt_timeout=PHASE_S,
        job_memory_bytes=256 << 20,
        slots=2,
    )


def mlp() -> tuple[torch.Tensor, Job]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    with torch.no_grad():
        expected = model(x)
    return expected, Job.from_module(model, (x,))


def big_inputs() -> Job:
    """1 MiB of inputs: they go over the data channel, not inline on the stream."""
    torch.manual_seed(1)
    return Job.from_module(lambda a: torch.relu(a).sum(0), (torch.randn(512, 512),))


def big_memory(mib: int) -> Job:
    """A job whose dry run peaks at about ``mib`` MiB: one float32 tensor of that size, summed."""
    n = mib * (1 << 20) // 4
    return Job.from_module(lambda a: (torch.zeros(n) + a).sum(), (torch.ones(1),))


async def still_serves(client: Client, worker: WorkerPeer) -> None:
    expected, job = mlp()
    outcome = await run_on(client, worker, job.prepared(), max_price=MAX_PRICE)
    (meta,) = outcome.result.message.outputs
    got = torch.frombuffer(bytearray(outcome.outputs[meta.digest]), dtype=torch.float32)
    assert torch.equal(got.reshape(expected.shape), expected)


async def status(worker: WorkerPeer) -> dict[str, Any]:
    def fetch() -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(worker.info.status_url, timeout=5).json()
        return data

    return await trio.to_thread.run_sync(fetch)


async def wait_idle(worker: WorkerPeer) -> dict[str, Any]:
    """Until every slot is free again (the hostile job's slot was given back); returns the worker's job status."""
    with trio.fail_after(CLOSE_WAIT_S):
        while True:
            jobs = (await status(worker))["jobs"]
            if jobs["free_slots"] == jobs["slots"]:
                return dict(jobs)
            await trio.sleep(0.1)


@contextlib.asynccontextmanager
async def conversation(client: Client, worker: WorkerPeer) -> AsyncIterator[Conversation]:
    stream = await _open_stream(client.node.host, ID(worker.peer.raw), worker.info.addrs)
    machine = ClientNegotiation(local=client.keypair.peer_id, remote=worker.peer)
    conv = Conversation(stream, machine, client.keypair, worker.peer, client.seen, client.clock)
    try:
        yield conv
    finally:
        with trio.CancelScope(shield=True):
            await conv.reset()


def request_of(client: Client, worker: WorkerPeer, job: PreparedJob, *, ttl_ms: int = MESSAGE_TTL_MS) -> JobRequest:
    now = client.clock()
    return JobRequest(
        id=secrets.token_bytes(16),
        nonce=secrets.randbits(64),
        expires_at=now + ttl_ms,
        client=client.peer_id,
        worker=worker.peer,
        job_digest=job.digest,
        spec_size=len(job.spec_bytes),
        requirements=job.requirements,
        max_price=MAX_PRICE,
        deadline=now + 60_000,
    )


async def request_and_accept(conv: Conversation, client: Client, worker: WorkerPeer, job: PreparedJob) -> None:
    """Request, take the offer and accept it: from here on the worker holds a slot for this job."""
    await conv.send(Request(opened=seal_opened(client.keypair, request_of(client, worker, job)), spec=job.spec_bytes))
    answer = await conv.receive_kind(Offer, Decline)
    assert isinstance(answer, Offer), answer
    accept = conv.machine.make_accept(**conv.message_fields())  # type: ignore[union-attr]
    await conv.send_signed(accept, lambda o: Accept(opened=o))  # type: ignore[arg-type]


async def closed_by_worker(conv: Conversation) -> P2PComputeError:
    """Wait (bounded) until the worker ends the stream; return what the client saw."""
    with trio.fail_after(CLOSE_WAIT_S), pytest.raises(P2PComputeError) as caught:
        while True:
            await conv.receive()
    return caught.value


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[WorkerPeer, Client]]:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            cluster(tmp_path, 1, configure=short_phases) as workers,
            client_of(workers, tmp_path / "client") as client,
        ):
            yield workers[0], client


async def test_a_silent_stream_is_closed_at_the_request_deadline(setup: tuple[WorkerPeer, Client]) -> None:
    worker, client = setup
    stream = await client.node.host.new_stream(ID(worker.peer.raw), [JOB_PROTOCOL])
    with trio.fail_after(CLOSE_WAIT_S):
        with contextlib.suppress(Exception):  # a reset or an abort frame then EOF: either way it ends
            while await stream.read(65536):
                pass
    await still_serves(client, worker)


async def test_an_offer_never_accepted_frees_the_slot(setup: tuple[WorkerPeer, Client]) -> None:
    worker, client = setup
    _, job = mlp()
    prepared = job.prepared()
    async with conversation(client, worker) as conv:
        await conv.send(
            Request(opened=seal_opened(client.keypair, request_of(client, worker, prepared)), spec=prepared.spec_bytes)
        )
        assert isinstance(await conv.receive_kind(Offer, Decline), Offer)
        error = await closed_by_worker(conv)
    assert "timeout" in str(error) or error.reason in (Reason.CANCELLED, Reason.STREAM_CLOSED), error
    await wait_idle(worker)
    await still_serves(client, worker)


@pytest.mark.parametrize("inputs", ["inline", "data_channel"])
async def test_inputs_that_never_come_free_the_slot(setup: tuple[WorkerPeer, Client], inputs: str) -> None:
    worker, client = setup
    job = mlp()[1] if inputs == "inline" else big_inputs()
    async with conversation(client, worker) as conv:
        await request_and_accept(conv, client, worker, job.prepared())
        error = await closed_by_worker(conv)  # we never send a blob, nor dial the data channel
    assert error.reason in (Reason.CANCELLED, Reason.STREAM_CLOSED), error
    jobs = await wait_idle(worker)
    assert jobs["stored"]["failed"] >= 1  # the accepted job is on record as failed, not forgotten
    await still_serves(client, worker)


async def test_a_result_never_paid_for_ends_the_stream(setup: tuple[WorkerPeer, Client]) -> None:
    worker, client = setup
    _, job = mlp()
    prepared = job.prepared()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with contextlib.AsyncExitStack() as stack:
            from p2pcompute.net.negotiate import open_session

            session = await stack.enter_async_context(
                open_session(
                    client.node.host,
                    client.keypair,
                    worker.peer,
                    worker.info.addrs,
                    prepared,
                    max_price=MAX_PRICE,
                    deadline=client.clock() + 60_000,
                    seen=client.seen,
                    clock=client.clock,
                )
            )
            await session.run()
            error = await closed_by_worker(session.conversation)  # no receipt, no rejection
    assert error.reason in (Reason.CANCELLED, Reason.STREAM_CLOSED), error
    jobs = await wait_idle(worker)
    assert jobs["stored"]["result_sent"] == 1  # the client owes it (after the grace period it is declined)


async def test_requirements_that_lie_are_declined(setup: tuple[WorkerPeer, Client]) -> None:
    worker, client = setup
    job = big_memory(64)
    honest = job.prepared()
    assert honest.requirements.memory_bytes >= 64 << 20
    lies = {
        "memory": replace(honest.requirements, memory_bytes=1 << 20),
        "flops": replace(honest.requirements, flops=0),
    }
    for what, claim in lies.items():
        lying = replace(honest, requirements=claim)
        with pytest.raises(NegotiationFailed) as caught:
            await run_on(client, worker, lying, max_price=MAX_PRICE)
        assert caught.value.reason is Reason.DECLINED
        assert "claim_mismatch" in caught.value.detail and what in caught.value.detail, caught.value
    outcome = await run_on(client, worker, honest, max_price=MAX_PRICE)  # the truth is served
    assert outcome.worker == worker.peer


async def test_the_operators_memory_limit_holds_whatever_the_claim(setup: tuple[WorkerPeer, Client]) -> None:
    """The worker is configured for 256 MiB a job; a 384 MiB job is declined, claiming 1 MiB or the truth."""
    worker, client = setup
    honest = big_memory(384).prepared()
    small_claim = replace(honest, requirements=replace(honest.requirements, memory_bytes=1 << 20))
    for prepared in (honest, small_claim):
        with pytest.raises(NegotiationFailed) as caught:
            await run_on(client, worker, prepared, max_price=MAX_PRICE)
        assert caught.value.reason is Reason.DECLINED
        assert "memory_limit" in caught.value.detail, caught.value
    await still_serves(client, worker)


async def test_a_reused_job_id_is_refused_and_the_stored_job_kept(setup: tuple[WorkerPeer, Client]) -> None:
    worker, client = setup
    _, job = mlp()
    job_id = secrets.token_bytes(16)
    await run_on(client, worker, job.prepared(), max_price=MAX_PRICE, job_id=job_id)  # paid
    with pytest.raises(NegotiationFailed) as caught:
        await run_on(client, worker, job.prepared(), max_price=MAX_PRICE, job_id=job_id, pay=False)
    assert caught.value.reason is Reason.DECLINED and "duplicate_id" in caught.value.detail, caught.value
    store = open_store(worker.config.data_dir / STORE_FILE)
    try:
        record = store.get_job(job_id, JobRole.WORKER, client.peer_id.raw)
    finally:
        store.close()
    assert record is not None and record.state is JobState.PAID
    assert {"request", "offer", "accept", "result", "receipt"} <= set(record.envelopes)
    await still_serves(client, worker)


async def test_a_message_living_longer_than_the_workers_ttl_is_refused(setup: tuple[WorkerPeer, Client]) -> None:
    worker, client = setup
    _, job = mlp()
    prepared = job.prepared()
    async with conversation(client, worker) as conv:
        request = request_of(client, worker, prepared, ttl_ms=10 * 60 * 1000)  # 10 minutes: the old cache's limit
        await conv.send(Request(opened=seal_opened(client.keypair, request), spec=prepared.spec_bytes))
        error = await closed_by_worker(conv)
    assert "expiry_too_far" in str(error), error
    await still_serves(client, worker)


async def test_one_peer_cannot_hold_every_slot_without_inputs(setup: tuple[WorkerPeer, Client]) -> None:
    """Two slots and a queue place: a peer's third job waiting for inputs is declined as busy."""
    worker, client = setup
    _, job = mlp()
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            conv = await stack.enter_async_context(conversation(client, worker))
            await request_and_accept(conv, client, worker, job.prepared())
        third = await stack.enter_async_context(conversation(client, worker))
        prepared = job.prepared()
        await third.send(
            Request(opened=seal_opened(client.keypair, request_of(client, worker, prepared)), spec=prepared.spec_bytes)
        )
        answer = await third.receive_kind(Offer, Decline)
        assert isinstance(answer, Decline), answer
        assert answer.opened.message.reason.value == "busy"
        assert "inputs" in answer.opened.message.detail
    await wait_idle(worker)
    await still_serves(client, worker)
