"""Replay protection: a bounded seen-cache with expiry and per-signer quotas (specs/00-conventions.md §8).

A message is accepted once, and only while ``now < expires_at <= now + max_ttl``. The cache holds the replay key of
every accepted, unexpired message, filed under the peer that signed it. It is bounded twice: one signer holds at most
``per_signer`` entries, and all signers together at most ``capacity``. Evicting an entry (the signer's own soonest
when it is over its quota, else the soonest of all) raises a *floor* of **that signer only**: from then on a message
of that signer expiring at or before its floor is refused as ``expired``. So no signer, and no crowd of throwaway
keys, can make another peer's fresh message be refused; they only age out entries early, and a replay of an evicted
message still fails on its signer's floor.

The floors are bounded too (``capacity`` signers; a floor is dropped once it is in the past). When more signers
were evicted within one ``max_ttl`` than that, the lowest floor is forgotten: that signer's evicted messages are
then guarded only by what their protocol binds them to (a job request by its job id, unique per client in the
worker's store; every later negotiation message by the hash chain of its exchange). That takes more than
``capacity`` distinct signers' messages within ``max_ttl``, and costs the flooder, not the honest peer.

Time is an argument (``now``, integer milliseconds since the Unix epoch); nothing here reads a clock.
"""

from __future__ import annotations

import hashlib
import heapq

from p2pcompute.core.envelope import Opened
from p2pcompute.core.messages import Message
from p2pcompute.errors import Reason, ReplayError

__all__ = [
    "DEFAULT_MAX_TTL_MS",
    "DEFAULT_PER_SIGNER",
    "DEFAULT_SEEN_CAPACITY",
    "SeenCache",
    "replay_key",
]

DEFAULT_SEEN_CAPACITY = 65_536
DEFAULT_PER_SIGNER = 1_024
DEFAULT_MAX_TTL_MS = 10 * 60 * 1000  # a signed message may be valid for at most 10 minutes ahead

_ANYONE = b""  # the signer of keys added without one (a shared bucket)


def replay_key(opened: Opened[Message]) -> bytes:
    """What makes a message unique: signer, payload type, id and nonce."""
    m = opened.message
    h = hashlib.sha256()
    for part in (opened.signer.raw, m.TYPE.encode(), m.id, m.nonce.to_bytes(8, "big")):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


class SeenCache:
    """Bounded memory of accepted messages; rejects replays and stale or too-far-future expiries."""

    def __init__(
        self,
        capacity: int = DEFAULT_SEEN_CAPACITY,
        max_ttl_ms: int = DEFAULT_MAX_TTL_MS,
        per_signer: int = DEFAULT_PER_SIGNER,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if max_ttl_ms < 1:
            raise ValueError("max_ttl_ms must be at least 1")
        if per_signer < 1:
            raise ValueError("per_signer must be at least 1")
        self._capacity = capacity
        self._max_ttl_ms = max_ttl_ms
        self._per_signer = min(per_signer, capacity)
        self._expiry: dict[bytes, tuple[int, bytes]] = {}  # key -> (expires_at, signer)
        self._heap: list[tuple[int, bytes]] = []  # (expires_at, key), lazily pruned
        self._signers: dict[bytes, list[tuple[int, bytes]]] = {}  # signer -> its own heap of (expires_at, key)
        self._floors: dict[bytes, int] = {}
        self._floor_heap: list[tuple[int, bytes]] = []  # (floor, signer), lazily pruned

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: object) -> bool:
        return key in self._expiry

    @property
    def max_ttl_ms(self) -> int:
        return self._max_ttl_ms

    def floor(self, signer: bytes = _ANYONE) -> int:
        """Messages of ``signer`` expiring at or before this time (ms) are refused: they may have been evicted."""
        return self._floors.get(signer, -1)

    def check(self, key: bytes, expires_at: int, now: int, signer: bytes = _ANYONE) -> None:
        """Raise :class:`ReplayError` unless a message with this key and expiry is fresh; do not record it."""
        if expires_at <= now:
            raise ReplayError(Reason.EXPIRED, f"expired {now - expires_at} ms ago")
        if expires_at > now + self._max_ttl_ms:
            raise ReplayError(
                Reason.EXPIRY_TOO_FAR, f"expires {expires_at - now} ms ahead, limit {self._max_ttl_ms} ms"
            )
        if key in self._expiry:
            raise ReplayError(Reason.REPLAYED, "message already seen")
        if expires_at <= self._floors.get(signer, -1):
            raise ReplayError(Reason.EXPIRED, "older than the oldest message of its signer this peer still remembers")

    def add(self, key: bytes, expires_at: int, now: int, signer: bytes = _ANYONE) -> None:
        """Check as :meth:`check`, then remember the message (under ``signer``) until it expires."""
        self.check(key, expires_at, now, signer)
        self._purge(now)
        own = self._signers.setdefault(signer, [])
        while len(own) >= self._per_signer:
            self._evict_from(signer)
        while len(self._expiry) >= self._capacity:
            self._evict_soonest()
        self._expiry[key] = (expires_at, signer)
        heapq.heappush(self._heap, (expires_at, key))
        heapq.heappush(own, (expires_at, key))

    def accept(self, opened: Opened[Message], now: int) -> None:
        """Record a verified message, or raise :class:`ReplayError` (``replayed``, ``expired``, ``expiry_too_far``)."""
        self.add(replay_key(opened), opened.message.expires_at, now, opened.signer.raw)

    # -- bounds ------------------------------------------------------------------------------------------------------

    def _forget(self, key: bytes) -> int:
        expires_at, signer = self._expiry.pop(key)
        own = self._signers[signer]
        own.remove((expires_at, key))  # at most per_signer entries
        heapq.heapify(own)
        if not own:
            del self._signers[signer]
        return expires_at

    def _evict_from(self, signer: bytes) -> None:
        expires_at, key = self._signers[signer][0]
        self._forget(key)
        self._raise_floor(signer, expires_at)

    def _evict_soonest(self) -> None:
        while self._heap:
            expires_at, key = heapq.heappop(self._heap)
            entry = self._expiry.get(key)
            if entry is not None and entry[0] == expires_at:
                self._forget(key)
                self._raise_floor(entry[1], expires_at)
                return

    def _raise_floor(self, signer: bytes, expires_at: int) -> None:
        if expires_at <= self._floors.get(signer, -1):
            return
        self._floors[signer] = expires_at
        heapq.heappush(self._floor_heap, (expires_at, signer))
        while len(self._floors) > self._capacity:
            floor, who = heapq.heappop(self._floor_heap)
            if self._floors.get(who) == floor:
                del self._floors[who]  # the lowest floor: see the module docstring

    def _purge(self, now: int) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires_at, key = heapq.heappop(self._heap)
            entry = self._expiry.get(key)
            if entry is not None and entry[0] == expires_at:
                self._forget(key)
        while self._floor_heap and self._floor_heap[0][0] <= now:
            floor, who = heapq.heappop(self._floor_heap)
            if self._floors.get(who) == floor:
                del self._floors[who]  # a message expiring at or before it is expired anyway
