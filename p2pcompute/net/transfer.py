"""Data channel: job tensors over a direct TCP connection, named by ticket (specs/data-channel.md).

py-libp2p 0.8.1's Noise+yamux streams carry 0.04-0.15x of raw TCP on loopback, too slow for tensors. A worker
runs one :class:`DataServer`; the negotiation (over the Noise-authenticated libp2p stream) hands the client a
:class:`Ticket`: port, a single-use random token, the direction, the blobs expected and, for sealed mode, a key.
The client dials, proves the ticket by sending the token first, then the blobs flow. Every blob is checked
against its length and SHA-256 before it is handed over; in sealed mode every byte is also in ChaCha20-Poly1305
records. Sealed mode is off by default: with both ends in one process on loopback, clear mode measured 0.6-1.0x
of raw TCP and sealed mode 0.3-0.45x (specs/data-channel.md section 9).

The server side and the client functions only move bytes and time: what is expected comes from the ticket, and
every wait is bounded by a named timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import mmap
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Final

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from p2pcompute.core.tensors import DIGEST_SIZE, TensorMeta
from p2pcompute.errors import Reason, TransferError

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio-stubs that do not re-export TaskStatus.
    from trio_typing import TaskStatus

__all__ = [
    "CHUNK_SIZE",
    "DataChannelConfig",
    "DataServer",
    "Direction",
    "Blob",
    "Ticket",
    "download",
    "expected_blobs",
    "upload",
]

logger = logging.getLogger(__name__)

MAGIC: Final = b"p2pcdat1"
TOKEN_SIZE: Final = 32
KEY_SIZE: Final = 32
HELLO_SIZE: Final = len(MAGIC) + 1 + TOKEN_SIZE
#: A blob header: digest, then the byte length as u64 big-endian.
HEADER_SIZE: Final = DIGEST_SIZE + 8
#: Blob data moves in pieces of this size (the last piece of a blob may be shorter); one sealed record each.
CHUNK_SIZE: Final = 1 << 20
TAG_SIZE: Final = 16
#: Blobs from this size on are received into huge-page mappings (see :func:`_allocate`).
HUGE_BUFFER_MIN: Final = 2 << 20
#: Blobs from this size on are hashed in a worker thread, behind the receiving task.
HASH_THREAD_MIN: Final = 2 * CHUNK_SIZE
#: Pieces received ahead of the hashing thread before the receiver waits for it.
HASH_PIPELINE_DEPTH: Final = 8
RECORD_PREFIX_SIZE: Final = 4

#: Dialling the data server.
CONNECT_TIMEOUT_S: Final = 10.0
#: The hello (server side) and the server's answer to it (client side).
HELLO_TIMEOUT_S: Final = 10.0
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
DEFAULT_MAX_BLOBS: Final = 4096
DEFAULT_MAX_TICKET_BYTES: Final = 8 << 30


class Direction(StrEnum):
    """Which way the blobs flow, seen from the client (who always dials)."""

    UPLOAD = "upload"
    DOWNLOAD = "download"


_DIRECTION_BYTE: Final = {Direction.UPLOAD: 1, Direction.DOWNLOAD: 2}
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


@dataclass(frozen=True, slots=True)
class DataChannelConfig:
    """Limits of one data server (and of what a client accepts to download). Named defaults."""

    ticket_ttl_ms: int = DEFAULT_TICKET_TTL_MS
    result_retention_ms: int = DEFAULT_RESULT_RETENTION_MS
    max_tickets: int = DEFAULT_MAX_TICKETS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_blobs: int = DEFAULT_MAX_BLOBS
    max_ticket_bytes: int = DEFAULT_MAX_TICKET_BYTES
    #: Issue tickets with a key: the bytes are sealed (ChaCha20-Poly1305). Hashing is always on. Off by default:
    #: sealing measured under half of raw TCP throughput (specs/data-channel.md section 9).
    encrypt: bool = False

    def __post_init__(self) -> None:
        if min(self.ticket_ttl_ms, self.max_tickets, self.max_connections, self.max_blobs) < 1:
            raise ValueError("ticket_ttl_ms, max_tickets, max_connections and max_blobs must be >= 1")
        if self.result_retention_ms < 0 or self.max_ticket_bytes < 0:
            raise ValueError("result_retention_ms and max_ticket_bytes must be >= 0")


@dataclass(frozen=True, slots=True)
class Ticket:
    """What the negotiation hands the client: where to dial, what proves it, what flows. Single use."""

    token: bytes = field(repr=False)
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


def _hello(direction: Direction, token: bytes) -> bytes:
    if len(token) != TOKEN_SIZE:
        raise TransferError(Reason.BAD_TOKEN, f"a token is {TOKEN_SIZE} bytes, got {len(token)}")
    return MAGIC + bytes([_DIRECTION_BYTE[direction]]) + token


def _parse_hello(hello: bytes) -> tuple[Direction, bytes]:
    """(direction, token) of a hello, or :class:`TransferError` ``bad_token``."""
    directions = {byte: direction for direction, byte in _DIRECTION_BYTE.items()}
    if len(hello) != HELLO_SIZE or hello[: len(MAGIC)] != MAGIC or hello[len(MAGIC)] not in directions:
        raise TransferError(Reason.BAD_TOKEN, "not a data-channel hello")
    return directions[hello[len(MAGIC)]], hello[len(MAGIC) + 1 :]


def _blob_header(digest: bytes, nbytes: int) -> bytes:
    return digest + nbytes.to_bytes(8, "big")


def _parse_blob_header(header: bytes | bytearray) -> tuple[bytes, int]:
    return bytes(header[:DIGEST_SIZE]), int.from_bytes(header[DIGEST_SIZE:HEADER_SIZE], "big")


def _status_error(status: int, context: str) -> TransferError:
    reason = _STATUS_REASONS.get(status, Reason.TRANSFER_FAILED)
    return TransferError(reason, f"{context}: the server answered {reason.value} (status {status})")


class _Sealer:
    """ChaCha20-Poly1305 with a per-direction counter nonce (never reused: one key per single-use ticket)."""

    def __init__(self, key: bytes, direction: Direction) -> None:
        if len(key) != KEY_SIZE:
            raise TransferError(Reason.BAD_TOKEN, f"a key is {KEY_SIZE} bytes, got {len(key)}")
        self.aead = ChaCha20Poly1305(key)
        self._prefix = _NONCE_PREFIX[direction]
        self._counter = 0

    def nonce(self) -> bytes:
        nonce = self._prefix + self._counter.to_bytes(8, "big")
        self._counter += 1
        return nonce


async def _recv_exactly_into(sock: trio.socket.SocketType, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = await sock.recv_into(view[pos:])
        if n == 0:
            raise TransferError(Reason.TRANSFER_FAILED, f"cut short: {pos} of {len(view)} bytes of a piece arrived")
        pos += n


class _Writer:
    """Sends headers and blob pieces, in the clear or one sealed record per piece."""

    def __init__(self, stream: trio.SocketStream, sealer: _Sealer | None) -> None:
        self._stream = stream
        self._sealer = sealer
        self._scratch = memoryview(bytearray(RECORD_PREFIX_SIZE + CHUNK_SIZE + TAG_SIZE)) if sealer else None

    async def send_piece(self, piece: bytes | memoryview) -> None:
        with trio.fail_after(CHUNK_TIMEOUT_S):
            if self._sealer is None or self._scratch is None:
                await self._stream.send_all(piece)
                return
            size = len(piece) + TAG_SIZE
            record = self._scratch[: RECORD_PREFIX_SIZE + size]
            record[:RECORD_PREFIX_SIZE] = size.to_bytes(RECORD_PREFIX_SIZE, "big")
            self._sealer.aead.encrypt_into(self._sealer.nonce(), piece, None, record[RECORD_PREFIX_SIZE:])
            await self._stream.send_all(record)

    async def send_blobs(self, blobs: Iterable[tuple[bytes, Blob]]) -> None:
        for digest, data in blobs:
            await self.send_piece(_blob_header(digest, len(data)))
            view = memoryview(data)
            for start in range(0, len(view), CHUNK_SIZE):
                await self.send_piece(view[start : start + CHUNK_SIZE])


class _Reader:
    """Receives pieces of a size the receiver already knows, straight into their destination."""

    def __init__(self, stream: trio.SocketStream, sealer: _Sealer | None) -> None:
        self._sock = stream.socket
        self._sealer = sealer
        self._scratch = memoryview(bytearray(max(RECORD_PREFIX_SIZE, CHUNK_SIZE + TAG_SIZE))) if sealer else None

    async def read_piece(self, view: memoryview) -> None:
        with trio.fail_after(CHUNK_TIMEOUT_S):
            if self._sealer is None or self._scratch is None:
                await _recv_exactly_into(self._sock, view)
                return
            prefix = self._scratch[:RECORD_PREFIX_SIZE]
            await _recv_exactly_into(self._sock, prefix)
            size = int.from_bytes(prefix, "big")
            if size != len(view) + TAG_SIZE:
                raise TransferError(Reason.TRANSFER_FAILED, f"a record of {size} bytes where {len(view)} were due")
            record = self._scratch[:size]
            await _recv_exactly_into(self._sock, record)
            try:
                self._sealer.aead.decrypt_into(self._sealer.nonce(), record, None, view)
            except InvalidTag:
                raise TransferError(Reason.TRANSFER_FAILED, "a record does not authenticate") from None

    async def expect_eof(self) -> None:
        with trio.fail_after(CHUNK_TIMEOUT_S):
            if await self._sock.recv_into(bytearray(1), 1):
                raise TransferError(Reason.TOO_LARGE, "bytes after the last stated blob")

    async def receive_blobs(self, expected: Mapping[bytes, int]) -> dict[bytes, memoryview]:
        """Exactly the ``expected`` blobs (any order), each length- and hash-checked, then the end of the stream."""
        received: dict[bytes, memoryview] = {}
        header = bytearray(HEADER_SIZE)
        while len(received) < len(expected):
            await self.read_piece(memoryview(header))
            digest, nbytes = _parse_blob_header(header)
            if digest not in expected or digest in received:
                raise TransferError(Reason.UNEXPECTED_BLOB, f"blob {digest.hex()[:16]} is not (or no longer) due")
            if nbytes != expected[digest]:
                raise TransferError(
                    Reason.SHAPE_MISMATCH, f"blob {digest.hex()[:16]}: {nbytes} bytes announced, {expected[digest]} due"
                )
            buffer = _allocate(nbytes)
            if await self._receive_hashed(buffer) != digest:
                raise TransferError(Reason.HASH_MISMATCH, f"blob bytes do not hash to {digest.hex()[:16]}")
            received[digest] = buffer
        await self.expect_eof()
        return received

    async def _receive_hashed(self, view: memoryview) -> bytes:
        """Fill ``view`` piece by piece and return its SHA-256.

        Past one piece, a second task hashes what has arrived in a worker thread (``update`` releases the GIL)
        while this one receives the next pieces.
        """
        hasher = hashlib.sha256()
        if len(view) < HASH_THREAD_MIN:
            for start in range(0, len(view), CHUNK_SIZE):  # an empty blob has no data piece
                piece = view[start : start + CHUNK_SIZE]
                await self.read_piece(piece)
                hasher.update(piece)
            return hasher.digest()
        arrived_send, arrived_receive = trio.open_memory_channel[int](HASH_PIPELINE_DEPTH)
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hash_behind, hasher, view, arrived_receive)
            async with arrived_send:
                try:
                    for start in range(0, len(view), CHUNK_SIZE):
                        piece = view[start : start + CHUNK_SIZE]
                        await self.read_piece(piece)
                        await arrived_send.send(start + len(piece))
                except Exception as exc:  # raised as is, not wrapped in the nursery's exception group
                    failure = exc
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return hasher.digest()


async def _hash_behind(hasher: hashlib._Hash, view: memoryview, arrived: trio.MemoryReceiveChannel[int]) -> None:
    """Hash ``view`` up to each offset announced on ``arrived``, batching whatever has arrived meanwhile."""
    hashed = 0
    async with arrived:
        async for upto in arrived:
            while True:
                try:
                    upto = arrived.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await trio.to_thread.run_sync(hasher.update, view[hashed:upto])
            hashed = upto


async def _read_status(stream: trio.SocketStream, timeout_s: float) -> int | None:
    """The server's status byte, or None when the connection ended (or broke) first; ``timeout`` after ``timeout_s``."""
    try:
        with trio.fail_after(timeout_s):
            data = await stream.receive_some(1)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return None
    except trio.TooSlowError:
        raise TransferError(Reason.TIMEOUT, f"no status byte from the data server within {timeout_s} s") from None
    return data[0] if data else None


async def _send_status(stream: trio.SocketStream, status: int) -> None:
    with trio.move_on_after(FAREWELL_TIMEOUT_S), contextlib.suppress(trio.BrokenResourceError, OSError):
        await stream.send_all(bytes([status]))


async def _dial(host: str, port: int) -> trio.SocketStream:
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            return await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise TransferError(Reason.TRANSFER_FAILED, f"cannot reach the data server {host}:{port}: {exc}") from exc


async def _open_session(host: str, port: int, direction: Direction, token: bytes) -> trio.SocketStream:
    """Dial, send the hello, and wait for the server to accept the ticket."""
    hello = _hello(direction, token)
    stream = await _dial(host, port)
    try:
        with trio.fail_after(HELLO_TIMEOUT_S):
            await stream.send_all(hello)
        status = await _read_status(stream, HELLO_TIMEOUT_S)
    except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
        await stream.aclose()
        raise _transfer_error(exc) from exc
    except BaseException:
        await stream.aclose()
        raise
    if status != _STATUS_OK:
        await stream.aclose()
        if status is None:
            raise TransferError(Reason.TRANSFER_FAILED, "the data server closed the connection after the hello")
        raise _status_error(status, f"{direction.value} refused")
    return stream


def _transfer_error(exc: Exception) -> TransferError:
    """The :class:`TransferError` for what broke a connection (a stall, a reset, a check that failed)."""
    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return TransferError(Reason.TIMEOUT, "the peer stalled")
    return TransferError(Reason.TRANSFER_FAILED, f"connection broken: {exc!r}")


# ---------------------------------------------------------------------------------------------------------------
# Client


async def upload(host: str, port: int, token: bytes, key: bytes | None, blobs: Mapping[bytes, Blob]) -> None:
    """Send ``blobs`` (digest -> bytes) on an upload ticket; returns once the server has checked them all.

    Raises :class:`TransferError` with the server's verdict (``bad_token``, ``expired``, ``hash_mismatch``, ...),
    ``timeout`` or ``transfer_failed``.
    """
    sealer = _Sealer(key, Direction.UPLOAD) if key is not None else None
    stream = await _open_session(host, port, Direction.UPLOAD, token)
    async with stream:
        try:
            await _Writer(stream, sealer).send_blobs(blobs.items())
            with trio.fail_after(CHUNK_TIMEOUT_S):
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError) as exc:
            # The server may have refused part way; its status byte, if it got through, says why.
            status = None
            with contextlib.suppress(TransferError):
                status = await _read_status(stream, FAREWELL_TIMEOUT_S)
            if status is not None and status != _STATUS_OK:
                raise _status_error(status, "upload refused") from exc
            raise _transfer_error(exc) from exc
        status = await _read_status(stream, VERDICT_TIMEOUT_S)
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

    Raises :class:`TransferError` (``bad_token``, ``expired``, ``hash_mismatch``, ``shape_mismatch``,
    ``unexpected_blob``, ``too_large``, ``timeout``, ``transfer_failed``).
    """
    wanted = dict(expected_blobs(expected, max_blobs=config.max_blobs, max_bytes=config.max_ticket_bytes))
    sealer = _Sealer(key, Direction.DOWNLOAD) if key is not None else None
    stream = await _open_session(host, port, Direction.DOWNLOAD, token)
    async with stream:
        try:
            return await _Reader(stream, sealer).receive_blobs(wanted)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError) as exc:
            raise _transfer_error(exc) from exc


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


class DataServer:
    """The worker's data-channel listener: one TCP port, any number of single-use tickets (bounded).

    ``bind_host`` is the IP to listen on (the interface of the libp2p listen address). ``clock`` (ms since the
    epoch) and ``random_bytes`` are injectable for tests.
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
        self._connections = 0

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the data server is not listening yet")
        return self._port

    @property
    def open_tickets(self) -> int:
        return len(self._slots)

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

    def expect_upload(self, metas: Iterable[TensorMeta | tuple[bytes, int]], *, encrypt: bool | None = None) -> Ticket:
        """Issue an upload ticket for ``metas``; then await :meth:`receive_upload` with it.

        ``encrypt`` overrides ``config.encrypt`` for this ticket (sealed mode when true).
        """
        blobs = expected_blobs(metas, max_blobs=self._config.max_blobs, max_bytes=self._config.max_ticket_bytes)
        return self._issue(Direction.UPLOAD, blobs, (), encrypt)

    def offer_download(self, blobs: Mapping[bytes, Blob], *, encrypt: bool | None = None) -> Ticket:
        """Issue a download ticket serving ``blobs`` (digest -> bytes, trusted: not re-hashed) once.

        ``encrypt`` overrides ``config.encrypt`` for this ticket (sealed mode when true).
        """
        specs = expected_blobs(
            ((digest, len(data)) for digest, data in blobs.items()),
            max_blobs=self._config.max_blobs,
            max_bytes=self._config.max_ticket_bytes,
        )
        return self._issue(Direction.DOWNLOAD, specs, tuple(blobs.items()), encrypt)

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
        encrypt: bool | None,
    ) -> Ticket:
        now = self._clock()
        self._prune(now)
        if len(self._slots) >= self._config.max_tickets:
            raise TransferError(Reason.TOO_LARGE, f"{len(self._slots)} tickets open, limit {self._config.max_tickets}")
        token = self._random_bytes(TOKEN_SIZE)
        use_key = self._config.encrypt if encrypt is None else encrypt
        ticket = Ticket(
            token=token,
            key=self._random_bytes(KEY_SIZE) if use_key else None,
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

    def _claim(self, hello: bytes) -> _Slot:
        direction, token = _parse_hello(hello)
        key = _slot_key(token)
        slot = self._slots.get(key)
        if (
            slot is None
            or not hmac.compare_digest(slot.ticket.token, token)
            or slot.state is not _State.OPEN
            or slot.ticket.direction is not direction
        ):
            raise TransferError(Reason.BAD_TOKEN, "unknown, used or mismatched ticket")
        if slot.ticket.expires_at_ms <= self._clock():
            slot.finish(None, TransferError(Reason.EXPIRED, "the ticket expired before it was claimed"))
            del self._slots[key]
            raise TransferError(Reason.EXPIRED, "the ticket expired")
        slot.state = _State.CLAIMED
        slot.claimed.set()
        if direction is Direction.DOWNLOAD:
            del self._slots[key]  # single use; the handler holds the blobs now
        return slot

    # -- connections --------------------------------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._connections >= self._config.max_connections:
                logger.info("data channel: refusing a connection, %d open", self._connections)
                await _send_status(stream, _STATUS_CODES[Reason.TRANSFER_FAILED])
                return
            self._connections += 1
            try:
                await self._handle_session(stream)
            finally:
                self._connections -= 1

    async def _handle_session(self, stream: trio.SocketStream) -> None:
        slot: _Slot | None = None
        try:
            hello = bytearray(HELLO_SIZE)
            with trio.fail_after(HELLO_TIMEOUT_S):
                await _recv_exactly_into(stream.socket, memoryview(hello))
            slot = self._claim(bytes(hello))
            self._prune(self._clock())
            await _send_status(stream, _STATUS_OK)
            ticket = slot.ticket
            sealer = _Sealer(ticket.key, ticket.direction) if ticket.key is not None else None
            if ticket.direction is Direction.UPLOAD:
                result = await _Reader(stream, sealer).receive_blobs(dict(ticket.blobs))
                slot.finish(result, None)
                await _send_status(stream, _STATUS_OK)
            else:
                await _Writer(stream, sealer).send_blobs(slot.blobs)
                with trio.fail_after(CHUNK_TIMEOUT_S):
                    await stream.send_eof()
                slot.finish(None, None)
        except (TransferError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            error = _transfer_error(exc)
            # Before a ticket is claimed anyone can cause this: not worth more than a debug line.
            logger.log(logging.INFO if slot else logging.DEBUG, "data channel: transfer refused or failed: %s", error)
            if slot is not None and slot.state is not _State.DONE:
                slot.finish(None, error)
            await _send_status(stream, _STATUS_CODES.get(error.reason, _STATUS_CODES[Reason.TRANSFER_FAILED]))
