"""Reachability service: AutoNAT, circuit relay v2 (serving and reserving) and DCUtR, from py-libp2p 0.8.1.

What this adapter pins down (specs/reachability.md):

* **AutoNAT dial-backs are fresh connections.** 0.8.1's server "dials back" with ``host.connect``, which returns
  the connection the request came in on: every node behind NAT would be told it is public. Our server probes the
  requester's address with a new TCP connection (only addresses on the requester's observed IP, at most
  :data:`MAX_PROBE_ADDRS`, each bounded by :data:`PROBE_TIMEOUT_S`, :data:`MAX_CONCURRENT_PROBES` at once).
* **Relaying is opt-in** (``relay_service``) with limits on reservations, circuits, bytes and seconds per circuit.
* **Reservations only when needed**: :class:`p2pcompute.core.reach.ReachState` decides from the verdicts; a node that
  is not known to be public reserves on configured relays first, then on connected peers that speak the hop
  protocol, and advertises ``<relay>/p2p-circuit/p2p/<us>`` beside its direct addresses.
* **Dialling** tries direct addresses first, then each relayed one (0.8.1's swarm skips ``/p2p-circuit``
  addresses, so :meth:`ReachService.dial` goes through the relay transport itself).
* **Hole punching**: DCUtR runs on every node; it upgrades a relayed connection to a direct one where the NATs
  allow (a public peer is dialled back by the peer behind NAT), and the relayed one is closed after a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.basic_host import BasicHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2pcompute.core.matching import address_group
from p2pcompute.core.reach import (
    NatMode,
    Reachability,
    ReachPolicy,
    ReachState,
    RelayCandidate,
    Verdict,
    circuit_address,
    is_circuit_address,
)
from p2pcompute.errors import DialError
from p2pcompute.net.holepunch import GuardedDCUtR, Scope, allowed_scopes, dial_target
from p2pcompute.net.relay import GuardedRelay, RelayServiceLimits

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = [
    "HOP_PROTOCOL",
    "ReachService",
    "ReachSettings",
    "RelayServiceLimits",
    "is_relayed",
]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S: Final = 3.0  # one dial-back TCP probe
MAX_PROBE_ADDRS: Final = 4  # addresses probed per request
MAX_CONCURRENT_PROBES: Final = 8  # dial-back probes this node runs at once, for everyone
AUTONAT_QUERY_TIMEOUT_S: Final = 10.0  # one dial-back request, as the asking side
AUTONAT_SERVERS_PER_ROUND: Final = 4  # servers asked per check
RESERVE_TIMEOUT_S: Final = 10.0  # dial a relay and reserve a slot
DIAL_TIMEOUT_S: Final = 10.0  # one direct or relayed dial
MAX_RELAYED_DIALS: Final = 3  # relayed addresses of one advert tried per dial (an advert may list 16)
FIRST_CHECK_S: Final = 1.0  # while unsettled, look again after this, doubling up to CHECK_INTERVAL_S
CHECK_INTERVAL_S: Final = 60.0  # once settled, this often


@dataclass(frozen=True, slots=True)
class ReachSettings:
    mode: NatMode = NatMode.AUTO
    relay_service: bool = False  # serve as a relay for others (hop)
    relays: tuple[str, ...] = ()  # relays to reserve on first when unreachable, /…/p2p/<id>
    reserve: bool = True  # hold relay slots when unreachable (a client-only peer has nothing to serve)
    hole_punch: bool = True  # run DCUtR
    announce: tuple[str, ...] = ()  # the operator's public addresses: what dial-backs are asked to try
    policy: ReachPolicy = field(default_factory=ReachPolicy)
    limits: RelayServiceLimits = field(default_factory=RelayServiceLimits)
    check_interval_s: float = CHECK_INTERVAL_S


def is_relayed(host: IHost, peer: ID) -> bool:
    """Whether every connection we hold to ``peer`` goes through a relay (no direct path to it)."""
    conns = host.get_network().get_connections(peer)
    if not conns:
        return False
    return all(any(is_circuit_address(str(a)) for a in _transport_addrs(c)) for c in conns)


def _transport_addrs(conn: Any) -> list[Any]:
    with contextlib.suppress(Exception):
        return list(conn.get_transport_addresses())
    return []


class _FreshDialBack(AutoNATService):
    """AutoNAT whose dial-back is a new TCP connection to the requester's observed IP (see module doc)."""

    def __init__(self, host: BasicHost) -> None:
        super().__init__(host, serve=True)
        self._probes = trio.CapacityLimiter(MAX_CONCURRENT_PROBES)
        self._asking: set[ID] = set()  # peers with a request being answered: one at a time each

    async def handle_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        if peer in self._asking:
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        self._asking.add(peer)
        try:
            await super().handle_stream(stream)
        finally:
            self._asking.discard(peer)

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs[:MAX_PROBE_ADDRS]:
            try:
                maddr = multiaddr.Multiaddr(raw)
                ip = maddr.value_for_protocol("ip4") if "ip4" in maddr.protocols() else None
                if ip is None:
                    ip = maddr.value_for_protocol("ip6")
                port = int(maddr.value_for_protocol("tcp"))
            except Exception:
                continue
            async with self._probes:
                with trio.move_on_after(PROBE_TIMEOUT_S):
                    try:
                        stream = await trio.open_tcp_stream(str(ip), port)
                    except OSError:
                        continue
                    await stream.aclose()
                    log.debug("dial-back to %s at %s:%d reached it", peer_id, ip, port)
                    return bytes(raw)
        return None


def _may_dial(addr: str, allowed: frozenset[Scope]) -> bool:
    if addr.startswith(("/dns4/", "/dns6/", "/dns/", "/dnsaddr/")):
        return True
    return dial_target(addr, allowed) is not None


async def _tcp_probe(maddr: multiaddr.Multiaddr) -> bool:
    """Whether a new TCP connection to ``maddr`` (``/ip4|ip6/…/tcp/…``) opens within :data:`PROBE_TIMEOUT_S`."""
    with contextlib.suppress(Exception), trio.move_on_after(PROBE_TIMEOUT_S):
        protocols = [p.name for p in maddr.protocols()]
        ip = maddr.value_for_protocol("ip6" if "ip6" in protocols else "ip4")
        stream = await trio.open_tcp_stream(str(ip), int(maddr.value_for_protocol("tcp")))
        await stream.aclose()
        return True
    return False


class _Pokes:
    """A network notifee: a new connection or a lost one makes the reachability service look again now."""

    def __init__(self, service: ReachService) -> None:
        self._service = service

    async def connected(self, network: Any, conn: Any) -> None:
        self._service.poke()

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._service.poke()

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


class ReachService:
    """Find out whether we are reachable; serve as a relay if asked; hold relay slots when we are not reachable."""

    def __init__(
        self,
        host: IHost,
        settings: ReachSettings,
        *,
        clock: Callable[[], int],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.host = host
        self.settings = settings
        self.clock = clock
        self.on_change = on_change
        self.state = ReachState(settings.mode, settings.policy)
        self.held: dict[str, str] = {}  # relay peer id -> our circuit address through it
        self._failed: dict[str, int] = {}  # relay peer id -> when a reservation last failed (ms)
        self._transport: CircuitV2Transport | None = None
        self._autonat: _FreshDialBack | None = None
        self._wake = trio.Event()
        self._random = random.Random()

    # --- what the node reads ---

    def relayed_addrs(self) -> tuple[str, ...]:
        return tuple(self.held.values())

    def status(self) -> dict[str, Any]:
        now = self.clock()
        observed: list[str] = []
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is not None:
            with contextlib.suppress(Exception):
                observed = [str(a) for a in manager.addrs(min_observers=1)]
        return {
            "reachability": self.state.status(now).value,
            "nat": self.settings.mode.value,
            "relay_service": self.settings.relay_service,
            "relayed_addrs": list(self.relayed_addrs()),
            "verdicts": [
                {"server": v.server, "reachable": v.reachable, "age_s": (now - v.at_ms) / 1000}
                for v in self.state.verdicts(now)
            ],
            "observed_addrs": observed,
        }

    def observed_public_addrs(self) -> list[str]:
        """Addresses Identify says others see us at, confirmed by py-libp2p's observer threshold (distinct
        observer groups); only meaningful once AutoNAT says we are public."""
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is None:
            return []
        with contextlib.suppress(Exception):
            return [str(a) for a in manager.addrs()]
        return []

    # --- dialling ---

    async def dial(self, peer: ID, addrs: Sequence[str]) -> None:
        """Connect to ``peer``: its direct addresses first, then through each relay it advertised."""
        if self.host.get_network().get_connections(peer):
            return
        # An advert is the worker's word: it could aim us at our own LAN, loopback or cloud metadata address. Only
        # addresses in a scope we are in ourselves (global always; loopback/private only in such a testnet), and
        # DNS names (a public node's announce), are dialled; a relayed address by its relay's address.
        allowed = allowed_scopes(self.host.get_addrs())
        addrs = [a for a in addrs if _may_dial(a.split("/p2p-circuit")[0], allowed)]
        direct = [a for a in addrs if not is_circuit_address(a)]
        relayed = [a for a in addrs if is_circuit_address(a)]
        errors: list[str] = []
        if direct:
            # The advert is signed and fresh: a peer that restarted (perhaps on a new port) is dialled now, not
            # refused for a minute because its old address failed (0.8.1's negative cache).
            unblock = getattr(self.host.get_network(), "unblock_peer", None)
            if unblock is not None:
                with contextlib.suppress(Exception):
                    unblock(peer)
            maddrs = []
            for addr in direct:
                with contextlib.suppress(Exception):
                    maddrs.append(multiaddr.Multiaddr(addr.split("/p2p/")[0]))
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self.host.connect(PeerInfo(peer, maddrs))
                return
            except Exception as exc:
                errors.append(f"direct: {exc}")
        if self._transport is None and relayed:
            errors.append("relayed: the reachability service is not running")
            relayed = []
        for addr in relayed[:MAX_RELAYED_DIALS]:
            assert self._transport is not None
            self._fresh_relay_dial(addr)
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self._transport.dial(multiaddr.Multiaddr(addr))
                log.info("reached %s through a relay (%s)", peer, addr)
                return
            except Exception as exc:
                errors.append(f"{addr}: {exc}")
        raise DialError(f"cannot reach {peer}: " + ("; ".join(errors) or "no address"))

    def _fresh_relay_dial(self, circuit: str) -> None:
        """Dial the relay of ``circuit`` at exactly the address the circuit names, unless already connected.

        An advert is signed by the worker, not by its relay: a hostile one could name a real relay at a dead address.
        0.8.1 would remember that address for the relay, and after the failure refuse every dial to the relay for a
        minute (its negative cache), cutting us off from honest workers behind the same relay."""
        relay_part = circuit.split("/p2p-circuit")[0]
        with contextlib.suppress(Exception):
            relay = ID.from_base58(relay_part.rsplit("/p2p/", 1)[1])
            if self.host.get_network().get_connections(relay):
                return
            self.host.get_peerstore().clear_addrs(relay)
            unblock = getattr(self.host.get_network(), "unblock_peer", None)
            if unblock is not None:
                unblock(relay)

    # --- the service ---

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limits = self.settings.limits.libp2p()
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if self.settings.relay_service else RelayRole(0))
        protocol = GuardedRelay(
            self.host,
            self.settings.limits,
            allow_hop=self.settings.relay_service,
            accept_stop_from=lambda peer: str(peer) in self.held,  # only relays we hold a slot on reach us
        )
        self.host.get_network().register_notifee(cast(Any, _Pokes(self)))
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(protocol))
            self._transport = CircuitV2Transport(self.host, protocol, RelayConfig(roles=roles, limits=limits))
            self._autonat = _FreshDialBack(cast(BasicHost, self.host))
            if self.settings.hole_punch:
                await stack.enter_async_context(background_trio_service(GuardedDCUtR(self.host)))
            if self.settings.relay_service:
                log.info(
                    "serving as a relay: %d slots, %d circuits of at most %d MiB and %d s",
                    self.settings.limits.reservations,
                    self.settings.limits.circuits,
                    self.settings.limits.circuit_bytes // 1024**2,
                    self.settings.limits.circuit_seconds,
                )
            try:
                async with trio.open_nursery() as nursery:
                    task_status.started()
                    await self._loop(nursery)
            finally:
                self._transport = None
                with contextlib.suppress(Exception):
                    self.host.remove_stream_handler(AUTONAT_PROTOCOL_ID)

    def poke(self) -> None:
        """Look again now (a new connection, a lost relay)."""
        self._wake.set()

    async def _loop(self, nursery: trio.Nursery) -> None:
        before = (self.state.status(self.clock()), self.relayed_addrs())
        wait = FIRST_CHECK_S
        while True:
            try:
                if self.settings.mode is NatMode.AUTO:
                    await self._check()
                self._drop_lost_relays()
                if self.settings.reserve:
                    await self._reserve(nursery)
            except Exception:  # a peer's bytes must never end the node: log, and look again later
                log.exception("reachability check failed; trying again later")
            now = (self.state.status(self.clock()), self.relayed_addrs())
            if now != before:
                log.info("reachability %s; relayed addresses: %s", now[0].value, ", ".join(now[1]) or "none")
                before = now
                self.on_change()
            # Settled: public, or holding the slots we want. Otherwise look again soon, backing off to the interval.
            settled = now[0] is Reachability.PUBLIC or len(now[1]) >= self.settings.policy.max_relays
            wait = self.settings.check_interval_s if settled else min(wait * 2, self.settings.check_interval_s)
            self._wake = trio.Event()
            with trio.move_on_after(wait):
                await self._wake.wait()
                wait = FIRST_CHECK_S  # poked: a new peer or a lost relay

    async def _check(self) -> None:
        assert self._autonat is not None
        servers = [p for p in self._direct_peers() if self._speaks(p, AUTONAT_PROTOCOL_ID)]
        self._random.shuffle(servers)  # not always the first peers connected: those may all be one liar's
        asked = 0
        for peer in servers:
            if asked == AUTONAT_SERVERS_PER_ROUND:
                break
            asked += 1
            group = self._group(peer)
            try:
                status, _addr = await self._autonat.query_server(
                    peer, addrs=self._own_dialable(), timeout=AUTONAT_QUERY_TIMEOUT_S
                )
            except Exception as exc:
                log.debug("AutoNAT query to %s failed: %s", peer, exc)
                continue
            from libp2p.host.autonat.pb.autonat_pb2 import Message

            if status in (int(Message.OK), int(Message.E_DIAL_ERROR)):
                self.state.record(Verdict(str(peer), group, status == int(Message.OK), self.clock()))

    def _own_dialable(self) -> list[bytes]:
        """What we ask servers to dial back: the announced addresses when the operator set them (a port forward
        that does not work then shows as ``private``), else the listen and observed addresses."""
        out = []
        if self.settings.announce:
            for text in self.settings.announce:
                with contextlib.suppress(Exception):
                    out.append(multiaddr.Multiaddr(text.split("/p2p/")[0]).to_bytes())
            return out
        for addr in self.host.get_transport_addrs():
            text = str(addr)
            if "/ip4/0.0.0.0/" in text or "/ip6/::/" in text:
                continue
            out.append(addr.to_bytes())
        for text in self.observed_public_addrs():
            with contextlib.suppress(Exception):
                out.append(multiaddr.Multiaddr(text.split("/p2p/")[0]).to_bytes())
        return out

    def _drop_lost_relays(self) -> None:
        for relay in list(self.held):
            if not self.host.get_network().get_connections(ID.from_base58(relay)):
                log.info("lost the relay %s; its slot is gone", relay)
                del self.held[relay]

    def _candidates(self) -> list[RelayCandidate]:
        out = []
        for addr in self.settings.relays:
            out.append(RelayCandidate(addr.rsplit("/p2p/", 1)[1], addr, configured=True, group=address_group(addr)))
        for peer in self._direct_peers():
            if not self._speaks(peer, HOP_PROTOCOL):
                continue
            found = self._relay_address(peer)
            if found is not None:
                out.append(RelayCandidate(str(peer), found, group=address_group(found)))
        return out

    def _relay_address(self, peer: ID) -> str | None:
        """A discovered relay's address: the IP of our connection to it, with a TCP port it lists at that IP.

        Its Identify addresses are its own word: a hostile peer could name any address (a black hole, a victim), and
        a relayed address through it would send clients there. The IP is the one we are connected to; the port is
        probed before a slot is taken (:meth:`_reserve`)."""
        ip = self._remote_ip(peer)
        if ip is None:
            return None
        family = "ip6" if ":" in ip else "ip4"
        for listed in self.host.get_peerstore().addrs(peer):
            parts = str(listed).split("/")  # "", "ip4", ip, "tcp", port[, "p2p", id]
            shape = len(parts) == 5 or (len(parts) == 7 and parts[5] == "p2p")
            if shape and parts[1] == family and parts[2] == ip and parts[3] == "tcp" and parts[4].isdigit():
                return f"/{family}/{ip}/tcp/{int(parts[4])}/p2p/{peer}"
        return None

    async def _reserve(self, nursery: trio.Nursery) -> None:
        assert self._transport is not None
        now = self.clock()
        failed = [p for p, at in self._failed.items() if now - at < self.settings.check_interval_s * 1000]
        held_groups = [address_group(a) for a in self.held.values()]
        for candidate in self.state.relays_to_reserve(now, self._candidates(), list(self.held), failed, held_groups):
            try:
                own = circuit_address(candidate.addr, candidate.peer, str(self.host.get_id()))
                ok = await self._reserve_on(candidate, nursery)
            except Exception as exc:  # anything a stranger's relay can make go wrong: try another later
                ok = False
                log.info("reserving a slot on %s failed: %s", candidate.addr, exc)
            if not ok:
                self._failed[candidate.peer] = now
                continue
            self.held[candidate.peer] = own
            log.info("holding a relay slot on %s", candidate.addr)

    async def _reserve_on(self, candidate: RelayCandidate, nursery: trio.Nursery) -> bool:
        assert self._transport is not None
        relay = ID.from_base58(candidate.peer)
        base = candidate.addr.split("/p2p/")[0]
        maddr = multiaddr.Multiaddr(base)
        with trio.fail_after(RESERVE_TIMEOUT_S):
            if not candidate.configured and not await _tcp_probe(maddr):
                raise DialError(f"nothing listens at {base}, the address it gave")
            await self.host.connect(PeerInfo(relay, [maddr]))
            stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
            try:
                return await self._transport.reserve(stream, relay, nursery)
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()

    def _direct_peers(self) -> list[ID]:
        network = self.host.get_network()
        return [
            p for p in self.host.get_connected_peers() if network.get_connections(p) and not is_relayed(self.host, p)
        ]

    def _speaks(self, peer: ID, protocol: str) -> bool:
        with contextlib.suppress(Exception):
            return protocol in self.host.get_peerstore().get_protocols(peer)
        return False

    def _group(self, peer: ID) -> str:
        ip = self._remote_ip(peer)
        if ip is None:
            return str(peer)
        return address_group(f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/1")

    def _remote_ip(self, peer: ID) -> str | None:
        """The IP of our direct connection to ``peer`` (what Noise authenticated, not what the peer says)."""
        for conn in self.host.get_network().get_connections(peer):
            for addr in _transport_addrs(conn):
                parts = str(addr).split("/")
                if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
                    return parts[2]
            with contextlib.suppress(Exception):
                remote = conn.muxed_conn.secured_conn.get_remote_address()  # type: ignore[attr-defined]
                if remote:
                    return str(remote[0])
        return None
