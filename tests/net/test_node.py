"""Peers (p2pcompute.node.Node, all its services wired) on real hosts in one trio process: adverts, validation, sync,
status endpoint. Each service alone: tests/services/."""

from __future__ import annotations

import hashlib
import logging
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pcompute.compute.gpu import HardwareReport
from p2pcompute.config import NodeConfig
from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import Device, DeviceKind, GpuAdvert, Software
from p2pcompute.net.gossip import Gossip, GossipConfig
from p2pcompute.net.host import connect, host_addrs, open_host
from p2pcompute.net.logs import RELAY_LOGGER
from p2pcompute.net.protocols import ADVERTS_TOPIC
from p2pcompute.node import Node, now_ms
from p2pcompute.testing.net import LOOPBACK, wait_until

WAIT_S = 20.0
HARDWARE = HardwareReport(
    devices=(
        Device(
            kind=DeviceKind.CPU, name="Test CPU", memory_bytes=8 << 30, free_memory_bytes=4 << 30, tflops=0.1,
            compute_capability="", cores=2,
        ),
    ),
    software=Software(p2pcompute="0.1.0", torch="2.13.0+cpu", cuda="", python="3.11.7"),
    driver="",
    probed_at=0.0,
)  # fmt: skip


def _seed(name: str, i: int) -> bytes:
    return hashlib.sha256(f"test_node/{name}/{i}".encode()).digest()


async def _run_node(
    seed: bytes, config: NodeConfig, stop: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    keypair = KeyPair.from_seed(seed)
    async with open_host(seed, LOOPBACK) as host, trio.open_nursery() as nursery:
        node = Node(config, keypair, HARDWARE, host)
        await nursery.start(node.run)
        task_status.started(node)
        await stop.wait()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_peers(
    name: str, n: int, tmp_path: Path, *, bootstrap: Sequence[str] = (), **overrides: Any
) -> AsyncIterator[list[Node]]:
    """n peers: peer 0 first, the others bootstrapping from it (as `p2pcompute node run` would)."""
    stop = trio.Event()
    nodes: list[Node] = []

    def config(i: int, bootstrap: Sequence[str]) -> NodeConfig:
        return NodeConfig(
            data_dir=tmp_path / f"peer-{i}", listen=LOOPBACK, bootstrap=tuple(bootstrap), status_port=0,
            advertise_interval=overrides.get("advertise_interval", 30.0),
            advert_ttl=overrides.get("advert_ttl", 60.0), slots=2,
        ).validate()  # fmt: skip

    async with trio.open_nursery() as nursery:
        try:
            for i in range(n):
                (tmp_path / f"peer-{i}").mkdir(parents=True)
                boot = host_addrs(nodes[0].host)[:1] if nodes else bootstrap
                nodes.append(await nursery.start(_run_node, _seed(name, i), config(i, boot), stop))
            yield nodes
        finally:
            stop.set()


def _received(node: Node, result: str) -> float:
    value = node.metrics.registry.get_sample_value("p2pcompute_adverts_received_total", {"result": result})
    return value or 0.0


async def test_adverts_reach_every_peer(tmp_path: Path) -> None:
    async with open_peers("reach", 5, tmp_path) as nodes:
        with trio.fail_after(WAIT_S):
            for node in nodes:
                await node.wait_for(lambda node=node: len(node.market) == len(nodes))
        ids = {n.peer_id for n in nodes}
        for node in nodes:
            assert {e.peer_id for e in node.market} == ids
            entry = node.market.get(nodes[0].peer_id)
            assert entry is not None
            assert entry.advert.devices == HARDWARE.devices
            assert entry.advert.slots_free == 2
        # A change of free capacity is re-advertised at once, long before the 30 s period.
        nodes[1].set_free_slots(0)
        with trio.fail_after(WAIT_S):
            await nodes[3].wait_for(
                lambda: (e := nodes[3].market.get(nodes[1].peer_id)) is not None and e.advert.slots_free == 0
            )


async def test_a_late_joiner_catches_up_through_advert_sync(tmp_path: Path) -> None:
    """Peers re-advertise only every 30 s here; a newcomer gets the existing adverts by asking (sync)."""
    # Re-advertising every 300 s: within the test, every advert after the first must come through sync.
    async with open_peers("late", 3, tmp_path, advertise_interval=300.0, advert_ttl=600.0) as nodes:
        with trio.fail_after(WAIT_S):
            for node in nodes:
                await node.wait_for(lambda node=node: len(node.market) == 3)
        before = {n.peer_id: n.metrics.registry.get_sample_value("p2pcompute_adverts_published_total") for n in nodes}
        async with open_peers(
            "late-joiner",
            1,
            tmp_path / "joiner",
            bootstrap=host_addrs(nodes[0].host)[:1],
            advertise_interval=300.0,
            advert_ttl=600.0,
        ) as (joiner,):
            with trio.fail_after(WAIT_S):
                await joiner.wait_for(lambda: len(joiner.market) == 4)
                for node in nodes:
                    await node.wait_for(lambda node=node: joiner.peer_id in node.market)
            # Nobody re-published to make that happen.
            assert {
                n.peer_id: n.metrics.registry.get_sample_value("p2pcompute_adverts_published_total") for n in nodes
            } == before


async def test_sync_serves_the_market(tmp_path: Path) -> None:
    async with open_peers("sync", 2, tmp_path) as (a, b):
        with trio.fail_after(WAIT_S):
            await a.wait_for(lambda: len(a.market) == 2)
            assert await b.sync_from(a.host.get_id()) == 0  # b already holds both: nothing new
        held = {e.peer_id for e in a.market}
        assert held == {a.peer_id, b.peer_id}


def _advert(pair: KeyPair, now: int, **changes: Any) -> GpuAdvert:
    fields: dict[str, Any] = dict(
        id=b"\x07" * 16, nonce=1, expires_at=now + 60_000, peer_id=pair.peer_id, seq=now, issued_at=now,
        addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{pair.peer_id}",), devices=HARDWARE.devices, price_per_second=1,
        slots_total=1, slots_free=1, software=HARDWARE.software,
    )  # fmt: skip
    fields.update(changes)
    return GpuAdvert(**fields)


@asynccontextmanager
async def open_attacker(name: str, honest: Node) -> AsyncIterator[tuple[KeyPair, Gossip]]:
    """A bare host whose gossip has no validator (it sends whatever it likes), connected to ``honest``."""
    seed = _seed(name, 99)
    async with open_host(seed, LOOPBACK) as host, trio.open_nursery() as nursery:
        gossip = Gossip(host, GossipConfig())
        await nursery.start(gossip.run)
        await gossip.subscribe(ADVERTS_TOPIC)
        await connect(host, host_addrs(honest.host)[0])
        await wait_until(lambda: honest.host.get_id() in gossip.topic_peers(ADVERTS_TOPIC))
        yield KeyPair.from_seed(seed), gossip
        nursery.cancel_scope.cancel()


async def _send(honest: Node, gossip: Gossip, data: bytes, expect: str) -> None:
    before = _received(honest, expect)
    await gossip.publish(ADVERTS_TOPIC, data)
    with trio.fail_after(WAIT_S):
        await honest.wait_for(lambda: _received(honest, expect) > before)


async def test_invalid_adverts_are_rejected_and_never_reach_the_market(tmp_path: Path) -> None:
    # Each attacker sends at most three invalid adverts: more would push its gossip score under the
    # publish threshold, after which the honest peer ignores it altogether (tested below).
    async with open_peers("invalid", 2, tmp_path) as nodes:
        honest = nodes[0]
        now = now_ms()
        async with open_attacker("invalid-a", honest) as (mallory, gossip):
            good = seal(mallory, _advert(mallory, now, seq=now + 10))
            await _send(honest, gossip, good, "accepted")
            await _send(honest, gossip, seal(mallory, _advert(mallory, now, seq=now + 5)), "stale_sequence")
            await _send(honest, gossip, seal(mallory, _advert(mallory, now, seq=now + 10, nonce=2)), "replayed")
            await _send(honest, gossip, seal(mallory, _advert(mallory, now - 120_000, seq=now + 11)), "expired")
            assert honest.gossip.peer_score(gossip.pubsub.my_id, ADVERTS_TOPIC) < 0  # invalid messages cost her
        async with open_attacker("invalid-b", honest) as (eve, gossip):
            await _send(honest, gossip, seal(eve, _advert(eve, now + 120_000, seq=now)), "future_dated")
            await _send(honest, gossip, seal(eve, _advert(eve, now, slots_free=2)), "inconsistent")
            await _send(honest, gossip, b"\x92\x01\x02", "not_a_map")
        async with open_attacker("invalid-c", honest) as (_, gossip):
            await _send(honest, gossip, good[:-1], "truncated")
            await _send(honest, gossip, good[:-1] + bytes([good[-1] ^ 1]), "bad_signature")
            # An honest peer's signed advert re-published by someone else: refused (origin is not the signer).
            await _send(honest, gossip, nodes[1].make_advert(now_ms()), "signer_mismatch")

        entry = honest.market.get(mallory.peer_id)
        assert entry is not None and entry.opened.envelope == good  # only the valid one got in
        assert eve.peer_id not in honest.market
        assert len(honest.market) == 3  # itself, the other honest peer, Mallory's one valid advert


async def test_an_advert_aiming_clients_at_another_peer_is_rejected(tmp_path: Path) -> None:
    """Mallory signs her own advert but gives Bob's address (or none she can be dialled on): refused, so no
    client ever dials Bob (or 0.0.0.0) on her behalf."""
    async with open_peers("foreign", 2, tmp_path) as (honest, bob):
        now = now_ms()
        async with open_attacker("foreign-a", honest) as (mallory, gossip):
            bobs = host_addrs(bob.host)[0]
            assert bobs.endswith(f"/p2p/{bob.peer_id}")
            await _send(honest, gossip, seal(mallory, _advert(mallory, now, addrs=(bobs,))), "foreign_address")
            any_ip = f"/ip4/0.0.0.0/tcp/1/p2p/{mallory.peer_id}"
            on_any = seal(mallory, _advert(mallory, now, seq=now + 1, addrs=(any_ip,)))
            await _send(honest, gossip, on_any, "bad_address")
            assert mallory.peer_id not in honest.market
            # Her advert with her own address gets in: the refusals were about the addresses alone.
            await _send(honest, gossip, seal(mallory, _advert(mallory, now, seq=now + 2)), "accepted")
        entry = honest.market.get(mallory.peer_id)
        assert entry is not None and entry.advert.addrs == (f"/ip4/127.0.0.1/tcp/1/p2p/{mallory.peer_id}",)
        # Our own adverts comply: every address ends in the advertiser's own id (specs/adverts.md §4 check 8).
        for node in (honest, bob):
            own = node.market.get(node.peer_id)
            assert own is not None and all(a.endswith(f"/p2p/{node.peer_id}") for a in own.advert.addrs)


async def test_persistent_offender_is_cut_off(tmp_path: Path) -> None:
    """Each invalid advert costs the sender gossip score, until the honest peer stops listening to it."""
    async with open_peers("offender", 1, tmp_path) as nodes:
        honest = nodes[0]
        threshold = GossipConfig().score.publish_threshold
        async with open_attacker("offender-a", honest) as (_, gossip):

            def score() -> float:
                return honest.gossip.peer_score(gossip.pubsub.my_id, ADVERTS_TOPIC)

            sent = 0
            while score() > threshold and sent < 20:
                before = score()
                await _send(honest, gossip, b"\x92" + bytes([sent, sent]), "not_a_map")
                sent += 1
                assert score() < before
            assert score() <= threshold
            assert 4 <= sent <= 7  # ~10 points an invalid message against a threshold of -50


async def test_status_and_metrics_endpoint(tmp_path: Path) -> None:
    async with open_peers("status", 2, tmp_path) as nodes:
        with trio.fail_after(WAIT_S):
            await nodes[0].wait_for(lambda: len(nodes[0].market) == 2)
        base = f"http://127.0.0.1:{nodes[0].status_port}"
        async with httpx.AsyncClient(timeout=5.0) as client:
            status = (await client.get(f"{base}/status")).json()
            metrics = (await client.get(f"{base}/metrics")).text
            missing = await client.get(f"{base}/nope")
            post = await client.post(f"{base}/status")
        assert status["peer_id"] == str(nodes[0].peer_id)
        assert status["addrs"] == host_addrs(nodes[0].host)
        assert str(nodes[1].peer_id) in status["connected_peers"]
        assert {m["peer_id"] for m in status["market"]} == {str(n.peer_id) for n in nodes}
        assert status["market"][0]["devices"][0]["name"] == "Test CPU"
        assert "p2pcompute_market_adverts 2.0" in metrics
        assert "p2pcompute_adverts_published_total" in metrics
        assert missing.status_code == 404
        assert post.status_code == 405
        info = (tmp_path / "peer-0" / "node.json").read_text()
        assert str(nodes[0].peer_id) in info


_CLIENT_SCRIPT = """
import sys, trio
from pathlib import Path
from p2pcompute.client import open_client

async def main():
    async with open_client([sys.argv[1]], data_dir=Path(sys.argv[2])) as client:
        assert not client.node.host.get_connected_peers()

trio.run(main)
"""


def _dead_peer_addr() -> str:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{KeyPair.from_seed(_seed('dead', 0)).peer_id}"


async def test_a_client_keeps_libp2p_warnings_off_the_terminal(tmp_path: Path) -> None:
    """py-libp2p logged a failed dial as an error on a logger nobody handles, so Python printed it bare on stderr
    ("Failed to open TCP stream: ..."), into the terminal of a program that merely uses the client library."""
    with trio.fail_after(WAIT_S * 2):
        done = await trio.run_process(
            [sys.executable, "-c", _CLIENT_SCRIPT, _dead_peer_addr(), str(tmp_path)], capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode() == ""  # an application that configured no logging sees nothing


async def test_libp2p_records_are_kept_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """... and one that asks for DEBUG on p2pcompute.libp2p gets them, formatted and routed like its own logs."""
    from p2pcompute.client import open_client

    caplog.set_level(logging.DEBUG, logger=RELAY_LOGGER)
    with trio.fail_after(WAIT_S):
        async with open_client([_dead_peer_addr()], key=KeyPair.from_seed(_seed("client", 0)), data_dir=tmp_path):
            pass
    relayed = [r for r in caplog.records if r.name.startswith(RELAY_LOGGER) and "Failed to open TCP" in r.message]
    assert relayed and all(r.levelno == logging.DEBUG for r in relayed)
    assert relayed[0].message.startswith("error: ")  # the original level, kept in the text


async def test_adverts_carry_the_announced_addresses_and_no_loopback_beside_routable_ones() -> None:
    """With ``announce`` set, adverts carry exactly those addresses (each ending in the node's id): behind NAT the
    listen addresses are private. Without it, a node listening on 0.0.0.0 advertises its interface addresses but
    not 127.0.0.1 (to anyone else that is their own machine); a loopback-only node keeps its loopback address."""
    from p2pcompute.core.adverts import check_advert_address
    from p2pcompute.node import advert_addrs

    pair = KeyPair.from_seed(hashlib.sha256(b"announce").digest())
    async with open_host(pair.seed, ["/ip4/0.0.0.0/tcp/0"]) as host:
        announced = advert_addrs(host, pair.peer_id, ("/ip4/203.0.113.7/tcp/4001", "/dns4/gpu.example.org/tcp/4001"))
        assert announced == (
            f"/ip4/203.0.113.7/tcp/4001/p2p/{pair.peer_id}",
            f"/dns4/gpu.example.org/tcp/4001/p2p/{pair.peer_id}",
        )
        expanded = advert_addrs(host, pair.peer_id)
        assert expanded and not any("/0.0.0.0/" in a for a in expanded)
        for addr in expanded:
            check_advert_address(addr, pair.peer_id)
        if any("/127.0.0.1/" not in a for a in expanded):  # the machine has a routable interface
            assert not any("/127.0.0.1/" in a for a in expanded)
    async with open_host(pair.seed, LOOPBACK) as host:
        (only,) = advert_addrs(host, pair.peer_id)
        assert only.startswith("/ip4/127.0.0.1/tcp/")


async def test_adverts_carry_relayed_addresses_beside_direct_ones_and_observed_ones_only_when_given() -> None:
    """A worker holding relay slots advertises ``<relay>/p2p-circuit/p2p/<us>`` after its direct addresses; observed
    addresses (Identify's) appear only when the node passes them (it does once AutoNAT says it is public); a relayed
    address through someone else's id, or one a receiver would refuse, is never advertised."""
    from p2pcompute.node import advert_addrs

    pair = KeyPair.from_seed(hashlib.sha256(b"relayed").digest())
    me = f"/p2p/{pair.peer_id}"
    relayed = f"/ip4/10.77.0.2/tcp/4001/p2p/12D3KooWRelay/p2p-circuit{me}"
    async with open_host(pair.seed, LOOPBACK) as host:
        [direct] = advert_addrs(host, pair.peer_id)
        assert advert_addrs(host, pair.peer_id, relayed=[relayed]) == (direct, relayed)
        observed = advert_addrs(host, pair.peer_id, observed=["/ip4/198.51.100.4/tcp/4001"])
        assert observed == (f"/ip4/198.51.100.4/tcp/4001{me}",)  # routable: the loopback one is dropped beside it
        foreign = "/ip4/10.77.0.2/tcp/4001/p2p/12D3KooWRelay/p2p-circuit/p2p/12D3KooWSomeoneElse"
        assert advert_addrs(host, pair.peer_id, relayed=[foreign]) == (direct,)
        announced = advert_addrs(host, pair.peer_id, ("/ip4/203.0.113.7/tcp/4001",), relayed=[relayed])
        assert announced == (f"/ip4/203.0.113.7/tcp/4001{me}", relayed)


async def test_at_most_max_concurrent_syncs_are_served_whatever_gossip_arrives(tmp_path: Path) -> None:
    """Sync requests that hold their stream take the node's sync slots; with every slot taken the next one is reset
    at once, also after adverts arrived meanwhile (the limiter used to be re-created on every gossiped message, so
    the bound never held)."""
    from libp2p.host.exceptions import StreamFailure
    from libp2p.network.stream.exceptions import StreamReset

    from p2pcompute.net.protocols import ADVERTS_SYNC_PROTOCOL
    from p2pcompute.services.sync import MAX_CONCURRENT_SYNCS

    async with open_peers("syncbound", 2, tmp_path) as (a, b):
        held = [await b.host.new_stream(a.host.get_id(), [ADVERTS_SYNC_PROTOCOL]) for _ in range(MAX_CONCURRENT_SYNCS)]
        await wait_until(lambda: a.sync_server.serving == MAX_CONCURRENT_SYNCS)
        a.notify_waiters()  # what every advert received does
        await b.publish_advert()  # and a real one arrives
        # the next one is reset at once, never served (during protocol selection, or on its first read)
        with trio.fail_after(5), pytest.raises((StreamReset, StreamFailure)):
            extra = await b.host.new_stream(a.host.get_id(), [ADVERTS_SYNC_PROTOCOL])
            await extra.read(1)
        assert a.sync_server.serving == MAX_CONCURRENT_SYNCS
        for stream in held:
            await stream.reset()
        await wait_until(lambda: a.sync_server.serving == 0)
        assert await b.sync_from(a.host.get_id()) >= 0  # slots free again: served
