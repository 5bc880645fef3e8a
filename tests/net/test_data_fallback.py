"""The data channel's fallback: tickets over a ``/p2pcompute/data/1.0.0`` libp2p stream (specs/data-channel.md §10).

Real py-libp2p hosts on loopback in one trio process. The first part drives a :class:`DataServer` directly (its
``handle_stream`` registered on a host): the same session over the stream, one ticket table for both paths,
hostile streams cut off within the bounds. The second part runs whole jobs against a real :class:`Worker` (host,
executor child, store, data server) whose data port the client cannot reach, and one whose port it can.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import trio
import trio.testing
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from p2pcompute.client import Job, open_client
from p2pcompute.compute.executor import open_executor
from p2pcompute.config import NodeConfig
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.messages import DeviceKind
from p2pcompute.core.negotiation import MAX_CLOCK_SKEW_MS, MESSAGE_TTL_MS
from p2pcompute.core.replay import SeenCache
from p2pcompute.errors import Reason, TransferError
from p2pcompute.net.host import connect, host_addrs, open_host
from p2pcompute.net.negotiate import PreparedJob, WorkerResult, open_data_stream, open_session, relayed
from p2pcompute.net.protocols import DATA_PROTOCOL, JOB_PROTOCOL
from p2pcompute.net.transfer import (
    CHUNK_SIZE,
    CHUNK_TIMEOUT_S,
    STREAM_HELLO_TIMEOUT_S,
    Cipher,
    DataChannelConfig,
    DataPath,
    DataServer,
    Ticket,
    dial_data_server,
    download_over,
    upload,
    upload_over,
)
from p2pcompute.store import STORE_FILE, open_store
from p2pcompute.testing.jobs import chain_module, cluster
from p2pcompute.testing.net import seed_for
from p2pcompute.worker import Worker, WorkerSettings

WORKER_IP = "127.0.0.1"
#: An address of this machine the client never dials: a data server bound there is unreachable for it.
ELSEWHERE_IP = "127.0.0.2"
#: A second listen address of a node, where its data channel (on the first) does not listen.
OTHER_LISTEN_IP = "127.0.0.3"
WAIT_S = 30.0
POLL_S = 0.01
DEFAULT_CONFIG = DataChannelConfig()
JOB_TIMEOUT_S = 120.0  # an executor child imports torch first: seconds on a loaded 2-core machine
MAX_PRICE = 1_000_000
MEMORY = 256 << 20
MAGIC = b"p2pcdat2"
UPLOAD, DOWNLOAD = 1, 2
AES_BYTE = 2
BAD_TOKEN, SHAPE_MISMATCH, TOO_LARGE, TRANSFER_FAILED, TIMEOUT = 1, 4, 6, 7, 8


def blob(data: bytes) -> tuple[bytes, bytes]:
    return hashlib.sha256(data).digest(), data


BLOBS = dict([blob(b""), blob(b"x"), blob(os.urandom(1000)), blob(os.urandom(CHUNK_SIZE + 12345))])
SMALL = blob(b"small blob")
TWO_PIECES = blob(os.urandom(CHUNK_SIZE + 7))


def specs(blobs: dict[bytes, bytes]) -> list[tuple[bytes, int]]:
    return [(digest, len(data)) for digest, data in blobs.items()]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# -- a data server behind a libp2p host ----------------------------------------------------------------------------


@dataclass
class Pair:
    server: DataServer
    worker: IHost
    client: IHost
    peer: ID

    async def stream(self) -> INetStream:
        return await open_data_stream(self.client, self.peer)


@asynccontextmanager
async def served(name: str, config: DataChannelConfig = DEFAULT_CONFIG) -> AsyncIterator[Pair]:
    """A data server on WORKER_IP whose ``handle_stream`` serves DATA_PROTOCOL on a host, and a connected client."""
    server = DataServer(WORKER_IP, config=config)
    async with (
        open_host(seed_for(name, 0), [f"/ip4/{WORKER_IP}/tcp/0"]) as worker,
        open_host(seed_for(name, 1), [f"/ip4/{WORKER_IP}/tcp/0"]) as client,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(server.serve)
        worker.set_stream_handler(DATA_PROTOCOL, server.handle_stream)
        peer = await connect(client, host_addrs(worker)[0])
        yield Pair(server, worker, client, peer)
        nursery.cancel_scope.cancel()


async def upload_on_stream(pair: Pair, ticket: Ticket, blobs: dict[bytes, bytes]) -> dict[bytes, memoryview]:
    """An honest upload over a libp2p stream; what the server received."""
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await upload_over(await pair.stream(), ticket.token, ticket.key, blobs)

            nursery.start_soon(send)
            return await pair.server.receive_upload(ticket)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (a server-side count that no event announces) within WAIT_S."""
    with trio.fail_after(WAIT_S):
        while not condition():
            await trio.sleep(POLL_S)


async def expect_upload_failure(server: DataServer, ticket: Ticket, reason: Reason) -> None:
    with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
        await server.receive_upload(ticket)
    assert caught.value.reason is reason, caught.value


@pytest.mark.parametrize("cipher", [Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305], ids=["aes", "chacha"])
async def test_upload_and_download_over_a_libp2p_stream(test_name: str, cipher: Cipher) -> None:
    config = DataChannelConfig(cipher=cipher)
    async with served(test_name) as pair:
        up = pair.server.expect_upload(specs(BLOBS))
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await upload_over(await pair.stream(), up.token, up.key, BLOBS, config=config)

                nursery.start_soon(send)
                assert await pair.server.receive_upload(up) == BLOBS
            down = pair.server.offer_download(BLOBS)
            got = await download_over(await pair.stream(), down.token, down.key, specs(BLOBS), config=config)
        assert got == BLOBS
        assert pair.server.open_tickets == 0
        assert pair.server.stats == {"stream_claimed": 2}


async def test_a_ticket_is_single_use_across_both_paths(test_name: str) -> None:
    """A token used on the stream is refused on TCP and on the stream; one used on TCP is refused on the stream."""
    async with served(test_name) as pair:
        server, port = pair.server, pair.server.port
        up = server.expect_upload(specs(BLOBS))
        assert await upload_on_stream(pair, up, BLOBS) == BLOBS
        with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
            await upload(WORKER_IP, port, up.token, up.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN, caught.value
        with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
            await upload_over(await pair.stream(), up.token, up.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN, caught.value

        down = server.offer_download(BLOBS)
        with trio.fail_after(WAIT_S):
            assert await download_over(await pair.stream(), down.token, down.key, specs(BLOBS)) == BLOBS
        for transport in (await dial_data_server(WORKER_IP, port), await pair.stream()):
            with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
                await download_over(transport, down.token, down.key, specs(BLOBS))
            assert caught.value.reason is Reason.BAD_TOKEN, caught.value

        up = server.expect_upload(specs(BLOBS))  # used on TCP first, then replayed on the stream
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload_over, await dial_data_server(WORKER_IP, port), up.token, up.key, BLOBS)
                assert await server.receive_upload(up) == BLOBS
        with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
            await upload_over(await pair.stream(), up.token, up.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN
        assert server.stats == {"stream_claimed": 2, "direct_claimed": 1}
        assert server.open_tickets == 0


# -- hostile streams, speaking the wire format by hand ------------------------------------------------------------


class RawStream:
    """A hand-written client on a data stream: a hello, then whatever (AES-sealed) records the test chooses."""

    def __init__(self, stream: INetStream, key: bytes | None) -> None:
        self.stream = stream
        self.aead = AESGCM(key) if key else None
        self.counter = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, pair: Pair, ticket: Ticket | None, hello: bytes | None = None) -> AsyncIterator[RawStream]:
        stream = await pair.stream()
        try:
            if hello is None and ticket is not None:
                hello = MAGIC + bytes([UPLOAD, AES_BYTE]) + ticket.token
            if hello:
                await stream.write(hello)
            yield cls(stream, ticket.key if ticket else None)
        finally:
            with trio.move_on_after(1.0):
                await stream.reset()

    async def send(self, plaintext: bytes) -> None:
        assert self.aead is not None
        nonce = b"\x01\x00\x00\x00" + self.counter.to_bytes(8, "big")
        self.counter += 1
        await self.stream.write(self.aead.encrypt(nonce, plaintext, None))

    async def status(self) -> bytes:
        """The next status byte, or b"" when the server closed without one."""
        try:
            return await self.stream.read(1)
        except StreamEOF:
            return b""

    async def verdict(self) -> bytes:
        """Half-close, then the server's final status byte (after the one that accepted the hello)."""
        await self.stream.close()
        return await self.status()


async def test_hostile_streams_are_cut_off_and_the_server_keeps_serving(test_name: str) -> None:
    async with served(test_name) as pair:
        server = pair.server
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        with trio.fail_after(WAIT_S):
            async with RawStream.open(pair, None, MAGIC + bytes([UPLOAD, AES_BYTE]) + os.urandom(32)) as raw:
                assert await raw.status() == bytes([BAD_TOKEN])  # a wrong token
                assert await raw.status() == b""  # and the stream is closed
            # (less than yamux's first window: the server reads 42 bytes, and a writer of more would wait for it)
            async with RawStream.open(pair, None, b"GET / HTTP/1.1\r\n" + os.urandom(128 << 10)) as raw:
                assert await raw.status() == bytes([BAD_TOKEN])  # 128 KiB of garbage: 42 bytes are read
        assert server.open_tickets == 1  # neither claimed the ticket

        with trio.fail_after(WAIT_S):  # a blob announced longer than the ticket states: refused before any buffer
            async with RawStream.open(pair, ticket) as raw:
                assert await raw.status() == bytes([0])
                await raw.send(SMALL[0] + (1 << 40).to_bytes(8, "big"))
                assert await raw.verdict() == bytes([SHAPE_MISMATCH])
            await expect_upload_failure(server, ticket, Reason.SHAPE_MISMATCH)

            ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])  # bytes beyond the last blob
            async with RawStream.open(pair, ticket) as raw:
                assert await raw.status() == bytes([0])
                await raw.send(SMALL[0] + len(SMALL[1]).to_bytes(8, "big"))
                await raw.send(SMALL[1])
                await raw.send(os.urandom(1000))
                assert await raw.verdict() == bytes([TOO_LARGE])
            await expect_upload_failure(server, ticket, Reason.TOO_LARGE)

            ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])  # a record that does not authenticate
            async with RawStream.open(pair, ticket) as raw:
                assert await raw.status() == bytes([0])
                await raw.send(SMALL[0] + len(SMALL[1]).to_bytes(8, "big"))
                raw.counter += 1  # the wrong nonce
                await raw.send(SMALL[1])
                assert await raw.verdict() == bytes([TRANSFER_FAILED])
            await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)

        ticket = server.expect_upload(specs(BLOBS))
        assert await upload_on_stream(pair, ticket, BLOBS) == BLOBS
        assert server.stats["stream_claimed"] == 4


async def test_stalled_streams_are_cut_off(test_name: str, autojump_clock: trio.testing.MockClock) -> None:
    # Virtual time: the server's named timeouts fire as soon as nothing else can happen (no real waiting).
    autojump_clock.autojump_threshold = 0.05
    async with served(test_name) as pair:
        start = trio.current_time()
        async with RawStream.open(pair, None, b"") as silent:  # no hello at all
            assert await silent.status() == bytes([TIMEOUT])
        assert STREAM_HELLO_TIMEOUT_S <= trio.current_time() - start < STREAM_HELLO_TIMEOUT_S + 5
        assert pair.server.pending_connections == 0

        ticket = pair.server.expect_upload([(TWO_PIECES[0], len(TWO_PIECES[1]))])
        async with RawStream.open(pair, ticket) as raw:  # half a blob, then nothing
            assert await raw.status() == bytes([0])
            await raw.send(TWO_PIECES[0] + len(TWO_PIECES[1]).to_bytes(8, "big"))
            await raw.send(TWO_PIECES[1][:CHUNK_SIZE])
            start = trio.current_time()
            assert await raw.status() == bytes([TIMEOUT])
            assert CHUNK_TIMEOUT_S <= trio.current_time() - start < CHUNK_TIMEOUT_S + 5
        await expect_upload_failure(pair.server, ticket, Reason.TIMEOUT)

        ticket = pair.server.expect_upload(specs(dict([SMALL])))
        assert await upload_on_stream(pair, ticket, dict([SMALL])) == dict([SMALL])


@asynccontextmanager
async def another_client(name: str, index: int, pair: Pair) -> AsyncIterator[Pair]:
    """A second client host (peer), connected to the same worker and data server."""
    async with open_host(seed_for(name, index), [f"/ip4/{WORKER_IP}/tcp/0"]) as client:
        peer = await connect(client, host_addrs(pair.worker)[0])
        yield Pair(pair.server, pair.worker, client, peer)


async def test_streams_per_peer_and_sessions_are_bounded(test_name: str) -> None:
    """A peer's streams are capped (max_streams_per_peer). Streams that have not sent a hello wait in the stream
    pool, outside max_connections: a full pool makes room by displacing the oldest stream of the peer holding the
    most, and only a valid ticket takes a session (max_connections, over both paths; one refused stays unclaimed)."""
    config = DataChannelConfig(max_streams_per_peer=2, max_connections=1, max_pending_total=2)
    async with served(test_name, config) as pair, another_client(test_name, 2, pair) as other:
        server = pair.server
        async with RawStream.open(pair, None, b"") as oldest, RawStream.open(pair, None, b""):  # two silent streams
            await wait_until(lambda: server.pending_connections == 2)
            assert server.open_sessions == 0
            with trio.fail_after(WAIT_S):
                async with RawStream.open(pair, None, b"") as third:  # a third stream of the same peer
                    assert await third.status() == bytes([TRANSFER_FAILED])
                assert server.stats["stream_busy"] == 1
                # The pool is full of the first peer's silent streams: another peer's hello still gets read.
                ticket = server.expect_upload(specs(dict([SMALL])))
                assert await upload_on_stream(other, ticket, dict([SMALL])) == dict([SMALL])
                assert server.stats["stream_pending_evicted"] == 1
                assert await oldest.status() == bytes([TRANSFER_FAILED])  # the one displaced

                # max_connections counts sessions with a valid ticket, over both paths: one held on a stream ...
                held = server.expect_upload(specs(dict([SMALL])))
                direct = server.expect_upload(specs(dict([SMALL])))
                async with RawStream.open(other, held) as raw:
                    assert await raw.status() == bytes([0])
                    assert server.open_sessions == 1
                    with pytest.raises(TransferError) as caught:  # ... and a valid ticket on TCP is refused
                        await upload(WORKER_IP, server.port, direct.token, direct.key, dict([SMALL]))
                    assert caught.value.reason is Reason.TRANSFER_FAILED
                    assert server.stats["direct_busy"] == 1
                    await raw.send(SMALL[0] + len(SMALL[1]).to_bytes(8, "big"))
                    await raw.send(SMALL[1])
                    assert await raw.verdict() == bytes([0])
                assert await server.receive_upload(held) == dict([SMALL])
                async with trio.open_nursery() as nursery:  # the refused ticket was left unclaimed: it still works
                    nursery.start_soon(upload, WORKER_IP, server.port, direct.token, direct.key, dict([SMALL]))
                    assert await server.receive_upload(direct) == dict([SMALL])
        await wait_until(lambda: server.pending_connections == 0 and server.open_sessions == 0)


async def test_idle_tcp_connections_do_not_lock_out_the_stream(test_name: str) -> None:
    """A7: twice max_connections idle connections on the data port (from 16 addresses, within the pending pool)
    used to take every session of both paths. They wait for their hello outside max_connections now: an upload
    over the stream, and one over TCP, go through."""
    sources = [f"127.0.0.{i}" for i in range(2, 18)]
    async with served(test_name) as pair, trio.open_nursery() as nursery:
        server = pair.server
        idle: list[trio.SocketStream] = []

        async def connect_from(source: str) -> None:
            sock = trio.socket.socket()
            await sock.bind((source, 0))
            await sock.connect((WORKER_IP, server.port))
            idle.append(trio.SocketStream(sock))

        for source in sources:
            for _ in range(DEFAULT_CONFIG.max_pending_per_source):
                nursery.start_soon(connect_from, source)
        count = len(sources) * DEFAULT_CONFIG.max_pending_per_source
        assert count == 2 * DEFAULT_CONFIG.max_connections
        await wait_until(lambda: server.pending_connections == count)
        ticket = server.expect_upload(specs(BLOBS))
        assert await upload_on_stream(pair, ticket, BLOBS) == BLOBS
        ticket = server.expect_upload(specs(BLOBS))
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as uploads:
                uploads.start_soon(upload, WORKER_IP, server.port, ticket.token, ticket.key, BLOBS)
                assert await server.receive_upload(ticket) == BLOBS
        assert server.stats == {"stream_claimed": 1, "direct_claimed": 1}
        for stream in idle:
            await stream.aclose()


# -- the client's decision ---------------------------------------------------------------------------------------


def fake_stream(*, transport: ConnectionType, swarm: ConnectionType, addrs: list[str]) -> INetStream:
    muxed = SimpleNamespace(
        get_connection_type=lambda: transport, get_transport_addresses=lambda: [Multiaddr(a) for a in addrs]
    )
    swarm_conn = SimpleNamespace(get_connection_type=lambda: swarm, get_transport_addresses=lambda: [])
    stream: INetStream = SimpleNamespace(muxed_conn=muxed, swarm_conn=swarm_conn)  # type: ignore[assignment]
    return stream


CIRCUIT = "/ip4/198.51.100.7/tcp/4001/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq/p2p-circuit"


@pytest.mark.parametrize(
    ("transport", "swarm", "addrs", "relay"),
    [
        (ConnectionType.DIRECT, ConnectionType.DIRECT, ["/ip4/192.0.2.1/tcp/4001"], False),
        (ConnectionType.UNKNOWN, ConnectionType.UNKNOWN, [], False),
        (ConnectionType.RELAYED, ConnectionType.UNKNOWN, [], True),  # the dialling side of a circuit
        (ConnectionType.UNKNOWN, ConnectionType.RELAYED, [], True),  # the listening side, tagged by the protocol
        (ConnectionType.UNKNOWN, ConnectionType.UNKNOWN, [CIRCUIT], True),
    ],
    ids=["direct", "unknown", "relayed-transport", "relayed-swarm", "circuit-address"],
)
def test_relayed(transport: ConnectionType, swarm: ConnectionType, addrs: list[str], relay: bool) -> None:
    reason = relayed(fake_stream(transport=transport, swarm=swarm, addrs=addrs))
    assert (reason is not None) is relay, reason


def test_a_stream_that_says_nothing_of_its_connection_is_not_relayed() -> None:
    assert relayed(SimpleNamespace()) is None  # type: ignore[arg-type]

    def broken() -> ConnectionType:
        raise RuntimeError("no transport info")

    conn = SimpleNamespace(get_connection_type=broken, get_transport_addresses=broken)
    assert relayed(SimpleNamespace(muxed_conn=conn, swarm_conn=conn)) is None  # type: ignore[arg-type]


# -- whole jobs against a real worker ------------------------------------------------------------------------------


@dataclass
class BareWorker:
    host: IHost
    worker: Worker
    data: DataServer
    peer: PeerId

    @property
    def addr(self) -> str:
        return host_addrs(self.host)[0]


@asynccontextmanager
async def bare_worker(base: Path, name: str, *, data_ip: str) -> AsyncIterator[BareWorker]:
    """A worker (host on WORKER_IP, one executor child, a store) whose data server listens on ``data_ip``; its
    protocol handlers registered as a node registers them (``Worker.stream_handlers``)."""
    keypair = KeyPair.from_seed(seed_for(name, 0))
    store = open_store(base / "worker" / STORE_FILE)
    try:
        async with (
            open_executor(workers=1, device="cpu", memory_limit=MEMORY) as executor,
            open_host(keypair.seed, [f"/ip4/{WORKER_IP}/tcp/0"]) as host,
            trio.open_nursery() as nursery,
        ):
            data = DataServer(data_ip)
            await nursery.start(data.serve)
            settings = WorkerSettings(
                price_per_second=1000,
                slots=1,
                memory_bytes=MEMORY,
                device_kinds=frozenset({DeviceKind.CPU}),
                tflops=0.05,
            )
            worker = Worker(
                keypair=keypair, executor=executor, store=store, data=data, settings=settings, clock=wall_ms
            )
            handlers = worker.stream_handlers()
            assert set(handlers) == {JOB_PROTOCOL, DATA_PROTOCOL}
            for protocol, handler in handlers.items():
                host.set_stream_handler(protocol, handler)
            yield BareWorker(host, worker, data, keypair.peer_id)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


@dataclass
class BareClient:
    host: IHost
    keypair: KeyPair
    seen: SeenCache

    async def run(self, worker: BareWorker, job: PreparedJob) -> tuple[WorkerResult, list[DataPath]]:
        """Negotiate ``job`` with ``worker``, pay for it; the result and the path each ticket took."""
        with trio.fail_after(JOB_TIMEOUT_S):
            async with open_session(
                self.host,
                self.keypair,
                worker.peer,
                [worker.addr],
                job,
                max_price=MAX_PRICE,
                deadline=wall_ms() + int(JOB_TIMEOUT_S * 1000),
                seen=self.seen,
                clock=wall_ms,
            ) as session:
                result = await session.run()
                await session.pay()
                return result, list(session.data_paths)


@asynccontextmanager
async def bare_client(name: str, worker: BareWorker) -> AsyncIterator[BareClient]:
    keypair = KeyPair.from_seed(seed_for(name, 1))
    async with open_host(keypair.seed, [f"/ip4/{WORKER_IP}/tcp/0"]) as host:
        await connect(host, worker.addr)
        yield BareClient(host, keypair, SeenCache(max_ttl_ms=MESSAGE_TTL_MS + MAX_CLOCK_SKEW_MS))


def big_job() -> Job:
    """1 MiB input, 1 MiB weights, 1 MiB output: an upload ticket and a download ticket (above INLINE_BYTES)."""
    torch.manual_seed(1)
    return Job.from_module(chain_module(512, 1), (torch.randn(512, 512),))


def check_outputs(result: WorkerResult, job: Job) -> None:
    """The outputs are the signed result's (hash-checked on arrival) and what the job computes locally."""
    (meta,) = result.result.message.outputs
    got = torch.frombuffer(bytearray(result.outputs[meta.digest]), dtype=torch.float32).reshape(meta.shape)
    assert torch.allclose(got, job.run_locally()[0], rtol=1e-5, atol=1e-6)


def mark_relayed(client: IHost, peer: PeerId) -> None:
    """Tag the client's connection to ``peer`` as circuit relay v2 tags a relayed one (``set_transport_info``)."""
    (conn,) = client.get_network().get_connections(ID(peer.raw))
    conn.set_transport_info(conn.get_transport_addresses(), ConnectionType.RELAYED)  # type: ignore[attr-defined]


async def test_a_job_completes_over_the_stream_when_the_data_port_is_unreachable(
    tmp_path: Path, test_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's data server listens on 127.0.0.2; the client dials the IP of its libp2p connection, 127.0.0.1,
    where that port is closed: both tickets move over the stream, the result is right, paid, and a hostile data
    stream in between costs the worker nothing."""
    job = big_job()
    caplog.set_level(logging.INFO, logger="p2pcompute.net.negotiate")
    with trio.fail_after(JOB_TIMEOUT_S * 2):
        async with (
            bare_worker(tmp_path, test_name, data_ip=ELSEWHERE_IP) as worker,
            bare_client(test_name, worker) as client,
        ):
            result, paths = await client.run(worker, job.prepared())
            check_outputs(result, job)
            assert paths == [DataPath.STREAM, DataPath.STREAM]
            assert worker.data.stats == {"stream_claimed": 2}
            fallbacks = [r.getMessage() for r in caplog.records if DATA_PROTOCOL in r.getMessage()]
            assert len(fallbacks) == 2, fallbacks
            assert all(f"cannot reach the data server {WORKER_IP}:{worker.data.port}" in m for m in fallbacks)
            assert "the upload goes over" in fallbacks[0] and "the download goes over" in fallbacks[1]

            stream = await open_data_stream(client.host, ID(worker.peer.raw))  # a hostile stream: a wrong token
            await stream.write(MAGIC + bytes([UPLOAD, AES_BYTE]) + os.urandom(32))
            assert await stream.read(1) == bytes([BAD_TOKEN])
            await stream.reset()

            silent = await open_data_stream(client.host, ID(worker.peer.raw))  # says nothing during the next job
            result, paths = await client.run(worker, job.prepared())  # inputs cached: only the download
            check_outputs(result, job)
            assert paths == [DataPath.STREAM]
            await silent.reset()
            await wait_until(lambda: worker.worker.stats["paid"] == 2)  # the receipts arrive behind the results
            assert worker.worker.status()["data_channel"] == {"stream_claimed": 3}


async def test_the_direct_path_is_used_when_it_connects_and_never_over_a_relay(
    tmp_path: Path, test_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = big_job()
    caplog.set_level(logging.INFO, logger="p2pcompute.net.negotiate")
    with trio.fail_after(JOB_TIMEOUT_S * 2):
        async with (
            bare_worker(tmp_path, test_name, data_ip=WORKER_IP) as worker,
            bare_client(test_name, worker) as client,
        ):
            result, paths = await client.run(worker, job.prepared())
            check_outputs(result, job)
            assert paths == [DataPath.DIRECT, DataPath.DIRECT]
            assert worker.data.stats == {"direct_claimed": 2}
            assert not [r for r in caplog.records if DATA_PROTOCOL in r.getMessage()]

            # Over a relayed connection the remote IP is the relay's: nothing is dialled there.
            mark_relayed(client.host, worker.peer)
            second = Job.from_module(chain_module(512, 2), (torch.randn(512, 512),))
            result, paths = await client.run(worker, second.prepared())
            check_outputs(result, second)
            assert paths == [DataPath.STREAM, DataPath.STREAM]
            assert worker.data.stats == {"direct_claimed": 2, "stream_claimed": 2}
            (upload_line, download_line) = [r.getMessage() for r in caplog.records if DATA_PROTOCOL in r.getMessage()]
            assert "the connection is relayed" in upload_line and "the connection is relayed" in download_line


async def test_a_node_serves_the_fallback_and_client_run_verifies_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real node (``serve``) listening on 127.0.0.1 and 127.0.0.3, its data channel on 127.0.0.1 only; a client
    that reaches it on 127.0.0.3 finds that data port closed: ``Client.run`` completes and verifies the job over
    the node's /p2pcompute/data/1.0.0 handler."""
    job = big_job()
    caplog.set_level(logging.INFO, logger="p2pcompute.net.negotiate")

    def two_ips(index: int, config: NodeConfig) -> NodeConfig:
        return replace(config, listen=(f"/ip4/{WORKER_IP}/tcp/0", f"/ip4/{OTHER_LISTEN_IP}/tcp/0"))

    with trio.fail_after(JOB_TIMEOUT_S * 2):
        async with cluster(tmp_path, 1, configure=two_ips) as workers:
            (far,) = [a for a in workers[0].info.addrs if f"/ip4/{OTHER_LISTEN_IP}/" in a]
            async with open_client([far], data_dir=tmp_path / "client", listen=(f"/ip4/{WORKER_IP}/tcp/0",)) as client:
                with trio.fail_after(JOB_TIMEOUT_S):
                    await client.node.wait_for(lambda: len(client.node.market) >= 1)
                result = await client.run(job, max_price=MAX_PRICE, deadline=60, redundancy=1)
                async with httpx.AsyncClient() as http:
                    status = (await http.get(workers[0].info.status_url)).json()
    assert result.worker == workers[0].peer
    assert torch.allclose(result.outputs[0], job.run_locally()[0], rtol=1e-5, atol=1e-6)
    assert status["jobs"]["data_channel"].get("stream_claimed", 0) >= 2, status["jobs"]["data_channel"]
    assert "direct_claimed" not in status["jobs"]["data_channel"]
    fallbacks = [r.getMessage() for r in caplog.records if DATA_PROTOCOL in r.getMessage()]
    assert fallbacks and all(f"cannot reach the data server {OTHER_LISTEN_IP}:" in m for m in fallbacks), fallbacks
