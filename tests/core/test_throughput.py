"""Delivered throughput against advertised TFLOPS (core.throughput): a claim is capped at what was delivered."""

from __future__ import annotations

import pytest

from p2pcompute.core.identity import KeyPair
from p2pcompute.core.throughput import ThroughputLedger, ThroughputPolicy
from p2pcompute.errors import ConfigError

PEER = KeyPair.from_seed(b"\x41" * 32).peer_id
GFLOP = 10**9


def test_short_jobs_say_nothing_about_the_device() -> None:
    ledger = ThroughputLedger()
    # 1 GFLOP at a claimed 100 TFLOPS: 0.01 ms expected, all overhead
    assert not ledger.observe(PEER, flops=GFLOP, waited_ms=50, claimed_tflops=100.0)
    assert ledger.get(PEER).samples == 0
    assert ledger.effective_tflops(PEER, 100.0) == 100.0


def test_a_claim_is_capped_at_what_was_delivered() -> None:
    ledger = ThroughputLedger(ThroughputPolicy(min_expected_ms=100, min_samples=2, slack=1.5))
    # claims 10 TFLOPS; 2 TFLOP jobs took 2 s each: 1 TFLOPS delivered (a lower bound)
    for _ in range(2):
        assert ledger.observe(PEER, flops=2000 * GFLOP, waited_ms=2000, claimed_tflops=10.0)
    assert ledger.get(PEER).best_tflops == pytest.approx(1.0)
    assert ledger.effective_tflops(PEER, 10.0) == pytest.approx(1.5)
    assert ledger.overclaims(PEER, 10.0)


def test_an_honest_claim_is_left_alone() -> None:
    ledger = ThroughputLedger()
    for _ in range(3):
        ledger.observe(PEER, flops=1000 * GFLOP, waited_ms=1100, claimed_tflops=1.0)  # ~0.9 delivered
    assert ledger.effective_tflops(PEER, 1.0) == 1.0 and not ledger.overclaims(PEER, 1.0)


def test_one_sample_is_not_enough() -> None:
    ledger = ThroughputLedger(ThroughputPolicy(min_samples=2))
    ledger.observe(PEER, flops=2000 * GFLOP, waited_ms=20_000, claimed_tflops=10.0)
    assert ledger.effective_tflops(PEER, 10.0) == 10.0


def test_policy_bounds() -> None:
    with pytest.raises(ConfigError):
        ThroughputPolicy(slack=0.5)
