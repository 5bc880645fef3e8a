"""Shared by the service tests: a hardware report, adverts to sign, counters to read."""

from __future__ import annotations

import time
from typing import Any

import prometheus_client

from p2pcompute.compute.gpu import HardwareReport
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.messages import Device, DeviceKind, GpuAdvert, Software

HARDWARE = HardwareReport(
    devices=(
        Device(
            kind=DeviceKind.CPU, name="Test CPU", memory_bytes=8 << 30, free_memory_bytes=4 << 30, tflops=0.1,
            compute_capability="", cores=2,
        ),
    ),
    software=Software(p2pcompute="0.1.0", torch="2.13.0+cpu", cuda="", python="3.11.7"),
    driver="",
    probed_at=0.0,
)  # fmt: skip


def wall_ms() -> int:
    """A real clock (adverts carry absolute times); tests that move time inject their own."""
    return time.time_ns() // 1_000_000


def advert(pair: KeyPair, now: int, **changes: Any) -> GpuAdvert:
    """A valid advert of ``pair`` issued at ``now`` (expiring a minute later), with ``changes``."""
    fields: dict[str, Any] = dict(
        id=b"\x07" * 16, nonce=1, expires_at=now + 60_000, peer_id=pair.peer_id, seq=now, issued_at=now,
        addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{pair.peer_id}",), devices=HARDWARE.devices, price_per_second=1,
        slots_total=1, slots_free=1, software=HARDWARE.software,
    )  # fmt: skip
    fields.update(changes)
    return GpuAdvert(**fields)


class Received:
    """A counter (by result, or plain) in its own registry, and what it counted."""

    def __init__(self, name: str, *, by_result: bool = True) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.name = name
        labels = ["result"] if by_result else []
        self.counter = prometheus_client.Counter(name, "test", labels, registry=self.registry)

    def __getitem__(self, result: str) -> float:
        return self.registry.get_sample_value(f"{self.name}_total", {"result": result}) or 0.0

    @property
    def total(self) -> float:
        return self.registry.get_sample_value(f"{self.name}_total") or 0.0
