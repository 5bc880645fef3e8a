"""Matching a job to workers from the market view (pure; the client feeds adverts, time and randomness).

A worker is *eligible* for a job when its advert is live, it has a free slot, a device of the required
kind with enough free memory, and its estimated price for the job is within the client's maximum. Among
eligible workers the client picks at random, weighted towards cheap, fast, reputable and near ones, with
two rules that make redundant runs independent (specs/verification.md): never the same peer twice, and at
most one worker per network address group (:func:`address_group`), so one operator with many peer ids
on one network cannot fill a quorum.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from p2pcompute.core.identity import PeerId
from p2pcompute.core.messages import Device, GpuAdvert, Requirements

__all__ = [
    "DEFAULT_MIN_PRICE",
    "DEFAULT_OVERHEAD_MS",
    "Candidate",
    "MatchPolicy",
    "Rng",
    "address_group",
    "choose",
    "default_weight",
    "eligible",
    "estimate_ms",
    "job_price",
    "requirements_fit",
    "run_estimate_ms",
]

DEFAULT_MIN_PRICE = 1000  # micro-credits: the least a job costs (a worker may set its own floor)
DEFAULT_OVERHEAD_MS = 200  # fixed per-job cost a worker charges for: loading, transfer set-up


class Rng(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True, kw_only=True)
class MatchPolicy:
    """Constants of the estimate: what a job costs beyond its FLOPs (figures in specs/negotiation.md)."""

    overhead_ms: int = DEFAULT_OVERHEAD_MS  # what workers are assumed to charge for besides FLOPs
    min_price: int = DEFAULT_MIN_PRICE  # the price floor workers are assumed to have
    bytes_per_ms: int = 200_000  # ~200 MB/s: the data channel on a LAN, conservatively


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """An eligible worker with what the client expects of it."""

    peer: PeerId
    advert: GpuAdvert
    device: Device
    group: str
    expected_ms: int
    price: int


def address_group(addr: str) -> str:
    """The network group of a multiaddr: public IPv4 /16, public IPv6 /32, loopback/private/DNS the address itself.

    Loopback and private addresses are grouped by the full address: on a LAN or a local testnet they say
    nothing about who runs the peer, and grouping them would leave one worker per machine.
    """
    parts = addr.split("/")
    if len(parts) < 3:
        return addr
    proto, host = parts[1], parts[2]
    if proto not in ("ip4", "ip6"):
        return f"{proto}:{host}"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{proto}:{host}"
    if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified:
        return f"{proto}:{ip}"
    prefix = 16 if ip.version == 4 else 32
    return f"{proto}:{ipaddress.ip_network(f'{ip}/{prefix}', strict=False)}"


def _advert_group(advert: GpuAdvert) -> str:
    """A worker's group: that of its first routable address (its first address when none is routable)."""
    for addr in advert.addrs:
        if "/ip4/0.0.0.0/" not in addr and "/ip6/::/" not in addr:
            return address_group(addr)
    return address_group(advert.addrs[0])


def run_estimate_ms(flops: int, tflops: float, overhead_ms: int = DEFAULT_OVERHEAD_MS) -> int:
    """What a worker charges time for: the overhead plus ``flops`` at its measured TFLOPS (unknown: overhead only).

    Client and worker use this one estimate, so the client can predict the price a worker will offer.
    """
    if tflops <= 0:
        return overhead_ms
    return overhead_ms + math.ceil(flops / (tflops * 1e9))


def job_price(run_ms: int, price_per_second: int, min_price: int = DEFAULT_MIN_PRICE) -> int:
    """Price of a job in micro-credits: the worker's rate times the run estimate, rounded up, never below the floor."""
    return max(min_price, -(-run_ms * price_per_second // 1000))


def estimate_ms(requirements: Requirements, device: Device, policy: MatchPolicy = MatchPolicy()) -> int:
    """Expected wall time of a job on ``device`` as the client sees it: the run estimate plus the transfers."""
    transfer = (requirements.input_bytes + requirements.output_bytes) / policy.bytes_per_ms
    return run_estimate_ms(requirements.flops, device.tflops, policy.overhead_ms) + math.ceil(transfer)


def _fits(device: Device, requirements: Requirements) -> bool:
    if requirements.device_kind is not None and device.kind is not requirements.device_kind:
        return False
    return device.free_memory_bytes >= requirements.memory_bytes


def eligible(
    adverts: Iterable[GpuAdvert],
    requirements: Requirements,
    max_price: int,
    now: int,
    *,
    exclude: Iterable[PeerId] = (),
    policy: MatchPolicy = MatchPolicy(),
) -> list[Candidate]:
    """Workers that can run the job within ``max_price``, each on its best fitting device."""
    excluded = set(exclude)
    out: list[Candidate] = []
    for advert in adverts:
        # A full worker stays eligible: adverts lag behind capacity (a worker re-advertises at most every few
        # seconds), and a busy worker simply declines; ``choose`` weighs full workers down instead.
        if advert.peer_id in excluded or advert.expires_at <= now:
            continue
        best: tuple[int, Device] | None = None
        for device in advert.devices:
            if _fits(device, requirements):
                ms = estimate_ms(requirements, device, policy)
                if best is None or ms < best[0]:
                    best = (ms, device)
        if best is None:
            continue
        expected, device = best
        run_ms = run_estimate_ms(requirements.flops, device.tflops, policy.overhead_ms)
        price = job_price(run_ms, advert.price_per_second, policy.min_price)
        if price > max_price:
            continue
        out.append(
            Candidate(
                peer=advert.peer_id,
                advert=advert,
                device=device,
                group=_advert_group(advert),
                expected_ms=expected,
                price=price,
            )
        )
    return out


FULL_WORKER_WEIGHT = 0.1  # how much less likely a worker that advertised no free slot is chosen


def default_weight(candidate: Candidate) -> float:
    """Cheaper and faster is better; a full worker much less likely; every eligible worker keeps a chance."""
    base = 1.0 / (1.0 + candidate.price) + 1.0 / (1.0 + candidate.expected_ms)
    return base * (FULL_WORKER_WEIGHT if candidate.advert.slots_free < 1 else 1.0)


def choose(
    candidates: Sequence[Candidate],
    k: int,
    rng: Rng,
    *,
    weight: Callable[[Candidate], float] = default_weight,
    taken_groups: Iterable[str] = (),
    latency_ms: Mapping[PeerId, float] | None = None,
) -> list[Candidate]:
    """Pick up to ``k`` workers at random, weighted by ``weight``, distinct in peer id and address group.

    ``taken_groups`` are groups already used by this job (escalation adds workers to a running job).
    Returns fewer than ``k`` when there are not enough distinct groups.
    """
    groups = set(taken_groups)
    pool = [c for c in candidates if c.group not in groups]
    chosen: list[Candidate] = []
    seen: set[PeerId] = set()
    while pool and len(chosen) < k:
        weights = [max(weight(c), 0.0) * _latency_factor(c, latency_ms) for c in pool]
        total = sum(weights)
        if total <= 0.0:
            weights = [1.0] * len(pool)
            total = float(len(pool))
        x = rng.random() * total
        index = len(pool) - 1
        for i, w in enumerate(weights):
            if x < w:
                index = i
                break
            x -= w
        pick = pool[index]
        chosen.append(pick)
        seen.add(pick.peer)
        groups.add(pick.group)
        pool = [c for c in pool if c.group not in groups and c.peer not in seen]
    return chosen


def _latency_factor(candidate: Candidate, latency_ms: Mapping[PeerId, float] | None) -> float:
    if not latency_ms or candidate.peer not in latency_ms:
        return 1.0
    return 1.0 / (1.0 + latency_ms[candidate.peer] / 100.0)


def requirements_fit(device: Device, requirements: Requirements) -> bool:
    """Whether one device can take the job (kind and free memory); the worker's admission uses it too."""
    return _fits(device, requirements)
