"""Hole punching: py-libp2p 0.8.1's DCUtR, guarded so that no peer can make a node dial where it likes
(specs/reachability.md §7).

0.8.1's :class:`~libp2p.relay.circuit_v2.dcutr.DCUtRProtocol` dials every address a peer names, unfiltered: the
up to ~400 of a 4 KiB CONNECT message, in parallel, three rounds, each dial with the swarm's retries, several sessions
from one peer at once; and, with no message at all, every non-relayed address the peerstore holds for a relayed peer
(what its Identify listed, up to 1000) each time its auto-drive loop comes round. A stranger with one relayed
connection turned a node into a port scanner of its own machine, its LAN or anyone else. :class:`GuardedDCUtR`:

* **dials only what could be the peer**: ``/ip4`` or ``/ip6`` + ``/tcp`` addresses (no ``/dns``, no QUIC, no
  circuit), on a global unicast IP, or on a loopback / private / link-local one only when one of the node's own
  advertised addresses is in that same scope (:func:`allowed_scopes`: a loopback testnet may dial loopback, a netns
  testnet on 10.77.0.0/24 may dial private addresses); never multicast, unspecified, reserved or documentation
  ranges; never a port 0, the node's own addresses or the relay's; duplicates removed; at most
  :data:`MAX_PUNCH_ADDRS` for the direct dial and :data:`MAX_PUNCH_ADDRS` for the punch (:func:`punch_targets`);
* **one session per peer at a time** (a second stream from the peer is reset; when both sides initiate at once, the
  session of the peer with the smaller id goes on), at most :data:`MAX_CONCURRENT_PUNCHES` sessions for everyone, and
  :data:`PUNCH_COOLDOWN_S` after a session that dialled before the next one in the same direction with that peer;
* **bounded dials**: one attempt per address in the direct dial, :data:`PUNCH_ROUNDS` single attempts per address in
  the punch (no swarm retries), never more than :data:`MAX_SESSION_DIALS` in a session; message reads and writes
  within :data:`PUNCH_MESSAGE_TIMEOUT_S`;
* starts its own attempts only once Identify has told it the peer's protocols and addresses, and several at once
  (0.8.1's loop awaited each in turn: one silent peer stalled every other upgrade).
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol
from multiaddr import Multiaddr

__all__ = [
    "MAX_CONCURRENT_PUNCHES",
    "MAX_PUNCH_ADDRS",
    "MAX_SESSION_DIALS",
    "PUNCH_COOLDOWN_S",
    "PUNCH_MESSAGE_TIMEOUT_S",
    "PUNCH_ROUNDS",
    "GuardedDCUtR",
    "Scope",
    "allowed_scopes",
    "dial_target",
    "punch_targets",
    "scope_of",
]

log = logging.getLogger(__name__)

MAX_PUNCH_ADDRS: Final = 4  # addresses of a peer dialled in the direct dial, and again in the punch
PUNCH_ROUNDS: Final = 3  # punch rounds; each dials every punch address once
MAX_SESSION_DIALS: Final = MAX_PUNCH_ADDRS * (1 + PUNCH_ROUNDS)  # connection attempts in one session (16)
MAX_CONCURRENT_PUNCHES: Final = 4  # sessions at once, inbound and outbound, all peers together
PUNCH_COOLDOWN_S: Final = 60.0  # after a session that dialled, before the next one with that peer (per direction)
PUNCH_MESSAGE_TIMEOUT_S: Final = 10  # one DCUtR message read or written (0.8.1: 30 s)
PUNCH_ROUND_S: Final = 5.0  # one punch round waits at most this for a direct connection
PUNCH_PAUSE_S: Final = 2.0  # between punch rounds
DRIVE_INTERVAL_S: Final = 2.0  # how often relayed peers are looked at for an upgrade of our own


class Scope(enum.Enum):
    """Where an IP address can lead. Only :attr:`GLOBAL` is dialled by every node."""

    GLOBAL = "global"
    PRIVATE = "private"  # RFC 1918, RFC 6598 shared (carrier NAT), IPv6 ULA fc00::/7
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"


_PRIVATE_NETS: Final = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_6TO4: Final = ipaddress.ip_network("2002::/16")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def scope_of(ip: str | IPAddress) -> Scope | None:
    """The scope of ``ip``; None for what is never dialled (unspecified, multicast, reserved, documentation,
    benchmarking, site-local and other special-purpose ranges)."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return scope_of(addr.ipv4_mapped)
        if addr in _NAT64 or addr in _6TO4:  # an IPv4 address in disguise: only a global one
            embedded = ipaddress.IPv4Address(addr.packed[-4:] if addr in _NAT64 else addr.packed[2:6])
            return Scope.GLOBAL if scope_of(embedded) is Scope.GLOBAL else None
        if addr.is_site_local:
            return None
    if addr.is_unspecified or addr.is_multicast:
        return None
    if addr.is_loopback:
        return Scope.LOOPBACK
    if addr.is_link_local:
        return Scope.LINK_LOCAL
    if any(addr in net for net in _PRIVATE_NETS):
        return Scope.PRIVATE
    if addr.is_reserved or not addr.is_global:
        return None
    return Scope.GLOBAL


def _ip_of(addr: str | bytes | Multiaddr) -> IPAddress | None:
    with contextlib.suppress(Exception):
        maddr = addr if isinstance(addr, Multiaddr) else Multiaddr(addr)
        first = maddr.protocols()[0].name
        if first in ("ip4", "ip6"):
            return ipaddress.ip_address(maddr.value_for_protocol(first))
    return None


def allowed_scopes(own: Iterable[str | bytes | Multiaddr]) -> frozenset[Scope]:
    """The scopes a node with the addresses ``own`` dials: :attr:`Scope.GLOBAL`, and the scope of each of its own."""
    scopes = {Scope.GLOBAL}
    for addr in own:
        ip = _ip_of(addr)
        scope = scope_of(ip) if ip is not None else None
        if scope is not None:
            scopes.add(scope)
    return frozenset(scopes)


def dial_target(addr: str | bytes | Multiaddr, allowed: frozenset[Scope]) -> str | None:
    """``addr`` as ``/ip4|ip6/<ip>/tcp/<port>`` when it may be dialled by a node that dials ``allowed``, else None.

    Only ip + tcp (a trailing ``/p2p/<id>`` is dropped: the dial names the peer it expects); an IPv4-mapped IPv6
    address is written as the IPv4 one, an IPv6 one compressed, so duplicates compare equal."""
    try:
        maddr = addr if isinstance(addr, Multiaddr) else Multiaddr(addr)
        names = [p.name for p in maddr.protocols()]
        if names and names[-1] == "p2p":
            names = names[:-1]
        if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
            return None
        ip = ipaddress.ip_address(maddr.value_for_protocol(names[0]))
        port = int(maddr.value_for_protocol("tcp"))
    except Exception:
        return None
    if not 0 < port < 65536:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    scope = scope_of(ip)
    if scope is None or scope not in allowed:
        return None
    return f"/ip{ip.version}/{ip.compressed}/tcp/{port}"


def punch_targets(
    addrs: Iterable[str | bytes | Multiaddr],
    allowed: frozenset[Scope],
    *,
    exclude: Iterable[str] = (),
    limit: int = MAX_PUNCH_ADDRS,
) -> list[Multiaddr]:
    """The first ``limit`` distinct dialable addresses of ``addrs`` (:func:`dial_target`), in their order, none in
    ``exclude`` (addresses in :func:`dial_target`'s form)."""
    skip = set(exclude)
    out: list[Multiaddr] = []
    for addr in addrs:
        if len(out) >= limit:
            break
        target = dial_target(addr, allowed)
        if target is None or target in skip:
            continue
        skip.add(target)
        out.append(Multiaddr(target))
    return out


class _Phase(enum.Enum):
    DIRECT = "direct"  # our own attempt: the plain direct dial to the peer's known addresses
    EXCHANGE = "exchange"  # CONNECT / SYNC messages
    PUNCH = "punch"  # the simultaneous dials


@dataclass(eq=False)
class _Session:
    inbound: bool
    phase: _Phase
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    dials: int = 0
    dialled: set[str] = field(default_factory=set)


class GuardedDCUtR(DCUtRProtocol):
    """DCUtR with the limits of the module doc. A drop-in for ``DCUtRProtocol(host)``."""

    def __init__(
        self,
        host: IHost,
        *,
        max_addrs: int = MAX_PUNCH_ADDRS,
        max_concurrent: int = MAX_CONCURRENT_PUNCHES,
        cooldown_s: float = PUNCH_COOLDOWN_S,
        max_session_dials: int = MAX_SESSION_DIALS,
    ) -> None:
        super().__init__(host, read_timeout=PUNCH_MESSAGE_TIMEOUT_S, write_timeout=PUNCH_MESSAGE_TIMEOUT_S)
        self.max_addrs = max_addrs
        self.max_concurrent = max_concurrent
        self.cooldown_s = cooldown_s
        self.max_session_dials = max_session_dials
        self._sessions: dict[ID, _Session] = {}
        self._ended: dict[tuple[ID, bool], float] = {}  # (peer, inbound) -> when a session that dialled ended
        self._driving: set[ID] = set()
        #: Every session, for tests and the curious: (peer, inbound, addresses dialled, dial attempts).
        self.history: list[tuple[ID, bool, frozenset[str], int]] = []

    # --- what may be dialled ---

    def allowed(self) -> frozenset[Scope]:
        """Our scopes: those of the addresses we advertise (specs/reachability.md §2), and global."""
        with contextlib.suppress(Exception):
            return allowed_scopes(self.host.get_addrs())
        return frozenset({Scope.GLOBAL})

    def _excluded(self, peer: ID) -> set[str]:
        """Our own addresses, and those of the relays our relayed connections to ``peer`` go through."""
        everyone = frozenset(Scope)
        out: set[str] = set()
        own: list[Any] = []
        with contextlib.suppress(Exception):
            own += list(self.host.get_addrs())
        with contextlib.suppress(Exception):
            own += list(self.host.get_transport_addrs())
        relays: set[str] = set()
        with contextlib.suppress(Exception):
            for conn in self.host.get_network().get_connections(peer):
                for addr in _transport_addrs(conn):
                    text = str(addr)
                    if "/p2p-circuit" not in text:
                        continue
                    before = text.split("/p2p-circuit")[0]
                    own.append(before)
                    relays.update(part.split("/")[0] for part in before.split("/p2p/")[1:])
        for relay in relays - {str(peer)}:
            with contextlib.suppress(Exception):
                own += list(self.host.get_peerstore().addrs(ID.from_base58(relay)))
        for addr in own:
            target = dial_target(addr, everyone)
            if target is not None:
                out.add(target)
        return out

    def _targets(self, peer: ID, addrs: Iterable[Any]) -> list[Multiaddr]:
        return punch_targets(addrs, self.allowed(), exclude=self._excluded(peer), limit=self.max_addrs)

    def _known_addrs(self, peer: ID) -> list[Multiaddr]:
        with contextlib.suppress(Exception):
            return list(self.host.get_peerstore().addrs(peer))
        return []

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[Multiaddr]:
        # A CONNECT message's addresses: filtered before anything keeps them (0.8.1 also adds them to the peerstore).
        return punch_targets(addr_bytes, self.allowed(), limit=self.max_addrs)

    # --- sessions ---

    def busy(self, peer: ID) -> bool:
        """Whether a session with ``peer`` is under way."""
        return peer in self._sessions

    def cooling(self, peer: ID, *, inbound: bool) -> bool:
        """Whether a session with ``peer`` in that direction would be refused for the cooldown."""
        ended = self._ended.get((peer, inbound))
        return ended is not None and trio.current_time() - ended < self.cooldown_s

    def _yields_to(self, peer: ID) -> bool:
        """Both sides initiated at once: the session of the peer with the smaller id goes on."""
        return peer.to_bytes() < self.host.get_id().to_bytes()

    def _admit(self, peer: ID, *, inbound: bool) -> _Session | None:
        if self.cooling(peer, inbound=inbound):
            log.debug("hole punch with %s refused: cooldown", peer)
            return None
        current = self._sessions.get(peer)
        if current is not None:
            if not inbound or current.inbound or current.phase is not _Phase.EXCHANGE or not self._yields_to(peer):
                log.debug("hole punch with %s refused: a session is under way", peer)
                return None
            log.debug("both sides initiated a hole punch; %s's session goes on", peer)
            current.cancel.cancel()
        elif len(self._sessions) >= self.max_concurrent:
            log.debug("hole punch with %s refused: %d sessions under way", peer, len(self._sessions))
            return None
        session = _Session(inbound=inbound, phase=_Phase.EXCHANGE if inbound else _Phase.DIRECT)
        self._sessions[peer] = session
        return session

    def _release(self, peer: ID, session: _Session) -> None:
        if self._sessions.get(peer) is session:
            del self._sessions[peer]
        now = trio.current_time()
        if session.dials:
            self._ended[(peer, session.inbound)] = now
            for key, at in list(self._ended.items()):
                if now - at >= self.cooldown_s:
                    del self._ended[key]
        self.history.append((peer, session.inbound, frozenset(session.dialled), session.dials))
        del self.history[:-64]

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        try:
            peer = stream.muxed_conn.peer_id
        except Exception:
            await _reset(stream)
            return
        session = self._admit(peer, inbound=True)
        if session is None:
            await _reset(stream)
            return
        try:
            await super()._handle_dcutr_stream(stream)
        finally:
            self._release(peer, session)

    async def _initiate_hole_punch_locked(self, peer_id: ID) -> bool:
        if not self._identified(peer_id):
            return False  # wait for Identify: the peer's addresses and whether it speaks DCUtR at all
        session = self._admit(peer_id, inbound=False)
        if session is None:
            return False
        try:
            with session.cancel:
                return await super()._initiate_hole_punch_locked(peer_id)
            return False  # the peer's own simultaneous session went on instead
        finally:
            self._release(peer_id, session)

    def _identified(self, peer: ID) -> bool:
        with contextlib.suppress(Exception):
            return bool(self.host.get_peerstore().get_protocols(peer))
        return False

    # --- dialling ---

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        session = self._sessions.get(peer_id)
        if session is None:
            return False
        try:
            targets = self._targets(peer_id, self._known_addrs(peer_id))
            if targets:
                with trio.move_on_after(self.dial_timeout):
                    async with trio.open_nursery() as nursery:
                        for addr in targets:
                            nursery.start_soon(self._dial, session, peer_id, addr, None, False)
            upgraded = await self._verify_direct_connection(peer_id)
        finally:
            session.phase = _Phase.EXCHANGE
        if upgraded:
            self._schedule_relay_close(peer_id)
        return upgraded

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[Multiaddr], as_responder: bool = False) -> bool:
        session = self._sessions.get(peer_id)
        if session is None:
            return False
        session.phase = _Phase.PUNCH
        # The CONNECT message's addresses first, then what the peerstore knows (as 0.8.1 does), together capped.
        targets = self._targets(peer_id, [*addrs, *self._known_addrs(peer_id)])
        if not targets:
            log.debug("no address of %s to punch", peer_id)
            return False
        for round_ in range(PUNCH_ROUNDS):
            pending = [len(targets)]

            async def dial(addr: Multiaddr, pending: list[int] = pending) -> None:
                try:
                    await self._dial(session, peer_id, addr, self._source_for(addr), as_responder)
                finally:
                    pending[0] -= 1

            async with trio.open_nursery() as nursery:
                for addr in targets:
                    nursery.start_soon(dial, addr)
                with trio.move_on_after(PUNCH_ROUND_S):
                    while pending[0] and not await self._verify_direct_connection(peer_id):
                        await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
            if await self._verify_direct_connection(peer_id):
                self._schedule_relay_close(peer_id)
                return True
            if round_ + 1 < PUNCH_ROUNDS:
                await trio.sleep(PUNCH_PAUSE_S)
        return False

    async def _dial_peer(
        self,
        peer_id: ID,
        addr: Multiaddr,
        source: tuple[str, int] | None = None,
        as_responder: bool = False,
    ) -> None:
        session = self._sessions.get(peer_id)
        if session is not None:
            await self._dial(session, peer_id, addr, source, as_responder)

    async def _dial(
        self, session: _Session, peer_id: ID, addr: Multiaddr, source: tuple[str, int] | None, as_responder: bool
    ) -> None:
        """One connection attempt (no swarm retries), within the session's budget."""
        if session.dials >= self.max_session_dials:
            return
        session.dials += 1
        session.dialled.add(str(addr))
        network = cast(Any, self.host.get_network())
        try:
            with trio.fail_after(self.dial_timeout):
                if as_responder:
                    await network.dial_addr_as_responder(addr, peer_id, source)
                else:
                    once = getattr(network, "_dial_addr_single_attempt", None) or network.dial_addr
                    await once(addr, peer_id, source)
        except Exception as exc:
            log.debug("hole-punch dial to %s at %s failed: %s", peer_id, addr, exc)
            return
        if await self._verify_direct_connection(peer_id):
            log.info("direct connection to %s at %s", peer_id, addr)
            self._direct_connections.add(peer_id)

    def _source_for(self, target: Multiaddr) -> tuple[str, int] | None:
        """Our TCP listen address of the target's family: punch dials leave from the listen port, so the NAT mapping
        is the one the peer was told about (0.8.1 took the first *advertised* address, which with ``announce`` is not
        one of ours)."""
        family = target.protocols()[0].name
        with contextlib.suppress(Exception):
            for addr in self.host.get_transport_addrs():
                names = [p.name for p in addr.protocols()]
                if names[:2] == [family, "tcp"] and "p2p-circuit" not in names:
                    return str(addr.value_for_protocol(family)), int(addr.value_for_protocol("tcp"))
        return None

    # --- our own attempts ---

    async def _auto_drive_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(DRIVE_INTERVAL_S)
                with contextlib.suppress(Exception):
                    for peer in self._relayed_peers():
                        if len(self._sessions) >= self.max_concurrent or len(self._driving) >= self.max_concurrent:
                            break
                        if (
                            peer in self._driving
                            or peer in self._sessions
                            or peer in self._direct_connections
                            or self._hole_punch_attempts.get(peer, 0) >= MAX_HOLE_PUNCH_ATTEMPTS
                            or self.cooling(peer, inbound=False)
                            or not self._identified(peer)
                        ):
                            continue
                        self._driving.add(peer)
                        nursery.start_soon(self._drive, peer)

    async def _drive(self, peer: ID) -> None:
        try:
            await self.initiate_hole_punch(peer)
        except Exception as exc:
            log.debug("hole punch to %s failed: %s", peer, exc)
        finally:
            self._driving.discard(peer)

    def _relayed_peers(self) -> list[ID]:
        network = self.host.get_network()
        out = []
        for peer in self.host.get_connected_peers():
            if peer == self.host.get_id():
                continue
            conns = network.get_connections(peer)
            if conns and all(any("/p2p-circuit" in str(a) for a in _transport_addrs(c)) for c in conns):
                out.append(peer)
        return out


def _transport_addrs(conn: Any) -> list[Any]:
    with contextlib.suppress(Exception):
        return list(conn.get_transport_addresses())
    return []


async def _reset(stream: INetStream) -> None:
    with contextlib.suppress(Exception):
        await stream.reset()
