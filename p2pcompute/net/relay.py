"""The relay service: py-libp2p 0.8.1's circuit relay v2 hop and stop handlers, guarded against strangers
(specs/reachability.md §5).

0.8.1's relay falls short where a stranger pushes it; :class:`GuardedRelay` adds what it lacks. Used by
:class:`p2pcompute.net.reach.ReachService` on every node (the stop side: being reached through a relay) and, with
``relay_service``, the hop side (relaying for others).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from libp2p.abc import IHost, INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol, _is_relayed_stream
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.constants import MAX_READ_LEN

from p2pcompute.core.matching import address_group

__all__ = ["CIRCUIT_IDLE_S", "STOP_TIMEOUT_S", "GuardedRelay", "RelayServiceLimits"]

log = logging.getLogger(__name__)

CIRCUIT_IDLE_S: Final = 60.0  # a circuit on which no byte moved either way for this long is reset (yamux pings: 30 s)
STOP_TIMEOUT_S: Final = 15.0  # open the STOP stream to the destination and have its answer
_CLOSE_TIMEOUT_S: Final = 5.0  # closing or resetting a circuit's two streams, once it is over


@dataclass(frozen=True, slots=True)
class RelayServiceLimits:
    """What a node that serves as a relay grants (``relay_*`` settings)."""

    reservations: int = 32  # peers holding a slot at once
    circuits: int = 16  # relayed connections at once, through this relay as a whole
    circuit_bytes: int = 128 * 1024**2  # bytes one circuit may carry (both directions together)
    circuit_seconds: int = 600  # how long one circuit may stay open, idle or not
    reservation_seconds: int = 3600  # how long a slot lasts before it must be refreshed
    per_group: int = 4  # slots held at once by peers of one address group (one operator's many keys)
    per_peer_circuits: int = 4  # circuits one source peer may have open through this relay at once
    per_group_circuits: int = 8  # circuits source peers of one address group may have open at once

    def libp2p(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_seconds,
            data=self.circuit_bytes,
            max_circuit_conns=self.circuits,
            max_reservations=self.reservations,
            reservation_ttl=self.reservation_seconds,
        )


def _stream_group(stream: Any) -> str:
    with contextlib.suppress(Exception):
        remote = stream.get_remote_address()
        if remote:
            family = "ip6" if ":" in remote[0] else "ip4"
            return address_group(f"/{family}/{remote[0]}/tcp/{remote[1]}")
    with contextlib.suppress(Exception):
        return f"peer:{stream.muxed_conn.peer_id}"
    return "unknown"


def _refuse_all(_peer: ID) -> bool:
    return False


@dataclass(eq=False)
class _Circuit:
    """One relayed connection: its own pair of streams, so that ending it touches nothing else."""

    src: ID
    dst: ID
    group: str
    src_stream: INetStream
    dst_stream: INetStream | None = None
    remaining: float = math.inf  # bytes it may still carry, both directions together
    last_active: float = 0.0  # trio clock of the last byte read from either side
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reason: str = ""  # why it ended: "eof", "failed" (the STOP leg), "idle", "bytes", "stalled", "reset", ...
    counted: bool = False  # on the destination's reservation (0.8.1's active_connections)

    def end(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self.scope.cancel()


class GuardedRelay(CircuitV2Protocol):
    """0.8.1's relay, with what it lacks against strangers:

    * a reservation is for the authenticated peer only (0.8.1 takes the peer id the request names, so anyone could
      take slots in others' names);
    * slots of peers no longer connected are released before counting (0.8.1 keeps them until their TTL, an hour:
      under churn a relay fills with slots of peers long gone);
    * at most ``per_group`` slots per address group, so one operator's many keys cannot take every slot;
    * each circuit keeps its own pair of streams and ends only those (0.8.1 files circuits by destination peer id: two
      circuits to one worker share an entry, and the end of a stranger's circuit closed an honest client's);
    * at most ``circuits`` circuits through the relay as a whole (0.8.1 counts per destination), ``per_peer_circuits``
      per source peer and ``per_group_circuits`` per source address group;
    * a circuit ends after ``circuit_seconds`` whether or not bytes move (0.8.1 checks its deadline only when a chunk
      arrives: an idle circuit lived forever), and after :data:`CIRCUIT_IDLE_S` with no byte either way;
    * a STOP (someone reaching us through a relay) is accepted only from a peer ``accept_stop_from`` names, the relays
      we hold a slot on (0.8.1 accepts one from any connected peer, who could then pass any key off as relayed).
    """

    def __init__(
        self,
        host: IHost,
        limits: RelayServiceLimits,
        *,
        allow_hop: bool,
        accept_stop_from: Callable[[ID], bool] = _refuse_all,
    ) -> None:
        super().__init__(host, limits=limits.libp2p(), allow_hop=allow_hop)
        self._service_limits = limits
        self._per_group = limits.per_group
        self._accept_stop_from = accept_stop_from
        self._group_of: dict[ID, str] = {}  # holders of a granted slot -> their address group
        self._reserving: collections.Counter[str] = collections.Counter()  # groups with a RESERVE being answered
        self._live: set[_Circuit] = set()
        self._circuits_of_peer: collections.Counter[ID] = collections.Counter()
        self._circuits_of_group: collections.Counter[str] = collections.Counter()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await super().run(task_status=task_status)
        finally:
            for circuit in list(self._live):
                circuit.end("shutdown")

    # --- slots ---

    async def _handle_reserve(self, stream: Any, msg: HopMessage) -> None:
        remote: ID = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and bytes(msg.peer.id) != remote.to_bytes():
            log.info("refused a relay slot that %s asked for in another peer's name", remote)
            await self._refuse(stream, StatusCode.PERMISSION_DENIED)
            return
        manager = self.resource_manager
        manager._clean_expired()
        for peer in list(manager._reservations):
            if not self.host.get_network().get_connections(peer):
                del manager._reservations[peer]
        # Only holders of a slot are remembered: refused or expired peers leave no entry behind.
        self._group_of = {p: g for p, g in self._group_of.items() if p in manager._reservations}
        group = _stream_group(stream)
        same = sum(1 for p, g in self._group_of.items() if g == group and p != remote) + self._reserving[group]
        if same >= self._per_group:
            log.info("refused a relay slot to %s: %d slots already held from %s", remote, same, group)
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        self._reserving[group] += 1  # counted while answered, so concurrent requests cannot overshoot per_group
        try:
            await super()._handle_reserve(stream, msg)
        finally:
            self._reserving[group] -= 1
            if self._reserving[group] <= 0:
                del self._reserving[group]
            if remote in manager._reservations:  # granted (or refreshed)
                self._group_of[remote] = group

    # --- circuits (hop) ---

    def circuits(self) -> int:
        """Circuits open through this relay now."""
        return len(self._live)

    def _circuit_refusal(self, src: ID, group: str) -> str | None:
        limits = self._service_limits
        if len(self._live) >= limits.circuits:
            return f"{len(self._live)} circuits open, the relay's limit"
        if self._circuits_of_peer[src] >= limits.per_peer_circuits:
            return f"{self._circuits_of_peer[src]} circuits open from this peer"
        if self._circuits_of_group[group] >= limits.per_group_circuits:
            return f"{self._circuits_of_group[group]} circuits open from {group}"
        return None

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        src: ID = stream.muxed_conn.peer_id
        try:
            dst = ID(bytes(msg.peer.id))
        except Exception:
            await self._refuse_circuit(stream, StatusCode.MALFORMED_MESSAGE)
            return
        manager = self.resource_manager
        if msg.HasField("reservation") and not manager.verify_reservation(src, msg.reservation):
            await self._refuse_circuit(stream, StatusCode.PERMISSION_DENIED)
            return
        if manager.get_reservation(dst) is None:
            await self._refuse_circuit(stream, StatusCode.NO_RESERVATION)
            return
        group = _stream_group(stream)
        refusal = self._circuit_refusal(src, group)
        if refusal is not None:
            log.info("refused a circuit from %s to %s: %s", src, dst, refusal)
            await self._refuse_circuit(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        seconds = self._service_limits.circuit_seconds
        circuit = _Circuit(
            src=src,
            dst=dst,
            group=group,
            src_stream=stream,
            remaining=self.limits.data if self.limits.data > 0 else math.inf,
            scope=trio.move_on_after(seconds if seconds > 0 else math.inf),
        )
        # Counted before the first await, so concurrent CONNECTs cannot overshoot the limits.
        self._live.add(circuit)
        self._circuits_of_peer[src] += 1
        self._circuits_of_group[group] += 1
        try:
            with circuit.scope:
                await self._run_circuit(circuit)
            if circuit.scope.cancelled_caught and not circuit.reason:
                circuit.reason = "expired"
        finally:
            self._live.discard(circuit)
            _drop(self._circuits_of_peer, src)
            _drop(self._circuits_of_group, group)
            if circuit.counted:
                manager.release_connection(dst)
            log.debug("circuit %s -> %s over: %s", src, dst, circuit.reason or "cancelled")
            with trio.CancelScope(shield=True):
                await self._end_streams(circuit)

    async def _run_circuit(self, circuit: _Circuit) -> None:
        """The STOP leg, the statuses, then the two pumps and the idle watch."""
        stop_limit = Limit(duration=self.limits.duration, data=self.limits.data)
        try:
            with trio.fail_after(STOP_TIMEOUT_S):
                dst_stream = await self.host.new_stream(circuit.dst, [STOP_PROTOCOL_ID])
                circuit.dst_stream = dst_stream
                connect = StopMessage(
                    type=StopMessage.CONNECT, peer=CircuitPeerId(id=circuit.src.to_bytes()), limit=stop_limit
                )
                await write_delimited_msg(dst_stream, connect)
                answer = await read_delimited_msg(dst_stream, StopMessage)
            status = StatusCode(answer.status) if answer.HasField("status") else StatusCode.OK
            if status != StatusCode.OK:
                raise ConnectionError(f"the destination answered {status.name}")
        except Exception as exc:
            log.info("circuit %s -> %s failed: %s", circuit.src, circuit.dst, exc)
            circuit.reason = "failed"
            await self._send_status(circuit.src_stream, StatusCode.CONNECTION_FAILED, str(exc))
            return
        reservation = self.resource_manager.get_reservation(circuit.dst)
        if reservation is not None:
            reservation.active_connections += 1  # 0.8.1's per-destination count, kept right for who reads it
            circuit.counted = True
        await self._send_status(circuit.src_stream, StatusCode.OK, "Connection established", limit=stop_limit)
        circuit.last_active = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, circuit, circuit.src_stream, dst_stream)
            nursery.start_soon(self._pump, circuit, dst_stream, circuit.src_stream)
            nursery.start_soon(self._watch_idle, circuit)

    async def _pump(self, circuit: _Circuit, src: INetStream, dst: INetStream) -> None:
        """Copy one direction. Reads are never cancelled but to end the circuit (py-libp2p's yamux read is not
        cancel-safe: a chunk taken from its buffer would be lost), so idleness is watched by :meth:`_watch_idle`."""
        try:
            while True:
                data = await src.read(MAX_READ_LEN)
                if not data:
                    circuit.end("eof")
                    return
                circuit.last_active = trio.current_time()
                if len(data) > circuit.remaining:
                    circuit.end("bytes")
                    return
                circuit.remaining -= len(data)
                with trio.fail_after(self.write_timeout):
                    await dst.write(data)
        except StreamEOF:
            circuit.end("eof")
        except trio.TooSlowError:
            circuit.end("stalled")
        except Exception:
            circuit.end("reset")

    @staticmethod
    async def _watch_idle(circuit: _Circuit) -> None:
        while True:
            deadline = circuit.last_active + CIRCUIT_IDLE_S
            if trio.current_time() >= deadline:
                circuit.end("idle")
                return
            await trio.sleep_until(deadline)

    async def _end_streams(self, circuit: _Circuit) -> None:
        """Close a circuit that ended cleanly (FIN after the last byte, or after the failure status); reset one that
        was cut (limits, idleness, errors, shutdown). Only this circuit's own two streams."""
        await _close_or_reset(circuit.src_stream, clean=circuit.reason in ("eof", "failed"))
        if circuit.dst_stream is not None:
            await _close_or_reset(circuit.dst_stream, clean=circuit.reason == "eof")

    async def _refuse_circuit(self, stream: INetStream, code: StatusCode) -> None:
        await self._send_status(stream, code, code.name)
        await trio.sleep(0.5)  # as 0.8.1: a moment to read the status before the reset
        with contextlib.suppress(Exception):
            await stream.reset()

    # --- being reached through a relay (stop) ---

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        relay: ID = stream.muxed_conn.peer_id
        if _is_relayed_stream(stream) or not self._accept_stop_from(relay):
            log.info("refused a relayed connection offered by %s: we hold no relay slot on it", relay)
            await self._send_stop_status(stream, StatusCode.PERMISSION_DENIED, "no relay slot held here")
            with contextlib.suppress(Exception), trio.move_on_after(_CLOSE_TIMEOUT_S):
                await stream.close()
            return
        await super()._handle_stop_stream(stream)

    @staticmethod
    async def _refuse(stream: Any, code: StatusCode) -> None:
        with contextlib.suppress(Exception):
            await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=to_proto_status(code)))
        with contextlib.suppress(Exception):
            await stream.close()


async def _close_or_reset(stream: INetStream, *, clean: bool) -> None:
    if clean:
        with trio.move_on_after(_CLOSE_TIMEOUT_S):
            try:
                await stream.close()
                return
            except Exception:
                pass
    with contextlib.suppress(Exception), trio.move_on_after(_CLOSE_TIMEOUT_S):
        await stream.reset()


def _drop(counter: collections.Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
