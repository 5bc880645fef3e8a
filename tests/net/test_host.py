"""p2pcompute.net.host: keys, Noise-only security, dialling, bounded shutdown; real hosts on 127.0.0.1."""

from __future__ import annotations

import multiaddr
import nacl.signing
import psutil
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2pcompute.errors import DialError, HostStartError
from p2pcompute.net.host import (
    HostConfig,
    connect,
    host_addrs,
    libp2p_keypair,
    open_host,
)
from p2pcompute.testing.net import (
    LOOPBACK,
    NodeConfig,
    connect_line,
    open_nodes,
    seed_for,
    tcp_port,
    wait_until,
)


def our_sockets(ports: set[int], states: set[str]) -> list[str]:
    """This process's TCP sockets on 127.0.0.1 at ``ports`` (either end) whose state is in ``states`` (the hosts
    here listen on 127.0.0.1; another test's socket on another address may have the same port number)."""
    found = []
    for conn in psutil.Process().net_connections(kind="tcp"):
        ends = {(a.ip, a.port) for a in (conn.laddr, conn.raddr) if a}
        if ends & {("127.0.0.1", p) for p in ports} and conn.status in states:
            found.append(f"{conn.laddr} -> {conn.raddr} {conn.status}")
    return found


def test_keypair_is_the_pynacl_key_and_its_peer_id() -> None:
    seed = bytes(range(32))
    key_pair = libp2p_keypair(seed)
    signing_key = nacl.signing.SigningKey(seed)
    assert key_pair.public_key.to_bytes() == bytes(signing_key.verify_key)
    assert key_pair.private_key.to_bytes() == seed
    # A signature made through libp2p verifies with PyNaCl, and the other way round.
    assert signing_key.verify_key.verify(b"msg", key_pair.private_key.sign(b"msg")) == b"msg"
    assert key_pair.public_key.verify(b"msg", signing_key.sign(b"msg").signature)
    peer_id = ID.from_pubkey(key_pair.public_key)
    assert peer_id.to_base58().startswith("12D3KooW")  # Ed25519 key inlined in an identity multihash
    assert peer_id.extract_public_key().to_bytes() == bytes(signing_key.verify_key)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_keypair_rejects_a_seed_of_the_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        libp2p_keypair(b"\x01" * length)


def test_host_config_checks_its_limits() -> None:
    with pytest.raises(ValueError):
        HostConfig(low_watermark=50, high_watermark=10)
    with pytest.raises(ValueError):
        HostConfig(dial_timeout_s=0)


async def test_host_listens_on_the_bound_port_with_its_peer_id(test_name: str) -> None:
    seed = seed_for(test_name, 0)
    async with open_host(seed, LOOPBACK) as host:
        assert host.get_id() == ID.from_pubkey(libp2p_keypair(seed).public_key)
        (addr,) = host_addrs(host)
        assert addr.startswith("/ip4/127.0.0.1/tcp/")
        assert addr.endswith(f"/p2p/{host.get_id()}")
        assert tcp_port(host) != 0


async def test_dial_connects_both_ends_and_returns_the_authenticated_peer_id(test_name: str) -> None:
    async with open_nodes(test_name, [NodeConfig()] * 2) as (a, b):
        peer_id = await connect(a.host, b.addr)
        assert peer_id == b.host.get_id()
        await wait_until(lambda: a.host.get_id() in b.host.get_connected_peers())
        # One connection per peer, which also turns off 0.8.1's 250 ms "happy eyeballs" dial delay.
        assert a.host.get_network().connection_config.max_connections_per_peer == 1
        # Dialling a connected peer again reuses the connection.
        assert await connect(a.host, b.addr) == peer_id
        assert len(a.host.get_network().get_connections(peer_id)) == 1


async def test_dial_to_the_wrong_peer_id_is_refused(test_name: str) -> None:
    """Noise checks the remote key against the /p2p id we dialled."""
    async with open_nodes(test_name, [NodeConfig()] * 3) as (a, b, c):
        impostor = str(multiaddr.Multiaddr(b.addr).decapsulate(f"/p2p/{b.host.get_id()}")) + (f"/p2p/{c.host.get_id()}")
        with pytest.raises(DialError):
            await connect(a.host, impostor)
        assert c.host.get_id() not in a.host.get_connected_peers()
        assert b.host.get_id() not in a.host.get_connected_peers()


async def test_dial_errors_are_dial_errors(test_name: str) -> None:
    async with open_nodes(test_name, [NodeConfig()]) as (a,):
        with pytest.raises(DialError):
            await connect(a.host, "/ip4/127.0.0.1/tcp/1")  # no /p2p part
        with pytest.raises(DialError):
            await connect(a.host, a.addr)  # ourselves
        free_port_addr = f"/ip4/127.0.0.1/tcp/1/p2p/{ID.from_pubkey(create_new_key_pair().public_key)}"
        with pytest.raises(DialError):
            await connect(a.host, free_port_addr, dial_timeout_s=5.0)


async def test_a_plaintext_host_can_neither_dial_us_nor_be_dialled(test_name: str) -> None:
    plain_keys = libp2p_keypair(seed_for(test_name, 99))
    plain = new_host(
        key_pair=plain_keys,
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(plain_keys)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        listen_addrs=[multiaddr.Multiaddr(LOOPBACK[0])],
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    async with open_nodes(test_name, [NodeConfig()]) as (ours,), plain.run([multiaddr.Multiaddr(LOOPBACK[0])]):
        try:
            with pytest.raises(SwarmException), trio.fail_after(10):
                await plain.connect(info_from_p2p_addr(multiaddr.Multiaddr(ours.addr)))
            plain_addr = str(plain.get_addrs()[0])
            with pytest.raises(DialError):
                await connect(ours.host, plain_addr)
            assert ours.host.get_connected_peers() == []
            assert plain.get_connected_peers() == []
        finally:
            with trio.CancelScope(shield=True):
                await plain.close()


async def test_a_busy_port_is_refused_instead_of_shared(test_name: str) -> None:
    """0.8.1 listens with SO_REUSEPORT: without our probe a second host would share the port."""
    async with open_host(seed_for(test_name, 0), LOOPBACK) as first:
        busy = f"/ip4/127.0.0.1/tcp/{tcp_port(first)}"
        with pytest.raises(HostStartError):
            async with open_host(seed_for(test_name, 1), [busy]):
                pass


async def test_closing_leaves_no_listening_or_half_closed_sockets(test_name: str) -> None:
    async with open_nodes(test_name, [NodeConfig()] * 4) as nodes:
        await connect_line(nodes)
        await connect(nodes[0].host, nodes[3].addr)
        ports = {tcp_port(node.host) for node in nodes}
        assert len(our_sockets(ports, {"LISTEN"})) == 4
        assert our_sockets(ports, {"ESTABLISHED"})
    assert our_sockets(ports, {"LISTEN", "CLOSE_WAIT", "ESTABLISHED"}) == []


async def test_an_address_that_cannot_be_bound_fails_the_start(test_name: str) -> None:
    with pytest.raises(HostStartError), trio.fail_after(10):
        async with open_host(seed_for(test_name, 0), ["/ip4/192.0.2.1/tcp/0"]):  # TEST-NET-1, not ours
            pass


async def test_an_error_in_the_body_comes_out_unwrapped(test_name: str) -> None:
    with pytest.raises(KeyError):
        async with open_host(seed_for(test_name, 0), LOOPBACK):
            raise KeyError("mine")


async def test_cancelling_the_body_still_closes_the_host(test_name: str) -> None:
    with trio.move_on_after(0.5) as scope:
        async with open_host(seed_for(test_name, 0), LOOPBACK) as host:
            port = tcp_port(host)
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert our_sockets({port}, {"LISTEN"}) == []


async def test_peers_are_told_dialable_addresses_never_a_wildcard_and_the_announced_ones_when_set() -> None:
    """Identify and the DHT hand peers ``host.get_addrs()``: a 0.0.0.0 listener is expanded to interface addresses,
    loopback is dropped beside routable ones, and with ``announce`` only the announced addresses are told."""
    seed = seed_for("told", 0)
    async with open_host(seed, ["/ip4/0.0.0.0/tcp/0"]) as host:
        told = host_addrs(host)
        assert told and not any("/0.0.0.0/" in a for a in told)
        if any("/127.0.0.1/" not in a for a in told):
            assert not any("/127.0.0.1/" in a for a in told)
    config = HostConfig(announce=("/ip4/203.0.113.7/tcp/4001",))
    async with open_host(seed, ["/ip4/0.0.0.0/tcp/0"], config=config) as host:
        assert host_addrs(host) == [f"/ip4/203.0.113.7/tcp/4001/p2p/{host.get_id()}"]
