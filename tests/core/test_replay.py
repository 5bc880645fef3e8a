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


def _opened(nonce: int = 1, expires_at: int = NOW + 60_000, msg_id: bytes = b"\x05" * 16, pair: KeyPair = PAIR):
    record = PeerRecord(
        id=msg_id,
        nonce=nonce,
        expires_at=expires_at,
        peer_id=pair.peer_id,
        seq=1,
        addrs=("/ip4/127.0.0.1/tcp/1",),
    )
    return open_envelope(seal(pair, record))


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
    assert cache.floor(PAIR.peer_id.raw) == NOW + 100
    assert cache.floor(b"another signer") == -1
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


def test_throwaway_keys_cannot_make_a_fresh_message_expire() -> None:
    """Issue 9: 65,537 throwaway keys whose messages expire late once raised one shared floor above an honest
    message's expiry, which was then refused as ``expired``. Floors are per signer now, and a cache with the
    worker's own TTL refuses messages that live longer than it allows."""
    capacity, ttl = 64, 120_000
    cache = SeenCache(capacity=capacity, max_ttl_ms=ttl)
    for n in range(capacity + 1):
        cache.add(n.to_bytes(32, "big"), NOW + ttl, NOW, signer=b"throwaway-%d" % n)
    assert len(cache) == capacity
    honest = KeyPair.from_seed(b"\x09" * 32)
    cache.accept(_opened(expires_at=NOW + ttl - 1_000, pair=honest), NOW)  # an honest TTL, sent a moment earlier
    with pytest.raises(ReplayError) as info:
        cache.add(b"x" * 32, NOW + ttl + 1, NOW, signer=b"throwaway")
    assert info.value.reason is Reason.EXPIRY_TOO_FAR


def test_one_signer_is_held_to_its_quota() -> None:
    cache = SeenCache(capacity=64, per_signer=4)
    other = KeyPair.from_seed(b"\x0a" * 32)
    cache.accept(_opened(nonce=100, pair=other), NOW)
    for nonce in range(10):
        cache.accept(_opened(nonce=nonce, expires_at=NOW + 1_000 + nonce), NOW)
    assert len(cache) == 5  # four of PAIR's, one of the other signer's: a heavy signer evicts only its own
    assert _reason(cache, _opened(nonce=0, expires_at=NOW + 1_000)) is Reason.EXPIRED  # its evicted replay
    assert _reason(cache, _opened(nonce=100, pair=other)) is Reason.REPLAYED


@given(
    st.dictionaries(st.tuples(st.integers(0, 3), st.integers(0, 12)), st.integers(1, 400), min_size=1),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12), st.integers(0, 40)), max_size=80),
)
def test_no_replay_with_many_signers(expiries: dict[tuple[int, int], int], events: list[tuple[int, int, int]]) -> None:
    """With at most ``capacity`` signers, no message is accepted twice, under any eviction order."""
    cache = SeenCache(capacity=4, max_ttl_ms=400, per_signer=2)
    accepted: set[tuple[int, int]] = set()
    now = 0
    for signer, n, step in events:
        if (signer, n) not in expiries:
            continue
        now += step
        try:
            cache.add(bytes([signer, n]), expiries[(signer, n)], now, signer=bytes([signer]))
        except ReplayError:
            continue
        assert (signer, n) not in accepted, "replay accepted"
        accepted.add((signer, n))
        assert len(cache) <= 4
