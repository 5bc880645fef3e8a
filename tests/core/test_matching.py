"""Matching jobs to workers: eligibility, price, address groups, weighted random choice."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from p2pcompute.core.identity import KeyPair
from p2pcompute.core.matching import (
    DEFAULT_MIN_PRICE,
    DEFAULT_OVERHEAD_MS,
    MatchPolicy,
    address_group,
    choose,
    default_weight,
    eligible,
    estimate_ms,
    job_price,
    run_estimate_ms,
)
from p2pcompute.core.messages import DeviceKind, GpuAdvert, Requirements
from tests.core.strategies import SAMPLE_DEVICE, sample_advert

NOW = 1_800_000_000_000
REQ = Requirements(
    device_kind=None, memory_bytes=2**20, input_bytes=10_000, output_bytes=1_000, op_count=10, flops=10**9
)


def worker(i: int, ip: str | None = None, **changes: object) -> GpuAdvert:
    pair = KeyPair.from_seed(bytes([i + 1]) * 32)
    addr = f"/ip4/{ip or f'10.0.0.{i + 1}'}/tcp/4001"
    return sample_advert(pair, NOW, addrs=(addr,), **changes)


@pytest.mark.parametrize(
    ("addr", "group"),
    [
        ("/ip4/8.8.8.8/tcp/1", "ip4:8.8.0.0/16"),
        ("/ip4/8.8.200.1/tcp/2", "ip4:8.8.0.0/16"),
        ("/ip4/127.0.0.5/tcp/1", "ip4:127.0.0.5"),
        ("/ip4/192.168.1.9/tcp/1", "ip4:192.168.1.9"),
        ("/ip6/2a00:1450:4001::1/tcp/1", "ip6:2a00:1450::/32"),
        ("/ip6/::1/tcp/1", "ip6:::1"),
        ("/dns4/example.org/tcp/1", "dns4:example.org"),
        ("/ip4/not-an-ip/tcp/1", "ip4:not-an-ip"),
        ("garbage", "garbage"),
    ],
)
def test_address_groups(addr: str, group: str) -> None:
    assert address_group(addr) == group


def test_price_is_rate_times_time_rounded_up_and_never_below_the_floor() -> None:
    assert job_price(1500, 2000) == 3000
    assert job_price(1, 1, min_price=1) == 1
    assert job_price(0, 0) == DEFAULT_MIN_PRICE
    assert job_price(3333, 1000, min_price=0) == 3333
    assert job_price(1, 999, min_price=0) == 1  # rounded up: a job is never free unless the rate is zero


def test_run_estimate_is_overhead_plus_flops_at_the_measured_rate() -> None:
    assert run_estimate_ms(10**12, 1.0) == DEFAULT_OVERHEAD_MS + 1000
    assert run_estimate_ms(1, 1.0, overhead_ms=0) == 1
    assert run_estimate_ms(10**15, 0.0) == DEFAULT_OVERHEAD_MS  # unmeasured throughput: overhead only


def test_estimate_grows_with_flops_and_bytes() -> None:
    small = estimate_ms(REQ, SAMPLE_DEVICE)
    assert estimate_ms(replace(REQ, flops=REQ.flops * 1000), SAMPLE_DEVICE) > small
    assert estimate_ms(replace(REQ, input_bytes=10**9), SAMPLE_DEVICE) > small
    assert small >= MatchPolicy().overhead_ms


def test_eligibility_rules() -> None:
    ok = worker(0)
    full = worker(1, slots_free=0)
    expired = worker(2, expires_at=NOW)
    small = worker(3, devices=(replace(SAMPLE_DEVICE, free_memory_bytes=1024),))
    cpu = worker(4, devices=(replace(SAMPLE_DEVICE, kind=DeviceKind.CPU),))
    dear = worker(5, price_per_second=10**12)
    found = eligible([ok, full, expired, small, cpu, dear], REQ, max_price=10**6, now=NOW)
    # a full worker stays eligible (adverts lag behind capacity) but is weighed down
    assert {c.peer for c in found} == {ok.peer_id, cpu.peer_id, full.peer_id}
    by_peer = {c.peer: c for c in found}
    assert default_weight(by_peer[full.peer_id]) < default_weight(by_peer[ok.peer_id])
    cuda_only = eligible([ok, cpu], replace(REQ, device_kind=DeviceKind.CUDA), max_price=10**6, now=NOW)
    assert [c.peer for c in cuda_only] == [ok.peer_id]
    assert eligible([ok, cpu], REQ, max_price=10**6, now=NOW, exclude=[ok.peer_id])[0].peer == cpu.peer_id
    [candidate] = eligible([ok], REQ, max_price=10**6, now=NOW)
    assert candidate.price == job_price(run_estimate_ms(REQ.flops, SAMPLE_DEVICE.tflops), ok.price_per_second)
    assert candidate.expected_ms > run_estimate_ms(REQ.flops, SAMPLE_DEVICE.tflops)  # plus the transfers


def test_a_worker_runs_on_its_fastest_fitting_device() -> None:
    slow = replace(SAMPLE_DEVICE, tflops=0.001, name="slow")
    fast = replace(SAMPLE_DEVICE, tflops=100.0, name="fast")
    [candidate] = eligible([worker(0, devices=(slow, fast))], replace(REQ, flops=10**12), 10**9, NOW)
    assert candidate.device.name == "fast"


def test_choice_is_distinct_in_peer_and_address_group() -> None:
    adverts = [worker(i) for i in range(6)] + [worker(10 + i, ip=f"8.8.{i}.1") for i in range(4)]
    candidates = eligible(adverts, REQ, 10**9, NOW)
    rng = random.Random(7)
    for _ in range(200):
        picked = choose(candidates, 5, rng)
        assert len(picked) == 5
        assert len({c.peer for c in picked}) == 5
        assert len({c.group for c in picked}) == 5
        assert sum(c.group == "ip4:8.8.0.0/16" for c in picked) <= 1
    # only 7 distinct groups exist: six private addresses and one public /16
    assert len(choose(candidates, 10, rng)) == 7
    assert choose(candidates, 3, rng, taken_groups=[c.group for c in candidates]) == []


def test_choice_follows_the_weights_but_leaves_everyone_a_chance() -> None:
    candidates = eligible([worker(i) for i in range(3)], REQ, 10**9, NOW)
    favourite = candidates[0].peer
    rng = random.Random(1)
    counts = {c.peer: 0 for c in candidates}
    for _ in range(3000):
        [pick] = choose(candidates, 1, rng, weight=lambda c: 8.0 if c.peer == favourite else 1.0)
        counts[pick.peer] += 1
    assert counts[favourite] > 2000
    assert all(n > 100 for n in counts.values())
    # zero weights everywhere fall back to a uniform choice instead of failing
    assert len(choose(candidates, 2, rng, weight=lambda c: 0.0)) == 2


def test_latency_lowers_a_workers_chance() -> None:
    candidates = eligible([worker(i) for i in range(2)], REQ, 10**9, NOW)
    far, near = candidates[0].peer, candidates[1].peer
    rng = random.Random(3)
    picks = [choose(candidates, 1, rng, latency_ms={far: 900.0, near: 1.0})[0].peer for _ in range(2000)]
    assert picks.count(near) > 3 * picks.count(far)
