"""What workers deliver against what their adverts claim (specs/verification.md §11.4).

An advert's measured TFLOPS is the worker's own word: a worker that claims more looks faster and cheaper per job than
it is, and wins work it then serves slowly. The client measures instead: for each result, the job's FLOPs (from the
client's own dry run) over the time it waited for the result (from its accept to the result's arrival: transfers,
queueing and execution included). That wait is never shorter than the execution, so the throughput it gives is a
lower bound of what the worker really delivered; only jobs long enough that execution should dominate
(``min_expected_ms`` at the claimed rate) are counted. Once ``min_samples`` such jobs are in, a worker's effective
TFLOPS is the claim capped at ``slack`` times the best it delivered: claiming more than it delivers gains it nothing.

A client that wants to know sooner runs a short benchmark job on the worker (``Client.benchmark``): a real job,
checked like any other, sized to take ``min_expected_ms`` at the claimed rate.

Pure: observations and time are arguments.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from p2pcompute.core.identity import PeerId
from p2pcompute.errors import ConfigError

__all__ = ["Throughput", "ThroughputLedger", "ThroughputPolicy"]


@dataclass(frozen=True, slots=True)
class ThroughputPolicy:
    min_expected_ms: int = 100  # a job counts when it should take at least this long at the claimed rate
    min_samples: int = 2  # counted jobs before the claim is capped
    slack: float = 1.5  # the cap: this many times the best delivered throughput
    max_peers: int = 10_000

    def __post_init__(self) -> None:
        if self.min_expected_ms < 1 or self.min_samples < 1 or self.slack < 1.0 or self.max_peers < 1:
            raise ConfigError("throughput policy values must be positive, slack at least 1")


@dataclass(frozen=True, slots=True)
class Throughput:
    samples: int = 0
    best_tflops: float = 0.0  # the best lower bound measured


class ThroughputLedger:
    """Per-worker delivered throughput, measured by this client."""

    def __init__(self, policy: ThroughputPolicy | None = None) -> None:
        self.policy = policy or ThroughputPolicy()
        self._peers: OrderedDict[PeerId, Throughput] = OrderedDict()

    def get(self, peer: PeerId) -> Throughput:
        return self._peers.get(peer) or Throughput()

    def observe(self, peer: PeerId, *, flops: int, waited_ms: int, claimed_tflops: float) -> bool:
        """Record one result: ``flops`` done in at most ``waited_ms``. Returns whether it counted (long enough)."""
        if flops <= 0 or waited_ms <= 0 or claimed_tflops <= 0:
            return False
        expected_ms = flops / (claimed_tflops * 1e9)
        if expected_ms < self.policy.min_expected_ms:
            return False  # overheads dominate: says nothing about the device
        delivered = flops / (waited_ms * 1e9)
        old = self.get(peer)
        self._peers[peer] = replace(old, samples=old.samples + 1, best_tflops=max(old.best_tflops, delivered))
        self._peers.move_to_end(peer)
        while len(self._peers) > self.policy.max_peers:
            self._peers.popitem(last=False)
        return True

    def effective_tflops(self, peer: PeerId, claimed: float) -> float:
        """The claim, capped at ``slack`` times the best delivered once enough jobs were measured."""
        seen = self.get(peer)
        if seen.samples < self.policy.min_samples:
            return claimed
        return min(claimed, self.policy.slack * seen.best_tflops)

    def overclaims(self, peer: PeerId, claimed: float) -> bool:
        """Has this worker claimed more than it delivers (its claim is being capped)?"""
        return self.effective_tflops(peer, claimed) < claimed
