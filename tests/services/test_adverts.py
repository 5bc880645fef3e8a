"""p2pcompute.services.adverts: adverts received over gossip into the market (validator, expiry), and our own
adverts out (signed, capacity clamped, published, capabilities announced); real hosts on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from p2pcompute.compute.gpu import HardwareReport
from p2pcompute.config import NodeConfig
from p2pcompute.core.adverts import MarketView, validate_advert
from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.errors import LocalProtocolError
from p2pcompute.net.discovery import DiscoveryConfig
from p2pcompute.net.gossip import GossipConfig
from p2pcompute.net.protocols import ADVERTS_TOPIC
from p2pcompute.services.adverts import EXPIRE_INTERVAL_S, Advertiser, AdvertReceiver
from p2pcompute.services.changes import Changes
from p2pcompute.testing.net import LOOPBACK, connect_line, open_nodes, seed_for, wait_until
from p2pcompute.testing.net import NodeConfig as NetConfig
from tests.services.helpers import HARDWARE, Received, advert, wall_ms

WAIT_S = 20.0


def _config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(data_dir=tmp_path, listen=LOOPBACK, status_port=0, slots=2).validate()


async def test_the_receiver_admits_valid_adverts_refuses_the_rest_and_expires_them() -> None:
    name = "services/adverts/receiver"
    offset = [0]
    base = wall_ms()

    def clock() -> int:
        return base + offset[0]

    market, changes, received = MarketView(), Changes(), Received("adverts")
    gossip = NetConfig(gossip=GossipConfig())
    async with open_nodes(name, [gossip, gossip]) as (a, b), trio.open_nursery() as nursery:
        receiver = AdvertReceiver(
            peer_id=KeyPair.from_seed(seed_for(name, 0)).peer_id, market=market, gossip=a.pubsub, clock=clock,
            received=received.counter, changes=changes,
        )  # fmt: skip
        await nursery.start(receiver.run)
        await b.pubsub.subscribe(ADVERTS_TOPIC)  # b sends what it likes: no validator of its own
        await connect_line([a, b])
        await wait_until(lambda: a.host.get_id() in b.pubsub.topic_peers(ADVERTS_TOPIC))
        bob, mallory = KeyPair.from_seed(seed_for(name, 1)), KeyPair.from_seed(seed_for(name, 99))
        with trio.fail_after(WAIT_S):
            await b.pubsub.publish(ADVERTS_TOPIC, seal(bob, advert(bob, base)))
            await changes.wait_for(lambda: bob.peer_id in market)
            assert received["accepted"] == 1
            # A copy again (a new gossip message): ignored, neither admitted nor held against the forwarder.
            await b.pubsub.publish(ADVERTS_TOPIC, seal(bob, advert(bob, base)))
            await changes.wait_for(lambda: received["replayed"] == 1)
            # Mallory's advert, published by Bob: refused (the origin is not the signer).
            await b.pubsub.publish(ADVERTS_TOPIC, seal(mallory, advert(mallory, base)))
            await changes.wait_for(lambda: received["signer_mismatch"] == 1)
        assert mallory.peer_id not in market
        offset[0] = 61_000  # past the advert's expiry, by the injected clock
        await wait_until(lambda: bob.peer_id not in market, timeout_s=EXPIRE_INTERVAL_S * 5)
        nursery.cancel_scope.cancel()


async def test_the_advertiser_signs_adverts_with_rising_seq_and_clamped_capacity(tmp_path: Path) -> None:
    name = "services/adverts/make"
    pair = KeyPair.from_seed(seed_for(name, 0))
    addrs = (f"/ip4/127.0.0.1/tcp/4001/p2p/{pair.peer_id}",)
    net = NetConfig(gossip=GossipConfig(), discovery=DiscoveryConfig())
    async with open_nodes(name, [net]) as (node,):
        market = MarketView()

        def advertiser(hardware: HardwareReport | None) -> Advertiser:
            return Advertiser(
                _config(tmp_path), pair, hardware, market=market, gossip=node.pubsub, discovery=node.dht,
                clock=wall_ms, addrs=lambda: addrs, published=Received("published", by_result=False).counter,
            )  # fmt: skip

        ours = advertiser(HARDWARE)
        now = wall_ms()
        first = validate_advert(ours.make_advert(now), now, market.policy).message
        second = validate_advert(ours.make_advert(now), now, market.policy).message
        assert first.seq == now and second.seq == now + 1  # strictly increasing, also within one ms
        assert first.addrs == addrs and first.slots_total == 2 and first.slots_free == 2
        ours.set_free_slots(99)
        assert ours.free_slots == 2  # never more than configured
        ours.set_free_slots(-1)
        assert ours.free_slots == 0
        assert validate_advert(ours.make_advert(now), now, market.policy).message.slots_free == 0
        assert ours.capabilities() == ["cpu"]
        client_only = advertiser(None)
        assert client_only.capabilities() == []
        with pytest.raises(LocalProtocolError):
            client_only.make_advert(now)


async def test_the_advertiser_publishes_at_once_and_announces_its_capabilities(tmp_path: Path) -> None:
    name = "services/adverts/run"
    pair = KeyPair.from_seed(seed_for(name, 0))
    net = NetConfig(gossip=GossipConfig(), discovery=DiscoveryConfig())
    async with open_nodes(name, [net]) as (node,), trio.open_nursery() as nursery:
        market, published = MarketView(), Received("published", by_result=False)
        advertiser = Advertiser(
            _config(tmp_path), pair, HARDWARE, market=market, gossip=node.pubsub, discovery=node.dht, clock=wall_ms,
            addrs=lambda: (f"/ip4/127.0.0.1/tcp/4001/p2p/{pair.peer_id}",), published=published.counter,
        )  # fmt: skip
        await node.pubsub.subscribe(ADVERTS_TOPIC)
        await nursery.start(advertiser.run)
        # No bootstrap peer to wait for: the first advert goes out at once, into our own market too.
        await wait_until(lambda: pair.peer_id in market)
        assert published.total == 1.0
        with trio.fail_after(WAIT_S):
            while node.host.get_id() not in {p.peer_id for p in await node.dht.find_providers("cpu")}:
                await trio.sleep(0.05)  # the DHT announces no event for a record stored
        nursery.cancel_scope.cancel()
