"""p2pcompute.net.relay: the guarded relay against strangers (specs/reachability.md §5).

Regression tests for an outside review's attacks on py-libp2p 0.8.1's relay, each now failing: a stranger's circuit
ending closed an honest client's (circuits filed by destination peer id), idle circuits lived forever and the circuit
cap was per destination, the group table grew with every refused key, and any directly connected peer could pass a
STOP stream off as a relayed connection. Real py-libp2p hosts on 127.0.0.1 in one trio process (all one address
group, as loopback is grouped by the full address).
"""

from __future__ import annotations

import contextlib
from typing import cast

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from p2pcompute.core.reach import NatMode
from p2pcompute.net import relay as relay_module
from p2pcompute.net.host import open_host
from p2pcompute.net.reach import HOP_PROTOCOL, ReachSettings, RelayServiceLimits, is_relayed
from p2pcompute.net.relay import GuardedRelay
from p2pcompute.testing.net import seed_for, wait_until
from tests.net.test_reach import LISTEN, _connect, _echo_through, _peers

OK = to_proto_status(StatusCode.OK)
LIMIT = to_proto_status(StatusCode.RESOURCE_LIMIT_EXCEEDED)
WORKER = ReachSettings(mode=NatMode.PRIVATE, hole_punch=False)
CLIENT = ReachSettings(mode=NatMode.PUBLIC, reserve=False, hole_punch=False)
STRANGER = ReachSettings(mode=NatMode.PUBLIC, reserve=False, hole_punch=False)  # no slot, serves nothing


def _relay(limits: RelayServiceLimits | None = None) -> ReachSettings:
    limits = limits or RelayServiceLimits()
    return ReachSettings(mode=NatMode.PUBLIC, relay_service=True, reserve=False, hole_punch=False, limits=limits)


def _guard(relay: IHost) -> GuardedRelay:
    """The GuardedRelay behind a relay's hop handler (to read its counters)."""
    return cast(GuardedRelay, relay.get_mux().handlers[HOP_PROTOCOL].__self__)  # type: ignore[union-attr]


async def _raw_connect(src: IHost, relay: IHost, dst: ID) -> tuple[int, INetStream]:
    """A hop CONNECT by hand: the status and the circuit's stream, on which nothing is ever said."""
    stream = await src.new_stream(relay.get_id(), [HOP_PROTOCOL])
    await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=dst.to_bytes())))
    with trio.fail_after(20):
        answer = await read_delimited_msg(stream, HopMessage)
    return answer.status, stream


async def _is_cut(stream: INetStream) -> bool:
    """Whether the relay ended this circuit (a read ends at once rather than waiting for bytes)."""
    with trio.move_on_after(2):
        try:
            return not await stream.read(65536)
        except Exception:
            return True
    return False


async def test_control_relaying_works_and_a_finished_circuit_gives_its_counts_back(test_name: str) -> None:
    async with _peers(test_name, [_relay(), WORKER, CLIENT]) as [(relay, _), (worker, reach), (client, dialer)]:
        await _connect(worker, relay)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        await dialer.dial(worker.get_id(), list(reach.relayed_addrs()))  # the worker accepts its relay's STOP
        assert is_relayed(client, worker.get_id())
        assert await _echo_through(client, worker.get_id(), b"x" * 100_000) == b"x" * 100_000
        guard = _guard(relay)
        assert guard.circuits() == 1
        await client.disconnect(worker.get_id())
        await wait_until(lambda: guard.circuits() == 0)
        assert not guard._circuits_of_peer and not guard._circuits_of_group
        assert guard.resource_manager._reservations[worker.get_id()].active_connections == 0


async def test_a_stranger_ending_its_own_circuit_does_not_close_an_honest_client_s(test_name: str) -> None:
    """A2b: 0.8.1 filed circuits by destination peer id, and the end of one closed whichever the entry named."""
    async with _peers(test_name, [_relay(), WORKER, STRANGER, CLIENT]) as [
        (relay, _),
        (worker, reach),
        (stranger, _s),
        (client, dialer),
    ]:
        await _connect(worker, relay)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        await _connect(stranger, relay)
        status, junk = await _raw_connect(stranger, relay, worker.get_id())  # the stranger's circuit first
        assert status == OK
        await dialer.dial(worker.get_id(), list(reach.relayed_addrs()))  # then the client's, to the same worker
        assert await _echo_through(client, worker.get_id(), b"a" * 1000) == b"a" * 1000
        guard = _guard(relay)
        assert guard.circuits() == 2
        await junk.write(b"\x13junk that is not multistream\n")  # the worker gives up on it: that circuit ends
        await wait_until(lambda: guard.circuits() == 1)
        await trio.sleep(1)
        assert client.get_network().get_connections(worker.get_id())
        assert await _echo_through(client, worker.get_id(), b"b" * 1000) == b"b" * 1000


async def test_idle_circuits_end_at_circuit_seconds_and_the_relay_serves_again(test_name: str) -> None:
    """A2a: 0.8.1 checked the circuit's deadline only when a chunk arrived, so idle circuits held their count
    forever and a stranger could lock every client out of a worker."""
    limits = RelayServiceLimits(circuits=4, circuit_seconds=2)
    async with _peers(test_name, [_relay(limits), WORKER, STRANGER, CLIENT]) as [
        (relay, _),
        (worker, reach),
        (stranger, _s),
        (client, dialer),
    ]:
        await _connect(worker, relay)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        await _connect(stranger, relay)
        held = []
        for _ in range(limits.circuits):
            status, stream = await _raw_connect(stranger, relay, worker.get_id())
            assert status == OK
            held.append(stream)
        guard = _guard(relay)
        assert guard.circuits() == limits.circuits
        await wait_until(lambda: guard.circuits() == 0, timeout_s=3 * limits.circuit_seconds)
        for stream in held:
            assert await _is_cut(stream)
        assert guard.resource_manager._reservations[worker.get_id()].active_connections == 0
        await dialer.dial(worker.get_id(), list(reach.relayed_addrs()))
        assert await _echo_through(client, worker.get_id(), b"c" * 1000) == b"c" * 1000


async def test_a_circuit_with_no_byte_either_way_ends_after_the_idle_timeout(
    test_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_module, "CIRCUIT_IDLE_S", 1.0)
    async with _peers(test_name, [_relay(), WORKER, STRANGER, CLIENT]) as [
        (relay, _),
        (worker, reach),
        (stranger, _s),
        (client, dialer),
    ]:
        await _connect(worker, relay)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        await _connect(stranger, relay)
        guard = _guard(relay)
        _, idle = await _raw_connect(stranger, relay, worker.get_id())
        await dialer.dial(worker.get_id(), list(reach.relayed_addrs()))
        assert guard.circuits() == 2
        for _ in range(8):  # 2.4 s of traffic every 0.3 s: the client's circuit is never idle for 1 s
            assert await _echo_through(client, worker.get_id(), b"d" * 100) == b"d" * 100
            await trio.sleep(0.3)
        assert guard.circuits() == 1  # the stranger's silent one is gone
        assert await _is_cut(idle)
        await wait_until(lambda: guard.circuits() == 0, timeout_s=5)  # and the client's, once it goes quiet


async def test_the_circuit_limit_is_for_the_whole_relay_not_per_destination(test_name: str) -> None:
    """A2a: 0.8.1 counted circuits per destination reservation: N slots gave N x relay_max_circuits."""
    limits = RelayServiceLimits(circuits=4, per_peer_circuits=8, per_group_circuits=8)
    async with _peers(test_name, [_relay(limits), WORKER, WORKER, STRANGER]) as [
        (relay, _),
        (w1, r1),
        (w2, r2),
        (stranger, _s),
    ]:
        for w, r in ((w1, r1), (w2, r2)):
            await _connect(w, relay)
            await wait_until(lambda r=r: bool(r.relayed_addrs()))
        await _connect(stranger, relay)
        answers = []
        for w in (w1, w2):
            for _ in range(limits.circuits):
                status, _stream = await _raw_connect(stranger, relay, w.get_id())
                answers.append(status)
        assert answers.count(OK) == limits.circuits
        assert answers[limits.circuits :] == [LIMIT] * limits.circuits
        assert _guard(relay).circuits() == limits.circuits


async def test_one_source_peer_and_one_source_address_group_are_capped(test_name: str) -> None:
    limits = RelayServiceLimits(circuits=16, per_peer_circuits=2, per_group_circuits=3)
    async with _peers(test_name, [_relay(limits), WORKER, STRANGER, CLIENT]) as [
        (relay, _),
        (worker, reach),
        (stranger, _s),
        (client, _c),
    ]:
        await _connect(worker, relay)
        await wait_until(lambda: bool(reach.relayed_addrs()))
        await _connect(stranger, relay)
        await _connect(client, relay)
        mine = [(await _raw_connect(stranger, relay, worker.get_id()))[0] for _ in range(3)]
        assert mine == [OK, OK, LIMIT]  # per peer
        theirs = [(await _raw_connect(client, relay, worker.get_id()))[0] for _ in range(2)]
        assert theirs == [OK, LIMIT]  # per group: both dial from 127.0.0.1
        guard = _guard(relay)
        assert guard.circuits() == 3
        assert guard._circuits_of_peer == {stranger.get_id(): 2, client.get_id(): 1}


async def test_the_group_table_holds_only_peers_that_hold_a_slot(test_name: str) -> None:
    """A2c: an entry per peer id that ever asked (refused ones and expired slots included), never pruned."""
    async with _peers(test_name, [_relay(RelayServiceLimits(reservations=1)), WORKER]) as [(relay, _), (holder, r)]:
        await _connect(holder, relay)
        await wait_until(lambda: bool(r.relayed_addrs()))
        guard = _guard(relay)
        for i in range(8):
            async with open_host(seed_for(f"{test_name}/key{i}", 0), [LISTEN]) as key:
                await _connect(key, relay)
                stream = await key.new_stream(relay.get_id(), [HOP_PROTOCOL])
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                with trio.fail_after(10):
                    answer = await read_delimited_msg(stream, HopMessage)
                assert answer.status == LIMIT  # the relay's one slot is taken
        assert list(guard._group_of) == [holder.get_id()]
        assert not guard._reserving


async def test_a_stop_from_a_peer_we_hold_no_slot_on_is_refused(test_name: str) -> None:
    """A3c: a directly connected peer opened a STOP stream straight to a node and ran Noise inside it under another
    key: the node took that key for a relayed peer (and served it DCUtR)."""
    victim_settings = ReachSettings(mode=NatMode.PUBLIC, reserve=False, hole_punch=False)
    async with (
        _peers(test_name, [victim_settings]) as [(victim, _)],
        open_host(seed_for(test_name, 7), [LISTEN]) as attacker,
        open_host(seed_for(test_name, 8), [LISTEN]) as other_key,
    ):
        await _connect(attacker, victim)
        stop = await attacker.new_stream(victim.get_id(), [STOP_PROTOCOL_ID])
        connect = StopMessage(type=StopMessage.CONNECT, peer=CircuitPeerId(id=other_key.get_id().to_bytes()))
        await write_delimited_msg(stop, connect)
        with trio.fail_after(10):
            answer = await read_delimited_msg(stop, StopMessage)
        assert answer.status == to_proto_status(StatusCode.PERMISSION_DENIED)
        fake = multiaddr.Multiaddr(f"/p2p/{attacker.get_id()}/p2p-circuit/p2p/{victim.get_id()}")
        raw = RawConnection(stream=stop, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[fake])
        with contextlib.suppress(Exception), trio.move_on_after(5):
            await other_key.upgrade_outbound_connection(raw, victim.get_id())
        await trio.sleep(0.3)
        assert not victim.get_network().get_connections(other_key.get_id())
