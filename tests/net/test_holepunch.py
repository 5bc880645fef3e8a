"""DCUtR as guarded by p2pcompute.net.holepunch (specs/reachability.md §7): what a node dials, how often, how many.

The attacks of the security review (a peer with one relayed connection made py-libp2p 0.8.1's DCUtR dial every
address it named: ~400 per CONNECT message, three rounds with the swarm's retries, concurrent sessions, and every
address its Identify listed) replayed against real hosts on loopback. Connection attempts are counted on listeners
these tests bind themselves on 127.0.0.x; nothing else is dialled.
"""

from __future__ import annotations

import collections
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence

import multiaddr
import psutil
import pytest
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR
from libp2p.relay.circuit_v2.dcutr import read_dcutr_msg
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.relay.circuit_v2.utils import write_delimited_msg

from p2pcompute.core.reach import NatMode
from p2pcompute.net.holepunch import (
    MAX_CONCURRENT_PUNCHES,
    MAX_PUNCH_ADDRS,
    MAX_SESSION_DIALS,
    PUNCH_ROUNDS,
    GuardedDCUtR,
    Scope,
    _Phase,
    allowed_scopes,
    dial_target,
    punch_targets,
    scope_of,
)
from p2pcompute.net.host import HostConfig, host_addrs, libp2p_keypair, open_host
from p2pcompute.net.reach import ReachService, ReachSettings, is_relayed
from p2pcompute.testing.net import seed_for, wait_until

LISTEN = "/ip4/127.0.0.1/tcp/0"
RELAY = ReachSettings(mode=NatMode.PUBLIC, relay_service=True, hole_punch=False)
VICTIM = ReachSettings(mode=NatMode.PRIVATE)  # hole punching is on by default
ATTACKER = ReachSettings(mode=NatMode.PUBLIC, reserve=False, hole_punch=False)

# --- the scope filter (pure) ---

LOOPBACK_NODE = ("/ip4/127.0.0.1/tcp/4001",)
LAN_NODE = ("/ip4/10.77.0.3/tcp/4001",)  # the netns testnet
PUBLIC_NODE = ("/ip4/1.2.3.4/tcp/4001",)
LINK_NODE = ("/ip4/169.254.7.7/tcp/4001",)
PEER = "12D3KooWJxqwv2cN1U8dLBrk27U5MPrh6EDZFUSryeAhTws5qAwM"

# address, dialled by (L)oopback / la(N) / (P)ublic / lin(K)-local nodes, the address dialled when kept
SCOPE_TABLE: list[tuple[str, str, str | None]] = [
    ("/ip4/1.2.3.4/tcp/4001", "LNPK", "/ip4/1.2.3.4/tcp/4001"),
    ("/ip4/1.2.3.4/tcp/4001/p2p/" + PEER, "LNPK", "/ip4/1.2.3.4/tcp/4001"),
    ("/ip6/2606:4700:0::1/tcp/443", "LNPK", "/ip6/2606:4700::1/tcp/443"),
    ("/ip4/127.0.0.1/tcp/6379", "L", "/ip4/127.0.0.1/tcp/6379"),
    ("/ip4/127.0.0.3/tcp/22", "L", "/ip4/127.0.0.3/tcp/22"),
    ("/ip6/::1/tcp/22", "L", "/ip6/::1/tcp/22"),
    ("/ip6/::ffff:127.0.0.1/tcp/22", "L", "/ip4/127.0.0.1/tcp/22"),
    ("/ip4/10.1.2.3/tcp/22", "N", "/ip4/10.1.2.3/tcp/22"),
    ("/ip4/172.16.0.1/tcp/80", "N", "/ip4/172.16.0.1/tcp/80"),
    ("/ip4/192.168.1.1/tcp/80", "N", "/ip4/192.168.1.1/tcp/80"),
    ("/ip4/100.64.0.1/tcp/80", "N", "/ip4/100.64.0.1/tcp/80"),
    ("/ip6/fd00::1/tcp/80", "N", "/ip6/fd00::1/tcp/80"),
    ("/ip6/::ffff:10.0.0.1/tcp/80", "N", "/ip4/10.0.0.1/tcp/80"),
    ("/ip4/169.254.169.254/tcp/80", "K", "/ip4/169.254.169.254/tcp/80"),  # the cloud metadata service
    ("/ip6/fe80::1/tcp/80", "K", "/ip6/fe80::1/tcp/80"),
    ("/ip6/64:ff9b::102:304/tcp/80", "LNPK", "/ip6/64:ff9b::102:304/tcp/80"),  # NAT64 of 1.2.3.4
    ("/ip6/64:ff9b::a00:1/tcp/80", "", None),  # NAT64 of 10.0.0.1
    ("/ip6/2002:7f00:1::1/tcp/80", "", None),  # 6to4 of 127.0.0.1
    ("/ip4/0.0.0.0/tcp/80", "", None),
    ("/ip4/0.1.2.3/tcp/80", "", None),
    ("/ip6/::/tcp/80", "", None),
    ("/ip4/224.0.0.1/tcp/80", "", None),
    ("/ip6/ff02::1/tcp/80", "", None),
    ("/ip4/255.255.255.255/tcp/80", "", None),
    ("/ip4/240.0.0.1/tcp/80", "", None),
    ("/ip4/192.0.2.1/tcp/80", "", None),
    ("/ip4/198.18.0.1/tcp/80", "", None),
    ("/ip6/2001:db8::1/tcp/80", "", None),
    ("/ip6/fec0::1/tcp/80", "", None),
    ("/ip4/1.2.3.4/tcp/0", "", None),
    ("/ip4/1.2.3.4/udp/4001/quic-v1", "", None),
    ("/ip4/1.2.3.4/tcp/4001/ws", "", None),
    ("/dns4/localhost/tcp/4001", "", None),
    ("/dns/example.com/tcp/4001", "", None),
    ("/ip4/1.2.3.4/tcp/4001/p2p/" + PEER + "/p2p-circuit", "", None),
    ("/p2p/" + PEER, "", None),
]
NODES = {"L": LOOPBACK_NODE, "N": LAN_NODE, "P": PUBLIC_NODE, "K": LINK_NODE}


@pytest.mark.parametrize(("addr", "kept_by", "as_dialled"), SCOPE_TABLE, ids=[a for a, _, _ in SCOPE_TABLE])
def test_the_scope_filter_keeps_an_address_only_for_nodes_in_its_scope(
    addr: str, kept_by: str, as_dialled: str | None
) -> None:
    for node, own in NODES.items():
        target = dial_target(addr, allowed_scopes(own))
        assert target == (as_dialled if node in kept_by else None), f"{addr} for a node at {own[0]}"
        assert dial_target(multiaddr.Multiaddr(addr).to_bytes(), allowed_scopes(own)) == target  # as DCUtR sends it


def test_own_scopes_come_from_own_addresses_and_always_include_global() -> None:
    assert allowed_scopes([]) == {Scope.GLOBAL}
    assert allowed_scopes(["/ip4/0.0.0.0/tcp/4001", "/dns4/x/tcp/1", "garbage"]) == {Scope.GLOBAL}
    assert allowed_scopes(["/ip4/127.0.0.1/tcp/1/p2p/" + PEER]) == {Scope.GLOBAL, Scope.LOOPBACK}
    assert allowed_scopes(["/ip4/192.168.1.2/tcp/1", "/ip6/::1/tcp/1"]) == {
        Scope.GLOBAL,
        Scope.PRIVATE,
        Scope.LOOPBACK,
    }
    assert scope_of("8.8.8.8") is Scope.GLOBAL and scope_of("10.77.0.2") is Scope.PRIVATE


def test_targets_are_deduplicated_capped_and_in_order() -> None:
    named = [
        "/ip4/10.0.0.1/tcp/1",  # private: not for a public node
        "/ip4/1.1.1.1/tcp/1",
        "/ip6/::ffff:1.1.1.1/tcp/1",  # the same, written otherwise
        "/ip4/1.1.1.1/tcp/1/p2p/" + PEER,  # the same again
        "/ip4/5.5.5.5/tcp/5",  # excluded (say, the relay)
        *[f"/ip4/2.2.2.{i}/tcp/{i}" for i in range(1, 400)],
    ]
    got = punch_targets(named, allowed_scopes(PUBLIC_NODE), exclude={"/ip4/5.5.5.5/tcp/5"})
    assert [str(a) for a in got] == [
        "/ip4/1.1.1.1/tcp/1",
        "/ip4/2.2.2.1/tcp/1",
        "/ip4/2.2.2.2/tcp/2",
        "/ip4/2.2.2.3/tcp/3",
    ]
    assert len(got) == MAX_PUNCH_ADDRS
    assert punch_targets(["/ip4/127.0.0.1/tcp/1"] * 3, allowed_scopes(PUBLIC_NODE)) == []


# --- sessions: one per peer, a global cap, the cooldown, the tie-break (no network) ---


class _Host:
    def __init__(self, peer: ID) -> None:
        self.peer = peer

    def get_id(self) -> ID:
        return self.peer


def _ids(name: str, n: int) -> list[ID]:
    ids = [ID.from_pubkey(libp2p_keypair(seed_for(name, i)).public_key) for i in range(n)]
    return sorted(ids, key=lambda p: p.to_bytes())


async def test_one_session_per_peer_a_global_cap_and_a_cooldown_per_direction(
    test_name: str, autojump_clock: trio.testing.MockClock
) -> None:
    peers = _ids(test_name, MAX_CONCURRENT_PUNCHES + 2)
    me, a, others = peers[-1], peers[0], peers[1:-1]
    guard = GuardedDCUtR(_Host(me))  # type: ignore[arg-type]
    first = guard._admit(a, inbound=True)
    assert first is not None
    assert guard._admit(a, inbound=True) is None  # no second session from the same peer
    assert guard._admit(a, inbound=False) is None  # nor one of ours beside it
    held = [guard._admit(p, inbound=True) for p in others[: MAX_CONCURRENT_PUNCHES - 1]]
    assert all(held)
    assert guard._admit(others[-1], inbound=True) is None  # MAX_CONCURRENT_PUNCHES at once, for everyone
    for p, s in zip(others, held, strict=False):
        assert s is not None
        guard._release(p, s)
    first.dials = 3
    guard._release(a, first)
    assert guard.cooling(a, inbound=True) and not guard.cooling(a, inbound=False)
    assert guard._admit(a, inbound=True) is None  # the cooldown
    ours = guard._admit(a, inbound=False)  # the other direction is not cooling
    assert ours is not None
    guard._release(a, ours)  # it dialled nothing: no cooldown
    assert not guard.cooling(a, inbound=False)
    assert guard._admit(others[0], inbound=True) is not None  # a session without dials leaves no cooldown
    await trio.sleep(guard.cooldown_s)
    assert not guard.cooling(a, inbound=True)
    assert guard._admit(a, inbound=True) is not None


async def test_when_both_sides_initiate_at_once_the_smaller_id_s_session_goes_on(test_name: str) -> None:
    small, middle, large = _ids(test_name, 3)
    guard = GuardedDCUtR(_Host(middle))  # type: ignore[arg-type]
    ours = guard._admit(small, inbound=False)
    assert ours is not None
    assert guard._admit(small, inbound=True) is None  # ours is still dialling directly (no message sent yet)
    ours.phase = _Phase.EXCHANGE
    theirs = guard._admit(small, inbound=True)
    assert theirs is not None and ours.cancel.cancel_called and guard._sessions[small] is theirs
    guard._release(small, ours)  # the cancelled one unwinds after: it does not take the other's place
    assert guard.busy(small)
    mine = guard._admit(large, inbound=False)
    assert mine is not None
    mine.phase = _Phase.EXCHANGE
    assert guard._admit(large, inbound=True) is None and not mine.cancel.cancel_called  # ours goes on
    mine.phase = _Phase.PUNCH
    assert guard._admit(large, inbound=True) is None


# --- the attacks, on real hosts ---


class _Sinks:
    """TCP listeners on 127.0.0.3 that count the connections each accepts (and close them at once)."""

    def __init__(self, listeners: list[trio.SocketListener]) -> None:
        self.listeners = listeners
        self.ports = [listener.socket.getsockname()[1] for listener in listeners]
        self.accepted: collections.Counter[int] = collections.Counter()

    def addrs(self) -> list[str]:
        return [f"/ip4/127.0.0.3/tcp/{p}" for p in self.ports]

    async def serve(self, nursery: trio.Nursery) -> None:
        for listener, port in zip(self.listeners, self.ports, strict=True):
            nursery.start_soon(self._serve, listener, port)

    async def _serve(self, listener: trio.SocketListener, port: int) -> None:
        while True:
            conn = await listener.accept()
            self.accepted[port] += 1
            await conn.aclose()

    @property
    def total(self) -> int:
        return sum(self.accepted.values())

    def close(self) -> None:
        for listener in self.listeners:
            listener.socket.close()


async def _sinks(n: int) -> _Sinks:
    return _Sinks([(await trio.open_tcp_listeners(0, host="127.0.0.3"))[0] for _ in range(n)])


@contextlib.asynccontextmanager
async def _scene(
    name: str, attacker_announce: Sequence[str], sinks: _Sinks | None = None
) -> AsyncIterator[tuple[IHost, IHost, GuardedDCUtR]]:
    """A relay, a victim behind it (DCUtR on, as every node runs it) and an attacker connected to the victim through
    the relay. Yields (victim, attacker, the victim's DCUtR)."""
    configs = [HostConfig(), HostConfig(), HostConfig(announce=tuple(attacker_announce))]
    async with contextlib.AsyncExitStack() as stack:
        relay, victim, attacker = [
            await stack.enter_async_context(open_host(seed_for(name, i), [LISTEN], config=c))
            for i, c in enumerate(configs)
        ]
        if sinks is not None:
            stack.callback(sinks.close)  # after the nursery: its tasks accept on them until then
        async with trio.open_nursery() as nursery:
            if sinks is not None:
                await sinks.serve(nursery)
            services = []
            for host, settings in ((relay, RELAY), (victim, VICTIM), (attacker, ATTACKER)):
                service = ReachService(host, settings, clock=lambda: int(trio.current_time() * 1000))
                await nursery.start(service.run)
                services.append(service)
            guard = victim._dcutr_protocol  # type: ignore[attr-defined]
            assert isinstance(guard, GuardedDCUtR)  # what ReachService runs
            await victim.connect(info_from_p2p_addr(multiaddr.Multiaddr(host_addrs(relay)[0])))
            await wait_until(lambda: bool(services[1].relayed_addrs()))
            await services[2].dial(victim.get_id(), list(services[1].relayed_addrs()))
            assert is_relayed(attacker, victim.get_id())
            try:
                yield victim, attacker, guard
            finally:
                nursery.cancel_scope.cancel()


def _closed_port(held: list[socket.socket], ip: str = "127.0.0.4") -> str:
    """An address nothing listens on: a port these tests hold bound (a dial there is refused)."""
    sock = socket.socket()
    sock.bind((ip, 0))
    held.append(sock)
    return f"/ip4/{ip}/tcp/{sock.getsockname()[1]}"


async def _session(attacker: IHost, victim: ID, named: list[str]) -> bool:
    """One DCUtR session as the initiator: CONNECT naming ``named``, SYNC. Whether the victim answered."""
    obs = [multiaddr.Multiaddr(a).to_bytes() for a in named]
    try:
        with trio.fail_after(10):
            stream = await attacker.new_stream(victim, [DCUTR])
            await write_delimited_msg(stream, HolePunch(type=HolePunch.CONNECT, ObsAddrs=obs))
            answer = await read_dcutr_msg(stream, HolePunch)
            await write_delimited_msg(stream, HolePunch(type=HolePunch.SYNC))
    except Exception:
        return False  # reset: refused
    return answer.type == HolePunch.CONNECT


async def test_a_connect_message_of_hundreds_of_addresses_makes_the_node_dial_at_most_max_punch_addrs(
    test_name: str,
) -> None:
    sinks = await _sinks(100)
    held: list[socket.socket] = []
    try:
        async with _scene(test_name, [_closed_port(held)], sinks) as (victim, attacker, guard):
            me = attacker.get_id()
            # Its own attempt comes first (the attacker's Identify address is refused; the attacker speaks no
            # DCUtR): from then on the victim's outbound direction is cooling, and the sessions below are inbound.
            await wait_until(lambda: guard.cooling(me, inbound=False) and not guard.busy(me), timeout_s=30)
            named = sinks.addrs() + [_closed_port(held) for _ in range(250)]  # ~4 KiB
            answered: list[bool] = []

            async def session() -> None:
                answered.append(await _session(attacker, victim.get_id(), named))

            async with trio.open_nursery() as nursery:
                for _ in range(3):  # three sessions at once on one relayed connection
                    nursery.start_soon(session)
            assert sorted(answered) == [False, False, True]  # one session; the others are reset
            await wait_until(lambda: not guard.busy(me), timeout_s=30)
            assert 0 < len(sinks.accepted) <= MAX_PUNCH_ADDRS
            assert set(sinks.accepted) <= set(sinks.ports[:MAX_PUNCH_ADDRS])  # the first named, in order
            assert sinks.total <= MAX_PUNCH_ADDRS * PUNCH_ROUNDS <= MAX_SESSION_DIALS  # single attempts
            [(peer, _, dialled, dials)] = [h for h in guard.history if h[1]]  # one inbound session
            assert peer == me and len(dialled) <= MAX_PUNCH_ADDRS and dials <= MAX_SESSION_DIALS
            # The cooldown: the next session is refused, and nothing more is dialled.
            before = sinks.total
            assert not await _session(attacker, victim.get_id(), named)
            await trio.sleep(1.0)
            assert sinks.total == before
    finally:
        for sock in held:
            sock.close()


async def test_targets_that_never_answer_hold_at_most_max_punch_addrs_sockets(test_name: str) -> None:
    silent = []  # listeners that never accept: a connect completes, nothing is ever said (a blackholed LAN host)
    for _ in range(120):
        sock = socket.socket()
        sock.bind(("127.0.0.5", 0))
        sock.listen(8)
        silent.append(sock)
    held: list[socket.socket] = []
    try:
        async with _scene(test_name, [_closed_port(held)]) as (victim, attacker, guard):
            me = attacker.get_id()
            await wait_until(lambda: guard.cooling(me, inbound=False) and not guard.busy(me), timeout_s=30)
            process = psutil.Process()

            def sockets() -> int:
                return sum(1 for c in process.net_connections("tcp") if c.raddr and c.raddr.ip == "127.0.0.5")

            groups = [silent[i * 40 : (i + 1) * 40] for i in range(3)]
            async with trio.open_nursery() as nursery:
                for group in groups:
                    named = [f"/ip4/127.0.0.5/tcp/{s.getsockname()[1]}" for s in group]
                    nursery.start_soon(_session, attacker, victim.get_id(), named)
            peak = 0
            with trio.move_on_after(8):
                while True:
                    peak = max(peak, sockets())
                    await trio.sleep(0.2)
            assert 0 < peak <= MAX_PUNCH_ADDRS  # 0.8.1: ~400 per session, ~1000 for three
    finally:
        for sock in held + silent:
            sock.close()


async def test_a_relayed_peer_s_identify_addresses_are_dialled_at_most_max_punch_addrs_once(test_name: str) -> None:
    sinks = await _sinks(40)  # what the attacker's Identify lists as its own addresses (0.8.1 takes up to 1000)
    async with _scene(test_name, sinks.addrs(), sinks) as (_, attacker, guard):
        me = attacker.get_id()
        await wait_until(lambda: guard.cooling(me, inbound=False) and not guard.busy(me), timeout_s=30)
        await trio.sleep(6)  # 0.8.1's loop came round every 2 s: 2,400 connections in 30 s from 200 addresses
        assert 0 < len(sinks.accepted) <= MAX_PUNCH_ADDRS
        assert sinks.total <= MAX_PUNCH_ADDRS  # one attempt each
        [(_, inbound, dialled, dials)] = [h for h in guard.history if h[0] == me]  # one session: ours
        assert not inbound and dialled <= set(sinks.addrs()) and len(dialled) == dials <= MAX_PUNCH_ADDRS


# --- the legitimate path ---


async def test_a_relayed_connection_still_becomes_direct_within_the_limits(test_name: str) -> None:
    worker_settings = ReachSettings(mode=NatMode.PRIVATE)
    client_settings = ReachSettings(mode=NatMode.PUBLIC, reserve=False)
    async with contextlib.AsyncExitStack() as stack:
        relay, worker, client = [
            await stack.enter_async_context(open_host(seed_for(test_name, i), [LISTEN])) for i in range(3)
        ]
        async with trio.open_nursery() as nursery:
            services = []
            for host, settings in ((relay, RELAY), (worker, worker_settings), (client, client_settings)):
                service = ReachService(host, settings, clock=lambda: int(trio.current_time() * 1000))
                await nursery.start(service.run)
                services.append(service)
            await worker.connect(info_from_p2p_addr(multiaddr.Multiaddr(host_addrs(relay)[0])))
            await wait_until(lambda: bool(services[1].relayed_addrs()))
            await services[2].dial(worker.get_id(), list(services[1].relayed_addrs()))
            assert is_relayed(client, worker.get_id())
            await wait_until(lambda: not is_relayed(client, worker.get_id()), timeout_s=30)
            for host in (worker, client):
                guard = host._dcutr_protocol  # type: ignore[attr-defined]
                assert isinstance(guard, GuardedDCUtR)
                assert all(len(d) <= 2 * MAX_PUNCH_ADDRS and n <= MAX_SESSION_DIALS for _, _, d, n in guard.history)
            nursery.cancel_scope.cancel()
