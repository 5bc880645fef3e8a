"""GPU advert validation and the market view (specs/adverts.md).

Pure: the caller passes ``now`` (integer ms since the Unix epoch). The gossip validator calls
:meth:`MarketView.offer` with the bytes it received; a :class:`RemoteProtocolError` means "reject
and penalise the forwarder", anything returned means "accept and forward".
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from p2pcompute.core.envelope import Opened, open_envelope
from p2pcompute.core.identity import PeerId
from p2pcompute.core.messages import GpuAdvert
from p2pcompute.core.schema import Range, Struct
from p2pcompute.errors import DecodeError, Reason, ReplayError, SchemaError

__all__ = [
    "MAX_SYNC_ADVERTS",
    "AdvertPolicy",
    "MarketEntry",
    "MarketView",
    "SyncRequest",
    "check_advert_address",
    "validate_advert",
]

MAX_SYNC_ADVERTS = 10_000


@dataclass(frozen=True, kw_only=True)
class SyncRequest(Struct):
    """The one frame a client sends on ``/p2pcompute/adverts-sync/1.0.0``: how many adverts it wants."""

    version: Annotated[int, Range(1, 1)] = 1
    max_adverts: Annotated[int, Range(1, MAX_SYNC_ADVERTS)]


@dataclass(frozen=True, slots=True)
class AdvertPolicy:
    """Limits a peer applies to adverts it receives."""

    max_size: int = 16 * 1024  # envelope bytes
    max_lifetime_ms: int = 10 * 60 * 1000  # expires_at - issued_at
    max_clock_skew_ms: int = 30 * 1000  # how far in the future issued_at may be
    max_peers: int = 10_000  # adverts held at once
    max_tombstones: int = 10_000  # highest seq remembered for peers whose advert expired


def validate_advert(data: bytes, now: int, policy: AdvertPolicy = AdvertPolicy()) -> Opened[GpuAdvert]:
    """Check an advert's bytes on their own (no market state): size, signature, schema and time.

    Reasons: ``too_large``, every envelope/codec/schema reason, ``future_dated``, ``expired``,
    ``expiry_too_far``, ``inconsistent``, ``foreign_address`` and ``bad_address``.
    """
    if len(data) > policy.max_size:
        raise DecodeError(Reason.TOO_LARGE, f"advert of {len(data)} bytes, limit {policy.max_size}")
    opened: Opened[GpuAdvert] = open_envelope(data, expect=GpuAdvert)
    advert = opened.message
    if advert.issued_at > now + policy.max_clock_skew_ms:
        raise ReplayError(Reason.FUTURE_DATED, f"issued {advert.issued_at - now} ms in the future")
    if advert.expires_at <= now:
        raise ReplayError(Reason.EXPIRED, f"expired {now - advert.expires_at} ms ago")
    if advert.expires_at <= advert.issued_at:
        raise SchemaError(Reason.INCONSISTENT, "expires_at is not after issued_at")
    if advert.expires_at - advert.issued_at > policy.max_lifetime_ms:
        raise ReplayError(
            Reason.EXPIRY_TOO_FAR,
            f"lifetime {advert.expires_at - advert.issued_at} ms, limit {policy.max_lifetime_ms} ms",
        )
    if advert.slots_free > advert.slots_total:
        raise SchemaError(Reason.INCONSISTENT, f"slots_free {advert.slots_free} > slots_total {advert.slots_total}")
    for i, device in enumerate(advert.devices):
        if device.free_memory_bytes > device.memory_bytes:
            raise SchemaError(Reason.INCONSISTENT, f"devices[{i}]: free memory exceeds total memory")
    for i, addr in enumerate(advert.addrs):
        check_advert_address(addr, opened.signer, where=f"addrs[{i}]")
    return opened


def check_advert_address(addr: str, peer: PeerId, *, where: str = "address") -> None:
    """Raise unless ``addr`` may stand in an advert of ``peer`` (specs/adverts.md §4, check 8).

    It must end in ``/p2p/<peer>`` (``foreign_address`` otherwise: an advert cannot aim clients at a third
    party), and every ``ip4``/``ip6`` component must be a concrete address, never the unspecified
    ``0.0.0.0`` or ``::`` a peer listens on (``bad_address``).
    """
    head, sep, tail = addr.rpartition("/p2p/")
    if not sep or tail != peer.to_base58():
        raise SchemaError(Reason.FOREIGN_ADDRESS, f"{where} {addr!r} does not end in /p2p/{peer}")
    parts = head.split("/")
    for i, name in enumerate(parts):
        if name not in ("ip4", "ip6"):
            continue
        try:
            ip = ipaddress.ip_address(parts[i + 1]) if i + 1 < len(parts) else None
        except ValueError:
            ip = None
        if ip is None or ip.version != int(name[2]):
            raise SchemaError(Reason.BAD_ADDRESS, f"{where} {addr!r}: not an {name} address")
        if ip.is_unspecified:
            raise SchemaError(Reason.BAD_ADDRESS, f"{where} {addr!r}: the unspecified address {ip} is not dialable")


@dataclass(frozen=True, slots=True)
class MarketEntry:
    """The newest valid advert of one peer, as received."""

    opened: Opened[GpuAdvert]
    received_at: int

    @property
    def advert(self) -> GpuAdvert:
        return self.opened.message

    @property
    def peer_id(self) -> PeerId:
        return self.opened.signer


class MarketView:
    """The newest valid advert per peer; expired adverts drop out. Bounded in peers held."""

    def __init__(self, policy: AdvertPolicy = AdvertPolicy()) -> None:
        self.policy = policy
        self._entries: dict[PeerId, MarketEntry] = {}
        self._tombstones: OrderedDict[PeerId, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def __iter__(self) -> Iterator[MarketEntry]:
        return iter(list(self._entries.values()))

    def get(self, peer_id: PeerId) -> MarketEntry | None:
        return self._entries.get(peer_id)

    def offer(self, data: bytes, now: int) -> MarketEntry:
        """Validate ``data`` and keep it if it is the newest advert of its peer.

        Raises :class:`RemoteProtocolError`; besides :func:`validate_advert`'s reasons, ``replayed``
        (the same sequence number again) and ``stale_sequence`` (older than the one held).
        """
        return self.admit(validate_advert(data, now, self.policy), now)

    def admit(self, opened: Opened[GpuAdvert], now: int) -> MarketEntry:
        """Keep an advert already checked by :func:`validate_advert` if it is its peer's newest.

        Raises :class:`ReplayError` ``replayed`` or ``stale_sequence``.
        """
        advert = opened.message
        peer = opened.signer
        held = self._entries.get(peer)
        highest = held.advert.seq if held is not None else self._tombstones.get(peer)
        if highest is not None:
            if advert.seq == highest:
                raise ReplayError(Reason.REPLAYED, f"advert seq {advert.seq} already seen")
            if advert.seq < highest:
                raise ReplayError(Reason.STALE_SEQUENCE, f"advert seq {advert.seq} older than {highest}")
        entry = MarketEntry(opened=opened, received_at=now)
        self._entries[peer] = entry
        self._tombstones.pop(peer, None)
        if len(self._entries) > self.policy.max_peers:
            self._evict_soonest_expiring()
        return entry

    def expire(self, now: int) -> list[PeerId]:
        """Drop adverts that have expired; return whose."""
        gone = [peer for peer, entry in self._entries.items() if entry.advert.expires_at <= now]
        for peer in gone:
            self._bury(peer)
        return gone

    def adverts(self, now: int) -> list[MarketEntry]:
        """Unexpired adverts, newest first."""
        self.expire(now)
        return sorted(self._entries.values(), key=lambda e: e.advert.issued_at, reverse=True)

    def _evict_soonest_expiring(self) -> None:
        peer = min(self._entries, key=lambda p: self._entries[p].advert.expires_at)
        self._bury(peer)

    def _bury(self, peer: PeerId) -> None:
        entry = self._entries.pop(peer)
        self._tombstones[peer] = entry.advert.seq
        self._tombstones.move_to_end(peer)
        while len(self._tombstones) > self.policy.max_tombstones:
            self._tombstones.popitem(last=False)
