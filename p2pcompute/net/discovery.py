"""Peer discovery: a Kademlia DHT in server mode, bootstrap, capability provider records, optional mDNS.

Run it in a nursery next to its host::

    async with open_host(seed, ["/ip4/0.0.0.0/tcp/4001"]) as host, trio.open_nursery() as nursery:
        discovery = Discovery(host, DiscoveryConfig(bootstrap=("/ip4/.../tcp/4001/p2p/12D3...",)))
        await nursery.start(discovery.run)
        await discovery.provide("cuda")
        workers = await discovery.find_providers("cuda")

What it adds to py-libp2p 0.8.1's ``KadDHT``:

* **Routing table fed from connections.** 0.8.1 only adds a peer when it opens a KAD stream to us or
  shows up in a lookup. A network notifee queues every new connection; once Identify has told us the
  peer's protocols and listen addresses, a peer that speaks KAD (server mode) is added. A periodic
  reconcile catches anything the bounded queue dropped.
* **Provider lookups that always ask the network** and merge with what we store, deduplicated by peer id
  (0.8.1's ``find_providers`` returns the local store alone as soon as it holds one record, and returns
  the same provider once per peer that stores it).
* **Capability keys** in our own namespace: ``sha256(CAPABILITY_KEY_PREFIX + capability)`` as a
  multihash, handed to the provider store as bytes (0.8.1's string keys are parsed as CID or hex first,
  so ``"cafe"`` would not mean what it says).
* Periodic routing-table refresh and re-provide, every wait bounded by a named timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import ALPHA
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError
from libp2p.tools.anyio_service import background_trio_service

from p2pcompute.errors import DialError, DiscoveryError
from p2pcompute.net.host import DEFAULT_DIAL_TIMEOUT_S, connect
from p2pcompute.net.protocols import CAPABILITY_KEY_PREFIX, KAD_PROTOCOL

__all__ = [
    "Discovery",
    "DiscoveryConfig",
    "capability_key",
]

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio-stubs that shadow trio's own types and do not
    # re-export TaskStatus.
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)

DEFAULT_QUERY_TIMEOUT_S: Final = 15.0
#: One GET_PROVIDERS round trip to one peer.
DEFAULT_RPC_TIMEOUT_S: Final = 5.0
DEFAULT_IDENTIFY_WAIT_S: Final = 10.0
DEFAULT_REFRESH_INTERVAL_S: Final = 60.0
DEFAULT_REPROVIDE_INTERVAL_S: Final = 600.0
DEFAULT_PROVIDER_COUNT: Final = 20
DEFAULT_NEW_PEER_QUEUE: Final = 256
DEFAULT_MAX_CONCURRENT_ADMISSIONS: Final = 16
#: 0.8.1 signals "identify done" with no event; we look at the peerstore this often while waiting.
IDENTIFY_POLL_INTERVAL_S: Final = 0.02
MAX_CAPABILITY_LEN: Final = 64
_SHA2_256_MULTIHASH_PREFIX: Final = b"\x12\x20"


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    #: ``/…/p2p/<peer id>`` multiaddrs dialled at start.
    bootstrap: tuple[str, ...] = ()
    dial_timeout_s: float = DEFAULT_DIAL_TIMEOUT_S
    query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S
    rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S
    identify_wait_s: float = DEFAULT_IDENTIFY_WAIT_S
    refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S
    reprovide_interval_s: float = DEFAULT_REPROVIDE_INTERVAL_S
    provider_count: int = DEFAULT_PROVIDER_COUNT
    new_peer_queue: int = DEFAULT_NEW_PEER_QUEUE
    max_concurrent_admissions: int = DEFAULT_MAX_CONCURRENT_ADMISSIONS

    def __post_init__(self) -> None:
        timeouts = (
            self.dial_timeout_s,
            self.query_timeout_s,
            self.rpc_timeout_s,
            self.identify_wait_s,
            self.refresh_interval_s,
            self.reprovide_interval_s,
        )
        if any(t <= 0 for t in timeouts):
            raise ValueError("timeouts and intervals must be positive")
        if min(self.provider_count, self.new_peer_queue, self.max_concurrent_admissions) < 1:
            raise ValueError("counts and capacities must be >= 1")


def capability_key(capability: str) -> bytes:
    """The DHT key (a sha2-256 multihash) under which providers of ``capability`` are recorded."""
    if not capability or len(capability) > MAX_CAPABILITY_LEN or not capability.isascii():
        raise DiscoveryError(f"bad capability name {capability!r}")
    digest = hashlib.sha256(CAPABILITY_KEY_PREFIX + capability.encode("ascii")).digest()
    return _SHA2_256_MULTIHASH_PREFIX + digest


class _NewPeerNotifee(INotifee):
    """Queues the peer of every new connection; never blocks the swarm (it awaits notifees inline)."""

    def __init__(self, send: trio.MemorySendChannel[ID]) -> None:
        self._send = send

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        try:
            self._send.send_nowait(conn.muxed_conn.peer_id)
        except trio.WouldBlock:
            logger.debug("new-peer queue full; the periodic reconcile will pick the peer up")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


class Discovery:
    """KadDHT (server mode) service of one host. Start it with ``await nursery.start(discovery.run)``."""

    def __init__(self, host: IHost, config: DiscoveryConfig = DiscoveryConfig()) -> None:
        self._host = host
        self._config = config
        # Registers the KAD stream handler on the host; the service itself starts in run().
        self._dht = KadDHT(host, DHTMode.SERVER)
        self._provided: dict[str, bytes] = {}
        self._admission_limiter = trio.CapacityLimiter(config.max_concurrent_admissions)

    @property
    def dht(self) -> KadDHT:
        return self._dht

    def routing_table_peers(self) -> list[ID]:
        return self._dht.routing_table.get_peer_ids()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. ``started()`` comes after the bootstrap dials and a first refresh."""
        new_peer_send, new_peer_recv = trio.open_memory_channel[ID](self._config.new_peer_queue)
        notifee = _NewPeerNotifee(new_peer_send)
        network = self._host.get_network()
        async with background_trio_service(self._dht), trio.open_nursery() as nursery:
            network.register_notifee(notifee)
            try:
                nursery.start_soon(self._admit_new_peers, new_peer_recv)
                await nursery.start(self._run_mdns)
                await self._bootstrap()
                await self.refresh()
                nursery.start_soon(self._maintain)
                task_status.started()
                await trio.sleep_forever()
            finally:
                network.remove_notifee(notifee)
                new_peer_send.close()
                nursery.cancel_scope.cancel()

    # -- public operations ---------------------------------------------------------------------------

    async def provide(self, capability: str) -> bool:
        """Announce that we provide ``capability``; kept announced until the service stops.

        Returns whether at least one other peer accepted the record within the query timeout (the
        record is stored locally either way and re-announced every ``reprovide_interval_s``).
        """
        key = capability_key(capability)
        self._provided[capability] = key
        return await self._provide_key(key)

    async def find_providers(self, capability: str, *, count: int | None = None) -> list[PeerInfo]:
        """Peers that announced ``capability``, one entry per peer, ourselves included if we provide it.

        Asks the network every time. On timeout, returns what was found so far.
        """
        key = capability_key(capability)
        limit = count if count is not None else self._config.provider_count
        found: dict[ID, PeerInfo] = {}
        _merge_providers(found, self._dht.provider_store.get_providers(key))
        with trio.move_on_after(self._config.query_timeout_s) as scope:
            await self._lookup_providers(key, found, limit)
        if scope.cancelled_caught:
            logger.info("find_providers(%s) timed out with %d found", capability, len(found))
        return list(found.values())[:limit]

    async def find_peer(self, peer_id: ID) -> PeerInfo | None:
        """Addresses of ``peer_id``: from the routing table or peerstore, else by an iterative lookup.

        ``None`` when not found within the query timeout.
        """
        with trio.move_on_after(self._config.query_timeout_s) as scope:
            info = await self._dht.find_peer(peer_id)
            if info is not None and info.addrs:
                return info
        if scope.cancelled_caught:
            logger.info("find_peer(%s) timed out", peer_id)
        return None

    async def refresh(self) -> None:
        """Admit connected KAD peers, then a Kademlia refresh (self lookup + one per non-empty bucket)."""
        missing = [p for p in self._host.get_connected_peers() if not self._dht.routing_table.peer_in_table(p)]
        await self._admit_all(missing)
        with trio.move_on_after(self._config.query_timeout_s) as scope:
            await self._dht.refresh_routing_table()
        if scope.cancelled_caught:
            logger.info("routing table refresh timed out")

    # -- internals -----------------------------------------------------------------------------------

    async def _bootstrap(self) -> None:
        if not self._config.bootstrap:
            return
        reached: list[ID] = []

        async def dial(addr: str) -> None:
            try:
                reached.append(await connect(self._host, addr, dial_timeout_s=self._config.dial_timeout_s))
            except DialError as exc:
                logger.warning("bootstrap peer %s unreachable: %s", addr, exc)

        async with trio.open_nursery() as nursery:
            for addr in self._config.bootstrap:
                nursery.start_soon(dial, addr)
        await self._admit_all(reached)
        if not reached:
            logger.warning("no bootstrap peer reachable out of %d", len(self._config.bootstrap))

    async def _maintain(self) -> None:
        since_reprovide = 0.0
        while True:
            await trio.sleep(self._config.refresh_interval_s)
            await self.refresh()
            since_reprovide += self._config.refresh_interval_s
            if since_reprovide >= self._config.reprovide_interval_s:
                since_reprovide = 0.0
                for key in list(self._provided.values()):
                    await self._provide_key(key)

    async def _provide_key(self, key: bytes) -> bool:
        with trio.move_on_after(self._config.query_timeout_s) as scope:
            return await self._dht.provider_store.provide(key)
        if scope.cancelled_caught:
            logger.info("provide(%s) timed out", key.hex())
        return False

    async def _admit_new_peers(self, receive: trio.MemoryReceiveChannel[ID]) -> None:
        async with trio.open_nursery() as nursery, receive:
            async for peer_id in receive:
                nursery.start_soon(self._admit_limited, peer_id)

    async def _admit_all(self, peer_ids: Sequence[ID]) -> None:
        async with trio.open_nursery() as nursery:
            for peer_id in peer_ids:
                nursery.start_soon(self._admit_limited, peer_id)

    async def _admit_limited(self, peer_id: ID) -> None:
        async with self._admission_limiter:
            await self._admit(peer_id)

    async def _admit(self, peer_id: ID) -> bool:
        """Add ``peer_id`` to the routing table once Identify shows it serves KAD."""
        if peer_id == self._host.get_id():
            return False
        peerstore = self._host.get_peerstore()
        protocols: list[str] = []
        with trio.move_on_after(self._config.identify_wait_s):
            while True:
                try:
                    protocols = list(peerstore.get_protocols(peer_id) or [])
                    addrs = peerstore.addrs(peer_id)
                except PeerStoreError:  # not known yet
                    protocols, addrs = [], []
                if protocols and addrs:
                    break
                await trio.sleep(IDENTIFY_POLL_INTERVAL_S)
        if not protocols:
            logger.debug("identify of %s did not finish; not added to the routing table", peer_id)
            return False
        if str(KAD_PROTOCOL) not in protocols:
            return False
        added = await self._dht.routing_table.add_peer(PeerInfo(peer_id, addrs), skip_server_mode_check=True)
        logger.debug("routing table %s %s", "added" if added else "refused", peer_id)
        return added

    async def _lookup_providers(self, key: bytes, found: dict[ID, PeerInfo], limit: int) -> None:
        local_id = self._host.get_id()
        closest = await self._dht.peer_routing.find_closest_peers_network(key)
        queried: set[ID] = {local_id}
        candidates = [p for p in closest if p not in queried]
        while candidates and len(found) < limit:
            batch, candidates = candidates[:ALPHA], candidates[ALPHA:]
            closer: list[ID] = []

            async def ask(peer_id: ID, closer: list[ID] = closer) -> None:
                with trio.move_on_after(self._config.rpc_timeout_s):
                    # Private in 0.8.1, but the only call that asks one peer without touching the store.
                    providers, peers = await self._dht.provider_store._get_providers_from_peer_with_closers(
                        peer_id, key
                    )
                    _merge_providers(found, providers)
                    closer.extend(peers)

            async with trio.open_nursery() as nursery:
                for peer_id in batch:
                    queried.add(peer_id)
                    nursery.start_soon(ask, peer_id)
            fresh = [p for p in dict.fromkeys(closer) if p not in queried and p not in candidates]
            candidates = sort_peer_ids_by_distance(key, candidates + fresh)

    async def _run_mdns(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial peers that py-libp2p's mDNS reports (only when the host was opened with mDNS)."""
        if getattr(self._host, "mDNS", None) is None:
            task_status.started()
            return
        send, receive = trio.open_memory_channel[PeerInfo](self._config.new_peer_queue)
        token = trio.lowlevel.current_trio_token()
        local_id = self._host.get_id()

        def on_discovered(info: PeerInfo) -> None:
            # Called on a zeroconf thread, for every host of this process (the emitter is global).
            if info.peer_id == local_id:
                return
            # RuntimeError: called on the trio thread itself; the others: queue full or trio gone.
            with contextlib.suppress(trio.WouldBlock, trio.RunFinishedError, trio.BrokenResourceError, RuntimeError):
                trio.from_thread.run_sync(send.send_nowait, info, trio_token=token)

        peerDiscovery.register_peer_discovered_handler(on_discovered)
        try:
            task_status.started()
            async with receive:
                async for info in receive:
                    if info.peer_id in self._host.get_connected_peers():
                        continue
                    with trio.move_on_after(self._config.dial_timeout_s):
                        try:
                            await self._host.connect(info)
                        except Exception as exc:  # SwarmException and transport errors
                            logger.debug("mDNS peer %s not reachable: %s", info.peer_id, exc)
        finally:
            peerDiscovery.unregister_peer_discovered_handler(on_discovered)
            send.close()


def _merge_providers(found: dict[ID, PeerInfo], providers: Sequence[PeerInfo]) -> None:
    for info in providers:
        if info.peer_id in found:
            known = found[info.peer_id]
            addrs = list(dict.fromkeys([*known.addrs, *info.addrs]))
            found[info.peer_id] = PeerInfo(info.peer_id, addrs)
        else:
            found[info.peer_id] = PeerInfo(info.peer_id, list(dict.fromkeys(info.addrs)))
