"""Replay protection: a bounded seen-cache with expiry (specs/00-conventions.md §Replay protection).

A message is accepted once, and only while ``now < expires_at <= now + max_ttl``. The cache holds the
replay key of every accepted, unexpired message. When it is full it evicts the entries that expire
soonest and raises a *floor*: from then on any message expiring at or before the floor is refused as
``expired``. The floor never lets a replay through; it only ages out the oldest messages early, which
honest senders (who set ``expires_at = now + ttl``) do not notice.

Time is an argument (``now``, integer milliseconds since the Unix epoch); nothing here reads a clock.
"""

from __future__ import annotations

import hashlib
import heapq

from p2pcompute.core.envelope import Opened
from p2pcompute.core.messages import Message
from p2pcompute.errors import Reason, ReplayError

__all__ = ["DEFAULT_MAX_TTL_MS", "DEFAULT_SEEN_CAPACITY", "SeenCache", "replay_key"]

DEFAULT_SEEN_CAPACITY = 65_536
DEFAULT_MAX_TTL_MS = 10 * 60 * 1000  # a signed message may be valid for at most 10 minutes ahead


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

    def __init__(self, capacity: int = DEFAULT_SEEN_CAPACITY, max_ttl_ms: int = DEFAULT_MAX_TTL_MS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if max_ttl_ms < 1:
            raise ValueError("max_ttl_ms must be at least 1")
        self._capacity = capacity
        self._max_ttl_ms = max_ttl_ms
        self._expiry: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        self._floor = -1

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: object) -> bool:
        return key in self._expiry

    @property
    def floor(self) -> int:
        """Messages expiring at or before this time (ms) are refused: they may have been evicted."""
        return self._floor

    def check(self, key: bytes, expires_at: int, now: int) -> None:
        """Raise :class:`ReplayError` unless a message with this key and expiry is fresh; do not record it."""
        if expires_at <= now:
            raise ReplayError(Reason.EXPIRED, f"expired {now - expires_at} ms ago")
        if expires_at > now + self._max_ttl_ms:
            raise ReplayError(
                Reason.EXPIRY_TOO_FAR, f"expires {expires_at - now} ms ahead, limit {self._max_ttl_ms} ms"
            )
        if key in self._expiry:
            raise ReplayError(Reason.REPLAYED, "message already seen")
        if expires_at <= self._floor:
            raise ReplayError(Reason.EXPIRED, "older than the oldest message this peer still remembers")

    def add(self, key: bytes, expires_at: int, now: int) -> None:
        """Check as :meth:`check`, then remember the message until it expires."""
        self.check(key, expires_at, now)
        self._purge(now)
        while len(self._expiry) >= self._capacity:
            evicted_expiry, evicted_key = heapq.heappop(self._heap)
            del self._expiry[evicted_key]
            self._floor = max(self._floor, evicted_expiry)
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))

    def accept(self, opened: Opened[Message], now: int) -> None:
        """Record a verified message, or raise :class:`ReplayError` (``replayed``, ``expired``, ``expiry_too_far``)."""
        self.add(replay_key(opened), opened.message.expires_at, now)

    def _purge(self, now: int) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            del self._expiry[key]
