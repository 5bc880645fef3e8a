"""Host lifecycle: a py-libp2p host as an async context manager.

What this adapter pins down, against py-libp2p 0.8.1's defaults:

* **Noise only.** ``new_host()`` also offers TLS, secio and ``/plaintext/2.0.0`` (where the dialler may
  claim any peer id); we pass ``sec_opt={NOISE: ...}`` so every other security protocol is refused.
* **Yamux only** (``muxer_opt``), no mplex.
* ``ConnectionConfig(max_connections_per_peer=1)``: with the default of 3 every dial waits the 250 ms
  "happy eyeballs" delay before it returns.
* **Exclusive ports.** 0.8.1 listens with ``SO_REUSEPORT``, so a second host on a busy port starts
  without error and the kernel splits incoming connections between the two. We probe an explicit port
  first (a bind without ``SO_REUSEPORT`` fails while anyone listens there) and refuse to start.
* **Bounded, explicit shutdown.** Leaving ``host.run()`` alone does not release every socket:
  ``host.close()`` is awaited under a shielded timeout on the way out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import InvalidAddrError, info_from_p2p_addr
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.utils.address_validation import expand_wildcard_address

from p2pcompute.errors import DialError, HostStartError
from p2pcompute.net.protocols import NOISE_PROTOCOL, YAMUX_PROTOCOL

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT_S",
    "DEFAULT_DIAL_TIMEOUT_S",
    "HostConfig",
    "connect",
    "dialable_addrs",
    "is_loopback",
    "libp2p_keypair",
    "host_addrs",
    "open_host",
]

logger = logging.getLogger(__name__)

ED25519_SEED_LEN: Final = 32

DEFAULT_MAX_CONNECTIONS: Final = 128
#: The auto-connector dials known peers while the count is under (low + high) / 2.
DEFAULT_LOW_WATERMARK: Final = 16
#: The pruner closes connections above this count.
DEFAULT_HIGH_WATERMARK: Final = 96
DEFAULT_DIAL_TIMEOUT_S: Final = 10.0
#: ``host.close()`` costs ~0.1-0.2 s per connection (hard-coded sleeps in 0.8.1); this bounds it.
DEFAULT_CLOSE_TIMEOUT_S: Final = 10.0
#: multistream-select negotiation of one stream's protocol.
DEFAULT_NEGOTIATE_TIMEOUT_S: Final = 10


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Limits and timeouts of one host. Named defaults; no field is required."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    low_watermark: int = DEFAULT_LOW_WATERMARK
    high_watermark: int = DEFAULT_HIGH_WATERMARK
    dial_timeout_s: float = DEFAULT_DIAL_TIMEOUT_S
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S
    negotiate_timeout_s: int = DEFAULT_NEGOTIATE_TIMEOUT_S
    #: py-libp2p's zeroconf mDNS (LAN only). Discovered peers land in the peerstore and are handed to
    #: :class:`p2pcompute.net.discovery.Discovery` through libp2p's process-global event emitter.
    enable_mdns: bool = False
    #: The operator's public addresses: when set, the only ones Identify and the DHT tell peers (see
    #: :func:`dialable_addrs` for what they are told otherwise).
    announce: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.low_watermark <= self.high_watermark <= self.max_connections:
            raise ValueError("need 0 <= low_watermark <= high_watermark <= max_connections")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if self.dial_timeout_s <= 0 or self.close_timeout_s <= 0 or self.negotiate_timeout_s <= 0:
            raise ValueError("timeouts must be positive")

    def connection_config(self) -> ConnectionConfig:
        return ConnectionConfig(
            max_connections=self.max_connections,
            min_connections=0,
            low_watermark=self.low_watermark,
            high_watermark=self.high_watermark,
            max_connections_per_peer=1,
            dial_timeout=self.dial_timeout_s,
        )


def libp2p_keypair(seed: bytes) -> KeyPair:
    """The libp2p Ed25519 key pair of a 32-byte Ed25519 seed (the seed PyNaCl's ``SigningKey`` takes).

    ``ID.from_pubkey(keypair.public_key)`` is then the peer id of the same key that signs our messages.
    """
    if len(seed) != ED25519_SEED_LEN:
        raise ValueError(f"an Ed25519 seed is {ED25519_SEED_LEN} bytes, got {len(seed)}")
    private_key = Ed25519PrivateKey.from_bytes(seed)
    return KeyPair(private_key, private_key.get_public_key())


def dialable_addrs(addrs: Sequence[str]) -> list[str]:
    """What ``addrs`` (listen or observed addresses, without ``/p2p``) look like to others: an unspecified one
    (``0.0.0.0``, ``::``) expanded to this machine's interface addresses, and loopback ones dropped when anything
    else is there (to anyone else, 127.0.0.1 is their own machine: only a loopback testnet advertises it)."""
    out: list[str] = []
    for base in addrs:
        candidates = [base]
        parts = base.split("/")  # "", "ip4", "0.0.0.0", "tcp", "4001"
        if len(parts) > 2 and parts[1] in ("ip4", "ip6") and _is_unspecified(parts[2]):
            with contextlib.suppress(Exception):
                expanded = [str(m) for m in expand_wildcard_address(multiaddr.Multiaddr(base))]
                loopback = "/".join(["", parts[1], "127.0.0.1" if parts[1] == "ip4" else "::1", *parts[3:]])
                candidates = [a for a in expanded if a != base] or [loopback]
        out.extend(c for c in candidates if c not in out)
    return [a for a in out if not is_loopback(a)] or out


def is_loopback(addr: str) -> bool:
    """Whether ``addr``'s first ip4/ip6 component is a loopback address."""
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False


def _is_unspecified(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return False


def _addrs_factory(announce: Sequence[str]) -> Callable[[list[multiaddr.Multiaddr]], list[multiaddr.Multiaddr]]:
    """The host's address factory: what Identify and the DHT tell peers (never 0.0.0.0; loopback only alone)."""
    fixed = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in announce]

    def factory(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        if fixed:
            return list(fixed)
        return [multiaddr.Multiaddr(a) for a in dialable_addrs([str(c).split("/p2p/")[0] for c in candidates])]

    return factory


def host_addrs(host: IHost) -> list[str]:
    """The host's bound addresses with their ``/p2p/<peer id>`` suffix (ports resolved)."""
    return [str(addr) for addr in host.get_addrs()]


@asynccontextmanager
async def open_host(
    seed: bytes, listen_addrs: Sequence[str], *, config: HostConfig = HostConfig()
) -> AsyncIterator[IHost]:
    """Run a Noise + yamux + TCP host listening on ``listen_addrs`` (``/tcp/0`` picks a free port).

    The bound addresses are ``host.get_addrs()``. On exit, every connection and listener is closed
    within ``config.close_timeout_s``, even when the body is cancelled.
    """
    key_pair = libp2p_keypair(seed)
    maddrs = [multiaddr.Multiaddr(addr) for addr in listen_addrs]
    for maddr in maddrs:
        _check_port_free(maddr)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL: noise},
        muxer_opt={YAMUX_PROTOCOL: Yamux},
        listen_addrs=maddrs,
        connection_config=config.connection_config(),
        negotiate_timeout=config.negotiate_timeout_s,
        enable_mDNS=config.enable_mdns,
        addrs_factory=_addrs_factory(config.announce),
    )
    missing: list[str] = []
    body_exc: BaseException | None = None
    try:
        async with host.run(maddrs):
            listening = set(host.get_network().listeners)
            missing = [str(m) for m in maddrs if str(m) not in listening]
            if not missing:
                logger.debug("host %s listening on %s", host.get_id(), host.get_addrs())
                try:
                    yield host
                except BaseException as exc:
                    body_exc = exc
                    raise
                finally:
                    await _close_host(host, config.close_timeout_s)
    except BaseExceptionGroup as group:
        # host.run() yields inside nurseries, which wrap whatever the body raised: hand it back as is.
        if body_exc is not None and _sole_leaf(group) is body_exc:
            raise body_exc from None
        raise
    finally:
        # Also on a start failure: release whatever the swarm already opened.
        await _close_host(host, config.close_timeout_s)
    if missing:
        raise HostStartError(f"could not listen on {missing}")


def _sole_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


def _check_port_free(maddr: multiaddr.Multiaddr) -> None:
    """Raise :class:`HostStartError` if something already listens on the explicit TCP port of ``maddr``."""
    protocols = {p.name for p in maddr.protocols()}
    if "tcp" not in protocols or not protocols & {"ip4", "ip6"}:
        return
    port = int(maddr.value_for_protocol("tcp") or 0)
    if port == 0:
        return
    family, ip = (
        (socket.AF_INET6, maddr.value_for_protocol("ip6"))
        if "ip6" in protocols
        else (socket.AF_INET, maddr.value_for_protocol("ip4"))
    )
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # tolerate TIME_WAIT, not listeners
        try:
            probe.bind((ip, port))
        except OSError as exc:
            raise HostStartError(f"cannot listen on {maddr}: {exc.strerror}") from exc


async def _close_host(host: IHost, timeout_s: float) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(timeout_s) as scope:
        await host.close()
    if scope.cancelled_caught:
        logger.warning("host %s did not close within %.1f s", host.get_id(), timeout_s)


async def connect(host: IHost, peer_multiaddr: str, *, dial_timeout_s: float = DEFAULT_DIAL_TIMEOUT_S) -> ID:
    """Dial ``peer_multiaddr`` (it must end in ``/p2p/<peer id>``) and return the authenticated peer id.

    Noise checks that the remote holds the key of the peer id in the address. Returns at once when a
    connection to that peer already exists.
    """
    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(peer_multiaddr))
    except (InvalidAddrError, ValueError) as exc:
        raise DialError(f"not a dialable /p2p multiaddr: {peer_multiaddr!r}") from exc
    if info.peer_id == host.get_id():
        raise DialError("refusing to dial ourselves")
    try:
        with trio.fail_after(dial_timeout_s):
            await host.connect(info)
    except trio.TooSlowError as exc:
        raise DialError(f"dial to {peer_multiaddr} timed out after {dial_timeout_s} s") from exc
    except SwarmException as exc:
        raise DialError(f"dial to {peer_multiaddr} failed: {exc}") from exc
    return info.peer_id
