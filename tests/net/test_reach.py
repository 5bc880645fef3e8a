"""p2pcompute.net.reach: AutoNAT with fresh dial-backs, relay service with limits, reservations, relayed dials.

Real py-libp2p hosts on 127.0.0.1 in one trio process. Loopback has no NAT, so "behind NAT" is set by the
operator's ``nat = "private"`` here; the namespace testnet (tests/e2e) runs the same code behind a real NAT.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from typing import cast

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.host.basic_host import BasicHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from p2pcompute.core.reach import NatMode, Reachability, ReachPolicy, is_circuit_address
from p2pcompute.errors import DialError
from p2pcompute.net.host import HostConfig, host_addrs, open_host
from p2pcompute.net.reach import HOP_PROTOCOL, ReachService, ReachSettings, RelayServiceLimits, is_relayed
from p2pcompute.testing.net import seed_for, wait_until

LISTEN = "/ip4/127.0.0.1/tcp/0"
ECHO = TProtocol("/p2pcompute-test/echo/1.0.0")


async def _echo(stream: INetStream) -> None:
    with contextlib.suppress(Exception):
        while data := await stream.read(65536):
            await stream.write(data)
    with contextlib.suppress(Exception):
        await stream.close()


def _ms() -> int:
    return int(trio.current_time() * 1000)


@contextlib.asynccontextmanager
async def _peers(
    name: str, settings: Sequence[ReachSettings], *, listen: Sequence[str] = (), configs: Sequence[HostConfig] = ()
) -> AsyncIterator[list[tuple[IHost, ReachService]]]:
    async with contextlib.AsyncExitStack() as stack:
        hosts = [
            await stack.enter_async_context(
                open_host(
                    seed_for(name, i),
                    [listen[i] if listen else LISTEN],
                    config=configs[i] if configs else HostConfig(),
                )
            )
            for i in range(len(settings))
        ]
        # The services' nursery holds no host: cancelling it while an exception unwinds must not reach a host's
        # exit (a Cancelled raised there would replace the exception, and the nursery would swallow it).
        async with trio.open_nursery() as nursery:
            out = []
            for host, s in zip(hosts, settings, strict=True):
                host.set_stream_handler(ECHO, _echo)
                service = ReachService(host, s, clock=_ms)
                await nursery.start(service.run)
                out.append((host, service))
            try:
                yield out
            finally:
                nursery.cancel_scope.cancel()


async def _connect(a: IHost, b: IHost) -> None:
    await a.connect(info_from_p2p_addr(multiaddr.Multiaddr(host_addrs(b)[0])))


async def _echo_through(client: IHost, peer: ID, payload: bytes) -> bytes:
    stream = await client.new_stream(peer, [ECHO])
    await stream.write(payload)
    got = b""
    with trio.fail_after(10):
        while len(got) < len(payload):
            chunk = await stream.read(65536)
            if not chunk:
                break
            got += chunk
    await stream.close()
    return got


RELAY = ReachSettings(mode=NatMode.PUBLIC, relay_service=True)
PRIVATE = ReachSettings(mode=NatMode.PRIVATE)
CLIENT = ReachSettings(mode=NatMode.PUBLIC, reserve=False, hole_punch=False)


async def test_a_private_worker_holds_a_slot_and_a_client_reaches_it_only_through_the_relay(test_name: str) -> None:
    worker_settings = ReachSettings(mode=NatMode.PRIVATE, hole_punch=False)
    async with _peers(test_name, [RELAY, worker_settings, CLIENT]) as [(relay, _), (worker, reach), (client, dialer)]:
        await _connect(worker, relay)  # the worker found the relay (bootstrap), which speaks hop
        await wait_until(lambda: bool(reach.relayed_addrs()))
        [addr] = reach.relayed_addrs()
        assert addr == f"{host_addrs(relay)[0]}/p2p-circuit/p2p/{worker.get_id()}"
        assert reach.status()["reachability"] == Reachability.PRIVATE
        await dialer.dial(worker.get_id(), [addr])  # only the relayed address: nothing direct
        assert is_relayed(client, worker.get_id())
        assert await _echo_through(client, worker.get_id(), b"x" * 100_000) == b"x" * 100_000


async def test_a_peer_without_relay_service_never_relays(test_name: str) -> None:
    not_a_relay = ReachSettings(mode=NatMode.PUBLIC)
    worker_settings = ReachSettings(mode=NatMode.PRIVATE, relays=(), hole_punch=False)
    async with _peers(test_name, [not_a_relay, worker_settings, CLIENT]) as [
        (other, _),
        (worker, reach),
        (_client, dialer),
    ]:
        await _connect(worker, other)
        with trio.move_on_after(2):
            await wait_until(lambda: bool(reach.relayed_addrs()))
        assert reach.relayed_addrs() == ()  # the peer does not speak hop: no candidate
        fake = f"{host_addrs(other)[0]}/p2p-circuit/p2p/{worker.get_id()}"
        with pytest.raises(DialError):
            await dialer.dial(worker.get_id(), [fake])


async def test_configured_relays_are_dialled_and_used_first(test_name: str) -> None:
    async with _peers(test_name, [RELAY, RELAY]) as [(relay_a, _), (relay_b, _)]:
        configured = f"{host_addrs(relay_b)[0]}"
        settings = ReachSettings(
            mode=NatMode.PRIVATE, relays=(configured,), hole_punch=False, policy=ReachPolicy(max_relays=1)
        )
        async with _peers(test_name + "w", [settings]) as [(worker, reach)]:
            await _connect(worker, relay_a)  # connected to A, configured B: B wins
            await wait_until(lambda: bool(reach.relayed_addrs()))
            assert list(reach.held) == [str(relay_b.get_id())]


async def test_the_relay_cuts_a_circuit_at_its_byte_limit(test_name: str) -> None:
    small = ReachSettings(mode=NatMode.PUBLIC, relay_service=True, limits=RelayServiceLimits(circuit_bytes=64 * 1024))
    worker_settings = ReachSettings(mode=NatMode.PRIVATE, hole_punch=False)
    async with _peers(test_name, [small, worker_settings, CLIENT]) as [(relay, _), (worker, reach), (client, dialer)]:
        await _connect(worker, relay)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        await dialer.dial(worker.get_id(), list(reach.relayed_addrs()))
        got = b""
        with contextlib.suppress(Exception):  # a reset stream or closed connection ends it early
            got = await _echo_through(client, worker.get_id(), b"y" * (1024 * 1024))
        assert len(got) < 1024 * 1024  # 1 MiB never comes back through a relay that carries 64 KiB


async def test_the_relay_grants_no_more_slots_than_its_limit(test_name: str) -> None:
    one_slot = ReachSettings(mode=NatMode.PUBLIC, relay_service=True, limits=RelayServiceLimits(reservations=1))
    w = ReachSettings(mode=NatMode.PRIVATE, hole_punch=False)
    async with _peers(test_name, [one_slot, w, w]) as [(relay, _), (first, reach1), (second, reach2)]:
        await _connect(first, relay)
        await wait_until(lambda: bool(reach1.relayed_addrs()))
        await _connect(second, relay)
        with trio.move_on_after(3):
            await wait_until(lambda: bool(reach2.relayed_addrs()))
        assert reach2.relayed_addrs() == ()


async def test_autonat_dial_back_is_a_fresh_connection_not_the_one_the_request_came_on(test_name: str) -> None:
    """0.8.1's own server "dials back" over the connection the request came on: every NATed node would be public."""
    server = ReachSettings(mode=NatMode.PUBLIC, reserve=False, hole_punch=False)
    async with _peers(test_name, [server]) as [(s, _)], open_host(seed_for(test_name, 9), [LISTEN]) as me:
        await _connect(me, s)
        asker = AutoNATService(cast(BasicHost, me), serve=False)
        with socket.socket() as closed:  # a port on our observed IP where nothing listens
            closed.bind(("127.0.0.1", 0))
            dead = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}")
            status, _ = await asker.query_server(s.get_id(), addrs=[dead.to_bytes()])
            assert status == Message.E_DIAL_ERROR
        live = multiaddr.Multiaddr(str(me.get_transport_addrs()[0]))
        status, addr = await asker.query_server(s.get_id(), addrs=[live.to_bytes()])
        assert status == Message.OK and addr == live.to_bytes()
        foreign = multiaddr.Multiaddr("/ip4/127.0.0.9/tcp/1")  # not our observed IP: never dialled (no amplification)
        status, _ = await asker.query_server(s.get_id(), addrs=[foreign.to_bytes()])
        assert status == Message.E_DIAL_REFUSED


async def test_verdicts_from_two_address_groups_make_a_node_public(test_name: str) -> None:
    auto = ReachSettings(mode=NatMode.AUTO, hole_punch=False, policy=ReachPolicy(confirmations=2))
    server = ReachSettings(mode=NatMode.PUBLIC, reserve=False, hole_punch=False)
    async with (
        _peers(test_name, [auto]) as [(me, reach)],
        _peers(test_name + "s", [server, server], listen=["/ip4/127.0.0.2/tcp/0", "/ip4/127.0.0.3/tcp/0"]) as [
            (s1, _),
            (s2, _),
        ],
    ):
        await _connect(me, s1)
        await wait_until(lambda: len(reach.status()["verdicts"]) == 1)
        assert reach.state.status(_ms()) is Reachability.UNKNOWN  # one server never decides
        await _connect(me, s2)
        await wait_until(lambda: reach.state.status(_ms()) is Reachability.PUBLIC)


async def test_a_node_whose_announced_port_is_closed_finds_itself_private_and_takes_a_relay(test_name: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        announce = (f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}",)  # a port forward that does not work
        auto = ReachSettings(mode=NatMode.AUTO, hole_punch=False, announce=announce)
        relay = ReachSettings(mode=NatMode.PUBLIC, relay_service=True, reserve=False, hole_punch=False)
        async with (
            _peers(test_name, [auto]) as [(me, reach)],
            _peers(test_name + "s", [relay, relay], listen=["/ip4/127.0.0.2/tcp/0", "/ip4/127.0.0.3/tcp/0"]) as [
                (s1, _),
                (s2, _),
            ],
        ):
            await _connect(me, s1)
            await _connect(me, s2)
            await wait_until(lambda: reach.state.status(_ms()) is Reachability.PRIVATE)
            await wait_until(lambda: len(reach.relayed_addrs()) == 2)


async def test_a_public_peer_is_dialled_directly_and_holds_no_slot(test_name: str) -> None:
    auto = ReachSettings(mode=NatMode.AUTO, hole_punch=False, policy=ReachPolicy(confirmations=1))
    async with _peers(test_name, [RELAY, auto, CLIENT]) as [(relay, _), (worker, reach), (client, dialer)]:
        await _connect(worker, relay)
        await wait_until(lambda: reach.state.status(_ms()) is Reachability.PUBLIC)
        assert reach.relayed_addrs() == ()
        await dialer.dial(worker.get_id(), [host_addrs(worker)[0]])
        assert not is_relayed(client, worker.get_id())


async def test_hole_punch_upgrades_a_relayed_connection_when_a_direct_path_exists(test_name: str) -> None:
    worker_settings = ReachSettings(mode=NatMode.PRIVATE)
    client_settings = ReachSettings(mode=NatMode.PUBLIC, reserve=False)
    async with _peers(test_name, [RELAY, worker_settings, client_settings]) as [
        (relay, _),
        (worker, reach),
        (client, dialer),
    ]:
        await _connect(worker, relay)
        await _connect(client, relay)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        await dialer.dial(worker.get_id(), list(reach.relayed_addrs()))
        assert is_relayed(client, worker.get_id())
        # DCUtR (both sides drive it): on loopback the worker can dial the client directly.
        await wait_until(lambda: not is_relayed(client, worker.get_id()), timeout_s=30)
        assert await _echo_through(client, worker.get_id(), b"z" * 1000) == b"z" * 1000


def test_circuit_addresses_are_recognised() -> None:
    assert is_circuit_address("/ip4/1.2.3.4/tcp/1/p2p/Qm/p2p-circuit/p2p/Qn")
    assert not is_circuit_address("/ip4/1.2.3.4/tcp/1/p2p/Qm")


async def test_a_relay_refuses_a_slot_asked_for_in_another_peer_s_name(test_name: str) -> None:
    async with _peers(test_name, [RELAY, CLIENT]) as [(relay, _), (attacker, _a)]:
        await _connect(attacker, relay)
        stream = await attacker.new_stream(relay.get_id(), [HOP_PROTOCOL])
        victim = ID.from_base58("12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE")
        await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=victim.to_bytes())))
        with trio.fail_after(5):
            answer = await read_delimited_msg(stream, HopMessage)
        assert answer.status == to_proto_status(StatusCode.PERMISSION_DENIED)


async def test_a_relay_grants_at_most_per_group_slots_to_one_address_group(test_name: str) -> None:
    """All these peers dial from 127.0.0.1: one address group, as one operator's many keys would be."""
    relay = ReachSettings(mode=NatMode.PUBLIC, relay_service=True, limits=RelayServiceLimits(per_group=1))
    w = ReachSettings(mode=NatMode.PRIVATE, hole_punch=False)
    async with _peers(test_name, [relay, w, w]) as [(r, _), (first, reach1), (second, reach2)]:
        await _connect(first, r)
        await wait_until(lambda: bool(reach1.relayed_addrs()))
        await _connect(second, r)
        with trio.move_on_after(3):
            await wait_until(lambda: bool(reach2.relayed_addrs()))
        assert reach2.relayed_addrs() == ()


async def test_a_relay_releases_the_slot_of_a_peer_that_left(test_name: str) -> None:
    """0.8.1 keeps a slot for its whole TTL (an hour) after its holder is gone: under churn a relay fills up."""
    one_slot = ReachSettings(mode=NatMode.PUBLIC, relay_service=True, limits=RelayServiceLimits(reservations=1))
    w = ReachSettings(mode=NatMode.PRIVATE, hole_punch=False)
    async with _peers(test_name, [one_slot]) as [(relay, _)]:
        async with _peers(test_name + "gone", [w]) as [(gone, reach)]:
            await _connect(gone, relay)
            await wait_until(lambda: bool(reach.relayed_addrs()))
        await wait_until(lambda: not relay.get_network().get_connections(gone.get_id()))
        async with _peers(test_name + "new", [w]) as [(new, reach2)]:
            await _connect(new, relay)
            await wait_until(lambda: bool(reach2.relayed_addrs()))


async def test_a_client_tries_at_most_max_relayed_dials_relayed_addresses(test_name: str) -> None:
    """An advert may list 16 addresses; a client does not spend 16 dial timeouts on one worker. Dead addresses
    naming a real relay do not cut the client off from it (py-libp2p would otherwise remember the dead address and
    refuse to dial the relay for a minute)."""
    worker_settings = ReachSettings(mode=NatMode.PRIVATE, hole_punch=False)
    async with _peers(test_name, [RELAY, worker_settings, CLIENT]) as [(relay, _), (worker, reach), (_c, dialer)]:
        await _connect(worker, relay)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        [good] = reach.relayed_addrs()
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
            dead = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{relay.get_id()}/p2p-circuit/p2p/{worker.get_id()}"] * 3
            with pytest.raises(DialError):
                await dialer.dial(worker.get_id(), [*dead, good])
            await dialer.dial(worker.get_id(), [*dead[:2], good])


async def test_relays_naming_addresses_they_are_not_at_are_never_used_and_never_stop_the_node(test_name: str) -> None:
    """A peer that speaks hop tells Identify any address it likes: an empty one (which once raised out of the
    service and stopped the whole node), or someone else's (a black hole our clients would be sent to). A discovered
    relay's address is the IP we are connected to, at a port that answers; only then is a slot taken."""
    empty = HostConfig(announce=("/p2p/12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE",))
    forged = HostConfig(announce=("/ip4/192.0.2.1/tcp/443",))
    relays = [RELAY, RELAY, RELAY]
    worker_settings = ReachSettings(mode=NatMode.AUTO, hole_punch=False)
    async with (
        _peers(test_name, relays, configs=[empty, forged, HostConfig()]) as [(e, _), (f, _f), (honest, _h)],
        _peers(test_name + "w", [worker_settings]) as [(worker, reach)],
    ):
        await _connect(e, worker)
        await _connect(f, worker)
        with trio.move_on_after(3):
            await wait_until(lambda: bool(reach.relayed_addrs()))
        assert reach.relayed_addrs() == ()  # neither evil relay became ours; and the service still runs
        await _connect(worker, honest)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        assert list(reach.held) == [str(honest.get_id())]
        assert reach.relayed_addrs()[0].startswith(host_addrs(honest)[0])


async def test_a_client_never_dials_advert_addresses_outside_its_own_scopes(test_name: str) -> None:
    """An advert could aim clients at their own LAN or the cloud metadata address: a loopback-only client dials
    loopback and global addresses, never private or link-local ones (nor relays at such addresses)."""
    async with _peers(test_name, [CLIENT]) as [(_client, dialer)]:
        peer = ID.from_base58("12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE")
        aimed = [
            f"/ip4/192.168.1.1/tcp/22/p2p/{peer}",
            f"/ip4/169.254.169.254/tcp/80/p2p/{peer}",
            f"/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWSomeRelay/p2p-circuit/p2p/{peer}",
        ]
        with pytest.raises(DialError, match="no address"):
            await dialer.dial(peer, aimed)
