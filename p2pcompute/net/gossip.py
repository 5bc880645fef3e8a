"""Gossip: GossipSub with real parameters, a validator that raises, a bounded inbox, paced publishing.

Run it in a nursery next to its host::

    gossip = Gossip(host)
    await nursery.start(gossip.run)
    await gossip.subscribe(ADVERTS_TOPIC, validate_advert)   # validate_advert(origin, data) raises
    await gossip.publish(ADVERTS_TOPIC, advert_bytes)
    async for message in gossip.messages:
        ...

What this adapter sets against py-libp2p 0.8.1's defaults:

* **Heartbeat 1 s** (0.8.1: 120 s) and ``adaptive_gossip_enabled=False``: the adaptive mode rewrites the
  heartbeat to 30-60 s whenever it rates the network unhealthy.
* **Peer scoring with finite thresholds** (0.8.1: all ``-inf``, and every weight and cap 0, so nothing
  counts). A rejected message calls ``scorer.on_invalid_message(forwarder, topic)``; with a non-zero
  P4 weight and cap that lowers the forwarder's score, and below the thresholds we stop gossiping
  with it, stop forwarding its messages, then ignore it.
* **Validators signal rejection by returning False** in 0.8.1 (an exception escaping a sync validator
  is not caught by the library). We take ``validator(origin, data)`` that *raises* to reject, and turn
  that into ``False`` after logging the reason. The size cap is checked first.
* **Own publishes are paced** under ``max_messages_per_topic_per_second``: 0.8.1's spam check counts
  our own publishes too, drops the excess silently, and penalises our own score for it.
* Pubsub only hears of connections made after it exists, and opens its side of a peer's stream only
  on that event: :meth:`Gossip.run` creates it, opens streams to every peer already connected
  (``ensure_peer_stream``), answers an inbound pubsub stream by opening ours, and retries stragglers.
* **Shutdown in order.** 0.8.1 reads each inbound pubsub stream in a task of the *swarm's* nursery, and
  that task spawns into pubsub's own nursery (``manager.run_task(push_msg, ...)``) for every message it
  reads. Cancelled together, pubsub's task nursery could close while such a reader still ran, and the
  reader's next message raised ``RuntimeError: Nursery is closed to new arrivals`` out of the host. So
  the services run shielded from the caller's cancellation, and on the way out we first refuse new
  pubsub streams, cancel and await every stream reader, and only then stop pubsub and the router
  (bounded by ``close_timeout_s``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio
from libp2p.abc import IHost, INetStream, ISubscriptionAPI
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.tools.anyio_service import background_trio_service

from p2pcompute.errors import GossipError, MessageTooLarge
from p2pcompute.net.protocols import GOSSIPSUB_PROTOCOLS

__all__ = [
    "Gossip",
    "GossipConfig",
    "GossipMessage",
    "ScoreConfig",
    "Validator",
]

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio-stubs that shadow trio's own types and do not
    # re-export TaskStatus.
    from trio_typing import TaskStatus

logger = logging.getLogger(__name__)

#: ``validator(origin, data)`` returns to accept and raises (any ``Exception``) to reject. ``origin`` is
#: the author of the message, authenticated by its pubsub signature (not the peer that relayed it).
Validator = Callable[[ID, bytes], None]

DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024
DEFAULT_INBOX_CAPACITY: Final = 256
DEFAULT_HEARTBEAT_INTERVAL_S: Final = 1
#: py-libp2p 0.8.1's per-(forwarder, topic) spam limit; every peer of a network must use the same value.
DEFAULT_MAX_MESSAGES_PER_TOPIC_PER_S: Final = 10
DEFAULT_PUBLISH_TIMEOUT_S: Final = 5.0
DEFAULT_PEER_STREAM_TIMEOUT_S: Final = 10.0
DEFAULT_SEEN_TTL_S: Final = 120
#: Stopping: the stream readers, then pubsub and the router (each bound separately).
DEFAULT_CLOSE_TIMEOUT_S: Final = 5.0
#: How often connected peers without a pubsub stream are tried again (they may not run gossip at all).
PEER_RECONCILE_INTERVAL_S: Final = 30.0
#: Pacing keeps one message of headroom under the limit, and widens the window a little because
#: 0.8.1 measures it with the wall clock (time.time) and we with trio's monotonic clock.
_PACING_HEADROOM: Final = 1
_PACING_WINDOW_S: Final = 1.05


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    """Gossipsub v1.1 peer-score weights (decays are per heartbeat) and thresholds.

    One invalid message costs ``invalid_message_weight`` points. With the defaults a peer that sent
    one bad message is just at the gossip threshold; 6 take it under the publish threshold (we no longer
    forward its messages nor accept what it forwards), 9 under the graylist threshold.
    """

    invalid_message_weight: float = 10.0
    invalid_message_cap: float = 100.0
    invalid_message_decay: float = 0.99
    first_delivery_weight: float = 1.0
    first_delivery_cap: float = 20.0
    first_delivery_decay: float = 0.9
    time_in_mesh_weight: float = 0.1
    time_in_mesh_cap: float = 10.0
    time_in_mesh_decay: float = 0.99
    behaviour_penalty_weight: float = 1.0
    behaviour_penalty_threshold: float = 0.0
    behaviour_penalty_decay: float = 0.9
    #: 0 by default: testnets put every peer on one IP, where colocation would be punished.
    ip_colocation_weight: float = 0.0
    ip_colocation_threshold: int = 10
    gossip_threshold: float = -10.0
    publish_threshold: float = -50.0
    graylist_threshold: float = -80.0
    accept_px_threshold: float = 10.0

    def __post_init__(self) -> None:
        thresholds = (self.gossip_threshold, self.publish_threshold, self.graylist_threshold)
        if not all(math.isfinite(t) for t in (*thresholds, self.accept_px_threshold)):
            raise ValueError("score thresholds must be finite")
        if not self.graylist_threshold < self.publish_threshold <= self.gossip_threshold <= 0:
            raise ValueError("need graylist < publish <= gossip <= 0")
        if self.invalid_message_weight <= 0 or self.invalid_message_cap <= 0:
            raise ValueError("invalid messages must cost something")

    def score_params(self) -> ScoreParams:
        return ScoreParams(
            p1_time_in_mesh=TopicScoreParams(
                weight=self.time_in_mesh_weight, cap=self.time_in_mesh_cap, decay=self.time_in_mesh_decay
            ),
            p2_first_message_deliveries=TopicScoreParams(
                weight=self.first_delivery_weight,
                cap=self.first_delivery_cap,
                decay=self.first_delivery_decay,
            ),
            # 0.8.1 scores P3 as a reward, not as the spec's delivery-deficit penalty: left off.
            p3_mesh_message_deliveries=TopicScoreParams(weight=0.0, cap=0.0, decay=1.0),
            # Subtracted by 0.8.1: weight * min(count, cap).
            p4_invalid_messages=TopicScoreParams(
                weight=self.invalid_message_weight,
                cap=self.invalid_message_cap,
                decay=self.invalid_message_decay,
            ),
            p5_behavior_penalty_weight=self.behaviour_penalty_weight,
            p5_behavior_penalty_decay=self.behaviour_penalty_decay,
            p5_behavior_penalty_threshold=self.behaviour_penalty_threshold,
            p7_ip_colocation_weight=self.ip_colocation_weight,
            p7_ip_colocation_threshold=self.ip_colocation_threshold,
            publish_threshold=self.publish_threshold,
            gossip_threshold=self.gossip_threshold,
            graylist_threshold=self.graylist_threshold,
            accept_px_threshold=self.accept_px_threshold,
        )


@dataclass(frozen=True, slots=True)
class GossipConfig:
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    #: Whole seconds: 0.8.1 types it ``int``.
    heartbeat_interval_s: int = DEFAULT_HEARTBEAT_INTERVAL_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    inbox_capacity: int = DEFAULT_INBOX_CAPACITY
    max_messages_per_topic_per_s: int = DEFAULT_MAX_MESSAGES_PER_TOPIC_PER_S
    publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S
    peer_stream_timeout_s: float = DEFAULT_PEER_STREAM_TIMEOUT_S
    seen_ttl_s: int = DEFAULT_SEEN_TTL_S
    close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def __post_init__(self) -> None:
        if not 0 < self.degree_low <= self.degree <= self.degree_high:
            raise ValueError("need 0 < degree_low <= degree <= degree_high")
        if self.heartbeat_interval_s < 1:
            raise ValueError("heartbeat_interval_s must be >= 1")
        if self.max_messages_per_topic_per_s <= _PACING_HEADROOM:
            raise ValueError(f"max_messages_per_topic_per_s must be > {_PACING_HEADROOM}")
        if min(self.max_message_bytes, self.inbox_capacity, self.seen_ttl_s) < 1:
            raise ValueError("sizes and capacities must be >= 1")
        if min(self.publish_timeout_s, self.peer_stream_timeout_s, self.close_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """A message that passed the signature check, the size cap and the topic's validator."""

    topic: str
    data: bytes
    #: Author, authenticated by the pubsub signature.
    origin: ID
    seqno: bytes


class Gossip:
    """Pubsub + GossipSub service of one host. Start it with ``await nursery.start(gossip.run)``."""

    def __init__(self, host: IHost, config: GossipConfig = GossipConfig()) -> None:
        self._host = host
        self._config = config
        self._router = GossipSub(
            protocols=list(GOSSIPSUB_PROTOCOLS),
            degree=config.degree,
            degree_low=config.degree_low,
            degree_high=config.degree_high,
            heartbeat_interval=config.heartbeat_interval_s,
            score_params=config.score.score_params(),
            adaptive_gossip_enabled=False,
            max_messages_per_topic_per_second=float(config.max_messages_per_topic_per_s),
        )
        self._pubsub: Pubsub | None = None
        self._nursery: trio.Nursery | None = None
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[GossipMessage](config.inbox_capacity)
        self._published: dict[str, deque[float]] = {}
        self._validators: dict[str, Validator] = {}
        self._dropped = 0
        # Inbound pubsub stream readers (they run in the swarm's tasks, see the module docstring).
        self._readers: set[trio.CancelScope] = set()
        self._readers_gone = trio.Event()
        self._closing = False

    @property
    def messages(self) -> trio.MemoryReceiveChannel[GossipMessage]:
        """Accepted messages of every subscribed topic, our own excluded. Bounded: when the consumer
        falls behind, new messages are dropped and counted in :attr:`dropped`."""
        return self._inbox_recv

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def pubsub(self) -> Pubsub:
        if self._pubsub is None:
            raise GossipError("gossip is not running")
        return self._pubsub

    @property
    def router(self) -> GossipSub:
        return self._router

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. ``started()`` once pubsub streams to already-connected peers are open.

        Leaving (cancelled or not) stops the pubsub stream readers first, then pubsub, within
        ``2 * close_timeout_s``; the host stays up.
        """
        if self._closing:
            raise GossipError("a Gossip runs once; make a new one")
        # Created here, not in __init__: its notifee blocks the swarm until the service reads it.
        pubsub = Pubsub(self._host, self._router, seen_ttl=self._config.seen_ttl_s)
        register_send, register_recv = trio.open_memory_channel[ID](self._config.inbox_capacity)
        self._wrap_stream_handlers(pubsub, register_send)
        stop = trio.Event()
        async with trio.open_nursery() as services:
            try:
                await services.start(self._run_services, pubsub, stop)
                self._pubsub = pubsub
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    async with trio.open_nursery() as streams:
                        for peer_id in self._host.get_connected_peers():
                            streams.start_soon(self._ensure_peer_stream, peer_id)
                    nursery.start_soon(self._register_peers, register_recv)
                    nursery.start_soon(self._reconcile_peers, register_send)
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._nursery = None
                self._pubsub = None
                self._inbox_send.close()
                register_send.close()
                try:
                    await self._stop_readers()
                finally:
                    stop.set()  # the services stop only now, after the readers

    async def _run_services(
        self, pubsub: Pubsub, stop: trio.Event, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Pubsub and the router, shielded from the caller's cancellation: they stop when ``stop`` is set
        (after the stream readers are gone), within ``close_timeout_s``."""
        with trio.CancelScope(shield=True) as scope:
            async with background_trio_service(pubsub), background_trio_service(self._router):
                with trio.fail_after(self._config.peer_stream_timeout_s):
                    await pubsub.wait_until_ready()
                task_status.started()
                await stop.wait()
                scope.deadline = trio.current_time() + self._config.close_timeout_s
        if scope.cancelled_caught:
            logger.warning("gossip did not stop within %.1f s", self._config.close_timeout_s)

    async def _stop_readers(self) -> None:
        """Refuse new pubsub streams, cancel every stream reader and wait (bounded) until all have left."""
        self._closing = True
        for reader in self._readers:
            reader.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(self._config.close_timeout_s) as bound:
            if self._readers:
                await self._readers_gone.wait()
        if bound.cancelled_caught:
            logger.warning("%d pubsub stream readers did not stop in time", len(self._readers))

    async def subscribe(self, topic: str, validator: Validator | None = None) -> None:
        """Join ``topic``; its accepted messages go to :attr:`messages`. Idempotent per topic."""
        pubsub = self.pubsub
        if self._nursery is None:
            raise GossipError("gossip is not running")
        if topic in pubsub.topic_ids:
            return
        if validator is not None:
            self._validators[topic] = validator
        pubsub.set_topic_validator(topic, self._make_validator(topic, validator), is_async_validator=False)
        subscription = await pubsub.subscribe(topic)
        self._nursery.start_soon(self._pump, topic, subscription)

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and send ``data`` on ``topic``, waiting (< 1.1 s) if we are at the per-topic rate limit.

        Raises :class:`MessageTooLarge` over the size cap, and whatever the topic's validator raises
        (0.8.1 runs it on our own publishes too, and would drop a rejected one silently).
        """
        if len(data) > self._config.max_message_bytes:
            raise MessageTooLarge(f"{len(data)} bytes > {self._config.max_message_bytes}")
        validator = self._validators.get(topic)
        if validator is not None:
            validator(self._host.get_id(), data)
        await self._pace(topic)
        pubsub = self.pubsub  # after pacing: gossip may have stopped meanwhile
        with trio.fail_after(self._config.publish_timeout_s):
            await pubsub.publish(topic, data)

    def peer_score(self, peer_id: ID, topic: str) -> float:
        """Our gossipsub score of ``peer_id`` on ``topic`` (0 for an unknown peer)."""
        scorer = self._router.scorer
        return scorer.score(peer_id, [topic]) if scorer is not None else 0.0

    def topic_peers(self, topic: str) -> set[ID]:
        """Connected peers that told us they subscribe to ``topic``."""
        return set(self.pubsub.peer_topics.get(topic, set()))

    def mesh_peers(self, topic: str) -> set[ID]:
        return set(self._router.mesh.get(topic, set()))

    # -- internals -----------------------------------------------------------------------------------

    def _make_validator(self, topic: str, validator: Validator | None) -> Callable[[ID, rpc_pb2.Message], bool]:
        max_bytes = self._config.max_message_bytes

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            origin = ID(msg.from_id)
            if len(msg.data) > max_bytes:
                logger.info(
                    "rejected %d-byte message on %s from %s via %s: over %d bytes",
                    len(msg.data), topic, origin, forwarder, max_bytes,
                )  # fmt: skip
                return False
            if validator is None:
                return True
            try:
                validator(origin, msg.data)
            except Exception as exc:
                logger.info("rejected message on %s from %s via %s: %r", topic, origin, forwarder, exc)
                return False
            return True

        return validate

    async def _pump(self, topic: str, subscription: ISubscriptionAPI) -> None:
        local_id = self._host.get_id()
        async for msg in subscription:
            origin = ID(msg.from_id)
            if origin == local_id:
                continue
            message = GossipMessage(topic=topic, data=bytes(msg.data), origin=origin, seqno=bytes(msg.seqno))
            try:
                self._inbox_send.send_nowait(message)
            except trio.WouldBlock:
                self._dropped += 1
                logger.warning("gossip inbox full; dropped a message on %s (%d so far)", topic, self._dropped)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _pace(self, topic: str) -> None:
        limit = self._config.max_messages_per_topic_per_s - _PACING_HEADROOM
        sent = self._published.setdefault(topic, deque())
        while True:
            now = trio.current_time()
            while sent and now - sent[0] >= _PACING_WINDOW_S:
                sent.popleft()
            if len(sent) < limit:
                sent.append(now)
                return
            await trio.sleep_until(sent[0] + _PACING_WINDOW_S)

    def _wrap_stream_handlers(self, pubsub: Pubsub, register: trio.MemorySendChannel[ID]) -> None:
        """Inbound pubsub streams: read under a cancel scope of ours, refused once we are closing.

        An inbound stream from a peer we have no outbound stream to also asks us to open one: 0.8.1
        opens our side only on a ``connected`` event, so a peer whose pubsub started after the
        connection (or whose first attempt found no handler yet) would stay one-way forever.
        """

        async def handle(stream: INetStream) -> None:
            if self._closing:
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            peer_id = stream.muxed_conn.peer_id
            if peer_id not in pubsub.peers:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    register.send_nowait(peer_id)
            with trio.CancelScope() as reader:
                self._readers.add(reader)
                try:
                    await pubsub.stream_handler(stream)
                finally:
                    self._readers.discard(reader)
                    if self._closing and not self._readers:
                        self._readers_gone.set()
            if reader.cancelled_caught:
                with contextlib.suppress(Exception):
                    await stream.reset()

        for protocol in self._router.get_protocols():
            self._host.set_stream_handler(protocol, handle)

    async def _register_peers(self, receive: trio.MemoryReceiveChannel[ID]) -> None:
        in_flight: set[ID] = set()

        async def register(peer_id: ID) -> None:
            try:
                await self._ensure_peer_stream(peer_id)
            finally:
                in_flight.discard(peer_id)

        async with trio.open_nursery() as nursery, receive:
            async for peer_id in receive:
                if peer_id in in_flight or peer_id in self.pubsub.peers:
                    continue
                in_flight.add(peer_id)
                nursery.start_soon(register, peer_id)

    async def _reconcile_peers(self, register: trio.MemorySendChannel[ID]) -> None:
        """Safety net: now and then, retry connected peers that still have no pubsub stream."""
        while True:
            await trio.sleep(PEER_RECONCILE_INTERVAL_S)
            for peer_id in self._host.get_connected_peers():
                if peer_id not in self.pubsub.peers:
                    with contextlib.suppress(trio.WouldBlock):
                        register.send_nowait(peer_id)

    async def _ensure_peer_stream(self, peer_id: ID) -> None:
        if not await self.pubsub.ensure_peer_stream(peer_id, timeout=self._config.peer_stream_timeout_s):
            logger.debug("no pubsub stream to %s (yet)", peer_id)
