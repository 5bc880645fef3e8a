"""A peer: every service in one nursery (host, DHT discovery, advert gossip, status endpoint).

``await serve(config, task_status=...)`` runs until cancelled; ``task_status.started()`` receives a
:class:`NodeInfo` once the peer listens, has joined the adverts topic and published its first advert.
The node decides nothing itself: advert validation and the market view are ``core.adverts``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import h11
import multiaddr
import prometheus_client
import trio
from libp2p.abc import IHost, INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.utils.address_validation import expand_wildcard_address
from prometheus_client.core import CounterMetricFamily, Metric

from p2pcompute import __version__
from p2pcompute.compute.gpu import HardwareReport, load_or_probe
from p2pcompute.config import PROBE_TIMEOUT_S, STATUS_REQUEST_TIMEOUT_S, NodeConfig
from p2pcompute.core import codec
from p2pcompute.core.adverts import MarketView, SyncRequest, check_advert_address, validate_advert
from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.messages import GpuAdvert
from p2pcompute.core.reputation import Outcome, PeerReputation, Reputation
from p2pcompute.core.schema import from_wire, to_wire
from p2pcompute.core.verification import EvidenceInbox, ValidCheckEvidence
from p2pcompute.errors import (
    HostStartError,
    LocalProtocolError,
    P2PComputeError,
    Reason,
    RemoteProtocolError,
    ReplayError,
    SignatureError,
)
from p2pcompute.keys import load_or_create_key
from p2pcompute.net.discovery import Discovery, DiscoveryConfig
from p2pcompute.net.gossip import Gossip, GossipConfig
from p2pcompute.net.host import HostConfig, host_addrs, open_host
from p2pcompute.net.protocols import ADVERTS_SYNC_PROTOCOL, ADVERTS_TOPIC, EVIDENCE_TOPIC, JOB_PROTOCOL
from p2pcompute.net.stream import FramedStream

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
# Named timeouts and bounds of the node's own protocols (seconds unless noted).
FIRST_ADVERT_WAIT_S = 10.0  # wait this long for a gossip peer before the first advert
TOPIC_PEER_POLL_S = 0.1
SYNC_TIMEOUT_S = 10.0  # one whole advert-sync exchange
SYNC_PEERS = 3  # peers asked at start
MIN_RESYNC_INTERVAL_S = 30.0
MAX_CONCURRENT_SYNCS = 8  # sync requests served at once; more are reset
RECHECK_QUEUE = 16  # check evidence waiting to be redone; more is passed on unconfirmed
RECHECK_TIMEOUT_S = 30.0  # redoing one node check
SYNC_REQUEST_MAX_BYTES = 256
CONNECTION_HEADROOM = 32
MIN_CAPACITY_ADVERT_S = 10.0  # least time between adverts caused by capacity changes (each costs every peer CPU)
# Adverts refused for these reasons are not the forwarder's fault (see Node._validate_gossip).
_IGNORED = frozenset({Reason.REPLAYED, Reason.STALE_SEQUENCE})
_MAX_STATUS_REQUEST_BYTES = 16 * 1024


def now_ms() -> int:
    """Wall-clock time in ms since the Unix epoch: adverts carry absolute times."""
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


class _Metrics:
    """Prometheus metrics of one node, in the node's own registry (no global state)."""

    def __init__(self, node: Node) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.adverts_received = prometheus_client.Counter(
            "p2pcompute_adverts_received", "Adverts received over gossip, by result", ["result"], registry=r
        )
        self.evidence_received = prometheus_client.Counter(
            "p2pcompute_evidence_received", "Cheating evidence received over gossip, by result", ["result"], registry=r
        )
        self.adverts_published = prometheus_client.Counter(
            "p2pcompute_adverts_published", "Adverts this peer published", registry=r
        )
        prometheus_client.Gauge("p2pcompute_connected_peers", "Peers with an open connection", registry=r).set_function(
            lambda: len(node.host.get_connected_peers())
        )
        prometheus_client.Gauge(
            "p2pcompute_market_adverts", "Unexpired adverts in the market view", registry=r
        ).set_function(lambda: len(node.market.adverts(now_ms())))
        prometheus_client.Gauge(
            "p2pcompute_routing_table_peers", "Peers in the DHT routing table", registry=r
        ).set_function(lambda: len(node.discovery.routing_table_peers()))
        prometheus_client.Gauge("p2pcompute_free_slots", "Free job slots", registry=r).set_function(
            lambda: node.free_slots
        )
        r.register(_WorkCollector(node))


class _WorkCollector:
    """A worker's slot occupancy and executor time, as counters (read from the worker when scraped)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        worker = self.node.worker
        if worker is None:
            return
        busy = "Slot-seconds held by admitted jobs (utilisation)"
        yield CounterMetricFamily("p2pcompute_slot_busy_seconds", busy, value=worker.slot_busy_s())
        yield CounterMetricFamily("p2pcompute_exec_seconds", "Seconds of job runs", value=worker.exec_s())


class Node:
    """One running peer. Build it with :func:`serve`; tests may use it directly."""

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
        self.reputation = store.load_reputation() if store is not None else Reputation()
        self.evidence = EvidenceInbox()
        # check evidence waiting for its check to be redone (a client: in a thread; a worker: in its executor)
        self.rechecker: Callable[[ValidCheckEvidence], Awaitable[tuple[bool, str]]] | None = None
        self._rechecks_send, self._rechecks_recv = trio.open_memory_channel[ValidCheckEvidence](RECHECK_QUEUE)
        self.keypair = keypair
        self.hardware = hardware
        self.host = host
        self.clock = clock
        self.market = MarketView()
        self.gossip = Gossip(host, GossipConfig())
        self.discovery = Discovery(host, DiscoveryConfig(bootstrap=config.bootstrap))
        self.metrics = _Metrics(self)
        self.free_slots = config.slots
        self.started_at_ms = self.clock()  # the injected clock, as everywhere in the node
        self.status_port: int | None = None
        self.worker: Worker | None = None
        self._last_capacity_advert = 0.0
        self._seq = 0
        self._capacity_changed = trio.Event()
        self._gossip_seen = trio.Event()
        self._sync_limiter = trio.CapacityLimiter(MAX_CONCURRENT_SYNCS)
        self._advert_id = hashlib.sha256(b"p2pcompute/advert-series" + keypair.peer_id.raw).digest()[:16]

    @property
    def peer_id(self) -> PeerId:
        return self.keypair.peer_id

    # --- adverts ---

    def capabilities(self) -> list[str]:
        """Device kinds this peer offers (none for a client-only peer, which has no hardware report)."""
        if self.hardware is None:
            return []
        return sorted({d.kind.value for d in self.hardware.devices})

    def set_free_slots(self, free: int) -> None:
        """Record a change of free capacity; the advertiser re-advertises at once."""
        if free != self.free_slots:
            self.free_slots = max(0, min(free, self.config.slots))
            self._capacity_changed.set()

    def make_advert(self, now: int) -> bytes:
        if self.hardware is None:
            raise LocalProtocolError(Reason.INCONSISTENT, "a client-only peer has no hardware to advertise")
        self._seq = max(self._seq + 1, now)  # seq = issue time in ms, strictly increasing across restarts
        advert = GpuAdvert(
            id=self._advert_id,
            nonce=secrets.randbits(64),
            expires_at=now + int(self.config.advert_ttl * 1000),
            peer_id=self.peer_id,
            seq=self._seq,
            issued_at=now,
            addrs=advert_addrs(self.host, self.peer_id, self.config.announce),
            devices=self.hardware.devices,
            price_per_second=self.config.price_per_second,
            slots_total=self.config.slots,
            slots_free=self.free_slots,
            software=self.hardware.software,
        )
        return seal(self.keypair, advert)

    def _validate_gossip(self, origin: ID, data: bytes) -> None:
        """The adverts topic validator: raise to reject (the forwarder's gossip score pays for it)."""
        now = self.clock()
        if origin.to_bytes() == self.peer_id.raw:
            validate_advert(data, now, self.market.policy)  # our own publish: already in our market
            return
        try:
            opened = validate_advert(data, now, self.market.policy)
            if opened.signer.raw != origin.to_bytes():
                raise SignatureError(Reason.SIGNER_MISMATCH, "advert re-published by a peer other than its signer")
            self.market.admit(opened, now)
        except ReplayError as exc:
            if exc.reason not in _IGNORED:
                self._reject(origin, exc)
            # A validly signed, unexpired advert we already hold or have superseded. Gossip delivers
            # out of order (mesh vs IHAVE/IWANT paths), so this is no evidence against the forwarder:
            # keep the market as it is but let gossip treat the message as valid (0.8.1 has no IGNORE).
            self.metrics.adverts_received.labels(result=exc.reason.value).inc()
            log.debug("ignored advert from %s: %s", origin, exc)
            self.notify_waiters()
            return
        except RemoteProtocolError as exc:
            self._reject(origin, exc)
        self.metrics.adverts_received.labels(result="accepted").inc()
        self.notify_waiters()

    def _reject(self, origin: ID, exc: RemoteProtocolError) -> NoReturn:
        self.metrics.adverts_received.labels(result=exc.reason.value).inc()
        log.info("rejected advert from %s: %s", origin, exc)
        self.notify_waiters()
        raise exc

    # --- evidence of cheating (specs/verification.md) ---

    def record_outcome(self, peer: PeerId, outcome: Outcome, *, flops: int = 0, group: str = "") -> PeerReputation:
        """Apply an own observation of ``peer`` to its reputation, persisted when the node has a store.

        ``flops``: the checked work a valid result earns (0: unchecked, no trust); ``group``: its address group."""
        record = self.reputation.record(peer, outcome, self.clock(), flops=flops, group=group)
        if self.store is not None:
            self.store.save_reputation(record)
        return record

    def _validate_evidence(self, origin: ID, data: bytes) -> None:
        """The evidence topic validator: every signature is checked before anything changes; raise to reject."""
        now = self.clock()
        try:
            valid = self.evidence.receive(data, now)
        except ReplayError as exc:
            if exc.reason is Reason.REPLAYED:
                return  # a copy gossip delivered twice: no change, no penalty
            self.metrics.evidence_received.labels(result=exc.reason.value).inc()
            raise
        except RemoteProtocolError as exc:
            self.metrics.evidence_received.labels(result=exc.reason.value).inc()
            log.info("rejected evidence from %s: %s", origin, exc)
            raise
        if valid.reporter == self.peer_id:
            return  # our own report: already applied as an own observation
        if isinstance(valid, ValidCheckEvidence):
            # signatures, proofs and tensors hold; whether the node really fails needs the check redone (torch):
            # queued, and counted only once confirmed. The message itself is passed on either way.
            try:
                self._rechecks_send.send_nowait(valid)
            except trio.WouldBlock:
                self.metrics.evidence_received.labels(result="recheck_queue_full").inc()
                log.info("check evidence against %s not rechecked: the queue is full", valid.accused)
            return
        effect = self.reputation.record_report(valid.reporter, valid.accused, valid.job_digest, now)
        if self.store is not None:
            self.store.save_reputation(self.reputation.get(valid.accused))
        self.metrics.evidence_received.labels(result=effect.value).inc()
        log.info("evidence from %s against %s (%s): %s", valid.reporter, valid.accused, valid.strength, effect.value)
        self.notify_waiters()

    async def _recheck_evidence(self) -> None:
        """Redo the checks of received check evidence (``rechecker``) and count what they confirm."""
        async for valid in self._rechecks_recv:
            if self.rechecker is None:
                self.metrics.evidence_received.labels(result="not_rechecked").inc()
                log.info("check evidence against %s kept unconfirmed: this peer cannot redo checks", valid.accused)
                continue
            try:
                with trio.fail_after(RECHECK_TIMEOUT_S):
                    confirmed, detail = await self.rechecker(valid)
            except (trio.TooSlowError, P2PComputeError) as exc:
                log.info("rechecking evidence against %s failed: %s", valid.accused, exc)
                continue
            now = self.clock()
            if confirmed:
                effect = self.reputation.record_report(valid.reporter, valid.accused, valid.job_digest, now)
                if self.store is not None:
                    self.store.save_reputation(self.reputation.get(valid.accused))
                self.metrics.evidence_received.labels(result=f"check_{effect.value}").inc()
                log.info("check evidence from %s against %s confirmed: %s", valid.reporter, valid.accused, detail)
            else:
                self.record_outcome(valid.reporter, Outcome.BAD_EVIDENCE)
                self.metrics.evidence_received.labels(result="check_refuted").inc()
                log.info("check evidence from %s against %s refuted: %s", valid.reporter, valid.accused, detail)
            self.notify_waiters()

    async def publish_evidence(self, data: bytes) -> None:
        await self.gossip.publish(EVIDENCE_TOPIC, data)

    def notify_waiters(self) -> None:
        """Wake every :meth:`wait_for` to re-check its predicate (an advert arrived, or a client's room changed)."""
        self._gossip_seen.set()
        self._gossip_seen = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checking after every advert received (put a timeout around it)."""
        while not predicate():
            await self._gossip_seen.wait()

    async def publish_advert(self) -> None:
        now = self.clock()
        data = self.make_advert(now)
        self.market.offer(data, now)
        await self.gossip.publish(ADVERTS_TOPIC, data)
        self.metrics.adverts_published.inc()

    async def _advertise(self) -> None:
        # The first advert waits (briefly) for a gossip peer on the topic: published into an empty
        # mesh it would reach nobody. Then one per interval, and one at once whenever free capacity
        # changes. Peers that miss an advert catch up through advert sync, not through re-sends:
        # on 0.8.1 every gossiped message costs each peer milliseconds of CPU.
        if self.config.bootstrap:
            with trio.move_on_after(FIRST_ADVERT_WAIT_S):
                while not self.gossip.topic_peers(ADVERTS_TOPIC):
                    await trio.sleep(TOPIC_PEER_POLL_S)
        while True:
            self._capacity_changed = trio.Event()
            published_at = trio.current_time()
            try:
                await self.publish_advert()
            except (P2PComputeError, trio.TooSlowError) as exc:
                log.warning("could not publish advert: %s", exc)
            with trio.move_on_after(self.config.advertise_interval):
                await self._capacity_changed.wait()
                # Capacity can change with every job: it is re-advertised at once, but at most once every
                # MIN_CAPACITY_ADVERT_S (each gossiped advert costs every peer CPU); the newest capacity goes out.
                await trio.sleep_until(published_at + MIN_CAPACITY_ADVERT_S)

    # --- advert sync: a joining peer catches up on the adverts others already hold ---

    async def _handle_sync(self, stream: INetStream) -> None:
        """Serve ``/p2pcompute/adverts-sync/1.0.0``: one request frame in, advert frames and an empty frame out."""
        if self._sync_limiter.statistics().borrowed_tokens >= self._sync_limiter.total_tokens:
            await stream.reset()  # bounded: never queue up work for a flood of sync requests
            return
        async with self._sync_limiter:
            framed = FramedStream(stream, max_frame_size=SYNC_REQUEST_MAX_BYTES)
            try:
                with trio.fail_after(SYNC_TIMEOUT_S):
                    frame = await framed.receive()
                    if frame is None:
                        return
                    request = from_wire(SyncRequest, codec.unpack(frame))
                    framed = FramedStream(stream)
                    for entry in self.market.adverts(self.clock())[: request.max_adverts]:
                        await framed.send(entry.opened.envelope)
                    await framed.send(b"")
            except (P2PComputeError, BaseLibp2pError, trio.TooSlowError, OSError) as exc:
                log.info("advert sync request from %s failed: %s", stream.muxed_conn.peer_id, exc)
            finally:
                with trio.move_on_after(SYNC_TIMEOUT_S), contextlib.suppress(BaseLibp2pError):
                    await stream.close()

    async def sync_from(self, peer: ID) -> int:
        """Fetch the adverts ``peer`` holds into our market; returns how many were new to us."""
        accepted = 0
        with trio.fail_after(SYNC_TIMEOUT_S):
            stream = await self.host.new_stream(peer, [ADVERTS_SYNC_PROTOCOL])
            try:
                framed = FramedStream(stream)
                await framed.send(codec.pack(to_wire(SyncRequest(max_adverts=self.market.policy.max_peers))))
                for _ in range(self.market.policy.max_peers + 1):
                    frame = await framed.receive()
                    if not frame:  # empty frame: end of the list; None: the peer closed early
                        break
                    try:
                        self.market.offer(frame, self.clock())
                        accepted += 1
                    except RemoteProtocolError as exc:
                        if exc.reason not in _IGNORED:
                            log.info("sync from %s: dropped an advert: %s", peer, exc)
            finally:
                await stream.close()
        if accepted:
            self.notify_waiters()
        return accepted

    async def _sync(self) -> None:
        """Catch up from a few connected peers at start, then from one random peer now and then."""
        while True:
            peers = list(self.host.get_connected_peers())
            random.shuffle(peers)
            for peer in peers[:SYNC_PEERS]:
                try:
                    n = await self.sync_from(peer)
                    log.debug("synced %d adverts from %s", n, peer)
                except (P2PComputeError, BaseLibp2pError, trio.TooSlowError, OSError) as exc:
                    # a peer that is still starting, gone, or speaks another version: try others later
                    log.info("advert sync from %s failed: %s", peer, exc)
            await trio.sleep(max(self.config.advertise_interval * 2, MIN_RESYNC_INTERVAL_S))

    async def _drain_gossip(self) -> None:
        # Validation already put adverts into the market; the channel only needs emptying.
        async for _ in self.gossip.messages:
            pass

    async def _expire_market(self) -> None:
        while True:
            await trio.sleep(1.0)
            for peer in self.market.expire(self.clock()):
                log.info("advert of %s expired", peer)

    async def _provide(self) -> None:
        for capability in self.capabilities():
            try:
                await self.discovery.provide(capability)
            except Exception as exc:  # a DHT put can fail in many library-specific ways; retry later
                log.warning("could not announce capability %s: %s", capability, exc)

    # --- status ---

    def status(self) -> dict[str, Any]:
        now = self.clock()
        market = []
        for entry in self.market.adverts(now):
            a = entry.advert
            market.append(
                {
                    "peer_id": str(entry.peer_id),
                    "devices": [
                        {"kind": d.kind.value, "name": d.name, "memory_bytes": d.memory_bytes, "tflops": d.tflops}
                        for d in a.devices
                    ],
                    "tflops": round(sum(d.tflops for d in a.devices), 4),
                    "price_per_second": a.price_per_second,
                    "slots_free": a.slots_free,
                    "slots_total": a.slots_total,
                    "seq": a.seq,
                    "advert_age_s": round((now - a.issued_at) / 1000, 3),
                    "expires_in_s": round((a.expires_at - now) / 1000, 3),
                    "addrs": list(a.addrs),
                }
            )
        return {
            "version": __version__,
            "peer_id": str(self.peer_id),
            "addrs": host_addrs(self.host),
            "uptime_s": round((self.clock() - self.started_at_ms) / 1000, 3),
            "connected_peers": sorted(str(p) for p in self.host.get_connected_peers()),
            "routing_table_peers": len(self.discovery.routing_table_peers()),
            "capabilities": self.capabilities(),
            "free_slots": self.free_slots,
            "jobs": self.worker.status() if self.worker is not None else None,
            "market": market,
        }

    async def _serve_status(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve /status and /metrics on 127.0.0.1. When the configured port is taken (a second node on this
        machine), take any free port instead and say so: the endpoint is local, and node.json and the start-up
        output name the port. Only when no port at all can be had does the node refuse to start."""
        wanted = self.config.status_port
        try:
            listeners = await trio.open_tcp_listeners(wanted, host="127.0.0.1")
        except OSError as exc:
            if wanted == 0:
                raise HostStartError(f"cannot serve status on 127.0.0.1: {exc.strerror or exc}") from exc
            try:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            except OSError as again:
                raise HostStartError(f"cannot serve status on 127.0.0.1: {again.strerror or again}") from again
            log.warning(
                "status port %d on 127.0.0.1 is not available (%s); serving status on port %d instead "
                "(choose one with --status-port or status_port)",
                wanted, exc.strerror or exc, listeners[0].socket.getsockname()[1],
            )  # fmt: skip
        port = listeners[0].socket.getsockname()[1]
        task_status.started(port)
        await trio.serve_listeners(self._handle_status_connection, listeners)

    async def _handle_status_connection(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(STATUS_REQUEST_TIMEOUT_S):
            try:
                await _answer_http(stream, self._route)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                log.debug("status connection failed: %s", exc)
        await trio.aclose_forcefully(stream)

    def _route(self, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if path in ("/", "/status"):
            return 200, "application/json", json.dumps(self.status(), indent=2).encode()
        if path == "/metrics":
            return 200, prometheus_client.CONTENT_TYPE_LATEST, prometheus_client.generate_latest(self.metrics.registry)
        return 404, "text/plain", b"not found: try /status or /metrics\n"

    # --- lifecycle ---

    async def run(
        self,
        *,
        advertise: bool = True,
        serve_status: bool = True,
        task_status: TaskStatus[NodeInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run every service; a client-only peer runs with ``advertise=False`` (it reads the market only)."""
        async with trio.open_nursery() as nursery:
            # Pubsub must run before any connection is made (0.8.1 ignores earlier connections).
            await nursery.start(self.gossip.run)
            await self.gossip.subscribe(ADVERTS_TOPIC, self._validate_gossip)
            await self.gossip.subscribe(EVIDENCE_TOPIC, self._validate_evidence)
            self.host.set_stream_handler(ADVERTS_SYNC_PROTOCOL, self._handle_sync)  # before any dial
            if self.worker is not None:
                self.host.set_stream_handler(JOB_PROTOCOL, self.worker.handle_stream)
                await nursery.start(self.worker.data.serve)
            await nursery.start(self.discovery.run)
            if serve_status:
                self.status_port = await nursery.start(self._serve_status)
            nursery.start_soon(self._drain_gossip)
            nursery.start_soon(self._recheck_evidence)
            nursery.start_soon(self._expire_market)
            nursery.start_soon(self._sync)
            if advertise:
                nursery.start_soon(self._advertise)
                nursery.start_soon(self._provide)
            info = NodeInfo(
                peer_id=str(self.peer_id),
                addrs=advert_addrs(self.host, self.peer_id, self.config.announce) or tuple(host_addrs(self.host)),
                status_url=f"http://127.0.0.1:{self.status_port}/status" if serve_status else "",
                sandbox=tuple(self.worker.executor.sandbox.items()) if self.worker is not None else (),
            )
            if serve_status:
                _write_node_info(self.config.data_dir, info)
            task_status.started(info)


async def _answer_http(stream: trio.SocketStream, route: Callable[[str], tuple[int, str, bytes]]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_STATUS_REQUEST_BYTES)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            if event.method != b"GET":
                status, ctype, body = 405, "text/plain", b"only GET\n"
            else:
                status, ctype, body = route(event.target.decode("ascii", "replace"))
            headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close")]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        return


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
            await node.run(task_status=task_status)
    finally:
        store.close()


MAX_ADVERT_ADDRS = 16  # GpuAdvert.addrs holds 1 … 16


def advert_addrs(host: IHost, peer: PeerId, announce: Sequence[str] = ()) -> tuple[str, ...]:
    """The addresses our adverts carry (specs/adverts.md §4 check 8), each ending in our own ``/p2p/<id>``: the
    operator's ``announce`` addresses when set (the only ones then: behind NAT the listen addresses are private),
    else the host's, with an unspecified listen address (``0.0.0.0``, ``::``) expanded to this machine's interface
    addresses; loopback addresses only when there is nothing else (a loopback testnet: to anyone else,
    127.0.0.1 is their own machine); nothing a receiver would refuse."""
    suffix = f"/p2p/{peer}"
    out: list[str] = []
    if announce:
        return tuple(dict.fromkeys(a.removesuffix(suffix) + suffix for a in announce))[:MAX_ADVERT_ADDRS]
    for addr in host_addrs(host):
        base = addr.removesuffix(suffix)
        candidates = [base]
        parts = base.split("/")  # "", "ip4", "0.0.0.0", "tcp", "4001"
        if len(parts) > 2 and parts[1] in ("ip4", "ip6") and _is_unspecified(parts[2]):
            expanded = [str(m) for m in expand_wildcard_address(multiaddr.Multiaddr(base))]
            loopback = "/".join(["", parts[1], "127.0.0.1" if parts[1] == "ip4" else "::1", *parts[3:]])
            candidates = [a for a in expanded if a != base] or [loopback]
        for candidate in candidates:
            full = candidate + suffix
            try:
                check_advert_address(full, peer)
            except RemoteProtocolError as exc:
                log.debug("not advertising %s: %s", full, exc)
                continue
            if full not in out:
                out.append(full)
    routable = [a for a in out if not _is_loopback(a)]
    return tuple((routable or out)[:MAX_ADVERT_ADDRS])


def _is_loopback(addr: str) -> bool:
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


def advert_table(status: dict[str, Any]) -> list[dict[str, str]]:
    """Rows for a human table of a status document's market view."""
    rows = []
    for entry in status.get("market", []):
        devices = ", ".join(d["name"] for d in entry["devices"])
        rows.append(
            {
                "peer": entry["peer_id"][-12:],
                "devices": devices[:40],
                "TFLOPS": f"{entry['tflops']:.3f}",
                "price/s": f"{entry['price_per_second'] / 1_000_000:.6f}",
                "slots": f"{entry['slots_free']}/{entry['slots_total']}",
                "advert age": f"{entry['advert_age_s']:.1f} s",
            }
        )
    return rows
