"""Data channel: job tensors over a direct TCP connection, named by ticket (specs/data-channel.md).

py-libp2p 0.8.1's Noise+yamux streams carry 0.04-0.15x of raw TCP on loopback, too slow for tensors. A worker
runs one :class:`DataServer`; the negotiation (over the Noise-authenticated libp2p stream) hands the client a
:class:`Ticket`: port, a single-use random token, a single-use key, the direction and the blobs expected. The
client dials the IP of that authenticated connection (the ticket names only a port), proves the ticket by sending
its token first, then the blobs flow, sealed in AEAD records (AES-256-GCM where the dialling CPU has AES
instructions, else ChaCha20-Poly1305: the client picks, the server accepts either). Every blob is checked against
its length and SHA-256 before it is handed over. Clear mode (no key, bytes readable on the path) exists for
loopback testnets only and needs an explicit opt-in at both ends (:attr:`DataChannelConfig.clear`).

When no direct TCP path exists (a relayed connection, or a data port that does not connect), the same session,
byte for byte (hello with the token, status bytes, sealed records, hash checks), runs over a
``/p2pcompute/data/1.0.0`` stream on the libp2p connection instead (:meth:`DataServer.handle_stream` on the
worker, :func:`upload_over` / :func:`download_over` on the client, which decides in
:mod:`p2pcompute.net.negotiate`). Only the byte stream differs (:class:`_Channel`); tickets, framing, seal, checks
and bounds are one code path, and a ticket is single use across both.

The server side and the client functions only move bytes and time: what is expected comes from the ticket, and
every wait is bounded by a named timeout.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
import mmap
import platform
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF

from p2pcompute.core.matching import address_group
from p2pcompute.core.tensors import DIGEST_SIZE, TensorMeta
from p2pcompute.errors import Reason, TransferError

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio-stubs that do not re-export TaskStatus.
    from trio_typing import TaskStatus

__all__ = [
    "CHUNK_SIZE",
    "CONNECT_TIMEOUT_S",
    "DATA_DIAL_TIMEOUT_S",
    "Blob",
    "Cipher",
    "DataChannelConfig",
    "DataPath",
    "DataServer",
    "DataTransport",
    "Direction",
    "Ticket",
    "dial_data_server",
    "download",
    "download_over",
    "expected_blobs",
    "has_aes_instructions",
    "ticket_cipher",
    "upload",
    "upload_over",
]

logger = logging.getLogger(__name__)

MAGIC: Final = b"p2pcdat2"
TOKEN_SIZE: Final = 32
KEY_SIZE: Final = 32
#: The hello: magic, direction byte, cipher byte, token.
HELLO_SIZE: Final = len(MAGIC) + 2 + TOKEN_SIZE
#: A blob header: digest, then the byte length as u64 big-endian.
HEADER_SIZE: Final = DIGEST_SIZE + 8
#: Blob data moves in pieces of this size (the last piece of a blob may be shorter); one sealed record each.
CHUNK_SIZE: Final = 1 << 20
TAG_SIZE: Final = 16
#: Blobs from this size on are received into huge-page mappings (see :func:`_allocate`).
HUGE_BUFFER_MIN: Final = 2 << 20
#: Blobs from this size on are hashed in a worker thread, behind the receiving task.
HASH_THREAD_MIN: Final = 2 * CHUNK_SIZE
#: The most bytes one call into the hashing thread takes (a cancelled transfer waits for at most one call).
HASH_BATCH_MAX: Final = 16 * CHUNK_SIZE

#: Dialling the data server (:func:`upload`, :func:`download`).
CONNECT_TIMEOUT_S: Final = 10.0
#: A job client's dial of the data port before it moves the tensors over the libp2p stream instead
#: (:mod:`p2pcompute.net.negotiate`): a worker behind NAT drops the SYN, and waiting longer only delays the job.
DATA_DIAL_TIMEOUT_S: Final = 3.0
#: The server's wait for the hello on its TCP port, from the accepted connection: all that a connection which names
#: no ticket can cost. The client sends its 42 bytes as soon as its connect returns, so they arrive with (or right
#: after) the handshake's last ACK; 2 s leaves room for a few retransmissions of a lost segment.
HELLO_TIMEOUT_S: Final = 2.0
#: The server's wait for the hello on a ``/p2pcompute/data/1.0.0`` stream, from the negotiated stream: the hello
#: follows one more round trip (multistream-select), may queue behind the peer's other streams on the same
#: connection (a transfer's window, a relay's rate), and the peer is authenticated and bounded per peer.
STREAM_HELLO_TIMEOUT_S: Final = 10.0
#: The client's wait to send its hello and for the server's answer to it (the first status byte).
ACCEPT_TIMEOUT_S: Final = 10.0
#: Each header or data piece (at most CHUNK_SIZE bytes) in either direction: a stalled peer is cut off.
CHUNK_TIMEOUT_S: Final = 30.0
#: The uploader's wait for the final verdict after its last byte.
VERDICT_TIMEOUT_S: Final = 30.0
#: Best-effort status byte sent on the way out of a failed connection.
FAREWELL_TIMEOUT_S: Final = 1.0

DEFAULT_TICKET_TTL_MS: Final = 60_000
#: How long a finished upload waits for :meth:`DataServer.receive_upload` after its ticket's expiry.
DEFAULT_RESULT_RETENTION_MS: Final = 60_000
DEFAULT_MAX_TICKETS: Final = 256
DEFAULT_MAX_CONNECTIONS: Final = 32
#: TCP connections of one source (an IPv4 address, an IPv6 /64) waiting for their hello; one more takes the place of
#: the source's oldest, which is closed at once.
DEFAULT_MAX_PENDING_PER_SOURCE: Final = 4
#: Connections waiting for their hello, per path (TCP port, streams); when full, a newcomer takes the place of the
#: oldest waiting one of the address group (``address_group``; a stream: its peer) that holds the most.
DEFAULT_MAX_PENDING_TOTAL: Final = 128
#: Concurrent ``/p2pcompute/data/1.0.0`` sessions of one peer: as many as the job streams a worker lets one peer
#: hold (``NegotiationPolicy.max_streams_per_peer``), each of which has at most one transfer at a time.
DEFAULT_MAX_STREAMS_PER_PEER: Final = 4
DEFAULT_MAX_BLOBS: Final = 4096
DEFAULT_MAX_TICKET_BYTES: Final = 8 << 30


class Direction(StrEnum):
    """Which way the blobs flow, seen from the client (who always dials)."""

    UPLOAD = "upload"
    DOWNLOAD = "download"


class DataPath(StrEnum):
    """Which byte stream a ticket's session ran over."""

    #: The data channel: a TCP connection to the ticket's port at the IP of the libp2p connection.
    DIRECT = "direct"
    #: The fallback: a ``/p2pcompute/data/1.0.0`` stream on the (Noise-secured) libp2p connection.
    STREAM = "stream"


class Cipher(StrEnum):
    """The AEAD that seals a connection's records (both: 32-byte key, 12-byte nonce, 16-byte tag)."""

    AES_256_GCM = "aes-256-gcm"
    CHACHA20_POLY1305 = "chacha20-poly1305"


_DIRECTION_BYTE: Final = {Direction.UPLOAD: 1, Direction.DOWNLOAD: 2}
#: The hello's cipher byte; 0 is clear mode (a ticket without a key).
_CIPHER_BYTE: Final = {None: 0, Cipher.CHACHA20_POLY1305: 1, Cipher.AES_256_GCM: 2}
_AEAD: Final[dict[Cipher, type[AESGCM] | type[ChaCha20Poly1305]]] = {
    Cipher.AES_256_GCM: AESGCM,
    Cipher.CHACHA20_POLY1305: ChaCha20Poly1305,
}
#: Nonce prefixes of sealed records: client-to-server and server-to-client never share a nonce.
_NONCE_PREFIX: Final = {Direction.UPLOAD: b"\x01\x00\x00\x00", Direction.DOWNLOAD: b"\x02\x00\x00\x00"}

_STATUS_OK: Final = 0
_STATUS_CODES: Final = {
    Reason.BAD_TOKEN: 1,
    Reason.EXPIRED: 2,
    Reason.HASH_MISMATCH: 3,
    Reason.SHAPE_MISMATCH: 4,
    Reason.UNEXPECTED_BLOB: 5,
    Reason.TOO_LARGE: 6,
    Reason.TRANSFER_FAILED: 7,
    Reason.TIMEOUT: 8,
}
_STATUS_REASONS: Final = {code: reason for reason, code in _STATUS_CODES.items()}


#: A blob to send. Received blobs are writable ``memoryview``s (see :func:`_allocate`); ``torch.frombuffer``
#: takes them as they are, ``bytes(view)`` copies.
Blob = bytes | bytearray | memoryview


def _allocate(nbytes: int) -> memoryview:
    """A zeroed, writable buffer for one received blob.

    Faulting in fresh memory costs more than the loopback wire (measured here: a fresh 128 MiB ``bytearray``
    halves raw TCP throughput), so large buffers are anonymous mappings advised to use transparent huge pages
    (512 times fewer page faults); the mapping is unmapped when the last view of it goes.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_BUFFER_MIN or advice is None:
        return memoryview(bytearray(nbytes))
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(advice)
    return memoryview(region)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@functools.cache
def has_aes_instructions() -> bool:
    """Whether this CPU has AES instructions with carry-less multiply (what makes AES-GCM fast and constant-time).

    Linux: the ``aes`` and ``pclmulqdq`` (x86) or ``aes`` and ``pmull`` (ARMv8) flags of ``/proc/cpuinfo``.
    Elsewhere: true on x86-64 and 64-bit ARM, whose current CPUs (and every Apple one) all have them.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine().lower() in ("x86_64", "amd64", "arm64", "aarch64")
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags = set(value.split())
            return "aes" in flags and ("pclmulqdq" in flags or "pmull" in flags)
    return False


@dataclass(frozen=True, slots=True)
class DataChannelConfig:
    """Limits of one data server (and of what a client accepts to download). Named defaults."""

    ticket_ttl_ms: int = DEFAULT_TICKET_TTL_MS
    result_retention_ms: int = DEFAULT_RESULT_RETENTION_MS
    max_tickets: int = DEFAULT_MAX_TICKETS
    #: Concurrent sessions that presented a valid ticket, over both paths together.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: TCP connections of one source (IPv4 address, IPv6 /64) that have not sent their hello yet.
    max_pending_per_source: int = DEFAULT_MAX_PENDING_PER_SOURCE
    #: Connections (and, separately, streams) that have not sent their hello yet.
    max_pending_total: int = DEFAULT_MAX_PENDING_TOTAL
    #: Concurrent libp2p-stream sessions of one authenticated peer.
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER
    max_blobs: int = DEFAULT_MAX_BLOBS
    max_ticket_bytes: int = DEFAULT_MAX_TICKET_BYTES
    #: Clear mode, an explicit opt-in for loopback testnets: a server issues tickets without a key, and a client
    #: accepts them (bytes readable on the path; lengths and hashes are still checked). Off: every ticket is
    #: sealed, and a client refuses a ticket without a key before it dials.
    clear: bool = False
    #: The AEAD a client asks for when it dials; None: AES-256-GCM where :func:`has_aes_instructions`, else
    #: ChaCha20-Poly1305. A server accepts either.
    cipher: Cipher | None = None

    def __post_init__(self) -> None:
        limits = (
            self.ticket_ttl_ms,
            self.max_tickets,
            self.max_connections,
            self.max_pending_per_source,
            self.max_pending_total,
            self.max_streams_per_peer,
            self.max_blobs,
        )
        if min(limits) < 1:
            raise ValueError(
                "ticket_ttl_ms, max_tickets, max_connections, max_pending_per_source, max_pending_total, "
                "max_streams_per_peer and max_blobs must be >= 1"
            )
        if self.result_retention_ms < 0 or self.max_ticket_bytes < 0:
            raise ValueError("result_retention_ms and max_ticket_bytes must be >= 0")

    def dial_cipher(self) -> Cipher:
        """The cipher this end asks for when it dials a sealed ticket."""
        if self.cipher is not None:
            return self.cipher
        return Cipher.AES_256_GCM if has_aes_instructions() else Cipher.CHACHA20_POLY1305


@dataclass(frozen=True, slots=True)
class Ticket:
    """What the negotiation hands the client: where to dial, what proves it, what flows. Single use."""

    token: bytes = field(repr=False)
    #: The connection's key; None only from a server in clear mode.
    key: bytes | None = field(repr=False)
    port: int
    direction: Direction
    expires_at_ms: int
    #: (digest, byte length) of every blob, in the order the server sends them on a download.
    blobs: tuple[tuple[bytes, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.blobs)


def expected_blobs(
    items: Iterable[TensorMeta | tuple[bytes, int]],
    *,
    max_blobs: int = DEFAULT_MAX_BLOBS,
    max_bytes: int = DEFAULT_MAX_TICKET_BYTES,
) -> tuple[tuple[bytes, int], ...]:
    """Normalise metas or (digest, nbytes) pairs: duplicates merged, order kept, counts and totals bounded.

    Raises :class:`TransferError` (``shape_mismatch`` for one digest with two lengths, ``too_large`` over the
    limits, ``transfer_failed`` for a malformed digest or length) or :class:`JobFormatError` for a bad dtype.
    """
    seen: dict[bytes, int] = {}
    for item in items:
        digest, nbytes = (item.digest, item.nbytes) if isinstance(item, TensorMeta) else item
        if len(digest) != DIGEST_SIZE or nbytes < 0:
            raise TransferError(Reason.TRANSFER_FAILED, f"not a (32-byte digest, length >= 0) pair: {nbytes}")
        if seen.setdefault(digest, nbytes) != nbytes:
            raise TransferError(Reason.SHAPE_MISMATCH, f"blob {digest.hex()[:16]} listed with two lengths")
        if len(seen) > max_blobs:
            raise TransferError(Reason.TOO_LARGE, f"more than {max_blobs} blobs")
    total = sum(seen.values())
    if total > max_bytes:
        raise TransferError(Reason.TOO_LARGE, f"{total} bytes stated, limit {max_bytes}")
    return tuple(seen.items())


# ---------------------------------------------------------------------------------------------------------------
# Wire helpers (both roles)


def _hello(direction: Direction, cipher: Cipher | None, token: bytes) -> bytes:
    if len(token) != TOKEN_SIZE:
        raise TransferError(Reason.BAD_TOKEN, f"a token is {TOKEN_SIZE} bytes, got {len(token)}")
    return MAGIC + bytes([_DIRECTION_BYTE[direction], _CIPHER_BYTE[cipher]]) + token


def _parse_hello(hello: bytes) -> tuple[Direction, Cipher | None, bytes]:
    """(direction, cipher or None for clear, token) of a hello, or :class:`TransferError` ``bad_token``."""
    directions = {byte: direction for direction, byte in _DIRECTION_BYTE.items()}
    ciphers = {byte: cipher for cipher, byte in _CIPHER_BYTE.items()}
    at = len(MAGIC)
    if len(hello) != HELLO_SIZE or hello[:at] != MAGIC or hello[at] not in directions or hello[at + 1] not in ciphers:
        raise TransferError(Reason.BAD_TOKEN, "not a data-channel hello")
    return directions[hello[at]], ciphers[hello[at + 1]], hello[at + 2 :]


def _blob_header(digest: bytes, nbytes: int) -> bytes:
    return digest + nbytes.to_bytes(8, "big")


def _parse_blob_header(header: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    return bytes(header[:DIGEST_SIZE]), int.from_bytes(header[DIGEST_SIZE:HEADER_SIZE], "big")


def _status_error(status: int, context: str) -> TransferError:
    reason = _STATUS_REASONS.get(status, Reason.TRANSFER_FAILED)
    return TransferError(reason, f"{context}: the server answered {reason.value} (status {status})")


class _Sealer:
    """One direction's AEAD with a counter nonce (never reused: one key per single-use ticket, one connection)."""

    def __init__(self, key: bytes, direction: Direction, cipher: Cipher) -> None:
        if len(key) != KEY_SIZE:
            raise TransferError(Reason.BAD_TOKEN, f"a key is {KEY_SIZE} bytes, got {len(key)}")
        self.aead: AESGCM | ChaCha20Poly1305 = _AEAD[cipher](key)
        self._prefix = _NONCE_PREFIX[direction]
        self._counter = 0

    def nonce(self) -> bytes:
        nonce = self._prefix + self._counter.to_bytes(8, "big")
        self._counter += 1
        return nonce


# ---------------------------------------------------------------------------------------------------------------
# The byte stream a session runs over: a TCP connection (the data channel) or a libp2p stream (the fallback)


#: What a client session runs over: a dialled data-channel connection, or a ``/p2pcompute/data/1.0.0`` stream.
DataTransport = trio.SocketStream | INetStream

#: The errors a broken or closed byte stream raises (the libp2p adapter maps its own onto these).
_BROKEN: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Channel(Protocol):
    """The four operations a session needs. A broken stream raises one of :data:`_BROKEN`; ``recv_into`` returns 0
    at the end of the stream."""

    @property
    def path(self) -> DataPath: ...

    async def send_all(self, data: bytes | memoryview) -> None: ...

    async def recv_into(self, view: memoryview) -> int: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


class _SocketChannel:
    """A TCP connection; receives go straight into the caller's buffer (``recv_into``: no copy)."""

    path = DataPath.DIRECT

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream

    async def send_all(self, data: bytes | memoryview) -> None:
        await self._stream.send_all(data)

    async def recv_into(self, view: memoryview) -> int:
        return await self._stream.socket.recv_into(view)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _StreamChannel:
    """A libp2p stream (Noise+yamux): ``read`` returns new ``bytes`` of at most the size asked, copied into the
    caller's buffer; the end of the stream (``StreamEOF``) reads as 0; every libp2p error as a broken stream."""

    path = DataPath.STREAM

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self._rest = memoryview(b"")  # bytes read beyond what the last caller asked for (read(n) should give <= n)

    async def send_all(self, data: bytes | memoryview) -> None:
        try:
            await self._stream.write(data if isinstance(data, bytes) else bytes(data))
        except BaseLibp2pError as exc:
            raise trio.BrokenResourceError(f"libp2p stream: {exc!r}") from exc

    async def recv_into(self, view: memoryview) -> int:
        if not self._rest:
            try:
                data = await self._stream.read(len(view))
            except StreamEOF:
                return 0
            except BaseLibp2pError as exc:
                raise trio.BrokenResourceError(f"libp2p stream: {exc!r}") from exc
            self._rest = memoryview(data)
        n = min(len(view), len(self._rest))
        view[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n

    async def send_eof(self) -> None:
        # NetStream.close_write half-closes (yamux FIN); INetStream only promises close(), which for yamux is the
        # same FIN (the read side stays open).
        close_write = getattr(self._stream, "close_write", None)
        try:
            await (close_write() if callable(close_write) else self._stream.close())
        except BaseLibp2pError as exc:
            raise trio.BrokenResourceError(f"libp2p stream: {exc!r}") from exc

    async def aclose(self) -> None:
        """Close (FIN) within FAREWELL_TIMEOUT_S, else reset: a peer that stopped reading cannot hold us."""
        with trio.CancelScope(shield=True):
            closed = False
            with trio.move_on_after(FAREWELL_TIMEOUT_S), contextlib.suppress(BaseLibp2pError, *_BROKEN):
                await self._stream.close()
                closed = True
            if not closed:
                with trio.move_on_after(FAREWELL_TIMEOUT_S), contextlib.suppress(BaseLibp2pError, *_BROKEN):
                    await self._stream.reset()


def _channel(transport: DataTransport) -> _Channel:
    return _SocketChannel(transport) if isinstance(transport, trio.SocketStream) else _StreamChannel(transport)


async def _recv_exactly_into(channel: _Channel, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = await channel.recv_into(view[pos:])
        if n == 0:
            raise TransferError(Reason.TRANSFER_FAILED, f"cut short: {pos} of {len(view)} bytes of a piece arrived")
        pos += n


class _Writer:
    """Sends headers and blob pieces, in the clear or one sealed record per piece."""

    def __init__(self, channel: _Channel, sealer: _Sealer | None) -> None:
        self._channel = channel
        self._sealer = sealer
        self._scratch = memoryview(bytearray(CHUNK_SIZE + TAG_SIZE)) if sealer else None

    async def send_piece(self, piece: bytes | memoryview) -> None:
        with trio.fail_after(CHUNK_TIMEOUT_S):
            if self._sealer is None or self._scratch is None:
                await self._channel.send_all(piece)
                return
            record = self._scratch[: len(piece) + TAG_SIZE]
            self._sealer.aead.encrypt_into(self._sealer.nonce(), piece, None, record)
            await self._channel.send_all(record)

    async def send_blobs(self, blobs: Iterable[tuple[bytes, Blob]]) -> None:
        for digest, data in blobs:
            await self.send_piece(_blob_header(digest, len(data)))
            view = memoryview(data)
            for start in range(0, len(view), CHUNK_SIZE):
                await self.send_piece(view[start : start + CHUNK_SIZE])


@dataclass(eq=False, slots=True)
class _Pending:
    """A large blob being received: the hashing task hashes ``view[:arrived]`` behind the receiving one."""

    digest: bytes
    view: memoryview
    arrived: int = 0


class _HashBehind:
    """Hashes large blobs in a worker thread (``update`` releases the GIL), in arrival order, behind the receiver.

    The receiver never waits for it until the end of the stream: every blob already has its own buffer, so
    hashing may lag by any amount without more memory, and the next blob is received while the last one is hashed.
    """

    def __init__(self) -> None:
        self._blobs: list[_Pending] = []
        self._closed = False
        self._changed = trio.Event()

    def add(self, digest: bytes, view: memoryview) -> _Pending:
        pending = _Pending(digest, view)
        self._blobs.append(pending)
        return pending

    def arrived(self, pending: _Pending, upto: int) -> None:
        pending.arrived = upto
        self._changed.set()

    def close(self) -> None:
        """Nothing more will be added: :meth:`run` returns once every blob is hashed."""
        self._closed = True
        self._changed.set()

    async def _changes(self) -> None:
        self._changed = trio.Event()
        await self._changed.wait()

    async def run(self) -> None:
        """Hash every blob as its bytes arrive; ``hash_mismatch`` at the first that does not match its digest."""
        done = 0
        while done < len(self._blobs) or not self._closed:
            if done == len(self._blobs):
                await self._changes()
                continue
            blob = self._blobs[done]
            hasher = hashlib.sha256()
            hashed = 0
            while hashed < len(blob.view):
                if blob.arrived == hashed:
                    await self._changes()
                    continue
                upto = min(blob.arrived, hashed + HASH_BATCH_MAX)
                await trio.to_thread.run_sync(hasher.update, blob.view[hashed:upto])
                hashed = upto
            if hasher.digest() != blob.digest:
                raise TransferError(Reason.HASH_MISMATCH, f"blob bytes do not hash to {blob.digest.hex()[:16]}")
            done += 1


class _Reader:
    """Receives pieces of a size the receiver already knows, straight into their destination."""

    def __init__(self, channel: _Channel, sealer: _Sealer | None) -> None:
        self._channel = channel
        self._sealer = sealer
        self._scratch = memoryview(bytearray(CHUNK_SIZE + TAG_SIZE)) if sealer else None

    async def read_piece(self, view: memoryview) -> None:
        with trio.fail_after(CHUNK_TIMEOUT_S):
            if self._sealer is None or self._scratch is None:
                await _recv_exactly_into(self._channel, view)
                return
            record = self._scratch[: len(view) + TAG_SIZE]
            await _recv_exactly_into(self._channel, record)
            try:
                self._sealer.aead.decrypt_into(self._sealer.nonce(), record, None, view)
            except InvalidTag:
                raise TransferError(Reason.TRANSFER_FAILED, "a record does not authenticate") from None

    async def expect_eof(self) -> None:
        with trio.fail_after(CHUNK_TIMEOUT_S):
            if await self._channel.recv_into(memoryview(bytearray(1))):
                raise TransferError(Reason.TOO_LARGE, "bytes after the last stated blob")

    async def receive_blobs(self, expected: Mapping[bytes, int]) -> dict[bytes, memoryview]:
        """Exactly the ``expected`` blobs (any order), each length- and hash-checked, then the end of the stream.

        Blobs of :data:`HASH_THREAD_MIN` bytes and more are hashed by a second task (:class:`_HashBehind`); the
        first failure of either task is raised as it is, not wrapped in the nursery's exception group.
        """
        received: dict[bytes, memoryview] = {}
        behind = _HashBehind()
        failures: list[Exception] = []

        async def guarded(work: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
            try:
                await work()
            except Exception as exc:
                failures.append(exc)
                scope.cancel()

        async def receive() -> None:
            header = memoryview(bytearray(HEADER_SIZE))
            while len(received) < len(expected):
                await self.read_piece(header)
                digest, nbytes = _parse_blob_header(header)
                if digest not in expected or digest in received:
                    raise TransferError(Reason.UNEXPECTED_BLOB, f"blob {digest.hex()[:16]} is not (or no longer) due")
                if nbytes != expected[digest]:
                    raise TransferError(
                        Reason.SHAPE_MISMATCH,
                        f"blob {digest.hex()[:16]}: {nbytes} bytes announced, {expected[digest]} due",
                    )
                buffer = _allocate(nbytes)
                if nbytes < HASH_THREAD_MIN:
                    await self._receive_into(buffer, None)
                    if hashlib.sha256(buffer).digest() != digest:
                        raise TransferError(Reason.HASH_MISMATCH, f"blob bytes do not hash to {digest.hex()[:16]}")
                else:
                    pending = behind.add(digest, buffer)
                    await self._receive_into(buffer, functools.partial(behind.arrived, pending))
                received[digest] = buffer
            await self.expect_eof()
            behind.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, behind.run, nursery.cancel_scope)
            await guarded(receive, nursery.cancel_scope)
        if failures:
            raise failures[0]
        return received

    async def _receive_into(self, view: memoryview, arrived: Callable[[int], None] | None) -> None:
        for start in range(0, len(view), CHUNK_SIZE):  # an empty blob has no data piece
            piece = view[start : start + CHUNK_SIZE]
            await self.read_piece(piece)
            if arrived is not None:
                arrived(start + len(piece))


async def _read_status(channel: _Channel, timeout_s: float) -> int | None:
    """The server's status byte, or None when the stream ended (or broke) first; ``timeout`` after ``timeout_s``."""
    byte = memoryview(bytearray(1))
    try:
        with trio.fail_after(timeout_s):
            n = await channel.recv_into(byte)
    except _BROKEN:
        return None
    except trio.TooSlowError:
        raise TransferError(Reason.TIMEOUT, f"no status byte from the data server within {timeout_s} s") from None
    return byte[0] if n else None


async def _send_status(channel: _Channel, status: int) -> None:
    with trio.move_on_after(FAREWELL_TIMEOUT_S), contextlib.suppress(*_BROKEN):
        await channel.send_all(bytes([status]))


async def dial_data_server(host: str, port: int, *, timeout_s: float = CONNECT_TIMEOUT_S) -> trio.SocketStream:
    """A TCP connection to a data server, or :class:`TransferError` ``transfer_failed`` ("cannot reach") when it
    is refused, unreachable or not made within ``timeout_s``. Nothing is sent: a failed dial leaves the ticket
    unclaimed, so the caller may still use it over the libp2p stream."""
    try:
        with trio.fail_after(timeout_s):
            return await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        detail = f"not connected within {timeout_s} s" if isinstance(exc, trio.TooSlowError) else str(exc)
        raise TransferError(Reason.TRANSFER_FAILED, f"cannot reach the data server {host}:{port}: {detail}") from exc


async def _start_session(channel: _Channel, direction: Direction, cipher: Cipher | None, token: bytes) -> None:
    """Send the hello and wait for the server to accept the ticket."""
    hello = _hello(direction, cipher, token)
    try:
        with trio.fail_after(ACCEPT_TIMEOUT_S):
            await channel.send_all(hello)
        status = await _read_status(channel, ACCEPT_TIMEOUT_S)
    except (trio.TooSlowError, *_BROKEN) as exc:
        raise _transfer_error(exc) from exc
    if status != _STATUS_OK:
        if status is None:
            raise TransferError(Reason.TRANSFER_FAILED, "the data server closed the connection after the hello")
        raise _status_error(status, f"{direction.value} refused")


def _transfer_error(exc: Exception) -> TransferError:
    """The :class:`TransferError` for what broke a connection (a stall, a reset, a check that failed)."""
    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return TransferError(Reason.TIMEOUT, "the peer stalled")
    return TransferError(Reason.TRANSFER_FAILED, f"connection broken: {exc!r}")


def ticket_cipher(key: bytes | None, config: DataChannelConfig) -> Cipher | None:
    """The cipher a client names for a ticket with ``key`` (None: clear mode), or :class:`TransferError`
    ``bad_token`` for a keyless ticket when ``config`` did not opt in to clear mode (check before dialling)."""
    if key is not None:
        return config.dial_cipher()
    if not config.clear:
        raise TransferError(
            Reason.BAD_TOKEN, "the ticket has no key (clear mode) and this end did not opt in to clear transfers"
        )
    return None


# ---------------------------------------------------------------------------------------------------------------
# Client


async def upload(
    host: str,
    port: int,
    token: bytes,
    key: bytes | None,
    blobs: Mapping[bytes, Blob],
    *,
    config: DataChannelConfig = DataChannelConfig(),
) -> None:
    """Send ``blobs`` (digest -> bytes) on an upload ticket; returns once the server has checked them all.

    ``host`` must be the IP of the authenticated connection the ticket came over (the ticket names only a port).
    A ticket without a key is refused (``bad_token``, nothing dialled) unless ``config.clear``.
    Raises :class:`TransferError` with the server's verdict (``bad_token``, ``expired``, ``hash_mismatch``, ...),
    ``timeout`` or ``transfer_failed``.
    """
    ticket_cipher(key, config)
    await upload_over(await dial_data_server(host, port), token, key, blobs, config=config)


async def upload_over(
    transport: DataTransport,
    token: bytes,
    key: bytes | None,
    blobs: Mapping[bytes, Blob],
    *,
    config: DataChannelConfig = DataChannelConfig(),
) -> None:
    """:func:`upload` over a transport already open to the worker: a connection from :func:`dial_data_server`, or a
    ``/p2pcompute/data/1.0.0`` stream on the libp2p connection the ticket came over. The same session, byte for
    byte; the transport is closed on return."""
    channel = _channel(transport)
    try:
        cipher = ticket_cipher(key, config)
        sealer = _Sealer(key, Direction.UPLOAD, cipher) if key is not None and cipher is not None else None
        await _start_session(channel, Direction.UPLOAD, cipher, token)
        try:
            await _Writer(channel, sealer).send_blobs(blobs.items())
            with trio.fail_after(CHUNK_TIMEOUT_S):
                await channel.send_eof()
        except (*_BROKEN, trio.TooSlowError) as exc:
            # The server may have refused part way; its status byte, if it got through, says why.
            status = None
            with contextlib.suppress(TransferError):
                status = await _read_status(channel, FAREWELL_TIMEOUT_S)
            if status is not None and status != _STATUS_OK:
                raise _status_error(status, "upload refused") from exc
            raise _transfer_error(exc) from exc
        status = await _read_status(channel, VERDICT_TIMEOUT_S)
    finally:
        await channel.aclose()
    if status is None:
        raise TransferError(Reason.TRANSFER_FAILED, "the data server gave no verdict on the upload")
    if status != _STATUS_OK:
        raise _status_error(status, "upload refused")


async def download(
    host: str,
    port: int,
    token: bytes,
    key: bytes | None,
    expected: Iterable[TensorMeta | tuple[bytes, int]],
    *,
    config: DataChannelConfig = DataChannelConfig(),
) -> dict[bytes, memoryview]:
    """Fetch exactly the ``expected`` blobs on a download ticket; each is length- and hash-checked.

    ``host`` and a keyless ticket: as for :func:`upload`.
    Raises :class:`TransferError` (``bad_token``, ``expired``, ``hash_mismatch``, ``shape_mismatch``,
    ``unexpected_blob``, ``too_large``, ``timeout``, ``transfer_failed``).
    """
    expected = list(expected)
    expected_blobs(expected, max_blobs=config.max_blobs, max_bytes=config.max_ticket_bytes)
    ticket_cipher(key, config)
    return await download_over(await dial_data_server(host, port), token, key, expected, config=config)


async def download_over(
    transport: DataTransport,
    token: bytes,
    key: bytes | None,
    expected: Iterable[TensorMeta | tuple[bytes, int]],
    *,
    config: DataChannelConfig = DataChannelConfig(),
) -> dict[bytes, memoryview]:
    """:func:`download` over a transport already open to the worker (as for :func:`upload_over`)."""
    channel = _channel(transport)
    try:
        wanted = dict(expected_blobs(expected, max_blobs=config.max_blobs, max_bytes=config.max_ticket_bytes))
        cipher = ticket_cipher(key, config)
        sealer = _Sealer(key, Direction.DOWNLOAD, cipher) if key is not None and cipher is not None else None
        await _start_session(channel, Direction.DOWNLOAD, cipher, token)
        try:
            return await _Reader(channel, sealer).receive_blobs(wanted)
        except (*_BROKEN, trio.TooSlowError) as exc:
            raise _transfer_error(exc) from exc
    finally:
        await channel.aclose()


# ---------------------------------------------------------------------------------------------------------------
# Server


class _State(Enum):
    OPEN = "open"
    CLAIMED = "claimed"
    DONE = "done"


@dataclass(slots=True)
class _Slot:
    ticket: Ticket
    #: Download: the blobs to serve, in ticket order. Upload: empty.
    blobs: tuple[tuple[bytes, Blob], ...]
    state: _State = _State.OPEN
    claimed: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    result: dict[bytes, memoryview] | None = None
    error: TransferError | None = None

    def finish(self, result: dict[bytes, memoryview] | None, error: TransferError | None) -> None:
        self.state, self.result, self.error = _State.DONE, result, error
        self.claimed.set()
        self.done.set()


def _slot_key(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


@dataclass(eq=False, slots=True)
class _Waiter:
    """A connection (or stream) that has not sent its hello yet; ``scope`` bounds the wait."""

    source: str
    group: str
    scope: trio.CancelScope
    #: Displaced by a newcomer, over its source's cap or from a full pool (``scope`` is cancelled).
    evicted: bool = False


class _PendingPool:
    """The connections of one path that have not sent a hello: outside ``max_connections``, bounded on their own.

    At most ``per_source`` from one source (None: no cap here) and ``total`` in all, and a newcomer is always let
    in: over its source's cap it takes the place of that source's oldest waiter; in a full pool, that of the oldest
    waiter of the group holding the most. A flood displaces only itself (or its own source's, its own group's
    connections), while a hello that comes promptly, as every client sends it, still gets read
    (specs/data-channel.md §6.1).
    """

    def __init__(self, total: int, per_source: int | None) -> None:
        self._total = total
        self._per_source = per_source
        self._waiters: dict[_Waiter, None] = {}  # insertion order: oldest first
        self._sources: collections.Counter[str] = collections.Counter()
        self._groups: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._waiters)

    def admit(self, source: str, group: str, deadline: float) -> tuple[_Waiter, _Waiter | None]:
        """A place for a newcomer, and the waiter it displaced (None: none), whose scope is cancelled."""
        evicted = None
        if self._per_source is not None and self._sources[source] >= self._per_source:
            evicted = next(waiter for waiter in self._waiters if waiter.source == source)
        elif len(self._waiters) >= self._total:
            most = max(self._groups.values())
            evicted = next(waiter for waiter in self._waiters if self._groups[waiter.group] == most)
        if evicted is not None:
            evicted.evicted = True
            evicted.scope.cancel()
            self.remove(evicted)
        waiter = _Waiter(source, group, trio.CancelScope(deadline=deadline))
        self._waiters[waiter] = None
        self._sources[source] += 1
        self._groups[group] += 1
        return waiter, evicted

    def remove(self, waiter: _Waiter) -> None:
        """Forget a waiter (it sent its hello, gave up or was displaced); idempotent."""
        if waiter not in self._waiters:
            return
        del self._waiters[waiter]
        for counts, key in ((self._sources, waiter.source), (self._groups, waiter.group)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]


def _ip_source(ip: str) -> tuple[str, str]:
    """(source, group) of a remote IP on the TCP port. The source is the address (IPv6: its /64, what one
    subscriber holds); the group is its ``address_group`` (public IPv4 /16, public IPv6 /32, loopback and private
    addresses by themselves). An IPv4-mapped IPv6 address counts as the IPv4 address."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip, ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False)), address_group(f"/ip6/{address}")
    return str(address), address_group(f"/ip4/{address}")


class DataServer:
    """The worker's data-channel listener: one TCP port, any number of single-use tickets (bounded).

    The same tickets are served over ``/p2pcompute/data/1.0.0`` libp2p streams (register :meth:`handle_stream`
    as that protocol's handler): one slot table, so a ticket claimed on either path is gone for both.
    ``bind_host`` is the IP to listen on (the interface of the libp2p listen address). ``clock`` (ms since the
    epoch) and ``random_bytes`` are injectable for tests.

    A connection or stream first waits for its hello in a pending pool of its path (``max_pending_per_source``,
    ``max_pending_total``, ``HELLO_TIMEOUT_S`` or ``STREAM_HELLO_TIMEOUT_S``); only one that presents a valid
    ticket becomes a session and counts against ``max_connections``. :attr:`stats` counts tickets claimed and
    connections refused, by path: ``{path}_claimed``; ``{path}_busy`` (a valid ticket, but ``max_connections``
    sessions open; a stream: also ``max_streams_per_peer``); ``{path}_pending_evicted`` (a connection waiting for
    its hello, displaced by a newer one of its source over ``max_pending_per_source`` or from a full pool).
    """

    def __init__(
        self,
        bind_host: str,
        *,
        config: DataChannelConfig = DataChannelConfig(),
        clock: Callable[[], int] = _wall_clock_ms,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._bind_host = bind_host
        self._config = config
        self._clock = clock
        self._random_bytes = random_bytes
        self._port: int | None = None
        self._slots: dict[bytes, _Slot] = {}
        self._connections = 0  # sessions on both paths (valid tickets)
        self._pending = {
            DataPath.DIRECT: _PendingPool(config.max_pending_total, config.max_pending_per_source),
            # A stream's source is its authenticated peer, already capped by max_streams_per_peer.
            DataPath.STREAM: _PendingPool(config.max_pending_total, None),
        }
        self._streams_per_peer: collections.Counter[str] = collections.Counter()
        self.stats: collections.Counter[str] = collections.Counter()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the data server is not listening yet")
        return self._port

    @property
    def open_tickets(self) -> int:
        return len(self._slots)

    @property
    def open_sessions(self) -> int:
        """Sessions in progress (tickets presented), on both paths (at most ``max_connections``)."""
        return self._connections

    @property
    def pending_connections(self) -> int:
        """Connections and streams waiting for their hello (at most ``max_pending_total`` per path)."""
        return sum(len(pool) for pool in self._pending.values())

    async def serve(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on an ephemeral port of ``bind_host``; ``task_status.started(port)``; serve until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=self._bind_host)
        self._port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self._port)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
        finally:
            self._port = None
            for slot in self._slots.values():
                if slot.state is not _State.DONE:
                    slot.finish(None, TransferError(Reason.TRANSFER_FAILED, "the data server stopped"))
            self._slots.clear()

    # -- tickets ------------------------------------------------------------------------------------------------

    def expect_upload(self, metas: Iterable[TensorMeta | tuple[bytes, int]]) -> Ticket:
        """Issue an upload ticket for ``metas``; then await :meth:`receive_upload` with it."""
        blobs = expected_blobs(metas, max_blobs=self._config.max_blobs, max_bytes=self._config.max_ticket_bytes)
        return self._issue(Direction.UPLOAD, blobs, ())

    def offer_download(self, blobs: Mapping[bytes, Blob]) -> Ticket:
        """Issue a download ticket serving ``blobs`` (digest -> bytes, trusted: not re-hashed) once."""
        specs = expected_blobs(
            ((digest, len(data)) for digest, data in blobs.items()),
            max_blobs=self._config.max_blobs,
            max_bytes=self._config.max_ticket_bytes,
        )
        return self._issue(Direction.DOWNLOAD, specs, tuple(blobs.items()))

    def discard(self, ticket: Ticket) -> None:
        """Forget a ticket early (the negotiation was abandoned); a waiting :meth:`receive_upload` fails."""
        slot = self._slots.pop(_slot_key(ticket.token), None)
        if slot is not None and slot.state is _State.OPEN:
            slot.finish(None, TransferError(Reason.BAD_TOKEN, "ticket discarded"))

    async def receive_upload(self, ticket: Ticket) -> dict[bytes, memoryview]:
        """The checked blobs of an upload ticket, once the client has sent them all (put a timeout around it).

        Raises :class:`TransferError`: ``expired`` if no client claimed the ticket in time, otherwise whatever
        broke the transfer. The ticket is forgotten afterwards.
        """
        key = _slot_key(ticket.token)
        slot = self._slots.get(key)
        if slot is None or slot.ticket.direction is not Direction.UPLOAD:
            raise TransferError(Reason.BAD_TOKEN, "no such upload ticket")
        try:
            if slot.state is _State.OPEN:
                with trio.move_on_after(max(0, slot.ticket.expires_at_ms - self._clock()) / 1000):
                    await slot.claimed.wait()
                if slot.state is _State.OPEN:
                    slot.finish(None, TransferError(Reason.EXPIRED, "no client claimed the upload ticket in time"))
            await slot.done.wait()
        finally:
            if self._slots.get(key) is slot and slot.state is _State.DONE:
                del self._slots[key]
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def _issue(
        self,
        direction: Direction,
        specs: tuple[tuple[bytes, int], ...],
        blobs: tuple[tuple[bytes, Blob], ...],
    ) -> Ticket:
        now = self._clock()
        self._prune(now)
        if len(self._slots) >= self._config.max_tickets:
            raise TransferError(Reason.TOO_LARGE, f"{len(self._slots)} tickets open, limit {self._config.max_tickets}")
        token = self._random_bytes(TOKEN_SIZE)
        ticket = Ticket(
            token=token,
            key=None if self._config.clear else self._random_bytes(KEY_SIZE),
            port=self.port,
            direction=direction,
            expires_at_ms=now + self._config.ticket_ttl_ms,
            blobs=specs,
        )
        self._slots[_slot_key(token)] = _Slot(ticket, blobs)
        return ticket

    def _prune(self, now: int) -> None:
        """Drop expired open tickets, and finished uploads nobody collected within the retention time."""
        for key, slot in list(self._slots.items()):
            expiry = slot.ticket.expires_at_ms
            if slot.state is _State.OPEN and expiry <= now:
                slot.finish(None, TransferError(Reason.EXPIRED, "no client claimed the ticket in time"))
                del self._slots[key]
            elif slot.state is _State.DONE and expiry + self._config.result_retention_ms <= now:
                del self._slots[key]

    def _lookup(self, hello: bytes) -> tuple[bytes, _Slot, Cipher | None]:
        """The slot a hello names (unclaimed, unexpired), its key, and the cipher the client asked for (None: clear)."""
        direction, cipher, token = _parse_hello(hello)
        key = _slot_key(token)
        slot = self._slots.get(key)
        if (
            slot is None
            or not hmac.compare_digest(slot.ticket.token, token)
            or slot.state is not _State.OPEN
            or slot.ticket.direction is not direction
            or (cipher is None) != (slot.ticket.key is None)
        ):
            raise TransferError(Reason.BAD_TOKEN, "unknown, used or mismatched ticket")
        if slot.ticket.expires_at_ms <= self._clock():
            slot.finish(None, TransferError(Reason.EXPIRED, "the ticket expired before it was claimed"))
            del self._slots[key]
            raise TransferError(Reason.EXPIRED, "the ticket expired")
        return key, slot, cipher

    def _take(self, key: bytes, slot: _Slot) -> _Slot:
        """Claim a slot found by :meth:`_lookup` (single use from here on)."""
        slot.state = _State.CLAIMED
        slot.claimed.set()
        if slot.ticket.direction is Direction.DOWNLOAD:
            del self._slots[key]  # single use; the handler holds the blobs now
        return slot

    # -- connections --------------------------------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection to the TCP port."""
        try:
            ip = str(stream.socket.getpeername()[0])
        except OSError:  # already gone
            ip = "?"
        source, group = _ip_source(ip)
        await self._serve(_SocketChannel(stream), f"a connection from {ip}", source, group)

    async def handle_stream(self, stream: INetStream) -> None:
        """The ``/p2pcompute/data/1.0.0`` handler: the TCP port's session over a libp2p stream. Never raises.

        Bounded as the port is (a pending pool until the hello, ``max_connections`` sessions over both paths,
        single-use tickets, sizes from the ticket, the same timeouts but :data:`STREAM_HELLO_TIMEOUT_S` for the
        hello), and by ``max_streams_per_peer`` concurrent streams of one authenticated peer.
        """
        channel = _StreamChannel(stream)
        try:
            peer = str(stream.muxed_conn.peer_id)
        except Exception as exc:  # a stream without an authenticated peer: nothing to serve
            logger.info("data stream: refused a stream without a peer: %r", exc)
            await channel.aclose()
            return
        try:
            if self._streams_per_peer[peer] >= self._config.max_streams_per_peer:
                self.stats["stream_busy"] += 1
                logger.info(
                    "data stream: refusing one from %s, %d of its streams open", peer, self._streams_per_peer[peer]
                )
                await _send_status(channel, _STATUS_CODES[Reason.TRANSFER_FAILED])
                await channel.aclose()
                return
            self._streams_per_peer[peer] += 1
            try:
                await self._serve(channel, f"a stream from {peer}", peer, peer)
            finally:
                self._streams_per_peer[peer] -= 1
                if self._streams_per_peer[peer] <= 0:
                    del self._streams_per_peer[peer]
        except Exception as exc:  # a library error or a bug: this stream ends, the node goes on
            logger.warning("data stream from %s failed: %s: %s", peer, type(exc).__name__, exc, exc_info=True)
            await channel.aclose()

    async def _serve(self, channel: _Channel, who: str, source: str, group: str) -> None:
        try:
            hello = await self._receive_hello(channel, who, source, group)
            if hello is not None:
                await self._handle_session(channel, who, hello)
        finally:
            await channel.aclose()

    async def _receive_hello(self, channel: _Channel, who: str, source: str, group: str) -> bytes | None:
        """The hello, read while the connection waits in its path's pending pool; None when it was displaced (by a
        newer one of its source, or from a full pool), stalled or broke: answered, not served."""
        path = channel.path
        timeout_s = HELLO_TIMEOUT_S if path is DataPath.DIRECT else STREAM_HELLO_TIMEOUT_S
        pool = self._pending[path]
        waiter, evicted = pool.admit(source, group, trio.current_time() + timeout_s)
        if evicted is not None:
            self.stats[f"{path.value}_pending_evicted"] += 1
        hello = bytearray(HELLO_SIZE)
        error: TransferError | None = None
        try:
            with waiter.scope:
                await _recv_exactly_into(channel, memoryview(hello))
        except (TransferError, *_BROKEN) as exc:
            error = _transfer_error(exc)
        finally:
            pool.remove(waiter)
        if error is None and waiter.scope.cancelled_caught:
            if waiter.evicted:
                error = TransferError(Reason.TRANSFER_FAILED, "displaced by a newer connection: too many waited")
            else:
                error = TransferError(Reason.TIMEOUT, f"no hello within {timeout_s} s")
        if error is None:
            return bytes(hello)
        # Anyone can cause this: not worth more than a debug line.
        logger.debug("data %s: no hello from %s: %s", path.value, who, error)
        await _send_status(channel, _STATUS_CODES.get(error.reason, _STATUS_CODES[Reason.TRANSFER_FAILED]))
        return None

    async def _handle_session(self, channel: _Channel, who: str, hello: bytes) -> None:
        slot: _Slot | None = None
        counted = False
        try:
            key, found, cipher = self._lookup(hello)
            if self._connections >= self._config.max_connections:
                self.stats[f"{channel.path.value}_busy"] += 1
                logger.info("data %s: refusing %s, %d sessions open", channel.path.value, who, self._connections)
                raise TransferError(Reason.TRANSFER_FAILED, f"busy: {self._connections} sessions open")
            slot = self._take(key, found)
            self._connections += 1
            counted = True
            self.stats[f"{channel.path.value}_claimed"] += 1
            self._prune(self._clock())
            await _send_status(channel, _STATUS_OK)
            ticket = slot.ticket
            sealer = _Sealer(ticket.key, ticket.direction, cipher) if ticket.key and cipher else None
            if ticket.direction is Direction.UPLOAD:
                result = await _Reader(channel, sealer).receive_blobs(dict(ticket.blobs))
                slot.finish(result, None)
                await _send_status(channel, _STATUS_OK)
            else:
                await _Writer(channel, sealer).send_blobs(slot.blobs)
                with trio.fail_after(CHUNK_TIMEOUT_S):
                    await channel.send_eof()
                slot.finish(None, None)
        except (TransferError, trio.TooSlowError, *_BROKEN) as exc:
            error = _transfer_error(exc)
            # Before a ticket is claimed anyone can cause this: not worth more than a debug line.
            level = logging.INFO if slot else logging.DEBUG
            logger.log(level, "data %s: transfer with %s refused or failed: %s", channel.path.value, who, error)
            if slot is not None and slot.state is not _State.DONE:
                slot.finish(None, error)
            await _send_status(channel, _STATUS_CODES.get(error.reason, _STATUS_CODES[Reason.TRANSFER_FAILED]))
        finally:
            if counted:
                self._connections -= 1
