"""Reachability: is this node dialable from outside, and which relays should it hold (specs/reachability.md).

Pure: verdicts come in with the time they were received (integer ms); decisions come out. The I/O shell
(:mod:`p2pcompute.net.reach`) asks AutoNAT servers for dial-backs, reserves relay slots and re-advertises.

The rules, as a table of what a node does in each state:

============  =========================================  ==============================
status        when                                       relays to hold
============  =========================================  ==============================
``public``    mode ``public``, or ≥ ``confirmations``    none (a reachable node is
              dial-back successes from distinct            dialled directly)
              address groups and no failure at all
``private``   mode ``private``, or ≥ ``confirmations``   up to ``max_relays``
              failures from distinct address groups
``unknown``   otherwise                                  up to ``max_relays`` (holding a
                                                         slot costs little; being
                                                         unreachable costs every job)
============  =========================================  ==============================

The rule is asymmetric because the errors cost differently: a node wrongly taken for public holds no relay and
every job to it fails; one wrongly taken for private holds a slot it did not need. So liars saying "reachable"
must outvote no honest "unreachable": a single failure keeps a node off ``public``. A single server's verdict never
sets the status, each server counts once (its newest verdict), and verdicts expire after ``verdict_ttl_ms``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from p2pcompute.errors import ConfigError

__all__ = [
    "NatMode",
    "ReachPolicy",
    "ReachState",
    "Reachability",
    "RelayCandidate",
    "Verdict",
    "circuit_address",
    "is_circuit_address",
]

CIRCUIT = "/p2p-circuit"


class Reachability(StrEnum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


class NatMode(StrEnum):
    """What the operator says (``nat`` in the config): find out, or take it as given."""

    AUTO = "auto"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclass(frozen=True, slots=True)
class ReachPolicy:
    confirmations: int = 2  # agreeing verdicts (distinct address groups) that set the status
    verdict_ttl_ms: int = 30 * 60 * 1000  # a verdict older than this no longer counts
    max_verdicts: int = 64  # servers remembered (the oldest is forgotten first)
    max_relays: int = 2  # relay slots an unreachable node holds at once

    def __post_init__(self) -> None:
        if not 1 <= self.confirmations <= 16:
            raise ConfigError(f"autonat confirmations must be 1..16, got {self.confirmations}")
        if not 1 <= self.max_relays <= 8:
            raise ConfigError(f"max_relays must be 1..8, got {self.max_relays}")
        if self.verdict_ttl_ms <= 0 or self.max_verdicts < self.confirmations:
            raise ConfigError("verdict_ttl_ms must be positive and max_verdicts >= confirmations")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One AutoNAT server's answer: it could (or could not) open a fresh connection to us."""

    server: str  # the server's peer id (base58)
    group: str  # the server's address group (core.matching.address_group of the connection's address)
    reachable: bool
    at_ms: int


@dataclass(frozen=True, slots=True)
class RelayCandidate:
    """A peer that may hold a slot for us: configured by the operator, or found speaking the hop protocol."""

    peer: str  # peer id (base58)
    addr: str  # a dialable address of the relay ending in /p2p/<peer>
    configured: bool = False
    group: str = ""  # the relay's address group (core.matching.address_group); "" if unknown


class ReachState:
    """The node's view of its own reachability, fed verdicts; decides status and relays to hold."""

    def __init__(self, mode: NatMode = NatMode.AUTO, policy: ReachPolicy = ReachPolicy()) -> None:
        self.mode = mode
        self.policy = policy
        self._verdicts: OrderedDict[str, Verdict] = OrderedDict()

    def record(self, verdict: Verdict) -> None:
        self._verdicts.pop(verdict.server, None)
        self._verdicts[verdict.server] = verdict
        while len(self._verdicts) > self.policy.max_verdicts:
            self._verdicts.popitem(last=False)

    def verdicts(self, now_ms: int) -> list[Verdict]:
        return [v for v in self._verdicts.values() if now_ms - v.at_ms <= self.policy.verdict_ttl_ms]

    def status(self, now_ms: int) -> Reachability:
        if self.mode is NatMode.PUBLIC:
            return Reachability.PUBLIC
        if self.mode is NatMode.PRIVATE:
            return Reachability.PRIVATE
        live = self.verdicts(now_ms)
        yes = len({v.group for v in live if v.reachable})
        no = len({v.group for v in live if not v.reachable})
        need = self.policy.confirmations
        if yes >= need and no == 0:
            return Reachability.PUBLIC
        if no >= need and no >= yes:
            return Reachability.PRIVATE
        return Reachability.UNKNOWN

    def wants_relays(self, now_ms: int) -> bool:
        return self.status(now_ms) is not Reachability.PUBLIC

    def relays_to_reserve(
        self,
        now_ms: int,
        candidates: Iterable[RelayCandidate],
        held: Sequence[str],
        failed: Iterable[str] = (),
        held_groups: Iterable[str] = (),
    ) -> list[RelayCandidate]:
        """Which candidates to reserve on now: configured relays first, then the others in the order given,
        skipping held ones and ones that just failed, up to ``max_relays`` held in all. A discovered relay in the
        address group of a relay already held or chosen is skipped: one operator's relays (who may all drop our
        circuits) never take every slot."""
        if not self.wants_relays(now_ms):
            return []
        room = self.policy.max_relays - len(held)
        if room <= 0:
            return []
        skip = set(held) | set(failed)
        groups = {g for g in held_groups if g}
        seen: set[str] = set()
        ordered = sorted(candidates, key=lambda c: not c.configured)  # stable: configured first
        out: list[RelayCandidate] = []
        for candidate in ordered:
            if candidate.peer in skip or candidate.peer in seen:
                continue
            if not candidate.configured and candidate.group and candidate.group in groups:
                continue
            seen.add(candidate.peer)
            groups.add(candidate.group)
            out.append(candidate)
            if len(out) == room:
                break
        return out


def is_circuit_address(addr: str) -> bool:
    return CIRCUIT in addr


def circuit_address(relay_addr: str, relay_peer: str, own_peer: str) -> str:
    """The address others dial to reach us through ``relay_addr``:
    ``<relay transport>/p2p/<relay>/p2p-circuit/p2p/<us>``."""
    base = relay_addr.split("/p2p/")[0]
    if not base or is_circuit_address(relay_addr):
        raise ConfigError(f"{relay_addr!r} is not a direct relay address")
    return f"{base}/p2p/{relay_peer}{CIRCUIT}/p2p/{own_peer}"
