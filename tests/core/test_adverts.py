"""GPU adverts: validation reasons and the market view."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from p2pcompute.core import codec
from p2pcompute.core.adverts import AdvertPolicy, MarketView, check_advert_address, validate_advert
from p2pcompute.core.envelope import Envelope, seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import GpuAdvert, PeerRecord
from p2pcompute.core.schema import to_wire
from p2pcompute.errors import LocalProtocolError, Reason, RemoteProtocolError
from tests.core.strategies import SAMPLE_DEVICE, SAMPLE_SOFTWARE, sample_advert, sign_raw

NOW = 1_800_000_000_000
WORKER = KeyPair.from_seed(b"\x11" * 32)
OTHER = KeyPair.from_seed(b"\x12" * 32)

DEVICE = SAMPLE_DEVICE
SOFTWARE = SAMPLE_SOFTWARE


def own_addr(pair: KeyPair = WORKER, base: str = "/ip4/127.0.0.1/tcp/4001") -> str:
    return f"{base}/p2p/{pair.peer_id}"


def advert(pair: KeyPair = WORKER, **changes: Any) -> GpuAdvert:
    return sample_advert(pair, NOW, **{"addrs": (own_addr(pair),), **changes})


def sealed(pair: KeyPair = WORKER, **changes: Any) -> bytes:
    return seal(pair, advert(pair, **changes))


def reason(data: bytes, now: int = NOW, market: MarketView | None = None) -> Reason:
    with pytest.raises(RemoteProtocolError) as info:
        if market is None:
            validate_advert(data, now)
        else:
            market.offer(data, now)
    return info.value.reason


def test_valid_advert() -> None:
    opened = validate_advert(sealed(), NOW)
    assert opened.message == advert()
    assert opened.signer == WORKER.peer_id


def test_unsigned_advert_is_rejected() -> None:
    payload = codec.pack(to_wire(advert()))
    env = Envelope(public_key=WORKER.public_key, payload_type=GpuAdvert.TYPE, payload=payload, signature=b"")
    assert reason(codec.pack(to_wire(env))) is Reason.BAD_SIGNATURE
    assert reason(payload) is Reason.UNKNOWN_FIELD  # a bare advert is not an envelope


def test_advert_signed_by_another_peer() -> None:
    # OTHER signs an advert that claims to be WORKER's.
    assert reason(sign_raw(OTHER, GpuAdvert, codec.pack(to_wire(advert())))) is Reason.SIGNER_MISMATCH


def test_other_message_type_is_not_an_advert() -> None:
    record = PeerRecord(
        id=b"\x01" * 16, nonce=1, expires_at=NOW + 1, peer_id=WORKER.peer_id, seq=1, addrs=("/ip4/1.2.3.4/tcp/1",)
    )
    assert reason(seal(WORKER, record)) is Reason.UNEXPECTED_PAYLOAD_TYPE


@pytest.mark.parametrize(
    ("changes", "now", "expected"),
    [
        ({"expires_at": NOW}, NOW, Reason.EXPIRED),
        ({}, NOW + 60_000, Reason.EXPIRED),
        ({"issued_at": NOW + 31_000, "expires_at": NOW + 90_000}, NOW, Reason.FUTURE_DATED),
        ({"expires_at": NOW + 601_000}, NOW, Reason.EXPIRY_TOO_FAR),
        ({"issued_at": NOW + 10, "expires_at": NOW + 5}, NOW, Reason.INCONSISTENT),
        ({"slots_free": 5}, NOW, Reason.INCONSISTENT),
        ({"devices": (replace(DEVICE, free_memory_bytes=DEVICE.memory_bytes + 1),)}, NOW, Reason.INCONSISTENT),
    ],
)
def test_time_and_consistency_rejections(changes: dict[str, Any], now: int, expected: Reason) -> None:
    assert reason(sealed(**changes), now) is expected


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        # Not ending in the advertiser's own id: a client would be aimed at someone else.
        ("/ip4/127.0.0.1/tcp/4001", Reason.FOREIGN_ADDRESS),
        (f"/ip4/127.0.0.1/tcp/4001/p2p/{OTHER.peer_id}", Reason.FOREIGN_ADDRESS),
        (f"/ip4/127.0.0.1/tcp/4001/p2p/{WORKER.peer_id}/p2p-circuit/p2p/{OTHER.peer_id}", Reason.FOREIGN_ADDRESS),
        (f"/ip4/127.0.0.1/tcp/4001/p2p/{WORKER.peer_id}/", Reason.FOREIGN_ADDRESS),
        (f"/ip4/127.0.0.1/tcp/4001/ipfs/{WORKER.peer_id}", Reason.FOREIGN_ADDRESS),
        (f"/ip4/127.0.0.1/tcp/4001/p2p/{str(WORKER.peer_id).lower()}", Reason.FOREIGN_ADDRESS),
        # Unspecified (what a peer listens on, never what one can dial), or not an IP at all.
        (own_addr(base="/ip4/0.0.0.0/tcp/4001"), Reason.BAD_ADDRESS),
        (own_addr(base="/ip6/::/tcp/4001"), Reason.BAD_ADDRESS),
        (own_addr(base="/ip6/0:0:0:0:0:0:0:0/tcp/4001"), Reason.BAD_ADDRESS),
        (own_addr(base="/ip4/::1/tcp/4001"), Reason.BAD_ADDRESS),
        (own_addr(base="/ip4/999.1.1.1/tcp/4001"), Reason.BAD_ADDRESS),
        (own_addr(base="/ip4"), Reason.BAD_ADDRESS),
    ],
)
def test_advert_addresses_must_be_the_advertisers_own_and_dialable(addr: str, expected: Reason) -> None:
    assert reason(sealed(addrs=(own_addr(), addr))) is expected  # one bad address refuses the whole advert
    with pytest.raises(RemoteProtocolError) as info:
        check_advert_address(addr, WORKER.peer_id)
    assert info.value.reason is expected


@pytest.mark.parametrize(
    "base",
    [
        "/ip4/192.0.2.7/tcp/4001",
        "/ip6/2001:db8::7/tcp/4001",
        "/dns4/worker.example/tcp/4001",
        f"/ip4/198.51.100.1/tcp/4001/p2p/{OTHER.peer_id}/p2p-circuit",  # through a relay, ending in our own id
    ],
)
def test_advert_addresses_that_pass(base: str) -> None:
    check_advert_address(own_addr(base=base), WORKER.peer_id)
    assert validate_advert(sealed(addrs=(own_addr(base=base),)), NOW).message.addrs == (own_addr(base=base),)


def test_small_clock_skew_is_tolerated() -> None:
    validate_advert(sealed(issued_at=NOW + 29_000, expires_at=NOW + 60_000), NOW)


def test_oversized_advert() -> None:
    big = sealed(addrs=tuple(own_addr(base=f"/ip4/127.0.0.1/tcp/{4000 + i}/" + "x" * 150) for i in range(16)))
    assert len(big) > 2048
    with pytest.raises(RemoteProtocolError) as info:
        validate_advert(big, NOW, AdvertPolicy(max_size=2048))
    assert info.value.reason is Reason.TOO_LARGE


def test_malformed_advert() -> None:
    assert reason(b"\x00garbage") is Reason.TRAILING_BYTES
    assert reason(sealed()[:-3]) is Reason.TRUNCATED


def test_malformed_advert_cannot_be_sealed() -> None:
    with pytest.raises(LocalProtocolError):
        sealed(devices=())
    with pytest.raises(LocalProtocolError):
        sealed(slots_total=0)


# --- market view ---


def test_market_keeps_newest_per_peer() -> None:
    market = MarketView()
    market.offer(sealed(seq=1), NOW)
    market.offer(sealed(seq=5, slots_free=0), NOW)
    market.offer(sealed(OTHER, seq=1), NOW)
    assert len(market) == 2
    entry = market.get(WORKER.peer_id)
    assert entry is not None and entry.advert.seq == 5 and entry.advert.slots_free == 0


def test_market_rejects_replayed_and_older_sequence() -> None:
    market = MarketView()
    market.offer(sealed(seq=5), NOW)
    assert reason(sealed(seq=5), market=market) is Reason.REPLAYED
    assert reason(sealed(seq=5, nonce=99), market=market) is Reason.REPLAYED
    assert reason(sealed(seq=4), market=market) is Reason.STALE_SEQUENCE
    assert market.get(WORKER.peer_id).advert.seq == 5  # type: ignore[union-attr]


def test_invalid_adverts_never_enter_the_market() -> None:
    market = MarketView()
    for bad in (sealed(expires_at=NOW), sealed(slots_free=9), b"junk"):
        with pytest.raises(RemoteProtocolError):
            market.offer(bad, NOW)
    assert len(market) == 0
    assert market.adverts(NOW) == []


def test_market_drops_expired_and_remembers_their_sequence() -> None:
    market = MarketView()
    market.offer(sealed(seq=7, expires_at=NOW + 1000), NOW)
    market.offer(sealed(OTHER, seq=1, expires_at=NOW + 5000), NOW)
    assert len(market.adverts(NOW + 999)) == 2
    assert market.expire(NOW + 1000) == [WORKER.peer_id]
    assert WORKER.peer_id not in market
    # An older advert of the expired peer cannot come back (replayed from before the expiry).
    later = NOW + 1000
    assert reason(sealed(seq=6, issued_at=later, expires_at=later + 1000), later, market) is Reason.STALE_SEQUENCE
    market.offer(sealed(seq=8, issued_at=later, expires_at=later + 1000), later)


def test_market_is_bounded() -> None:
    market = MarketView(AdvertPolicy(max_peers=3))
    pairs = [KeyPair.from_seed(bytes([i]) * 32) for i in range(5)]
    for i, pair in enumerate(pairs):
        market.offer(sealed(pair, seq=1, expires_at=NOW + 10_000 + i), NOW)
    assert len(market) == 3
    # the soonest-expiring were evicted
    assert {e.peer_id for e in market} == {p.peer_id for p in pairs[2:]}


def test_adverts_are_newest_first() -> None:
    market = MarketView()
    market.offer(sealed(seq=1, issued_at=NOW - 5000), NOW)
    market.offer(sealed(OTHER, seq=1, issued_at=NOW - 1000), NOW)
    assert [e.peer_id for e in market.adverts(NOW)] == [OTHER.peer_id, WORKER.peer_id]


def test_admit_takes_an_already_validated_advert() -> None:
    market = MarketView()
    opened = validate_advert(sealed(seq=3), NOW)
    assert market.admit(opened, NOW).advert.seq == 3
    with pytest.raises(RemoteProtocolError) as info:
        market.admit(validate_advert(sealed(seq=2), NOW), NOW)
    assert info.value.reason is Reason.STALE_SEQUENCE
