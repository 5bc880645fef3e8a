"""The data channel over real sockets on 127.0.0.1 (specs/data-channel.md).

The hostile peers below speak the wire format by hand (raw trio sockets), as the spec describes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import fields
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from p2pcompute.config import load_config
from p2pcompute.core import codec
from p2pcompute.core.negotiation import (
    TicketBlob,
    TicketDirection,
    TicketFrame,
    decode_frame_payload,
    encode_frame_payload,
)
from p2pcompute.core.tensors import TensorMeta
from p2pcompute.errors import Reason, SchemaError, TransferError
from p2pcompute.net.host import connect, host_addrs, open_host
from p2pcompute.net.negotiate import remote_host
from p2pcompute.net.transfer import (
    CHUNK_SIZE,
    HELLO_TIMEOUT_S,
    Cipher,
    DataChannelConfig,
    DataServer,
    Ticket,
    _ip_source,
    _PendingPool,
    download,
    expected_blobs,
    has_aes_instructions,
    upload,
    upload_over,
)
from p2pcompute.testing.net import seed_for

HOST = "127.0.0.1"
WAIT_S = 30.0
MAGIC = b"p2pcdat2"
UPLOAD, DOWNLOAD = 1, 2
CLEAR_BYTE, CHACHA_BYTE, AES_BYTE = 0, 1, 2
DEFAULT_CONFIG = DataChannelConfig()
#: Clear mode, opted in (both ends use it: the server to issue keyless tickets, the client to accept them).
CLEAR = DataChannelConfig(clear=True)
AES = DataChannelConfig(cipher=Cipher.AES_256_GCM)
CHACHA = DataChannelConfig(cipher=Cipher.CHACHA20_POLY1305)
#: The modes of a transfer: (server config, client config).
MODES = {"aes": (DEFAULT_CONFIG, AES), "chacha": (DEFAULT_CONFIG, CHACHA), "clear": (CLEAR, CLEAR)}


def blob(data: bytes) -> tuple[bytes, bytes]:
    return hashlib.sha256(data).digest(), data


BLOBS = dict(
    [
        blob(b""),
        blob(b"x"),
        blob(os.urandom(1000)),
        blob(os.urandom(CHUNK_SIZE)),
        blob(os.urandom(3 * CHUNK_SIZE + 12345)),
    ]
)


class FakeClock:
    def __init__(self) -> None:
        self.now_ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now_ms


@asynccontextmanager
async def running_server(
    config: DataChannelConfig = DEFAULT_CONFIG, clock: Callable[[], int] | None = None
) -> AsyncIterator[DataServer]:
    server = DataServer(HOST, config=config) if clock is None else DataServer(HOST, config=config, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def specs(blobs: dict[bytes, bytes]) -> list[tuple[bytes, int]]:
    return [(digest, len(data)) for digest, data in blobs.items()]


async def upload_expecting(
    server: DataServer, ticket: Ticket, blobs: dict[bytes, bytes], config: DataChannelConfig = DEFAULT_CONFIG
) -> dict[bytes, memoryview]:
    """Run an honest upload and return what the server received."""
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(upload, HOST, server.port, ticket.token, ticket.key, blobs, config=config))
            return await server.receive_upload(ticket)


# -- honest transfers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_upload_round_trip(mode: str) -> None:
    server_config, client_config = MODES[mode]
    async with running_server(server_config) as server:
        ticket = server.expect_upload(specs(BLOBS))
        assert (ticket.key is None) is (mode == "clear")
        assert ticket.total_bytes == sum(map(len, BLOBS.values()))
        received = await upload_expecting(server, ticket, BLOBS, client_config)
        assert received == BLOBS
        assert server.open_tickets == 0


@pytest.mark.parametrize("mode", MODES)
async def test_download_round_trip(mode: str) -> None:
    server_config, client_config = MODES[mode]
    async with running_server(server_config) as server:
        ticket = server.offer_download(BLOBS)
        assert (ticket.key is None) is (mode == "clear")
        with trio.fail_after(WAIT_S):
            received = await download(HOST, server.port, ticket.token, ticket.key, specs(BLOBS), config=client_config)
        assert received == BLOBS
        assert server.open_tickets == 0


async def test_sealed_by_default() -> None:
    assert DEFAULT_CONFIG.clear is False
    expected = Cipher.AES_256_GCM if has_aes_instructions() else Cipher.CHACHA20_POLY1305
    assert DEFAULT_CONFIG.dial_cipher() is expected
    assert CHACHA.dial_cipher() is Cipher.CHACHA20_POLY1305
    async with running_server() as server:
        up, down = server.expect_upload(specs(BLOBS)), server.offer_download(BLOBS)
        assert up.key is not None and down.key is not None and len({up.key, down.key}) == 2
        assert await upload_expecting(server, up, BLOBS) == BLOBS
        assert await download(HOST, server.port, down.token, down.key, specs(BLOBS)) == BLOBS


async def test_clear_ticket_refused_unless_the_client_opted_in() -> None:
    async with running_server(CLEAR) as server:
        up, down = server.expect_upload(specs(BLOBS)), server.offer_download(BLOBS)
        assert up.key is None and down.key is None
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, up.token, up.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN and "clear" in caught.value.detail
        with pytest.raises(TransferError) as caught:
            await download(HOST, server.port, down.token, down.key, specs(BLOBS))
        assert caught.value.reason is Reason.BAD_TOKEN and "clear" in caught.value.detail
        assert server.open_tickets == 2  # refused before dialling: both tickets are still unclaimed
        assert await upload_expecting(server, up, BLOBS, CLEAR) == BLOBS
        assert await download(HOST, server.port, down.token, down.key, specs(BLOBS), config=CLEAR) == BLOBS


async def test_opting_in_to_clear_does_not_downgrade_a_sealed_ticket() -> None:
    async with running_server() as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket, cipher=CLEAR_BYTE) as raw:  # a clear hello, refused
            assert raw.status == bytes([1])  # bad_token
        assert server.open_tickets == 1  # a mismatched hello does not claim the ticket
        assert await upload_expecting(server, ticket, dict([SMALL]), CLEAR) == dict([SMALL])  # sealed after all


async def test_a_sealed_hello_for_a_clear_ticket_is_refused() -> None:
    async with running_server(CLEAR) as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket, cipher=AES_BYTE) as raw:
            assert raw.status == bytes([1])  # bad_token
        assert await upload_expecting(server, ticket, dict([SMALL]), CLEAR) == dict([SMALL])


@pytest.mark.parametrize("config", [AES, CHACHA], ids=["aes", "chacha"])
async def test_wrong_key_does_not_authenticate(config: DataChannelConfig) -> None:
    async with running_server() as server:
        up, down = server.expect_upload(specs(BLOBS)), server.offer_download(BLOBS)
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, up.token, os.urandom(32), BLOBS, config=config)
        assert caught.value.reason is Reason.TRANSFER_FAILED
        await expect_upload_failure(server, up, Reason.TRANSFER_FAILED)
        with pytest.raises(TransferError) as caught:
            await download(HOST, server.port, down.token, os.urandom(32), specs(BLOBS), config=config)
        assert caught.value.reason is Reason.TRANSFER_FAILED


async def test_records_sealed_with_another_cipher_than_the_hello_names_are_refused() -> None:
    async with running_server() as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket, cipher=AES_BYTE, seal_with=CHACHA_BYTE) as raw:
            await raw.send_blob(*SMALL)
            assert await raw.verdict() == bytes([7])  # transfer_failed
        await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)


async def test_upload_expected_as_tensor_metas() -> None:
    data = os.urandom(4 * 6 * 4)
    meta = TensorMeta(digest=hashlib.sha256(data).digest(), dtype="float32", shape=(4, 6))
    async with running_server() as server:
        ticket = server.expect_upload([meta, meta])  # listed twice: one blob
        assert ticket.blobs == ((meta.digest, len(data)),)
        assert await upload_expecting(server, ticket, {meta.digest: data}) == {meta.digest: data}


async def test_concurrent_tickets() -> None:
    halves = [dict(list(BLOBS.items())[:2]), dict(list(BLOBS.items())[2:])]
    async with running_server() as server:
        tickets = [server.expect_upload(specs(half)) for half in halves]
        results: list[dict[bytes, memoryview]] = [{}, {}]

        async def one(i: int) -> None:
            results[i] = await upload_expecting(server, tickets[i], halves[i])

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(one, i)
        assert results == halves


# -- tickets --------------------------------------------------------------------------------------------------------


async def test_wrong_token_refused_and_server_keeps_serving() -> None:
    async with running_server() as server:
        ticket = server.expect_upload(specs(BLOBS))
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, os.urandom(32), ticket.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN
        with pytest.raises(TransferError) as caught:
            await download(HOST, server.port, os.urandom(32), os.urandom(32), specs(BLOBS))
        assert caught.value.reason is Reason.BAD_TOKEN
        assert await upload_expecting(server, ticket, BLOBS) == BLOBS


async def test_ticket_direction_is_checked() -> None:
    async with running_server() as server:
        ticket = server.offer_download(BLOBS)
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, ticket.token, ticket.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN
        assert await download(HOST, server.port, ticket.token, ticket.key, specs(BLOBS)) == BLOBS


async def test_ticket_is_single_use() -> None:
    async with running_server() as server:
        up = server.expect_upload(specs(BLOBS))
        await upload_expecting(server, up, BLOBS)
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, up.token, up.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN

        down = server.offer_download(BLOBS)
        await download(HOST, server.port, down.token, down.key, specs(BLOBS))
        with pytest.raises(TransferError) as caught:
            await download(HOST, server.port, down.token, down.key, specs(BLOBS))
        assert caught.value.reason is Reason.BAD_TOKEN


async def test_expired_ticket_refused() -> None:
    clock = FakeClock()
    config = DataChannelConfig(ticket_ttl_ms=1000)
    async with running_server(config, clock) as server:
        up = server.expect_upload(specs(BLOBS))
        down = server.offer_download(BLOBS)
        clock.now_ms += 1000
        with pytest.raises(TransferError) as caught:
            await download(HOST, server.port, down.token, down.key, specs(BLOBS))
        assert caught.value.reason is Reason.EXPIRED
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, up.token, up.key, BLOBS)
        assert caught.value.reason is Reason.EXPIRED
        assert server.open_tickets == 0


async def test_receive_upload_of_unclaimed_ticket_expires() -> None:
    clock = FakeClock()
    async with running_server(DataChannelConfig(ticket_ttl_ms=1000), clock) as server:
        ticket = server.expect_upload(specs(BLOBS))
        clock.now_ms += 1000
        with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
            await server.receive_upload(ticket)
        assert caught.value.reason is Reason.EXPIRED
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, ticket.token, ticket.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN


async def test_discarded_ticket_refused() -> None:
    async with running_server() as server:
        ticket = server.expect_upload(specs(BLOBS))
        server.discard(ticket)
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, ticket.token, ticket.key, BLOBS)
        assert caught.value.reason is Reason.BAD_TOKEN


async def test_ticket_table_is_bounded() -> None:
    async with running_server(DataChannelConfig(max_tickets=2)) as server:
        server.expect_upload([])
        server.offer_download({})
        with pytest.raises(TransferError) as caught:
            server.expect_upload([])
        assert caught.value.reason is Reason.TOO_LARGE


def test_expected_blobs_bounds() -> None:
    digest = hashlib.sha256(b"a").digest()
    with pytest.raises(TransferError) as caught:
        expected_blobs([(digest, 1), (digest, 2)])
    assert caught.value.reason is Reason.SHAPE_MISMATCH
    with pytest.raises(TransferError) as caught:
        expected_blobs([(digest, 10)], max_bytes=9)
    assert caught.value.reason is Reason.TOO_LARGE
    with pytest.raises(TransferError) as caught:
        expected_blobs([(bytes([i]) * 32, 1) for i in range(3)], max_blobs=2)
    assert caught.value.reason is Reason.TOO_LARGE


# -- hostile peers, speaking the wire format by hand ----------------------------------------------------------------


class RawSession:
    """A hand-written client: hello, then whatever bytes the test chooses (clear or sealed records)."""

    def __init__(self, stream: trio.SocketStream, status: bytes, key: bytes | None, seal_with: int) -> None:
        self.stream = stream
        self.status = status
        aeads: dict[int, type[AESGCM] | type[ChaCha20Poly1305]] = {AES_BYTE: AESGCM, CHACHA_BYTE: ChaCha20Poly1305}
        self.aead = aeads[seal_with](key) if key and seal_with else None
        self.counter = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        port: int,
        ticket: Ticket,
        direction: int = UPLOAD,
        *,
        cipher: int | None = None,
        seal_with: int | None = None,
    ) -> AsyncIterator[RawSession]:
        """Send a hello for ``ticket`` naming ``cipher`` (default: AES, or clear for a keyless ticket)."""
        if cipher is None:
            cipher = AES_BYTE if ticket.key else CLEAR_BYTE
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(MAGIC + bytes([direction, cipher]) + ticket.token)
            status = await stream.receive_some(1)
            yield cls(stream, status, ticket.key, cipher if seal_with is None else seal_with)

    async def send(self, plaintext: bytes, *, tamper: bool = False, replay: bool = False) -> None:
        if self.aead is None:
            data = bytearray(plaintext)
        else:
            self.counter -= replay
            nonce = b"\x01\x00\x00\x00" + self.counter.to_bytes(8, "big")
            self.counter += 1
            data = bytearray(self.aead.encrypt(nonce, plaintext, None))
        if tamper:
            data[-1] ^= 0x01
        await self.stream.send_all(bytes(data))

    async def send_blob(self, digest: bytes, data: bytes, *, announce: int | None = None) -> None:
        await self.send(digest + (len(data) if announce is None else announce).to_bytes(8, "big"))
        for start in range(0, len(data), CHUNK_SIZE):
            await self.send(data[start : start + CHUNK_SIZE])

    async def verdict(self) -> bytes:
        with suppress(trio.BrokenResourceError):
            await self.stream.send_eof()
        try:
            return await self.stream.receive_some(1)
        except trio.BrokenResourceError:
            return b""


async def expect_upload_failure(server: DataServer, ticket: Ticket, reason: Reason) -> None:
    with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
        await server.receive_upload(ticket)
    assert caught.value.reason is reason, caught.value


BIG = blob(os.urandom(2 * CHUNK_SIZE + 7))
SMALL = blob(b"small blob")


@pytest.mark.parametrize("config", [CLEAR, DEFAULT_CONFIG], ids=["clear", "sealed"])
async def test_corrupted_blob_is_a_hash_mismatch(config: DataChannelConfig) -> None:
    async with running_server(config) as server:
        ticket = server.expect_upload([(BIG[0], len(BIG[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            corrupted = bytearray(BIG[1])
            corrupted[CHUNK_SIZE + 5] ^= 0xFF
            await raw.send_blob(BIG[0], bytes(corrupted))
            assert await raw.verdict() == bytes([3])  # hash_mismatch
        await expect_upload_failure(server, ticket, Reason.HASH_MISMATCH)


@pytest.mark.parametrize("cipher", [AES_BYTE, CHACHA_BYTE], ids=["aes", "chacha"])
async def test_tampered_record_does_not_authenticate(cipher: int) -> None:
    async with running_server() as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket, cipher=cipher) as raw:
            await raw.send(SMALL[0] + len(SMALL[1]).to_bytes(8, "big"))
            await raw.send(SMALL[1], tamper=True)
            assert await raw.verdict() == bytes([7])  # transfer_failed
        await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)


async def test_replayed_record_does_not_authenticate() -> None:
    """Each record has the next nonce: a record sent twice fails the second time."""
    async with running_server() as server:
        ticket = server.expect_upload([(BIG[0], len(BIG[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send(BIG[0] + len(BIG[1]).to_bytes(8, "big"))
            await raw.send(BIG[1][:CHUNK_SIZE])
            await raw.send(BIG[1][:CHUNK_SIZE], replay=True)
            assert await raw.verdict() == bytes([7])  # transfer_failed
        await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)


@pytest.mark.parametrize("config", [CLEAR, DEFAULT_CONFIG], ids=["clear", "sealed"])
async def test_truncated_upload_detected(config: DataChannelConfig) -> None:
    async with running_server(config) as server:
        ticket = server.expect_upload([(BIG[0], len(BIG[1])), (SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send_blob(*SMALL)
            await raw.send(BIG[0] + len(BIG[1]).to_bytes(8, "big"))
            await raw.send(BIG[1][:CHUNK_SIZE])  # one piece of three, then the end
            assert await raw.verdict() == bytes([7])  # transfer_failed
        await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)


async def test_missing_blob_detected() -> None:
    async with running_server() as server:
        ticket = server.expect_upload([(BIG[0], len(BIG[1])), (SMALL[0], len(SMALL[1]))])
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, ticket.token, ticket.key, dict([SMALL]))
        assert caught.value.reason is Reason.TRANSFER_FAILED
        await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)


@pytest.mark.parametrize("config", [CLEAR, DEFAULT_CONFIG], ids=["clear", "sealed"])
async def test_bytes_after_the_last_blob_refused(config: DataChannelConfig) -> None:
    async with running_server(config) as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send_blob(*SMALL)
            await raw.send(b"more")
            assert await raw.verdict() == bytes([6])  # too_large
        await expect_upload_failure(server, ticket, Reason.TOO_LARGE)


async def test_longer_blob_than_stated_refused() -> None:
    async with running_server(CLEAR) as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send_blob(SMALL[0], SMALL[1] + b"!")
            assert await raw.verdict() == bytes([4])  # shape_mismatch
        await expect_upload_failure(server, ticket, Reason.SHAPE_MISMATCH)


async def test_unknown_and_repeated_blobs_refused() -> None:
    async with running_server() as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1])), (BIG[0], len(BIG[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send_blob(*blob(b"not expected"))
            await raw.verdict()
        await expect_upload_failure(server, ticket, Reason.UNEXPECTED_BLOB)

        ticket = server.expect_upload([(SMALL[0], len(SMALL[1])), (BIG[0], len(BIG[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send_blob(*SMALL)
            await raw.send_blob(*SMALL)
            await raw.verdict()
        await expect_upload_failure(server, ticket, Reason.UNEXPECTED_BLOB)


async def test_garbage_hello_refused_and_server_keeps_serving() -> None:
    async with running_server() as server:
        ticket = server.expect_upload(specs(BLOBS))
        async with await trio.open_tcp_stream(HOST, server.port) as stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(20))
            assert await stream.receive_some(1) == bytes([1])  # bad_token
        assert await upload_expecting(server, ticket, BLOBS) == BLOBS


async def test_stalled_peers_are_cut_off(autojump_clock: trio.testing.MockClock) -> None:
    # Virtual time: the server's named timeouts fire as soon as nothing else can happen (no real waiting).
    autojump_clock.autojump_threshold = 0.05
    assert HELLO_TIMEOUT_S <= 2.0  # a connection that names no ticket costs a few seconds at most
    async with running_server() as server:
        for partial in (b"", MAGIC + bytes([UPLOAD, AES_BYTE]) + bytes(31)):  # nothing, then a hello but one byte
            start = trio.current_time()
            async with await trio.open_tcp_stream(HOST, server.port) as silent:
                await silent.send_all(partial)
                assert await silent.receive_some(1) == bytes([8])  # timeout: no hello
            assert HELLO_TIMEOUT_S <= trio.current_time() - start < HELLO_TIMEOUT_S + 1
        assert server.pending_connections == 0 and server.open_sessions == 0
        ticket = server.expect_upload([(BIG[0], len(BIG[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send(BIG[0] + len(BIG[1]).to_bytes(8, "big"))
            await raw.send(BIG[1][:1000])  # then nothing
            assert await raw.stream.receive_some(1) == bytes([8])
        await expect_upload_failure(server, ticket, Reason.TIMEOUT)


# -- connections that never send a hello (A7: the data port lockout) ------------------------------------------------

#: Addresses of this machine other than HOST, from which an attacker connects (a loopback address is its own group).
ATTACKER_IP = "127.0.0.2"
POLL_S = 0.01


async def dial_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to the data server on HOST from the local address ``source``."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class Flood:
    """The attacker of A7: idle connections that never send a hello, each replaced as soon as the server drops it."""

    def __init__(self) -> None:
        self.connects = 0

    async def hog(self, port: int, source: str, connections: int) -> None:
        """Keep ``connections`` idle connections from ``source`` open, until cancelled."""

        async def one() -> None:
            while True:
                with suppress(OSError):
                    async with await dial_from(source, port) as stream:
                        self.connects += 1
                        with suppress(trio.BrokenResourceError):
                            await stream.receive_some(1)  # the server's answer (displaced, timeout) or its close
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(one)


async def wait_for(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT_S):
        while not condition():
            await trio.sleep(POLL_S)


async def upload_from(server: DataServer, source: str, blobs: dict[bytes, bytes]) -> dict[bytes, memoryview]:
    """An honest upload of ``blobs`` on a fresh ticket, from the local address ``source``."""
    ticket = server.expect_upload(specs(blobs))
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await upload_over(await dial_from(source, server.port), ticket.token, ticket.key, blobs)

            nursery.start_soon(send)
            return await server.receive_upload(ticket)


async def test_idle_connections_from_one_source_do_not_lock_out_transfers() -> None:
    """A7: one address keeps twice max_connections idle connections on the data port and replaces each as the server
    drops it. They used to take every session (max_connections counts both paths), so every honest upload was
    refused transfer_failed. Now a connection waits for its hello in a pending pool, at most max_pending_per_source
    of one source (a newer one takes the oldest's place), and only a valid ticket makes a session: honest uploads
    go through, from another address and from the attacker's own."""
    flood = Flood()
    async with running_server() as server, trio.open_nursery() as nursery:
        nursery.start_soon(flood.hog, server.port, ATTACKER_IP, 2 * DEFAULT_CONFIG.max_connections)
        await wait_for(lambda: flood.connects >= 500)  # the attack is in full swing
        assert server.stats["direct_pending_evicted"] > 0
        for source in (HOST, ATTACKER_IP, HOST, ATTACKER_IP):
            assert await upload_from(server, source, dict([SMALL])) == dict([SMALL])
            assert server.pending_connections <= DEFAULT_CONFIG.max_pending_per_source
        assert server.stats["direct_claimed"] == 4 and "direct_busy" not in server.stats
        nursery.cancel_scope.cancel()


async def test_idle_connections_from_many_sources_do_not_lock_out_transfers() -> None:
    """The attacker's next step: many addresses (36 here, each its own group, as addresses of a /16 would be in the
    worst case), each at its per-source cap, more than the whole pending pool holds. The pool stays bounded, and a
    newcomer takes the place of the oldest waiter of the group holding the most: the honest hello is read."""
    sources = [f"127.0.0.{i}" for i in range(2, 38)]
    per_source = DEFAULT_CONFIG.max_pending_per_source
    assert len(sources) * per_source > DEFAULT_CONFIG.max_pending_total
    flood = Flood()
    async with running_server() as server, trio.open_nursery() as nursery:
        for source in sources:
            nursery.start_soon(flood.hog, server.port, source, per_source)
        await wait_for(lambda: flood.connects >= len(sources) * per_source + 500)
        assert server.pending_connections == DEFAULT_CONFIG.max_pending_total
        for _ in range(4):
            assert await upload_from(server, HOST, dict([SMALL])) == dict([SMALL])
            assert server.pending_connections <= DEFAULT_CONFIG.max_pending_total
        assert server.stats["direct_claimed"] == 4 and "direct_busy" not in server.stats
        nursery.cancel_scope.cancel()


async def test_pending_pool_displaces_from_the_group_holding_the_most() -> None:
    """Public addresses: a source is an IPv4 address (an IPv6 /64), a group its /16 (IPv6 /32)."""
    assert _ip_source("81.2.69.160") == ("81.2.69.160", "ip4:81.2.0.0/16")
    assert _ip_source("::ffff:81.2.69.160") == ("81.2.69.160", "ip4:81.2.0.0/16")
    assert _ip_source("2a00:1450:4001:81a::200e") == ("2a00:1450:4001:81a::/64", "ip6:2a00:1450::/32")
    assert _ip_source("127.0.0.2") == ("127.0.0.2", "ip4:127.0.0.2")

    pool = _PendingPool(total=8, per_source=2)
    deadline = trio.current_time() + HELLO_TIMEOUT_S
    attackers = [pool.admit(*_ip_source(f"81.2.{i}.1"), deadline) for i in range(8)]  # one /16, 8 sources
    assert len(pool) == 8 and all(evicted is None for _, evicted in attackers)
    honest, evicted = pool.admit(*_ip_source("93.184.216.34"), deadline)  # another /16: an attacker's place
    assert evicted is attackers[0][0] and evicted.evicted and evicted.scope.cancel_called
    for i in range(8, 40):  # the flood goes on: it displaces only its own group
        _, evicted = pool.admit(*_ip_source(f"81.2.{i}.1"), deadline)
        assert evicted is not None and evicted.group == "ip4:81.2.0.0/16"
    assert not honest.evicted and len(pool) == 8
    first, _ = pool.admit("81.2.200.1", "ip4:81.2.0.0/16", deadline)  # over the per-source cap: the oldest goes
    second, _ = pool.admit("81.2.200.1", "ip4:81.2.0.0/16", deadline)
    _, evicted = pool.admit("81.2.200.1", "ip4:81.2.0.0/16", deadline)
    assert evicted is first and not second.evicted and not honest.evicted
    pool.remove(honest)
    pool.remove(honest)  # idempotent
    assert len(pool) == 7


async def test_only_a_valid_ticket_takes_a_session() -> None:
    """Idle connections do not count against max_connections; a valid ticket over it is refused (direct_busy) and
    stays unclaimed."""
    async with running_server(DataChannelConfig(max_connections=1)) as server:
        idle = [await dial_from(f"127.0.0.{2 + i % 3}", server.port) for i in range(6)]
        await wait_for(lambda: server.pending_connections == 6)
        first = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        second = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, first) as raw:  # holds the only session
            assert raw.status == bytes([0])
            assert server.open_sessions == 1
            with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
                await upload(HOST, server.port, second.token, second.key, dict([SMALL]))
            assert caught.value.reason is Reason.TRANSFER_FAILED
            assert server.stats["direct_busy"] == 1
            await raw.send_blob(*SMALL)
            assert await raw.verdict() == bytes([0])
        assert await server.receive_upload(first) == dict([SMALL])
        assert server.open_tickets == 1  # the refused ticket was not claimed: it still works
        assert await upload_expecting(server, second, dict([SMALL])) == dict([SMALL])
        for stream in idle:
            await stream.aclose()


# -- a hostile server, seen by the downloading client ---------------------------------------------------------------


@asynccontextmanager
async def hostile_server(payload: bytes) -> AsyncIterator[int]:
    """Accepts one connection, reads the hello, says OK, sends ``payload`` and closes."""

    async def serve_one(stream: trio.SocketStream) -> None:
        async with stream:
            got = b""
            while len(got) < len(MAGIC) + 2 + 32:
                got += await stream.receive_some(64)
            await stream.send_all(b"\x00" + payload)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve_one, 0)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def header(digest: bytes, nbytes: int) -> bytes:
    return digest + nbytes.to_bytes(8, "big")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (header(BIG[0], len(BIG[1])) + BIG[1][:1000], Reason.TRANSFER_FAILED),
        (header(BIG[0], len(BIG[1])) + bytes(len(BIG[1])), Reason.HASH_MISMATCH),
        (header(BIG[0], len(BIG[1])) + BIG[1] + b"extra", Reason.TOO_LARGE),
        (header(BIG[0], len(BIG[1]) + 1) + BIG[1] + b"!", Reason.SHAPE_MISMATCH),
        (header(SMALL[0], len(SMALL[1])) + SMALL[1], Reason.UNEXPECTED_BLOB),
    ],
    ids=["truncated", "corrupted", "extra-bytes", "longer", "unexpected"],
)
async def test_download_checks_what_the_server_sends(payload: bytes, reason: Reason) -> None:
    async with hostile_server(payload) as port:
        with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
            await download(HOST, port, os.urandom(32), None, [(BIG[0], len(BIG[1]))], config=CLEAR)
        assert caught.value.reason is reason, caught.value


# -- where the client dials ------------------------------------------------------------------------------------------

TEST_PROTOCOL = TProtocol("/p2pcompute/test-transfer/1.0.0")


def test_a_ticket_names_no_host() -> None:
    """A ticket carries a port, never an address: a ticket frame with one is refused when decoded."""
    assert not {f.name for f in fields(TicketFrame)} & {"host", "ip", "addr", "address", "addrs", "multiaddr"}
    frame = TicketFrame(
        direction=TicketDirection.DOWNLOAD,
        port=4001,
        token=bytes(32),
        key=bytes(32),
        expires_at=1,
        blobs=(TicketBlob(digest=SMALL[0], nbytes=len(SMALL[1])),),
    )
    assert decode_frame_payload(encode_frame_payload(frame)) == frame
    wire = codec.unpack(encode_frame_payload(frame))
    wire["host"] = "203.0.113.9"  # TEST-NET-3: a third party
    with pytest.raises(SchemaError) as caught:
        decode_frame_payload(codec.pack(wire))
    assert caught.value.reason is Reason.UNKNOWN_FIELD


async def test_the_client_dials_the_ip_of_the_authenticated_connection(test_name: str) -> None:
    """The worker on 127.0.0.2 hands out the port of a third party's data server on 127.0.0.1: the client dials
    127.0.0.2 (the IP its libp2p connection to the worker uses) and never reaches the third party."""
    served = trio.Event()

    async def handler(stream: INetStream) -> None:
        served.set()
        await stream.close()

    async with (
        running_server() as third_party,
        open_host(seed_for(test_name, 0), ["/ip4/127.0.0.2/tcp/0"]) as worker,
        open_host(seed_for(test_name, 1), [f"/ip4/{HOST}/tcp/0"]) as client,
    ):
        worker.set_stream_handler(TEST_PROTOCOL, handler)
        peer = await connect(client, host_addrs(worker)[0])
        stream = await client.new_stream(peer, [TEST_PROTOCOL])
        assert remote_host(stream) == "127.0.0.2"
        ticket = third_party.offer_download(dict([SMALL]))
        with pytest.raises(TransferError) as caught, trio.fail_after(WAIT_S):
            await download(remote_host(stream), ticket.port, ticket.token, ticket.key, specs(dict([SMALL])))
        assert caught.value.reason is Reason.TRANSFER_FAILED
        assert "127.0.0.2" in caught.value.detail
        assert third_party.open_tickets == 1  # never claimed: nobody reached the third party
        await stream.close()


def test_a_node_opts_in_to_clear_mode_only_explicitly(tmp_path: Path) -> None:
    assert load_config().data_channel_clear is False
    (tmp_path / "node.toml").write_text("data_channel_clear = true\n")
    assert load_config(tmp_path / "node.toml").data_channel_clear is True
