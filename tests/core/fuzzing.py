"""The fuzz harness shared by tests/core/test_fuzz.py and benchmarks/fuzz_decoder.py."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from p2pcompute.core import codec
from p2pcompute.core.envelope import open_envelope, seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import PeerRecord, decode_message, encode_message
from tests.core.strategies import TEST_REGISTRY, Colour, Inner, Kitchen, sample_kitchen


def _frames(data: bytes) -> list[bytes]:
    decoder = codec.FrameDecoder(max_frame_size=4096)
    frames = decoder.feed(data)
    decoder.close()
    return frames


FUZZ_TARGETS: dict[str, Callable[[bytes], Any]] = {
    "unpack": codec.unpack,
    "decode_peer_record": lambda data: decode_message(PeerRecord, data),
    "decode_kitchen": lambda data: decode_message(Kitchen, data),
    "open_envelope": lambda data: open_envelope(data, TEST_REGISTRY),
    "frames": _frames,
}


def seed_corpus(pair: KeyPair) -> list[bytes]:
    record = PeerRecord(
        id=b"\x01" * 16,
        nonce=9,
        expires_at=1_700_000_000_000,
        peer_id=pair.peer_id,
        seq=2,
        addrs=("/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.1/tcp/4001"),
    )
    kitchen = sample_kitchen(
        pair.peer_id,
        blob=b"\x00\x01",
        maybe=3,
        colour=Colour.GREEN,
        items=(Inner(name="b", weight=2.0),),
        tags=("x", "y"),
    )
    sealed = [seal(pair, record), seal(pair, kitchen)]
    encoded = [encode_message(record), encode_message(kitchen)]
    return sealed + encoded + [codec.encode_frame(item) for item in sealed + encoded]


def mutations(rng: random.Random, corpus: list[bytes], count: int) -> Iterator[bytes]:
    """``count`` inputs: random bytes, and seeds with bit flips, cuts, insertions, splices, length edits."""
    for i in range(count):
        kind = i % 8
        seed = bytearray(rng.choice(corpus))
        if kind == 0:
            yield rng.randbytes(rng.randint(0, 300))
            continue
        if kind == 1:
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(seed))
                seed[pos] ^= 1 << rng.randrange(8)
        elif kind == 2:
            seed = seed[: rng.randrange(len(seed))]
        elif kind == 3:
            pos = rng.randrange(len(seed) + 1)
            seed[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif kind == 4:
            other = rng.choice(corpus)
            seed = seed[: rng.randrange(len(seed))] + other[rng.randrange(len(other)) :]
        elif kind == 5:
            pos = rng.randrange(len(seed))
            seed[pos] = rng.choice([0x00, 0x7F, 0x80, 0xC1, 0xD9, 0xDB, 0xDD, 0xDF, 0xFF, 0x91, 0xC4])
        elif kind == 6:
            pos = rng.randrange(len(seed))
            seed[pos : pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x00\x00"])
        else:
            start = rng.randrange(len(seed))
            end = min(len(seed), start + rng.randint(1, 16))
            del seed[start:end]
        yield bytes(seed)
