"""Fuzz-style robustness: random and mutated bytes give RemoteProtocolError and nothing else.

A longer run of the same harness lives in benchmarks/fuzz_decoder.py.
"""

from __future__ import annotations

import random

from p2pcompute.core import codec
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import PeerRecord
from p2pcompute.errors import RemoteProtocolError
from tests.core.fuzzing import FUZZ_TARGETS, mutations, seed_corpus

INPUTS = 12_000


def test_decoders_raise_only_remote_protocol_errors() -> None:
    rng = random.Random(20261123)
    corpus = seed_corpus(KeyPair.from_seed(b"\x09" * 32))
    counts = {name: 0 for name in FUZZ_TARGETS}
    rejected = 0
    for data in mutations(rng, corpus, INPUTS):
        for name, target in FUZZ_TARGETS.items():
            try:
                target(data)
            except RemoteProtocolError:
                rejected += 1
            counts[name] += 1
    assert all(n == INPUTS for n in counts.values())
    assert rejected > INPUTS  # the mutations really were mostly invalid


def test_corpus_is_valid_before_mutation() -> None:
    corpus = seed_corpus(KeyPair.from_seed(b"\x09" * 32))
    assert any(isinstance(codec.unpack(item), dict) for item in corpus)
    opened = FUZZ_TARGETS["open_envelope"](corpus[0])
    assert isinstance(opened.message, PeerRecord)
