"""The relay service: py-libp2p 0.8.1's circuit relay v2 hop and stop handlers, guarded against strangers
(specs/reachability.md §5).

0.8.1's relay falls short where a stranger pushes it; :class:`GuardedRelay` adds what it lacks. Used by
:class:`p2pcompute.net.reach.ReachService` on every node (the stop side: being reached through a relay) and, with
``relay_service``, the hop side (relaying for others).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import write_delimited_msg

from p2pcompute.core.matching import address_group

__all__ = ["GuardedRelay", "RelayServiceLimits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RelayServiceLimits:
    """What a node that serves as a relay grants (``relay_*`` settings)."""

    reservations: int = 32  # peers holding a slot at once
    circuits: int = 16  # relayed connections at once
    circuit_bytes: int = 128 * 1024**2  # bytes one circuit may carry (both directions together)
    circuit_seconds: int = 600  # how long one circuit may stay open
    reservation_seconds: int = 3600  # how long a slot lasts before it must be refreshed
    per_group: int = 4  # slots held at once by peers of one address group (one operator's many keys)

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


class GuardedRelay(CircuitV2Protocol):
    """0.8.1's relay, with what it lacks against strangers:

    * a reservation is for the authenticated peer only (0.8.1 takes the peer id the request names, so anyone could
      take slots in others' names);
    * slots of peers no longer connected are released before counting (0.8.1 keeps them until their TTL, an hour:
      under churn a relay fills with slots of peers long gone);
    * at most ``per_group`` slots per address group, so one operator's many keys cannot take every slot.
    """

    def __init__(self, host: IHost, limits: RelayServiceLimits, *, allow_hop: bool) -> None:
        super().__init__(host, limits=limits.libp2p(), allow_hop=allow_hop)
        self._per_group = limits.per_group
        self._group_of: dict[ID, str] = {}

    async def _handle_reserve(self, stream: Any, msg: HopMessage) -> None:
        remote: ID = stream.muxed_conn.peer_id
        if msg.HasField("peer") and msg.peer.id and bytes(msg.peer.id) != remote.to_bytes():
            log.info("refused a relay slot that %s asked for in another peer's name", remote)
            await self._refuse(stream, StatusCode.PERMISSION_DENIED)
            return
        manager = self.resource_manager
        for peer in list(manager._reservations):
            if not self.host.get_network().get_connections(peer):
                del manager._reservations[peer]
                self._group_of.pop(peer, None)
        group = _stream_group(stream)
        same = sum(1 for p, g in self._group_of.items() if g == group and p != remote and p in manager._reservations)
        if same >= self._per_group:
            log.info("refused a relay slot to %s: %d slots already held from %s", remote, same, group)
            await self._refuse(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        self._group_of[remote] = group
        await super()._handle_reserve(stream, msg)

    @staticmethod
    async def _refuse(stream: Any, code: StatusCode) -> None:
        with contextlib.suppress(Exception):
            await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=to_proto_status(code)))
        with contextlib.suppress(Exception):
            await stream.close()
