"""p2pcompute.net.discovery: KadDHT routing table, peer and provider lookups, bootstrap; real hosts."""

from __future__ import annotations

import itertools
import os

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError

from p2pcompute.errors import DiscoveryError
from p2pcompute.net.discovery import Discovery, DiscoveryConfig, capability_key
from p2pcompute.net.host import HostConfig, connect, host_addrs
from p2pcompute.testing.net import NodeConfig, connect_line, open_nodes, wait_until

#: Maintenance would run lookups behind the test's back; tests call refresh() when they want one.
QUIET = DiscoveryConfig(refresh_interval_s=3600.0)
DHT_NODE = NodeConfig(discovery=QUIET)


def test_capability_keys_are_namespaced_multihashes() -> None:
    cuda = capability_key("cuda")
    assert cuda[:2] == b"\x12\x20" and len(cuda) == 34
    assert capability_key("cafe") != bytes.fromhex("cafe")  # not parsed as hex, unlike 0.8.1's str keys
    assert len({capability_key(c) for c in ("cuda", "cpu", "CUDA", "cafe")}) == 4
    for bad in ("", "x" * 65, "gpü"):
        with pytest.raises(DiscoveryError):
            capability_key(bad)


async def test_connected_server_peers_enter_the_routing_table_both_ways(test_name: str) -> None:
    """0.8.1 never adds connected peers by itself; inbound ones only after Identify gave their addrs."""
    async with open_nodes(test_name, [DHT_NODE] * 3) as (a, b, c):
        await connect_line([a, b, c])
        await wait_until(lambda: b.host.get_id() in a.dht.routing_table_peers())
        await wait_until(lambda: {a.host.get_id(), c.host.get_id()} <= set(b.dht.routing_table_peers()))
        await wait_until(lambda: b.host.get_id() in c.dht.routing_table_peers())
        # The entry carries a dialable listen address, not the ephemeral port of the inbound socket.
        info = b.dht.dht.routing_table.get_peer_info(a.host.get_id())
        assert info is not None
        assert {str(m) for m in info.addrs} & {host_addrs(a.host)[0], host_addrs(a.host)[0].rsplit("/p2p/")[0]}


async def test_a_peer_finds_a_peer_it_is_not_connected_to(test_name: str) -> None:
    """A - B - C in a line: A learns C's address from B's DHT, then dials it."""
    async with open_nodes(test_name, [DHT_NODE] * 3) as (a, b, c):
        await connect_line([a, b, c])
        await wait_until(lambda: c.host.get_id() in b.dht.routing_table_peers())
        await wait_until(lambda: b.host.get_id() in a.dht.routing_table_peers())
        assert c.host.get_id() not in a.host.get_connected_peers()
        with pytest.raises(PeerStoreError):  # A has never heard of C
            a.host.get_peerstore().addrs(c.host.get_id())

        found = await a.dht.find_peer(c.host.get_id())

        assert found is not None and found.peer_id == c.host.get_id()
        c_tcp = host_addrs(c.host)[0].rsplit("/p2p/")[0]
        assert any(str(m).startswith(c_tcp) for m in found.addrs), found.addrs
        assert await connect(a.host, f"{c_tcp}/p2p/{c.host.get_id()}") == c.host.get_id()


async def test_find_peer_of_an_unknown_peer_is_none(test_name: str) -> None:
    async with open_nodes(test_name, [DHT_NODE] * 3) as (a, b, c):
        await connect_line([a, b])
        await wait_until(lambda: b.host.get_id() in a.dht.routing_table_peers())
        assert await a.dht.find_peer(c.host.get_id()) is None


async def test_providers_are_found_by_capability_once_each(test_name: str) -> None:
    """Five peers in a line; 1 and 3 provide cuda, 2 provides cpu; everyone asks."""
    async with open_nodes(test_name, [DHT_NODE] * 5) as nodes:
        await connect_line(nodes)
        for left, right in itertools.pairwise(nodes):
            await wait_until(lambda left=left, right=right: right.host.get_id() in left.dht.routing_table_peers())
        ids = [n.host.get_id() for n in nodes]
        assert await nodes[1].dht.provide("cuda")
        assert await nodes[3].dht.provide("cuda")
        assert await nodes[2].dht.provide("cpu")

        for asker in nodes:
            cuda = await asker.dht.find_providers("cuda")
            assert [p.peer_id for p in cuda].count(ids[1]) == 1
            assert {p.peer_id for p in cuda} == {ids[1], ids[3]}, asker
            assert all(p.addrs for p in cuda)
            cpu = await asker.dht.find_providers("cpu")
            assert [p.peer_id for p in cpu] == [ids[2]]
            assert await asker.dht.find_providers("tpu") == []
        # A provider that asks gets the other providers too (0.8.1 stops at its own local record).
        assert {p.peer_id for p in await nodes[1].dht.find_providers("cuda")} == {ids[1], ids[3]}
        assert len(await nodes[0].dht.find_providers("cuda", count=1)) == 1


async def test_a_node_joins_through_bootstrap_and_finds_the_others(test_name: str) -> None:
    async with open_nodes(test_name, [DHT_NODE, DHT_NODE, DHT_NODE, NodeConfig()]) as (boot, b, c, d):
        for peer in (b, c):
            await connect(peer.host, boot.addr)
        await wait_until(lambda: {b.host.get_id(), c.host.get_id()} <= set(boot.dht.routing_table_peers()))
        await c.dht.provide("cuda")

        async with trio.open_nursery() as nursery:
            late = Discovery(d.host, DiscoveryConfig(bootstrap=(boot.addr,), refresh_interval_s=3600.0))
            await nursery.start(late.run)
            # Started means bootstrapped and refreshed once: the lookup of itself went through boot.
            assert {boot.host.get_id(), b.host.get_id(), c.host.get_id()} <= set(late.routing_table_peers())
            assert [p.peer_id for p in await late.find_providers("cuda")] == [c.host.get_id()]
            nursery.cancel_scope.cancel()


async def test_unreachable_bootstrap_peers_do_not_stop_the_start(test_name: str) -> None:
    async with open_nodes(test_name, [DHT_NODE, NodeConfig()]) as (b, a):
        gone = f"/ip4/127.0.0.1/tcp/1/p2p/{ID.from_pubkey(create_new_key_pair().public_key)}"
        config = DiscoveryConfig(bootstrap=(gone, b.addr), dial_timeout_s=5.0, refresh_interval_s=3600.0)
        discovery = Discovery(a.host, config)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(discovery.run)
            assert b.host.get_id() in a.host.get_connected_peers()
            assert b.host.get_id() in discovery.routing_table_peers()
            nursery.cancel_scope.cancel()


@pytest.mark.skipif(
    bool(os.environ.get("P2PCOMPUTE_NO_MDNS_TEST")), reason="P2PCOMPUTE_NO_MDNS_TEST set: no multicast here"
)
async def test_mdns_peers_are_dialled(test_name: str) -> None:
    mdns = NodeConfig(host=HostConfig(enable_mdns=True), discovery=QUIET)
    async with open_nodes(test_name, [mdns] * 2) as (a, b):
        await wait_until(lambda: b.host.get_id() in a.host.get_connected_peers(), timeout_s=20)
