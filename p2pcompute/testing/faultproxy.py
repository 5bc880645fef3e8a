"""A fault-injecting TCP proxy for testnets: latency, loss (as retransmission stalls), resets and a bandwidth cap.

This kernel has no ``netem`` qdisc, so latency and loss that a TCP application would see are made here, between
the application and its peers::

    client ──▶ FaultProxy(listen) ──▶ target          one connection to the target per accepted client
               reader ─ bucket ─ schedule ─▶ [bounded pipe] ─▶ writer (sleeps until each chunk's release time)

Each direction of each connection is a *pipe with latency*: a reader task reads chunks, stamps each with the time it
may be delivered and puts it in a bounded channel; a writer task delivers chunks at those times, in order. The
reader keeps reading while the writer waits, so a delay adds latency without serialising throughput (up to
``pipe_chunks x read_size`` bytes in flight per direction, as a TCP window bounds it). Measured on loopback (one
connection, 2 shared cores): no faults ~430 MB/s; ``delay_ms=50`` ~22 MB/s (1 MiB in flight per 50 ms); a cap of
8 Mbit/s gave 8.0 Mbit/s; 100 Mbit/s with 20 ms delay gave 98.5 Mbit/s.

What each fault looks like to the application at either end (parameters in :class:`FaultSpec`):

``delay_ms``
    One-way latency added to every chunk, order preserved. A round trip through the proxy pays it twice.
``loss``
    The probability that one *segment* (:data:`SEGMENT_SIZE` bytes of the stream, the MSS of a 1500-byte MTU with
    TCP timestamps) is lost. TCP hides a loss from the application, which only sees the stream stall until the
    retransmission arrives: a lost segment is held for one RTO (:data:`RTO_S`, Linux's minimum), and each loss of the
    same segment's retransmission doubles it (TCP's exponential backoff, capped at :data:`MAX_RTO_S`, at most
    :data:`MAX_RETRANSMISSIONS` times). Bytes behind a stalled segment wait for it (in-order delivery), and bytes
    are never dropped, changed or reordered. Segments are counted along the byte stream, whatever size the reads
    happen to be, so a seed gives the same losses on every run. Each chunk read is released as a whole, at the
    release time of its latest segment.
``reset``
    The probability that a connection is reset: after a uniformly random number of bytes in ``[0,
    reset_max_bytes]`` (both directions counted), both sockets are closed with ``SO_LINGER`` 0, so each end
    receives a TCP RST; bytes still in the pipes are lost, as with a real reset.
``bandwidth_bps``
    A cap in *bits* per second for each direction, a token bucket (:class:`TokenBucket`) shared by every connection
    of the proxy (a link, not a per-connection limit); pass one :class:`SharedBandwidth` to several proxies to share
    it across ports (the CLI does, for its ``--map`` pairs). 0 is unlimited.
``seed``
    Every random draw comes from ``random.Random`` seeded by the seed, the connection's accept index and the
    direction. ``None`` draws a seed from the OS; :attr:`FaultProxy.seed` says which, to reproduce a run.

Bounds: :class:`ProxyLimits` (connections, read size, pipe depth, connect and send timeouts). A connection over
``max_connections`` is reset at once and counted as ``refused``. Reads have no timeout: an idle connection is
legitimate, and the applications at both ends keep their own timeouts. An error on either side (reset, broken
pipe, send timeout) resets the other side too and counts as ``aborted``. Cancelling :meth:`FaultProxy.run` resets
every open connection.

Command line (one process, several port pairs, e.g. inside a network namespace)::

    python -m p2pcompute.testing.faultproxy --map 10.77.0.2:4001=127.0.0.1:4001 \\
        --map 10.77.0.2:4002=127.0.0.1:4002 --delay-ms 50 --loss 0.01 --bandwidth-bps 20000000 --seed 7

``--listen H:P --target H:P`` is the same as one ``--map H:P=H:P``. Port 0 picks a free port. It prints one JSON
line per pair when listening (``{"event": "listening", "listen": ..., "target": ..., "port": ..., "seed": ...}``)
and one ``{"event": "stats", ...}`` line per pair when it stops (SIGTERM or SIGINT).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import random
import signal
import socket
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import click
import trio

from p2pcompute.errors import ConfigError, HostStartError, P2PComputeError

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio-stubs that do not re-export TaskStatus.
    from trio_typing import TaskStatus

__all__ = [
    "MAX_RETRANSMISSIONS",
    "MAX_RTO_S",
    "RTO_S",
    "SEGMENT_SIZE",
    "Direction",
    "FaultProxy",
    "FaultSpec",
    "PortMap",
    "ProxyLimits",
    "ProxyStats",
    "SegmentSchedule",
    "SharedBandwidth",
    "TokenBucket",
    "main",
    "parse_hostport",
    "parse_map",
    "serve_maps",
]

logger = logging.getLogger(__name__)

#: Bytes of stream per segment: the MSS of a 1500-byte MTU (1500 - 20 IP - 20 TCP - 12 timestamp option).
SEGMENT_SIZE: Final = 1448
#: Retransmission timeout of a first loss (Linux's TCP_RTO_MIN); doubles for each consecutive loss.
RTO_S: Final = 0.2
#: Cap of one backed-off RTO.
MAX_RTO_S: Final = 6.4
#: Most losses of one segment in a row (the worst stall is the sum of that many backed-off RTOs: 25.4 s).
MAX_RETRANSMISSIONS: Final = 8

MAX_DELAY_MS: Final = 60_000.0
#: Below this a cap makes no useful link (and would make tests crawl).
MIN_BANDWIDTH_BPS: Final = 8_000
MAX_BANDWIDTH_BPS: Final = 10**12
DEFAULT_RESET_MAX_BYTES: Final = 64 * 1024
MAX_RESET_MAX_BYTES: Final = 2**40
#: Smallest token bucket depth; otherwise 20 ms worth of the rate.
MIN_BURST_BYTES: Final = 16 * 1024
BURST_S: Final = 0.02

DEFAULT_MAX_CONNECTIONS: Final = 128
DEFAULT_READ_SIZE: Final = 64 * 1024
#: Chunks in flight per direction of one connection (with DEFAULT_READ_SIZE: at most 1 MiB).
DEFAULT_PIPE_CHUNKS: Final = 16
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
#: One chunk's send to a side that reads nothing for this long aborts the connection.
DEFAULT_SEND_TIMEOUT_S: Final = 60.0
DEFAULT_BACKLOG: Final = 128
#: Pause after accept() fails for lack of file descriptors or memory.
ACCEPT_BACKOFF_S: Final = 0.1
_ACCEPT_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """The faults of one link (see the module docstring for what each looks like). Validated on construction."""

    #: One-way latency added to every chunk, in milliseconds.
    delay_ms: float = 0.0
    #: Probability that a segment (SEGMENT_SIZE bytes) is lost and held for a retransmission timeout; in [0, 1).
    loss: float = 0.0
    #: Probability that a connection is reset after a random number of bytes; in [0, 1].
    reset: float = 0.0
    #: Cap in bits per second for each direction, shared by the proxy's connections; 0 is unlimited.
    bandwidth_bps: int = 0
    #: Seed of every random draw; None: one from the OS (FaultProxy.seed tells which).
    seed: int | None = None
    #: A reset connection is reset after a uniform number of bytes in [0, reset_max_bytes].
    reset_max_bytes: int = DEFAULT_RESET_MAX_BYTES

    def __post_init__(self) -> None:
        if not _is_number(self.delay_ms) or not 0 <= self.delay_ms <= MAX_DELAY_MS:
            raise ConfigError(f"delay_ms must be a number in [0, {MAX_DELAY_MS:g}], got {self.delay_ms!r}")
        if not _is_number(self.loss) or not 0 <= self.loss < 1:
            raise ConfigError(f"loss must be a probability in [0, 1), got {self.loss!r}")
        if not _is_number(self.reset) or not 0 <= self.reset <= 1:
            raise ConfigError(f"reset must be a probability in [0, 1], got {self.reset!r}")
        if (
            not isinstance(self.bandwidth_bps, int)
            or isinstance(self.bandwidth_bps, bool)
            or not (self.bandwidth_bps == 0 or MIN_BANDWIDTH_BPS <= self.bandwidth_bps <= MAX_BANDWIDTH_BPS)
        ):
            raise ConfigError(
                f"bandwidth_bps must be 0 (unlimited) or an integer in [{MIN_BANDWIDTH_BPS}, {MAX_BANDWIDTH_BPS}]"
                f" bits per second, got {self.bandwidth_bps!r}"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")
        if (
            not isinstance(self.reset_max_bytes, int)
            or isinstance(self.reset_max_bytes, bool)
            or not 0 <= self.reset_max_bytes <= MAX_RESET_MAX_BYTES
        ):
            raise ConfigError(f"reset_max_bytes must be an integer in [0, 2**40], got {self.reset_max_bytes!r}")

    @property
    def is_transparent(self) -> bool:
        """No fault at all: the proxy only forwards."""
        return self.delay_ms == 0 and self.loss == 0 and self.reset == 0 and self.bandwidth_bps == 0

    def cli_args(self) -> list[str]:
        """The command-line options of ``python -m p2pcompute.testing.faultproxy`` that give this spec."""
        args = [
            f"--delay-ms={self.delay_ms!r}",
            f"--loss={self.loss!r}",
            f"--reset={self.reset!r}",
            f"--reset-max-bytes={self.reset_max_bytes}",
            f"--bandwidth-bps={self.bandwidth_bps}",
        ]
        if self.seed is not None:
            args.append(f"--seed={self.seed}")
        return args


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Bounds of one proxy. Named defaults; no field is required."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    read_size: int = DEFAULT_READ_SIZE
    pipe_chunks: int = DEFAULT_PIPE_CHUNKS
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S
    backlog: int = DEFAULT_BACKLOG

    def __post_init__(self) -> None:
        for name in ("max_connections", "read_size", "pipe_chunks", "backlog"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ProxyLimits.{name} must be a positive integer, got {value!r}")
        for name in ("connect_timeout_s", "send_timeout_s"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ConfigError(f"ProxyLimits.{name} must be a positive number of seconds, got {value!r}")


class TokenBucket:
    """A token bucket in bytes, pure: the caller passes the time in.

    It starts full (``burst_bytes``) and refills at ``rate_bytes_per_s`` up to ``burst_bytes``. :meth:`reserve` always
    takes the bytes and returns how long the caller must wait before sending them; a reservation larger than what is
    left overdraws the bucket, and that debt delays whoever reserves next (so concurrent senders queue, first come
    first served). Hence by any time ``t`` the reservations whose wait has passed add up to at most ``burst_bytes +
    rate_bytes_per_s * (t - t0)`` bytes, ``t0`` being the first reservation's time.
    """

    __slots__ = ("_last", "_tokens", "burst_bytes", "rate_bytes_per_s")

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int) -> None:
        if not rate_bytes_per_s > 0 or burst_bytes < 1:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self.burst_bytes = burst_bytes
        self._tokens = float(burst_bytes)
        self._last: float | None = None

    @classmethod
    def for_bandwidth(cls, bandwidth_bps: int) -> TokenBucket:
        """The bucket of a cap in bits per second: depth 20 ms of the rate, at least MIN_BURST_BYTES."""
        rate = bandwidth_bps / 8
        return cls(rate, max(MIN_BURST_BYTES, math.ceil(rate * BURST_S)))

    @property
    def tokens(self) -> float:
        """Bytes available at the last reservation's time (negative: debt)."""
        return self._tokens

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` at time ``now``; return the seconds to wait before sending them (0: send now)."""
        if nbytes < 0:
            raise ValueError("cannot reserve a negative number of bytes")
        if self._last is None:
            self._last = now
        elif now > self._last:  # a clock that goes back refills nothing
            self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._last) * self.rate_bytes_per_s)
            self._last = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bytes_per_s


class Direction(StrEnum):
    TO_TARGET = "to_target"
    TO_CLIENT = "to_client"


class SharedBandwidth:
    """The two token buckets (one per direction) of one link; give the same object to several proxies to share."""

    def __init__(self, bandwidth_bps: int) -> None:
        if bandwidth_bps < 1:
            raise ValueError("bandwidth_bps must be positive (0, unlimited, is no SharedBandwidth at all)")
        self.bandwidth_bps = bandwidth_bps
        self.buckets = {d: TokenBucket.for_bandwidth(bandwidth_bps) for d in Direction}


class SegmentSchedule:
    """When each chunk of one direction's byte stream is delivered; pure (time and randomness are passed in).

    A chunk read at ``now`` is released at ``now + delay_s``, later by the stall of any segment of the stream whose
    first byte it carries and that is lost (each loss of one segment in a row costs an RTO that doubles, as TCP's
    backoff, capped at ``max_rto_s``), and never before the chunk ahead of it (TCP delivers in order).
    """

    __slots__ = (
        "_last_release",
        "_next_segment",
        "_offset",
        "delay_s",
        "loss",
        "max_retransmissions",
        "max_rto_s",
        "rng",
        "rto_s",
        "segment_size",
    )

    def __init__(
        self,
        *,
        delay_s: float,
        loss: float,
        rng: random.Random,
        segment_size: int = SEGMENT_SIZE,
        rto_s: float = RTO_S,
        max_rto_s: float = MAX_RTO_S,
        max_retransmissions: int = MAX_RETRANSMISSIONS,
    ) -> None:
        if delay_s < 0 or not 0 <= loss < 1 or segment_size < 1 or rto_s < 0 or max_retransmissions < 0:
            raise ValueError("bad segment schedule parameters")
        self.delay_s = delay_s
        self.loss = loss
        self.rng = rng
        self.segment_size = segment_size
        self.rto_s = rto_s
        self.max_rto_s = max_rto_s
        self.max_retransmissions = max_retransmissions
        self._offset = 0  # stream bytes scheduled so far
        self._next_segment = 0  # stream offset of the first segment not yet decided
        self._last_release = -math.inf

    def stall(self, losses: int) -> float:
        """Seconds a segment lost ``losses`` times in a row waits for its retransmission."""
        return float(sum(min(self.rto_s * 2.0**i, self.max_rto_s) for i in range(losses)))

    def schedule(self, nbytes: int, now: float) -> tuple[float, int]:
        """The release time of the next ``nbytes`` of the stream read at ``now``, and how many losses they met.

        ``nbytes`` 0 (end of stream) is released after everything before it, no earlier than ``now + delay_s``.
        """
        end = self._offset + nbytes
        hold = 0.0
        lost = 0
        if self.loss == 0:
            if end > self._next_segment:
                self._next_segment += -(-(end - self._next_segment) // self.segment_size) * self.segment_size
        else:
            while self._next_segment < end:
                losses = 0
                while losses < self.max_retransmissions and self.rng.random() < self.loss:
                    losses += 1
                if losses:
                    lost += losses
                    hold = max(hold, self.stall(losses))
                self._next_segment += self.segment_size
        self._offset = end
        release = max(self._last_release, now + self.delay_s + hold)
        self._last_release = release
        return release, lost


@dataclass(slots=True)
class ProxyStats:
    """Counters of one proxy (read them any time; they only grow, except ``active``)."""

    #: Connections accepted and connected to the target.
    connections: int = 0
    #: Connections open now.
    active: int = 0
    #: Connections over max_connections, reset at once.
    refused: int = 0
    #: Connections whose target could not be reached (the client is reset).
    connect_failed: int = 0
    bytes_to_target: int = 0
    bytes_to_client: int = 0
    #: Segment losses (each loss of a retransmission counts again).
    segments_lost: int = 0
    #: Connections reset on purpose (FaultSpec.reset).
    resets: int = 0
    #: Connections that ended with an error on one side (passed on to the other side as a reset).
    aborted: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _Connection:
    index: int
    #: Reset after this many bytes (both directions); None: never.
    reset_after: int | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    seen: int = 0
    injected_reset: bool = False
    failed: bool = False
    done: int = 0  # directions that ended cleanly

    def fail(self, *, injected: bool = False) -> None:
        self.failed = True
        self.injected_reset = self.injected_reset or injected
        self.scope.cancel()


def _abort(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a FIN."""
    sock = stream.socket
    with suppress(OSError):  # already closed or broken: closing is all that is left
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextmanager
def _failing_on_error(conn: _Connection) -> Iterator[None]:
    """An I/O error in one direction fails the connection (both sides are reset), never the proxy."""
    try:
        yield
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
        logger.debug("connection %d failed: %r", conn.index, exc)
        conn.fail()


def _check_ip(host: str, what: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what} host must be an IP address, got {host!r}") from None


def _check_port(port: object, what: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"{what} port must be in [0, 65535], got {port!r}")


class FaultProxy:
    """A TCP proxy from ``listen_host:listen_port`` to ``target_host:target_port`` with the faults of ``spec``.

    ``await nursery.start(proxy.run)`` returns the bound port (``listen_port`` 0 picks one); :attr:`stats` counts
    what happened. ``bandwidth`` shares one link's cap with other proxies; without it the proxy has its own,
    from ``spec.bandwidth_bps``. ``salt`` tells apart the random draws of proxies that share one seed.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        spec: FaultSpec = FaultSpec(),
        *,
        limits: ProxyLimits = ProxyLimits(),
        bandwidth: SharedBandwidth | None = None,
        salt: str = "",
    ) -> None:
        _check_ip(listen_host, "listen")
        _check_port(listen_port, "listen")
        _check_port(target_port, "target")
        if target_port == 0:
            raise ConfigError("target port must not be 0")
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.spec = spec
        self.limits = limits
        if bandwidth is None and spec.bandwidth_bps:
            bandwidth = SharedBandwidth(spec.bandwidth_bps)
        self.bandwidth = bandwidth
        self.seed: int = spec.seed if spec.seed is not None else random.SystemRandom().randrange(2**63)
        self.salt = salt
        self.stats = ProxyStats()
        #: The bound port, once run() has started.
        self.port: int | None = None

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.listen_host}:{self.port or self.listen_port} -> "
            f"{self.target_host}:{self.target_port}, {self.spec})"
        )

    def _rng(self, index: int, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}:{self.salt}:{index}:{purpose}")

    async def run(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and forward until cancelled; ``task_status.started(bound_port)`` once listening."""
        try:
            listeners = await trio.open_tcp_listeners(
                self.listen_port, host=self.listen_host, backlog=self.limits.backlog
            )
        except OSError as exc:
            raise HostStartError(f"cannot listen on {self.listen_host}:{self.listen_port}: {exc.strerror}") from exc
        (listener,) = listeners  # an IP literal gives exactly one
        async with listener, trio.open_nursery() as connections:
            self.port = listener.socket.getsockname()[1]
            logger.debug("%r listening", self)
            task_status.started(self.port)
            index = 0
            while True:
                try:
                    client = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_RESOURCE_ERRNOS:
                        raise
                    logger.warning("%r: accept failed (%s); pausing", self, exc.strerror)
                    await trio.sleep(ACCEPT_BACKOFF_S)
                    continue
                if self.stats.active >= self.limits.max_connections:
                    self.stats.refused += 1
                    _abort(client)
                    continue
                self.stats.active += 1
                connections.start_soon(self._handle, client, index)
                index += 1

    async def _handle(self, client: trio.SocketStream, index: int) -> None:
        target: trio.SocketStream | None = None
        conn: _Connection | None = None
        try:
            try:
                with trio.fail_after(self.limits.connect_timeout_s):
                    target = await trio.open_tcp_stream(self.target_host, self.target_port)
            except (OSError, trio.TooSlowError) as exc:
                logger.debug("%r: connection %d: target unreachable: %r", self, index, exc)
                self.stats.connect_failed += 1
                return
            self.stats.connections += 1
            reset_rng = self._rng(index, "reset")
            doomed = reset_rng.random() < self.spec.reset
            conn = _Connection(index, reset_rng.randint(0, self.spec.reset_max_bytes) if doomed else None)
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, client, target, conn, Direction.TO_TARGET)
                    nursery.start_soon(self._direction, target, client, conn, Direction.TO_CLIENT)
        finally:
            self.stats.active -= 1
            clean = conn is not None and conn.done == 2 and not conn.failed
            if conn is not None and conn.failed:
                if conn.injected_reset:
                    self.stats.resets += 1
                else:
                    self.stats.aborted += 1
            for stream in (client, target):
                if stream is None:
                    continue
                if clean:
                    stream.socket.close()  # FIN: both directions already ended
                else:
                    _abort(stream)

    async def _direction(
        self, src: trio.SocketStream, dst: trio.SocketStream, conn: _Connection, direction: Direction
    ) -> None:
        bucket = self.bandwidth.buckets[direction] if self.bandwidth is not None else None
        read_size = self.limits.read_size
        if bucket is not None:
            read_size = min(read_size, bucket.burst_bytes)
        schedule = SegmentSchedule(
            delay_s=self.spec.delay_ms / 1000, loss=self.spec.loss, rng=self._rng(conn.index, direction.value)
        )
        send, receive = trio.open_memory_channel[tuple[float, bytes]](self.limits.pipe_chunks)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, src, send, conn, schedule, bucket, read_size)
            nursery.start_soon(self._writer, receive, dst, conn, direction)

    async def _reader(
        self,
        src: trio.SocketStream,
        send: trio.MemorySendChannel[tuple[float, bytes]],
        conn: _Connection,
        schedule: SegmentSchedule,
        bucket: TokenBucket | None,
        read_size: int,
    ) -> None:
        with _failing_on_error(conn):
            async with send:
                while True:
                    data = await src.receive_some(read_size)
                    if conn.reset_after is not None and data:
                        conn.seen += len(data)
                        if conn.seen >= conn.reset_after:
                            logger.debug("%r: resetting connection %d after %d bytes", self, conn.index, conn.seen)
                            conn.fail(injected=True)
                            return
                    if bucket is not None and data:
                        wait = bucket.reserve(len(data), trio.current_time())
                        if wait > 0:
                            await trio.sleep(wait)
                    release, lost = schedule.schedule(len(data), trio.current_time())
                    self.stats.segments_lost += lost
                    await send.send((release, data))
                    if not data:  # end of stream, passed on after everything before it
                        return

    async def _writer(
        self,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        dst: trio.SocketStream,
        conn: _Connection,
        direction: Direction,
    ) -> None:
        with _failing_on_error(conn):
            async with receive:
                async for release, data in receive:
                    await trio.sleep_until(release)
                    if not data:
                        await dst.send_eof()
                        conn.done += 1
                        return
                    with trio.fail_after(self.limits.send_timeout_s):
                        await dst.send_all(data)
                    if direction is Direction.TO_TARGET:
                        self.stats.bytes_to_target += len(data)
                    else:
                        self.stats.bytes_to_client += len(data)


@dataclass(frozen=True, slots=True)
class PortMap:
    """One ``listen -> target`` pair of the command line."""

    listen_host: str
    listen_port: int
    target_host: str
    target_port: int

    def __str__(self) -> str:
        return f"{_hostport(self.listen_host, self.listen_port)}={_hostport(self.target_host, self.target_port)}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); raises ConfigError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    _check_port(port, text)
    return host, port


def parse_map(text: str) -> PortMap:
    """``LISTEN_HOST:LPORT=TARGET_HOST:TPORT`` → PortMap; raises ConfigError."""
    listen, sep, target = text.partition("=")
    if not sep:
        raise ConfigError(f"expected LISTEN_HOST:LPORT=TARGET_HOST:TPORT, got {text!r}")
    return PortMap(*parse_hostport(listen), *parse_hostport(target))


async def serve_maps(
    maps: Sequence[PortMap],
    spec: FaultSpec,
    *,
    limits: ProxyLimits = ProxyLimits(),
    out: Any = None,
    task_status: TaskStatus[list[FaultProxy]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one proxy per map, sharing one bandwidth cap, until SIGTERM/SIGINT or cancellation.

    Writes the JSON lines of the command line to ``out`` (default: stdout).
    """
    stream = out if out is not None else sys.stdout
    # One seed for the whole process (from the OS when the spec has none), printed, so a run can be repeated.
    if spec.seed is None:
        spec = replace(spec, seed=random.SystemRandom().randrange(2**63))
    bandwidth = SharedBandwidth(spec.bandwidth_bps) if spec.bandwidth_bps else None
    proxies = [
        FaultProxy(
            m.listen_host,
            m.listen_port,
            m.target_host,
            m.target_port,
            spec,
            limits=limits,
            bandwidth=bandwidth,
            salt=str(i),
        )
        for i, m in enumerate(maps)
    ]

    def emit(event: str, proxy: FaultProxy, **extra: Any) -> None:
        line = {
            "event": event,
            "listen": _hostport(proxy.listen_host, proxy.port or proxy.listen_port),
            "target": _hostport(proxy.target_host, proxy.target_port),
            **extra,
        }
        print(json.dumps(line), file=stream, flush=True)

    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                for proxy in proxies:
                    port = await nursery.start(proxy.run)
                    emit("listening", proxy, port=port, seed=proxy.seed)
                task_status.started(proxies)
                async for signum in signals:
                    logger.info("signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        for proxy in proxies:
            if proxy.port is not None:
                emit("stats", proxy, **proxy.stats.as_dict())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", metavar="HOST:PORT", help="Listen here (with --target; the same as one --map).")
@click.option("--target", metavar="HOST:PORT", help="Forward to here (with --listen).")
@click.option(
    "--map",
    "maps",
    multiple=True,
    metavar="LHOST:LPORT=THOST:TPORT",
    help="A listen=target pair; repeat for several ports (they share the bandwidth cap).",
)
@click.option("--delay-ms", type=float, default=0.0, show_default=True, help="One-way latency per chunk.")
@click.option("--loss", type=float, default=0.0, show_default=True, help="Segment loss probability, in [0, 1).")
@click.option("--reset", type=float, default=0.0, show_default=True, help="Per-connection reset probability.")
@click.option(
    "--reset-max-bytes",
    type=int,
    default=DEFAULT_RESET_MAX_BYTES,
    show_default=True,
    help="A reset comes after a uniform number of bytes up to this.",
)
@click.option("--bandwidth-bps", type=int, default=0, show_default=True, help="Bits/s per direction; 0 unlimited.")
@click.option("--seed", type=int, default=None, help="Seed of every random draw [default: from the OS].")
@click.option("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
)
def main(
    listen: str | None,
    target: str | None,
    maps: tuple[str, ...],
    delay_ms: float,
    loss: float,
    reset: float,
    reset_max_bytes: int,
    bandwidth_bps: int,
    seed: int | None,
    max_connections: int,
    log_level: str,
) -> None:
    """A fault-injecting TCP proxy (latency, loss stalls, resets, bandwidth cap) for testnets."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if (listen is None) != (target is None):
            raise ConfigError("--listen and --target go together")
        pairs = [parse_map(m) for m in maps]
        if listen is not None and target is not None:
            pairs.insert(0, PortMap(*parse_hostport(listen), *parse_hostport(target)))
        if not pairs:
            raise ConfigError("nothing to proxy: give --map LHOST:LPORT=THOST:TPORT or --listen and --target")
        spec = FaultSpec(
            delay_ms=delay_ms,
            loss=loss,
            reset=reset,
            bandwidth_bps=bandwidth_bps,
            seed=seed,
            reset_max_bytes=reset_max_bytes,
        )
        limits = ProxyLimits(max_connections=max_connections)
        for pair in pairs:  # fail before anything listens
            FaultProxy(pair.listen_host, pair.listen_port, pair.target_host, pair.target_port, spec, limits=limits)
        trio.run(partial(serve_maps, pairs, spec, limits=limits))
    except (P2PComputeError, BaseExceptionGroup) as exc:
        leaf = _leaf(exc)
        if not isinstance(leaf, P2PComputeError):
            raise
        raise click.ClickException(leaf.detail or str(leaf)) from None


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (or ``exc`` itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":  # pragma: no cover
    main()
