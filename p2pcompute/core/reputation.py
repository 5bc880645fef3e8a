"""Local reputation of workers and the adaptive replication policy (specs/verification.md §6).

Pure: scores change only through :meth:`Reputation.record` (own observations) and :meth:`Reputation.record_report`
(evidence received from other peers); time (``now``, ms) and randomness (``rng_value`` in [0, 1)) are arguments.
Persistence is an adapter's job: :meth:`PeerReputation.to_row` / :meth:`PeerReputation.from_row` give plain rows.

Slow to earn, fast to lose: a valid result adds ``valid_gain``; an invalid one sets the score to at most zero
minus ``invalid_penalty``, resets the streak of consecutive valid results and flags the worker. Replication
follows BOINC's adaptive replication: jobs of an unknown worker, or one with fewer than ``trust_streak``
consecutive valid results, are always replicated; after that, with probability ``(trust_streak / streak) **
decay`` down to ``min_replication``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from p2pcompute.core.identity import PeerId
from p2pcompute.errors import ConfigError, P2PComputeError, Reason, StoreError

__all__ = [
    "MAX_REPORTS_REMEMBERED",
    "Outcome",
    "PeerReputation",
    "ReportEffect",
    "Reputation",
    "ReputationPolicy",
]

MAX_GROUP_LEN = 64
MAX_CHECKED_FLOPS = (1 << 63) - 1
MAX_REPORTS_REMEMBERED = 65_536
"""(reporter, accused, job) triples remembered to count each report once (in memory only)."""


class Outcome(StrEnum):
    """A verified outcome of one job on one worker, as this peer observed it."""

    VALID = "valid"
    INVALID = "invalid"
    TIMEOUT = "timeout"
    DECLINED_AFTER_ACCEPT = "declined_after_accept"
    BAD_EVIDENCE = "bad_evidence"
    """The peer signed evidence that did not check out (a reporter, not a worker, outcome)."""


class ReportEffect(StrEnum):
    """What a received report did to the accused's reputation."""

    COUNTED = "counted"
    IGNORED_DISTRUSTED_REPORTER = "ignored_distrusted_reporter"
    IGNORED_DUPLICATE = "ignored_duplicate"


@dataclass(frozen=True, slots=True)
class ReputationPolicy:
    """Scoring and replication parameters (defaults in specs/verification.md §8)."""

    valid_gain: float = 1.0
    invalid_penalty: float = 50.0
    timeout_penalty: float = 2.0
    declined_penalty: float = 5.0
    bad_evidence_penalty: float = 20.0
    report_penalty: float = 5.0
    reports_to_flag: int = 3
    max_score: float = 1000.0
    trust_streak: int = 10
    decay: float = 2.0
    min_replication: float = 0.05
    spot_check_rate: float = 0.05
    max_peers: int = 100_000

    def __post_init__(self) -> None:
        for name in ("valid_gain", "invalid_penalty", "timeout_penalty", "declined_penalty", "report_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.report_penalty > self.invalid_penalty:
            raise ConfigError("a report from another peer must weigh less than an own observation")
        if not 0.0 <= self.min_replication <= 1.0 or not 0.0 <= self.spot_check_rate <= 1.0:
            raise ConfigError("min_replication and spot_check_rate are probabilities")
        if self.trust_streak < 1 or self.reports_to_flag < 1 or self.max_peers < 1 or self.decay <= 0:
            raise ConfigError("trust_streak, reports_to_flag, max_peers and decay must be positive")


@dataclass(frozen=True, slots=True)
class PeerReputation:
    """What this peer knows of one other peer."""

    peer: PeerId
    score: float = 0.0
    streak: int = 0
    valid: int = 0
    invalid: int = 0
    timeout: int = 0
    declined_after_accept: int = 0
    bad_evidence: int = 0
    reports: int = 0
    flagged: bool = False
    last_seen: int = 0
    checked_flops: int = 0  # FLOPs of this peer's results that were checked and found valid: its proven work
    group: str = ""  # the address group it was last seen in (a flagged peer's group is remembered)

    @property
    def distrusted(self) -> bool:
        """Flagged, or a net negative record: its reports are not believed and it is not chosen."""
        return self.flagged or self.score < 0

    def to_row(self) -> dict[str, bytes | int | float | str]:
        """A plain row for SQLite (column name → value)."""
        return {
            "peer": self.peer.raw,
            "score": self.score,
            "streak": self.streak,
            "valid": self.valid,
            "invalid": self.invalid,
            "timeout": self.timeout,
            "declined_after_accept": self.declined_after_accept,
            "bad_evidence": self.bad_evidence,
            "reports": self.reports,
            "flagged": int(self.flagged),
            "last_seen": self.last_seen,
            "checked_flops": self.checked_flops,
            "group": self.group,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, object]) -> PeerReputation:
        """Rebuild from a row; raises :class:`StoreError` (``store_failed``) for a missing or mistyped column."""
        try:
            peer_raw = row["peer"]
            if not isinstance(peer_raw, bytes):
                raise TypeError("peer is not bytes")
            ints = {}
            for name in ("streak", "valid", "invalid", "timeout", "declined_after_accept", "bad_evidence", "reports"):
                value = row[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise TypeError(f"{name} is not a non-negative int")
                ints[name] = value
            score, flagged, last_seen = row["score"], row["flagged"], row["last_seen"]
            checked_flops, group = row.get("checked_flops", 0), row.get("group", "")  # absent in r0 rows
            if not isinstance(checked_flops, int) or isinstance(checked_flops, bool) or checked_flops < 0:
                raise TypeError("checked_flops is not a non-negative int")
            if not isinstance(group, str):
                raise TypeError("group is not a str")
            if not isinstance(score, (int, float)) or isinstance(score, bool):
                raise TypeError("score is not a number")
            if flagged not in (0, 1) or not isinstance(last_seen, int):
                raise TypeError("flagged is not 0/1 or last_seen is not an int")
            return cls(
                peer=PeerId(peer_raw),
                score=float(score),
                flagged=bool(flagged),
                last_seen=last_seen,
                checked_flops=checked_flops,
                group=group[:MAX_GROUP_LEN],
                **ints,
            )
        except (KeyError, TypeError, P2PComputeError) as exc:
            raise StoreError(Reason.STORE_FAILED, f"bad reputation row: {exc}") from exc


class Reputation:
    """Scores per peer from verified outcomes; the adaptive replication and spot-check policy."""

    def __init__(self, policy: ReputationPolicy | None = None, peers: Iterable[PeerReputation] = ()) -> None:
        self.policy = policy or ReputationPolicy()
        self._peers: dict[PeerId, PeerReputation] = {p.peer: p for p in peers}
        self._reports_counted: OrderedDict[tuple[PeerId, PeerId, bytes], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, peer: PeerId) -> PeerReputation:
        """The record of ``peer`` (a fresh one for an unknown peer)."""
        return self._peers.get(peer) or PeerReputation(peer=peer)

    def known(self, peer: PeerId) -> bool:
        return peer in self._peers

    def rows(self) -> list[dict[str, bytes | int | float | str]]:
        return [p.to_row() for p in self._peers.values()]

    def record(self, peer: PeerId, outcome: Outcome, now: int, *, flops: int = 0, group: str = "") -> PeerReputation:
        """Apply an own observation and return the new record.

        A valid result earns trust only when it was checked (``flops`` > 0: the job's FLOPs, added to the peer's
        proven work): a lone result nobody checked changes nothing, so an undetected cheat cannot raise a streak.
        ``group`` is the peer's address group, remembered so that a flagged peer's group stays known.
        """
        pol = self.policy
        rec = self.get(peer)
        if group:
            rec = replace(rec, group=group[:MAX_GROUP_LEN])
        if outcome is Outcome.VALID and flops <= 0:
            pass
        elif outcome is Outcome.VALID:
            proven = min(rec.checked_flops + flops, MAX_CHECKED_FLOPS)
            rec = replace(rec, score=min(pol.max_score, rec.score + pol.valid_gain), streak=rec.streak + 1,
                          valid=rec.valid + 1, checked_flops=proven)  # fmt: skip
        elif outcome is Outcome.INVALID:
            rec = replace(rec, score=min(rec.score, 0.0) - pol.invalid_penalty, streak=0, invalid=rec.invalid + 1,
                          flagged=True)  # fmt: skip
        elif outcome is Outcome.TIMEOUT:
            rec = replace(rec, score=rec.score - pol.timeout_penalty, timeout=rec.timeout + 1)
        elif outcome is Outcome.DECLINED_AFTER_ACCEPT:
            rec = replace(rec, score=rec.score - pol.declined_penalty,
                          declined_after_accept=rec.declined_after_accept + 1)  # fmt: skip
        else:
            rec = replace(rec, score=rec.score - pol.bad_evidence_penalty, bad_evidence=rec.bad_evidence + 1)
        return self._store(replace(rec, last_seen=max(rec.last_seen, now)))

    def record_report(self, reporter: PeerId, accused: PeerId, job_digest: bytes, now: int) -> ReportEffect:
        """Apply checked evidence from another peer: a weaker negative than an own observation.

        Ignored when the reporter is distrusted here, or when this reporter already reported this accused for
        this job. The streak is halved (so replication rises again); ``reports_to_flag`` counted reports flag it.
        """
        if self.get(reporter).distrusted:
            return ReportEffect.IGNORED_DISTRUSTED_REPORTER
        key = (reporter, accused, job_digest)
        if key in self._reports_counted:
            return ReportEffect.IGNORED_DUPLICATE
        self._reports_counted[key] = None
        while len(self._reports_counted) > MAX_REPORTS_REMEMBERED:
            self._reports_counted.popitem(last=False)
        rec = self.get(accused)
        reports = rec.reports + 1
        rec = replace(
            rec,
            score=rec.score - self.policy.report_penalty,
            streak=rec.streak // 2,
            reports=reports,
            flagged=rec.flagged or reports >= self.policy.reports_to_flag,
            last_seen=max(rec.last_seen, now),
        )
        self._store(rec)
        return ReportEffect.COUNTED

    def replication_probability(self, peer: PeerId) -> float:
        """1.0 for unknown, flagged or not-yet-trusted peers; then falling with the streak to ``min_replication``."""
        pol = self.policy
        rec = self._peers.get(peer)
        if rec is None or rec.distrusted or rec.streak < pol.trust_streak:
            return 1.0
        return float(max(pol.min_replication, min(1.0, (pol.trust_streak / rec.streak) ** pol.decay)))

    def should_replicate(self, peer: PeerId, rng_value: float) -> bool:
        """Replicate a job given to ``peer``? ``rng_value`` is uniform in [0, 1)."""
        return rng_value < self.replication_probability(peer)

    def spot_check(self, rng_value: float) -> bool:
        """Make this job a hidden spot check? ``rng_value`` is uniform in [0, 1)."""
        return rng_value < self.policy.spot_check_rate

    def checked_flops(self, peer: PeerId) -> int:
        """The FLOPs of ``peer``'s results that were checked and valid (its proven work); 0 once distrusted."""
        rec = self._peers.get(peer)
        return 0 if rec is None or rec.distrusted else rec.checked_flops

    def flagged_groups(self) -> frozenset[str]:
        """Address groups in which a flagged peer was seen: a new key from there starts on probation."""
        return frozenset(p.group for p in self._peers.values() if p.flagged and p.group)

    def eligible(self, peer: PeerId) -> bool:
        """Not flagged: a reported or caught worker is never chosen."""
        rec = self._peers.get(peer)
        return rec is None or not rec.flagged

    def rank(self, candidates: Iterable[PeerId]) -> list[PeerId]:
        """Eligible candidates, highest score first; ties keep the given order (shuffle first for fairness)."""
        eligible = [p for p in candidates if self.eligible(p)]
        return sorted(eligible, key=lambda p: -self.get(p).score)

    def _store(self, rec: PeerReputation) -> PeerReputation:
        self._peers[rec.peer] = rec
        if len(self._peers) > self.policy.max_peers:
            # forget the longest-unseen unflagged peer; flagged peers are remembered first
            victims = sorted(self._peers.values(), key=lambda p: (p.flagged, p.last_seen))
            for victim in victims[: len(self._peers) - self.policy.max_peers]:
                if victim.peer != rec.peer:
                    del self._peers[victim.peer]
        return rec
