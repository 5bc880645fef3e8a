"""Replay protection: the bounded seen-cache."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.core.envelope import open_envelope, seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import PeerRecord
from p2pcompute.core.replay import SeenCache, replay_key
from p2pcompute.errors import Reason, ReplayError

NOW = 1_700_000_000_000
PAIR = KeyPair.from_seed(b"\x03" * 32)


def _opened(nonce: int = 1, expires_at: int = NOW + 60_000, msg_id: bytes = b"\x05" * 16):
    record = PeerRecord(
        id=msg_id,
        nonce=nonce,
        expires_at=expires_at,
        peer_id=PAIR.peer_id,
        seq=1,
        addrs=("/ip4/127.0.0.1/tcp/1",),
    )
    return open_envelope(seal(PAIR, record))


def _reason(cache: SeenCache, opened, now: int = NOW) -> Reason:
    with pytest.raises(ReplayError) as info:
        cache.accept(opened, now)
    return info.value.reason


def test_accepts_once_then_replayed() -> None:
    cache = SeenCache()
    cache.accept(_opened(), NOW)
    assert _reason(cache, _opened()) is Reason.REPLAYED
    cache.accept(_opened(nonce=2), NOW)  # a new nonce is a new message
    cache.accept(_opened(msg_id=b"\x06" * 16), NOW)  # so is a new id
    assert len(cache) == 3


def test_expired_and_too_far_ahead() -> None:
    cache = SeenCache(max_ttl_ms=60_000)
    assert _reason(cache, _opened(expires_at=NOW)) is Reason.EXPIRED
    assert _reason(cache, _opened(expires_at=NOW - 1)) is Reason.EXPIRED
    assert _reason(cache, _opened(expires_at=NOW + 60_001)) is Reason.EXPIRY_TOO_FAR
    cache.accept(_opened(expires_at=NOW + 60_000), NOW)


def test_expired_entries_are_forgotten_and_cannot_come_back() -> None:
    cache = SeenCache()
    opened = _opened(expires_at=NOW + 10)
    cache.accept(opened, NOW)
    cache.accept(_opened(nonce=2), NOW + 20)  # purges the first
    assert replay_key(opened) not in cache
    assert _reason(cache, opened, NOW + 20) is Reason.EXPIRED  # and its replay is refused by expiry


def test_full_cache_evicts_soonest_expiring_and_raises_floor() -> None:
    cache = SeenCache(capacity=2)
    first = _opened(nonce=1, expires_at=NOW + 100)
    cache.accept(first, NOW)
    cache.accept(_opened(nonce=2, expires_at=NOW + 200), NOW)
    cache.accept(_opened(nonce=3, expires_at=NOW + 300), NOW)
    assert len(cache) == 2
    assert cache.floor == NOW + 100
    assert _reason(cache, first) is Reason.EXPIRED  # evicted, but its replay still fails
    assert _reason(cache, _opened(nonce=4, expires_at=NOW + 50)) is Reason.EXPIRED
    cache.accept(_opened(nonce=5, expires_at=NOW + 400), NOW)


@given(
    st.dictionaries(st.integers(0, 30), st.integers(1, 400), min_size=1),
    st.lists(st.tuples(st.integers(0, 30), st.integers(0, 40)), max_size=80),
)
def test_no_replay_is_ever_accepted(expiries: dict[int, int], events: list[tuple[int, int]]) -> None:
    """Whatever the order, capacity pressure and clock, a message (key + fixed expiry) is accepted once."""
    cache = SeenCache(capacity=4, max_ttl_ms=400)
    accepted: set[bytes] = set()
    now = 0
    for key_n, step in events:
        if key_n not in expiries:
            continue
        now += step
        key = bytes([key_n])
        try:
            cache.add(key, expiries[key_n], now)
        except ReplayError:
            continue
        assert key not in accepted, "replay accepted"
        accepted.add(key)
        assert len(cache) <= 4


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SeenCache(capacity=0)
