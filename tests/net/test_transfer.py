"""The data channel over real sockets on 127.0.0.1 (specs/data-channel.md).

The hostile peers below speak the wire format by hand (raw trio sockets), as the spec describes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from p2pcompute.core.tensors import TensorMeta
from p2pcompute.errors import Reason, TransferError
from p2pcompute.net.transfer import (
    CHUNK_SIZE,
    DataChannelConfig,
    DataServer,
    Ticket,
    download,
    expected_blobs,
    upload,
)

HOST = "127.0.0.1"
WAIT_S = 30.0
MAGIC = b"p2pcdat1"
UPLOAD, DOWNLOAD = 1, 2
DEFAULT_CONFIG = DataChannelConfig()


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


async def upload_expecting(server: DataServer, ticket: Ticket, blobs: dict[bytes, bytes]) -> dict[bytes, memoryview]:
    """Run an honest upload and return what the server received."""
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload, HOST, server.port, ticket.token, ticket.key, blobs)
            return await server.receive_upload(ticket)


# -- honest transfers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypt", [True, False], ids=["sealed", "clear"])
async def test_upload_round_trip(encrypt: bool) -> None:
    async with running_server(DataChannelConfig(encrypt=encrypt)) as server:
        ticket = server.expect_upload(specs(BLOBS))
        assert (ticket.key is not None) is encrypt
        assert ticket.total_bytes == sum(map(len, BLOBS.values()))
        received = await upload_expecting(server, ticket, BLOBS)
        assert received == BLOBS
        assert server.open_tickets == 0


@pytest.mark.parametrize("encrypt", [True, False], ids=["sealed", "clear"])
async def test_download_round_trip(encrypt: bool) -> None:
    async with running_server(DataChannelConfig(encrypt=encrypt)) as server:
        ticket = server.offer_download(BLOBS)
        with trio.fail_after(WAIT_S):
            received = await download(HOST, server.port, ticket.token, ticket.key, specs(BLOBS))
        assert received == BLOBS
        assert server.open_tickets == 0


async def test_sealed_mode_per_ticket() -> None:
    async with running_server(DataChannelConfig(encrypt=False)) as server:
        up = server.expect_upload(specs(BLOBS), encrypt=True)
        down = server.offer_download(BLOBS, encrypt=True)
        assert up.key is not None and down.key is not None and up.key != down.key
        assert await upload_expecting(server, up, BLOBS) == BLOBS
        with pytest.raises(TransferError) as caught:  # a client without the key cannot read the records
            await download(HOST, server.port, down.token, None, specs(BLOBS))
        assert caught.value.reason in {Reason.UNEXPECTED_BLOB, Reason.SHAPE_MISMATCH}


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
            await download(HOST, server.port, os.urandom(32), None, specs(BLOBS))
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

    def __init__(self, stream: trio.SocketStream, key: bytes | None) -> None:
        self.stream = stream
        self.aead = ChaCha20Poly1305(key) if key else None
        self.counter = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int, ticket: Ticket, direction: int = UPLOAD) -> AsyncIterator[RawSession]:
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(MAGIC + bytes([direction]) + ticket.token)
            assert await stream.receive_some(1) == b"\x00"
            yield cls(stream, ticket.key)

    async def send(self, plaintext: bytes, *, tamper: bool = False) -> None:
        if self.aead is None:
            data = bytearray(plaintext)
        else:
            nonce = b"\x01\x00\x00\x00" + self.counter.to_bytes(8, "big")
            self.counter += 1
            sealed = self.aead.encrypt(nonce, plaintext, None)
            data = bytearray(len(sealed).to_bytes(4, "big") + sealed)
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


@pytest.mark.parametrize("encrypt", [False, True], ids=["clear", "sealed"])
async def test_corrupted_blob_is_a_hash_mismatch(encrypt: bool) -> None:
    async with running_server(DataChannelConfig(encrypt=encrypt)) as server:
        ticket = server.expect_upload([(BIG[0], len(BIG[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            corrupted = bytearray(BIG[1])
            corrupted[CHUNK_SIZE + 5] ^= 0xFF
            await raw.send_blob(BIG[0], bytes(corrupted))
            assert await raw.verdict() == bytes([3])  # hash_mismatch
        await expect_upload_failure(server, ticket, Reason.HASH_MISMATCH)


async def test_tampered_record_does_not_authenticate() -> None:
    async with running_server(DataChannelConfig(encrypt=True)) as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send(SMALL[0] + len(SMALL[1]).to_bytes(8, "big"))
            await raw.send(SMALL[1], tamper=True)
            await raw.verdict()
        await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)


@pytest.mark.parametrize("encrypt", [False, True], ids=["clear", "sealed"])
async def test_truncated_upload_detected(encrypt: bool) -> None:
    async with running_server(DataChannelConfig(encrypt=encrypt)) as server:
        ticket = server.expect_upload([(BIG[0], len(BIG[1])), (SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send_blob(*SMALL)
            await raw.send(BIG[0] + len(BIG[1]).to_bytes(8, "big"))
            await raw.send(BIG[1][:CHUNK_SIZE])  # one piece of three, then the end
            assert await raw.verdict() == bytes([7])  # transfer_failed
        await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)


async def test_missing_blob_detected() -> None:
    async with running_server(DataChannelConfig(encrypt=False)) as server:
        ticket = server.expect_upload([(BIG[0], len(BIG[1])), (SMALL[0], len(SMALL[1]))])
        with pytest.raises(TransferError) as caught:
            await upload(HOST, server.port, ticket.token, ticket.key, dict([SMALL]))
        assert caught.value.reason is Reason.TRANSFER_FAILED
        await expect_upload_failure(server, ticket, Reason.TRANSFER_FAILED)


@pytest.mark.parametrize("encrypt", [False, True], ids=["clear", "sealed"])
async def test_bytes_after_the_last_blob_refused(encrypt: bool) -> None:
    async with running_server(DataChannelConfig(encrypt=encrypt)) as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send_blob(*SMALL)
            await raw.send(b"more")
            assert await raw.verdict() == bytes([6])  # too_large
        await expect_upload_failure(server, ticket, Reason.TOO_LARGE)


async def test_longer_blob_than_stated_refused() -> None:
    async with running_server(DataChannelConfig(encrypt=False)) as server:
        ticket = server.expect_upload([(SMALL[0], len(SMALL[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send_blob(SMALL[0], SMALL[1] + b"!")
            assert await raw.verdict() == bytes([4])  # shape_mismatch
        await expect_upload_failure(server, ticket, Reason.SHAPE_MISMATCH)


async def test_unknown_and_repeated_blobs_refused() -> None:
    async with running_server(DataChannelConfig(encrypt=False)) as server:
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
    async with running_server() as server:
        async with await trio.open_tcp_stream(HOST, server.port) as silent:
            assert await silent.receive_some(1) == bytes([8])  # timeout: no hello
        ticket = server.expect_upload([(BIG[0], len(BIG[1]))])
        async with RawSession.open(server.port, ticket) as raw:
            await raw.send(BIG[0] + len(BIG[1]).to_bytes(8, "big"))
            await raw.send(BIG[1][:1000])  # then nothing
            assert await raw.stream.receive_some(1) == bytes([8])
        await expect_upload_failure(server, ticket, Reason.TIMEOUT)


# -- a hostile server, seen by the downloading client ---------------------------------------------------------------


@asynccontextmanager
async def hostile_server(payload: bytes) -> AsyncIterator[int]:
    """Accepts one connection, reads the hello, says OK, sends ``payload`` and closes."""

    async def serve_one(stream: trio.SocketStream) -> None:
        async with stream:
            got = b""
            while len(got) < len(MAGIC) + 1 + 32:
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
            await download(HOST, port, os.urandom(32), None, [(BIG[0], len(BIG[1]))])
        assert caught.value.reason is reason, caught.value
