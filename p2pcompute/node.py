"""A peer: every service in one nursery (host, DHT discovery, advert gossip and sync, evidence, status endpoint).

``await serve(config, task_status=...)`` runs until cancelled; ``task_status.started()`` receives a
:class:`NodeInfo` once the peer listens, has joined its topics and started advertising. :class:`Node` holds the
peer's state and its services (``p2pcompute.services``) and starts them in order in :meth:`Node.run`; the node
decides nothing itself: advert validation and the market view are ``core.adverts``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from p2pcompute.compute.gpu import HardwareReport, load_or_probe
from p2pcompute.config import PROBE_TIMEOUT_S, NodeConfig
from p2pcompute.core.adverts import MarketView, check_advert_address
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.reach import Reachability
from p2pcompute.core.reputation import Outcome, PeerReputation, Reputation
from p2pcompute.core.verification import EvidenceInbox
from p2pcompute.errors import RemoteProtocolError
from p2pcompute.keys import load_or_create_key
from p2pcompute.net.discovery import Discovery, DiscoveryConfig
from p2pcompute.net.gossip import Gossip, GossipConfig
from p2pcompute.net.host import HostConfig, dialable_addrs, host_addrs, is_loopback, open_host
from p2pcompute.net.reach import ReachService
from p2pcompute.services.adverts import Advertiser, AdvertReceiver
from p2pcompute.services.changes import Changes
from p2pcompute.services.evidence import EvidenceGossip, Rechecker
from p2pcompute.services.status import NodeMetrics, StatusServer, advert_table
from p2pcompute.services.sync import SyncClient, SyncServer

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio stubs that do not export TaskStatus.
    from trio_typing import TaskStatus

    from p2pcompute.compute.executor import Executor
    from p2pcompute.store import Store
    from p2pcompute.worker import Worker


__all__ = ["ExecutorWrapper", "Node", "NodeInfo", "advert_table", "serve"]

log = logging.getLogger(__name__)

ExecutorWrapper = Callable[["Executor", PeerId], "Executor"]
"""``(executor, this peer's id) -> the executor the worker uses``: a hook of :func:`serve` for harnesses (a testnet's
cheating peers wrap it, ``p2pcompute.testing.peer``); the production path passes none."""

NODE_INFO_FILE = "node.json"
CONNECTION_HEADROOM = 32


def now_ms() -> int:
    """Wall-clock time in ms since the Unix epoch: adverts carry absolute times. A node's default clock."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class NodeInfo:
    peer_id: str
    addrs: tuple[str, ...]
    status_url: str
    sandbox: tuple[tuple[str, str], ...] = ()  # the executor's sandbox layers (a worker), in LAYERS order

    def to_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {"peer_id": self.peer_id, "addrs": list(self.addrs), "status_url": self.status_url}
        if self.sandbox:
            info["sandbox"] = dict(self.sandbox)
        return info


class Node:
    """One running peer: its state (config, identity, host, clock, market, reputation) and its services, started in
    :meth:`run`. Build it with :func:`serve`; clients and tests may use it directly."""

    def __init__(
        self,
        config: NodeConfig,
        keypair: KeyPair,
        hardware: HardwareReport | None,
        host: IHost,
        *,
        clock: Callable[[], int] = now_ms,
        store: Store | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.keypair = keypair
        self.hardware = hardware
        self.host = host
        self.clock = clock
        self.started_at_ms = self.clock()  # the injected clock, as everywhere in the node
        self.reputation = store.load_reputation() if store is not None else Reputation()
        self.market = MarketView()
        self.gossip = Gossip(host, GossipConfig())
        self.discovery = Discovery(host, DiscoveryConfig(bootstrap=config.bootstrap))
        self.worker: Worker | None = None
        self.status_port: int | None = None
        self.changes = Changes()
        self.metrics = NodeMetrics(self)
        # The services, started by run().
        peer_id = keypair.peer_id
        self.advert_receiver = AdvertReceiver(
            peer_id=peer_id, market=self.market, gossip=self.gossip, clock=clock,
            received=self.metrics.adverts_received, changes=self.changes,
        )  # fmt: skip
        self.reach = ReachService(host, config.reach_settings(), clock=clock, on_change=self._addresses_changed)
        self.advertiser = Advertiser(
            config, keypair, hardware, market=self.market, gossip=self.gossip, discovery=self.discovery, clock=clock,
            addrs=self.advert_addrs, published=self.metrics.adverts_published,
        )  # fmt: skip
        self.evidence_gossip = EvidenceGossip(
            peer_id=peer_id, gossip=self.gossip, reputation=self.reputation, store=store, clock=clock,
            received=self.metrics.evidence_received, changes=self.changes,
        )  # fmt: skip
        self.sync_server = SyncServer(host=host, market=self.market, clock=clock)
        self.sync_client = SyncClient(
            host=host, market=self.market, clock=clock, changes=self.changes,
            advertise_interval=config.advertise_interval,
        )  # fmt: skip
        self.status_server = StatusServer(self, self.metrics, port=config.status_port)

    async def run(
        self,
        *,
        advertise: bool = True,
        serve_status: bool = True,
        task_status: TaskStatus[NodeInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run every service until cancelled; a client-only peer runs with ``advertise=False`` (it reads the market
        only) and ``serve_status=False``. Each service is started once the one before it is ready, in this order:
        what hooks into the host (pubsub, topic validators, protocol handlers) before discovery dials the first
        peer; what talks to peers after it."""
        async with trio.open_nursery() as nursery:
            # Hooked into the host before the first dial. Pubsub must run before any connection is made (0.8.1
            # ignores earlier connections).
            await nursery.start(self.gossip.run)
            nursery.start_soon(self._drain_gossip)
            await nursery.start(self.advert_receiver.run)
            await nursery.start(self.evidence_gossip.run)
            await nursery.start(self.sync_server.run)
            if self.worker is not None:
                for protocol, handler in self.worker.stream_handlers().items():  # jobs; tensors without a direct path
                    self.host.set_stream_handler(protocol, handler)
                await nursery.start(self.worker.data.serve)
            await nursery.start(self.reach.run)  # relay stop/hop, AutoNAT and DCUtR handlers before the first dial
            await nursery.start(self.discovery.run)
            # Connected: what talks to peers. One more service is one more `await nursery.start(service.run)`.
            if serve_status:
                self.status_port = await nursery.start(self.status_server.run)
            await nursery.start(self.sync_client.run)
            if advertise:
                await nursery.start(self.advertiser.run)
            info = NodeInfo(
                peer_id=str(self.peer_id),
                addrs=self.advert_addrs() or tuple(host_addrs(self.host)),
                status_url=f"http://127.0.0.1:{self.status_port}/status" if serve_status else "",
                sandbox=tuple(self.worker.executor.sandbox.items()) if self.worker is not None else (),
            )
            if serve_status:
                _write_node_info(self.config.data_dir, info)
            task_status.started(info)

    async def _drain_gossip(self) -> None:
        # The topic validators already put adverts and evidence where they go; the channel only needs emptying.
        async for _ in self.gossip.messages:
            pass

    @property
    def peer_id(self) -> PeerId:
        return self.keypair.peer_id

    # --- reputation and waiting for changes ---

    def record_outcome(self, peer: PeerId, outcome: Outcome, *, flops: int = 0, group: str = "") -> PeerReputation:
        """Apply an own observation of ``peer`` to its reputation, persisted when the node has a store.

        ``flops``: the checked work a valid result earns (0: unchecked, no trust); ``group``: its address group."""
        record = self.reputation.record(peer, outcome, self.clock(), flops=flops, group=group)
        if self.store is not None:
            self.store.save_reputation(record)
        return record

    def notify_waiters(self) -> None:
        """Wake every :meth:`wait_for` to re-check its predicate (an advert arrived, or a client's room changed)."""
        self.changes.notify()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checking after every advert received (put a timeout around it)."""
        await self.changes.wait_for(predicate)

    # --- delegated to the services ---

    @property
    def free_slots(self) -> int:
        return self.advertiser.free_slots

    def set_free_slots(self, free: int) -> None:
        """Record a change of free capacity; the advertiser re-advertises at once."""
        self.advertiser.set_free_slots(free)

    def capabilities(self) -> list[str]:
        return self.advertiser.capabilities()

    def make_advert(self, now: int) -> bytes:
        return self.advertiser.make_advert(now)

    async def publish_advert(self) -> None:
        await self.advertiser.publish()

    async def sync_from(self, peer: ID) -> int:
        return await self.sync_client.sync_from(peer)

    @property
    def evidence(self) -> EvidenceInbox:
        return self.evidence_gossip.inbox

    @property
    def rechecker(self) -> Rechecker | None:
        """Redoes the checks of received check evidence (a client: in a thread; a worker: in its executor)."""
        return self.evidence_gossip.rechecker

    @rechecker.setter
    def rechecker(self, rechecker: Rechecker | None) -> None:
        self.evidence_gossip.rechecker = rechecker

    async def publish_evidence(self, data: bytes) -> None:
        await self.evidence_gossip.publish(data)

    def status(self) -> dict[str, Any]:
        return self.status_server.status()

    def advert_addrs(self) -> tuple[str, ...]:
        """The addresses our adverts carry now (specs/reachability.md §2)."""
        public = self.reach.state.status(self.clock()) is Reachability.PUBLIC
        return advert_addrs(
            self.host,
            self.peer_id,
            self.config.announce,
            observed=self.reach.observed_public_addrs() if public else (),
            relayed=self.reach.relayed_addrs(),
        )

    def _addresses_changed(self) -> None:
        self.advertiser.addresses_changed()


def _write_node_info(data_dir: Path, info: NodeInfo) -> None:
    path = data_dir / NODE_INFO_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2))
    tmp.replace(path)


async def serve(
    config: NodeConfig,
    *,
    task_status: TaskStatus[NodeInfo] = trio.TASK_STATUS_IGNORED,
    wrap_executor: ExecutorWrapper | None = None,
) -> None:
    """Run a peer with ``config`` until cancelled (the CLI cancels on SIGINT/SIGTERM).

    With ``config.serve_jobs`` the peer is a worker: a warm executor pool (one child per slot), a data-channel
    listener and the job protocol handler; accepted jobs are persisted in ``<data_dir>/store.sqlite3``.
    ``wrap_executor`` (harnesses only) replaces the executor the job handler runs jobs on with what it returns;
    dry runs for evidence re-checks stay on the pool itself.
    """
    # Imported here: a worker's modules (executor pool, data channel, store) cost start-up time only where used.
    from p2pcompute.compute.executor import open_executor
    from p2pcompute.core.negotiation import NegotiationPolicy
    from p2pcompute.net.transfer import DataChannelConfig, DataServer
    from p2pcompute.store import STORE_FILE, open_store
    from p2pcompute.worker import Worker, WorkerSettings

    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keypair, created = load_or_create_key(config.key_path)
    if created:
        log.info("created identity %s in %s", keypair.peer_id, config.key_path)
    hardware = await trio.to_thread.run_sync(
        lambda: load_or_probe(config.data_dir, benchmark=config.probe_benchmark, timeout=PROBE_TIMEOUT_S)
    )
    host_config = HostConfig(
        enable_mdns=config.mdns,
        announce=config.announce,
        low_watermark=config.connections_low,
        high_watermark=config.connections_high,
        # Headroom above the pruning threshold: at max_connections the swarm refuses every new connection.
        max_connections=config.connections_high + CONNECTION_HEADROOM,
    )
    store = open_store(config.data_dir / STORE_FILE)
    try:
        async with contextlib.AsyncExitStack() as stack:
            executor = None
            if config.serve_jobs:
                executor = await stack.enter_async_context(
                    open_executor(
                        workers=config.slots,
                        memory_limit=config.job_memory_bytes,  # enforced on the child, not only advertised
                        sandbox=config.sandbox,
                        sandbox_uid_base=config.sandbox_uid_base,
                    )
                )
                _report_sandbox(executor.sandbox)
            host = await stack.enter_async_context(open_host(keypair.seed, config.listen, config=host_config))
            node = Node(config, keypair, hardware, host, store=store)
            if executor is not None:
                devices = hardware.devices
                worker_executor = executor if wrap_executor is None else wrap_executor(executor, keypair.peer_id)
                node.worker = Worker(
                    keypair=keypair,
                    executor=worker_executor,
                    store=store,
                    data=DataServer(
                        _listen_ip(config.listen), config=DataChannelConfig(clear=config.data_channel_clear)
                    ),
                    settings=WorkerSettings(
                        price_per_second=config.price_per_second,
                        slots=config.slots,
                        memory_bytes=min(config.job_memory_bytes, max(d.free_memory_bytes for d in devices)),
                        device_kinds=frozenset(d.kind for d in devices),
                        tflops=max(d.tflops for d in devices),
                        policy=NegotiationPolicy(
                            request_timeout_ms=round(config.request_timeout * 1000),
                            accept_timeout_ms=round(config.accept_timeout * 1000),
                            inputs_timeout_ms=round(config.inputs_timeout * 1000),
                            receipt_timeout_ms=round(config.receipt_timeout * 1000),
                        ),
                    ),
                    clock=node.clock,
                    on_capacity=node.set_free_slots,
                )
                node.worker.recover()
                node.rechecker = lambda valid: executor.recheck(valid.evidence.envelope, node.clock())
            # A bootstrap/relay-only peer (serve_jobs = false) sells nothing: no advert, or clients would try it.
            await node.run(advertise=config.serve_jobs, task_status=task_status)
    finally:
        store.close()


MAX_ADVERT_ADDRS = 16  # GpuAdvert.addrs holds 1 … 16


def advert_addrs(
    host: IHost,
    peer: PeerId,
    announce: Sequence[str] = (),
    *,
    observed: Sequence[str] = (),
    relayed: Sequence[str] = (),
) -> tuple[str, ...]:
    """The addresses our adverts carry (specs/reachability.md §2, adverts.md §4 check 8), each ending in our own
    ``/p2p/<id>``: the operator's ``announce`` addresses when set (the only direct ones then: behind NAT the listen
    addresses are private), else the listen addresses, an unspecified one (``0.0.0.0``, ``::``) expanded to this
    machine's interface addresses, plus ``observed`` ones (Identify's, once AutoNAT says we are public); then our
    ``relayed`` addresses (``<relay>/p2p-circuit/p2p/<us>``). Loopback addresses only when there is nothing else (a
    loopback testnet: to anyone else, 127.0.0.1 is their own machine); nothing a receiver would refuse."""
    suffix = f"/p2p/{peer}"
    if announce:
        direct = [a.removesuffix(suffix) for a in announce]
    else:
        listening = [str(a).split("/p2p/")[0] for a in host.get_transport_addrs()]
        direct = dialable_addrs([*listening, *(a.split("/p2p/")[0] for a in observed)])
    out: list[str] = []
    for base in direct:
        _add_checked(out, base + suffix, peer)
    through: list[str] = []
    for addr in relayed:
        if addr.endswith("/p2p-circuit" + suffix):  # through a relay to us, never to someone else
            _add_checked(through, addr, peer)
    # Loopback beside routable is dropped in each list: direct addresses, and relays (by the relay's address).
    return tuple([*_routable_or_all(out), *_routable_or_all(through)][:MAX_ADVERT_ADDRS])


def _routable_or_all(addrs: list[str]) -> list[str]:
    return [a for a in addrs if not is_loopback(a)] or addrs


def _add_checked(out: list[str], addr: str, peer: PeerId) -> None:
    try:
        check_advert_address(addr, peer)
    except RemoteProtocolError as exc:
        log.debug("not advertising %s: %s", addr, exc)
        return
    if addr not in out:
        out.append(addr)


def _report_sandbox(layers: dict[str, str]) -> None:
    """Say once which sandbox layers protect this worker, and warn about each one the kernel does not offer."""
    from p2pcompute.compute.sandbox import describe

    log.info("executor sandbox: %s", describe(layers))
    for name, state in layers.items():
        if state.startswith("unavailable"):
            log.warning('sandbox layer %s is %s; jobs still run (set sandbox = "required" to refuse)', name, state)


def _listen_ip(listen: tuple[str, ...]) -> str:
    """The IP of the first listen address (where the data channel listens too)."""
    parts = listen[0].split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else "0.0.0.0"
