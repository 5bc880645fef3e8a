"""Adverts over gossip (specs/adverts.md): those received go into the market view, our own go out.

:class:`AdvertReceiver` is the adverts topic's validator and keeps the market free of expired adverts;
:class:`Advertiser` publishes this peer's advert, again on every interval and at once when free capacity changes,
and announces its capabilities in the DHT. Validation and the market view themselves are ``core.adverts``.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import prometheus_client
import trio
from libp2p.peer.id import ID

from p2pcompute.compute.gpu import HardwareReport
from p2pcompute.config import NodeConfig
from p2pcompute.core.adverts import MarketView, validate_advert
from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.messages import GpuAdvert
from p2pcompute.errors import (
    LocalProtocolError,
    P2PComputeError,
    Reason,
    RemoteProtocolError,
    ReplayError,
    SignatureError,
)
from p2pcompute.net.discovery import Discovery
from p2pcompute.net.gossip import Gossip
from p2pcompute.net.protocols import ADVERTS_TOPIC
from p2pcompute.services.changes import Changes

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio stubs that do not export TaskStatus.
    from trio_typing import TaskStatus

__all__ = [
    "EXPIRE_INTERVAL_S",
    "FIRST_ADVERT_WAIT_S",
    "IGNORED_REASONS",
    "MIN_CAPACITY_ADVERT_S",
    "TOPIC_PEER_POLL_S",
    "AdvertReceiver",
    "Advertiser",
]

log = logging.getLogger(__name__)

FIRST_ADVERT_WAIT_S = 10.0  # wait this long for a gossip peer before the first advert
TOPIC_PEER_POLL_S = 0.1
MIN_CAPACITY_ADVERT_S = 10.0  # least time between adverts caused by capacity changes (each costs every peer CPU)
EXPIRE_INTERVAL_S = 1.0  # how often expired adverts leave the market
# Adverts refused for these reasons are not the forwarder's fault (see AdvertReceiver.validate).
IGNORED_REASONS = frozenset({Reason.REPLAYED, Reason.STALE_SEQUENCE})


class AdvertReceiver:
    """Adverts from gossip into ``market``: the topic validator, and the expiry of old adverts."""

    def __init__(
        self,
        *,
        peer_id: PeerId,
        market: MarketView,
        gossip: Gossip,
        clock: Callable[[], int],
        received: prometheus_client.Counter,
        changes: Changes,
    ) -> None:
        self._peer_id = peer_id
        self._market = market
        self._gossip = gossip
        self._clock = clock
        self._received = received  # labelled by result
        self._changes = changes

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the adverts topic with :meth:`validate` (gossip must be running); ``started()``; expire adverts."""
        await self._gossip.subscribe(ADVERTS_TOPIC, self.validate)
        task_status.started()
        while True:
            await trio.sleep(EXPIRE_INTERVAL_S)
            for peer in self._market.expire(self._clock()):
                log.info("advert of %s expired", peer)

    def validate(self, origin: ID, data: bytes) -> None:
        """The adverts topic validator: raise to reject (the forwarder's gossip score pays for it)."""
        now = self._clock()
        if origin.to_bytes() == self._peer_id.raw:
            validate_advert(data, now, self._market.policy)  # our own publish: already in our market
            return
        try:
            opened = validate_advert(data, now, self._market.policy)
            if opened.signer.raw != origin.to_bytes():
                raise SignatureError(Reason.SIGNER_MISMATCH, "advert re-published by a peer other than its signer")
            self._market.admit(opened, now)
        except ReplayError as exc:
            if exc.reason not in IGNORED_REASONS:
                self._reject(origin, exc)
            # A validly signed, unexpired advert we already hold or have superseded. Gossip delivers
            # out of order (mesh vs IHAVE/IWANT paths), so this is no evidence against the forwarder:
            # keep the market as it is but let gossip treat the message as valid (0.8.1 has no IGNORE).
            self._received.labels(result=exc.reason.value).inc()
            log.debug("ignored advert from %s: %s", origin, exc)
            self._changes.notify()
            return
        except RemoteProtocolError as exc:
            self._reject(origin, exc)
        self._received.labels(result="accepted").inc()
        self._changes.notify()

    def _reject(self, origin: ID, exc: RemoteProtocolError) -> NoReturn:
        self._received.labels(result=exc.reason.value).inc()
        log.info("rejected advert from %s: %s", origin, exc)
        self._changes.notify()
        raise exc


class Advertiser:
    """This peer's adverts: made from its hardware, free capacity and ``addrs()``, published over gossip; and its
    capabilities announced in the DHT. A client-only peer (no hardware) has one but never runs it."""

    def __init__(
        self,
        config: NodeConfig,
        keypair: KeyPair,
        hardware: HardwareReport | None,
        *,
        market: MarketView,
        gossip: Gossip,
        discovery: Discovery,
        clock: Callable[[], int],
        addrs: Callable[[], tuple[str, ...]],
        published: prometheus_client.Counter,
    ) -> None:
        self._config = config
        self._keypair = keypair
        self._hardware = hardware
        self._market = market
        self._gossip = gossip
        self._discovery = discovery
        self._clock = clock
        self._addrs = addrs  # the addresses an advert carries, asked for each advert
        self._published = published
        self.free_slots = config.slots
        self._seq = 0
        self._capacity_changed = trio.Event()
        self._advert_id = hashlib.sha256(b"p2pcompute/advert-series" + keypair.peer_id.raw).digest()[:16]

    def capabilities(self) -> list[str]:
        """Device kinds this peer offers (none for a client-only peer, which has no hardware report)."""
        if self._hardware is None:
            return []
        return sorted({d.kind.value for d in self._hardware.devices})

    def set_free_slots(self, free: int) -> None:
        """Record a change of free capacity; :meth:`run` re-advertises at once."""
        if free != self.free_slots:
            self.free_slots = max(0, min(free, self._config.slots))
            self._capacity_changed.set()

    def addresses_changed(self) -> None:
        """Our addresses changed (a relay slot taken or lost, reachability found): :meth:`run` re-advertises."""
        self._capacity_changed.set()

    def make_advert(self, now: int) -> bytes:
        if self._hardware is None:
            raise LocalProtocolError(Reason.INCONSISTENT, "a client-only peer has no hardware to advertise")
        self._seq = max(self._seq + 1, now)  # seq = issue time in ms, strictly increasing across restarts
        advert = GpuAdvert(
            id=self._advert_id,
            nonce=secrets.randbits(64),
            expires_at=now + int(self._config.advert_ttl * 1000),
            peer_id=self._keypair.peer_id,
            seq=self._seq,
            issued_at=now,
            addrs=self._addrs(),
            devices=self._hardware.devices,
            price_per_second=self._config.price_per_second,
            slots_total=self._config.slots,
            slots_free=self.free_slots,
            software=self._hardware.software,
        )
        return seal(self._keypair, advert)

    async def publish(self) -> None:
        """Publish an advert now (into our own market too)."""
        now = self._clock()
        data = self.make_advert(now)
        self._market.offer(data, now)
        await self._gossip.publish(ADVERTS_TOPIC, data)
        self._published.inc()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Advertise until cancelled, and announce the capabilities; needs gossip and discovery running."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._advertise)
            nursery.start_soon(self._provide)
            task_status.started()

    async def _advertise(self) -> None:
        # The first advert waits (briefly) for a gossip peer on the topic: published into an empty
        # mesh it would reach nobody. Then one per interval, and one at once whenever free capacity
        # changes. Peers that miss an advert catch up through advert sync, not through re-sends:
        # on 0.8.1 every gossiped message costs each peer milliseconds of CPU.
        if self._config.bootstrap:
            with trio.move_on_after(FIRST_ADVERT_WAIT_S):
                while not self._gossip.topic_peers(ADVERTS_TOPIC):
                    await trio.sleep(TOPIC_PEER_POLL_S)
        while True:
            self._capacity_changed = trio.Event()
            published_at = trio.current_time()
            try:
                await self.publish()
            except (P2PComputeError, trio.TooSlowError) as exc:
                log.warning("could not publish advert: %s", exc)
            with trio.move_on_after(self._config.advertise_interval):
                await self._capacity_changed.wait()
                # Capacity can change with every job: it is re-advertised at once, but at most once every
                # MIN_CAPACITY_ADVERT_S (each gossiped advert costs every peer CPU); the newest capacity goes out.
                await trio.sleep_until(published_at + MIN_CAPACITY_ADVERT_S)

    async def _provide(self) -> None:
        for capability in self.capabilities():
            try:
                await self._discovery.provide(capability)
            except Exception as exc:  # a DHT put can fail in many library-specific ways; retry later
                log.warning("could not announce capability %s: %s", capability, exc)
