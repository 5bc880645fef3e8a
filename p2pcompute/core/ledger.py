"""Receipts and the hash-chained ledger (specs/ledger.md).

A ledger is a list of :class:`LedgerEntry`, each holding one client-signed ``JobReceipt`` envelope exactly as
received, naming the hash of the entry before it, and signed by the ledger's owner over its own hash. So anyone
holding only the owner's peer id detects a changed, dropped, inserted or reordered entry, even when the tamperer
recomputed every hash: the owner's signatures no longer verify (:func:`verify_chain`). What the chain cannot show
is its own newest end: dropping the last entries leaves a shorter valid chain (see specs/ledger.md §5).

A *worker* ledger holds receipts naming its owner as the worker (earnings); a *client* ledger holds receipts its
owner signed (spending). Pure: storage is an adapter (``store.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from p2pcompute.core.envelope import Opened, open_envelope
from p2pcompute.core.identity import SIGNATURE_SIZE, KeyPair, PeerId, verify_signature
from p2pcompute.core.messages import JobReceipt
from p2pcompute.core.tensors import DIGEST_SIZE
from p2pcompute.errors import LocalProtocolError, Reason, RemoteProtocolError, ReplayError, SchemaError, StoreError

__all__ = [
    "DEFAULT_RECEIPT_GRACE_MS",
    "GENESIS_HASH",
    "AcceptedJob",
    "Ledger",
    "LedgerEntry",
    "LedgerRole",
    "entry_hash",
    "entry_signing_bytes",
    "owed",
    "verify_chain",
]

GENESIS_HASH = bytes(DIGEST_SIZE)
"""``prev_hash`` of the first entry."""
DEFAULT_RECEIPT_GRACE_MS = 10 * 60 * 1000
"""How long after delivering a result a worker waits for its receipt before counting the job as owed."""
_ENTRY_DOMAIN = b"p2pcompute/ledger-entry/v1\x00"
_SIGNATURE_DOMAIN = b"p2pcompute/ledger-signature/v1\x00"


class LedgerRole(StrEnum):
    WORKER = "worker"
    CLIENT = "client"


def entry_hash(seq: int, prev_hash: bytes, receipt: bytes) -> bytes:
    """SHA-256(domain ‖ u64be(seq) ‖ prev_hash ‖ SHA-256(receipt envelope))."""
    if not 0 <= seq < 1 << 64:
        raise ValueError("seq out of range")
    return hashlib.sha256(
        _ENTRY_DOMAIN + seq.to_bytes(8, "big") + prev_hash + hashlib.sha256(receipt).digest()
    ).digest()


def entry_signing_bytes(role: LedgerRole, entry_hash: bytes) -> bytes:
    """What the owner signs for an entry: ``"p2pcompute/ledger-signature/v1\\0" ‖ role ‖ "\\0" ‖ entry_hash``."""
    return _SIGNATURE_DOMAIN + role.value.encode("ascii") + b"\x00" + entry_hash


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One receipt in the chain, with the owner's signature over its hash (``b""``: not signed yet, a ledger
    written before entries were signed; :class:`Ledger` signs those when it is given the owner's key)."""

    seq: int
    prev_hash: bytes
    receipt: bytes
    entry_hash: bytes
    signature: bytes = b""

    @classmethod
    def make(
        cls,
        seq: int,
        prev_hash: bytes,
        receipt: bytes,
        *,
        signer: KeyPair | None = None,
        role: LedgerRole | None = None,
    ) -> LedgerEntry:
        """An entry chained after ``prev_hash``; signed when ``signer`` and ``role`` are given."""
        h = entry_hash(seq, prev_hash, receipt)
        entry = cls(seq=seq, prev_hash=prev_hash, receipt=receipt, entry_hash=h)
        return entry.signed(signer, role) if signer is not None and role is not None else entry

    def signed(self, signer: KeyPair, role: LedgerRole) -> LedgerEntry:
        """This entry with ``signer``'s signature over its hash in a ledger of ``role``."""
        return replace(self, signature=signer.sign(entry_signing_bytes(role, self.entry_hash)))


def _settle_key(r: JobReceipt) -> tuple[PeerId, PeerId, bytes]:
    return (r.client, r.worker, r.id)


def _open_receipt(data: bytes, owner: PeerId | None, role: LedgerRole | None) -> Opened[JobReceipt]:
    opened: Opened[JobReceipt] = open_envelope(data, expect=JobReceipt)
    r = opened.message
    if owner is not None and role is LedgerRole.WORKER and r.worker != owner:
        raise SchemaError(Reason.INCONSISTENT, f"receipt names worker {r.worker}, this ledger is {owner}'s")
    if owner is not None and role is LedgerRole.CLIENT and r.client != owner:
        raise SchemaError(Reason.INCONSISTENT, f"receipt signed by {r.client}, this ledger is {owner}'s")
    return opened


def _check_chain(
    entries: Iterable[LedgerEntry], owner: PeerId, role: LedgerRole, *, unsigned_ok: bool = False
) -> list[Opened[JobReceipt]]:
    """Audit every entry in order (the checks of specs/ledger.md §5). ``unsigned_ok`` accepts a ledger none of whose
    entries is signed (one written before signatures, about to be signed by its owner); a partly signed ledger never
    passes, so signatures cannot be stripped from some entries."""
    entries = list(entries)
    unsigned_ok = unsigned_ok and all(not e.signature for e in entries)
    opened: list[Opened[JobReceipt]] = []
    seen: set[tuple[PeerId, PeerId, bytes]] = set()
    prev = GENESIS_HASH
    for i, e in enumerate(entries):

        def broken(what: str, i: int = i) -> StoreError:
            return StoreError(Reason.CHAIN_BROKEN, f"entry {i}: {what}")

        if e.seq != i:
            raise broken(f"seq is {e.seq}, expected {i}")
        if e.prev_hash != prev:
            raise broken("prev_hash does not name the entry before it")
        if not isinstance(e.receipt, bytes) or e.entry_hash != entry_hash(e.seq, e.prev_hash, e.receipt):
            raise broken("entry_hash does not match its contents")
        if not (unsigned_ok and not e.signature) and not _signed_by(owner, role, e):
            raise broken(f"not signed by the ledger's owner {owner} (missing or bad signature)")
        try:
            receipt = _open_receipt(e.receipt, owner, role)
        except RemoteProtocolError as exc:
            raise broken(f"receipt does not check out: {exc}") from exc
        key = _settle_key(receipt.message)
        if key in seen:
            raise broken("a second receipt for the same job")
        seen.add(key)
        opened.append(receipt)
        prev = e.entry_hash
    return opened


def _signed_by(owner: PeerId, role: LedgerRole, e: LedgerEntry) -> bool:
    if not isinstance(e.signature, bytes) or len(e.signature) != SIGNATURE_SIZE:
        return False
    return verify_signature(owner.public_key, entry_signing_bytes(role, e.entry_hash), e.signature)


def verify_chain(entries: Iterable[LedgerEntry], *, owner: PeerId, role: LedgerRole) -> None:
    """Audit ``owner``'s ledger of ``role`` with nothing but its peer id: raise :class:`StoreError` (``chain_broken``,
    detail ``"entry <index>: ..."``) at the first bad entry — wrong seq, wrong prev_hash, wrong entry_hash, a
    signature that is not the owner's over that entry_hash, a receipt that does not verify or names someone else,
    or a second receipt for one job."""
    _check_chain(entries, owner, role)


class Ledger:
    """An owner's verified, append-only ledger held in memory (the store persists its entries).

    With ``signer`` (the owner's key) it can be appended to, and a ledger written before entries were signed (no
    entry signed) is accepted and signed at once: :attr:`newly_signed` lists those entries for the store to persist.
    Without ``signer`` it is an auditor's read-only view: every entry must carry the owner's signature.
    """

    def __init__(
        self, owner: PeerId, role: LedgerRole, entries: Iterable[LedgerEntry] = (), *, signer: KeyPair | None = None
    ) -> None:
        if signer is not None and signer.peer_id != owner:
            raise LocalProtocolError(Reason.SIGNER_MISMATCH, f"ledger of {owner} given the key of {signer.peer_id}")
        self.owner = owner
        self.role = role
        self._signer = signer
        entries = list(entries)
        self._receipts = _check_chain(entries, owner, role, unsigned_ok=signer is not None)
        self.newly_signed: tuple[LedgerEntry, ...] = ()
        if signer is not None and any(not e.signature for e in entries):
            entries = [e.signed(signer, role) for e in entries]
            self.newly_signed = tuple(entries)
        self._entries = entries
        self._settled = {_settle_key(r.message) for r in self._receipts}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def receipts(self) -> tuple[Opened[JobReceipt], ...]:
        return tuple(self._receipts)

    @property
    def head(self) -> bytes:
        """The hash the next entry will name."""
        return self._entries[-1].entry_hash if self._entries else GENESIS_HASH

    def append(self, receipt: bytes) -> LedgerEntry:
        """Verify a receipt envelope, chain it and sign the entry. Raises the envelope's
        :class:`RemoteProtocolError`, :class:`SchemaError` (``inconsistent``: names another owner),
        :class:`ReplayError` (``replayed``: the job already has a receipt) or :class:`LocalProtocolError`
        (``signer_mismatch``: this ledger was loaded without its owner's key)."""
        if self._signer is None:
            raise LocalProtocolError(
                Reason.SIGNER_MISMATCH, f"the {self.role.value} ledger of {self.owner} was loaded without its key"
            )
        opened = _open_receipt(receipt, self.owner, self.role)
        key = _settle_key(opened.message)
        if key in self._settled:
            raise ReplayError(Reason.REPLAYED, f"job {opened.message.id.hex()} already has a receipt")
        entry = LedgerEntry.make(len(self._entries), self.head, receipt, signer=self._signer, role=self.role)
        self._entries.append(entry)
        self._receipts.append(opened)
        self._settled.add(key)
        return entry

    def paid(self, client: PeerId, worker: PeerId, job_id: bytes) -> bool:
        return (client, worker, job_id) in self._settled

    def totals(self) -> dict[PeerId, int]:
        """Micro-credits per counterparty: earned from each client (worker ledger) or spent on each worker."""
        out: dict[PeerId, int] = {}
        for r in self._receipts:
            other = r.message.client if self.role is LedgerRole.WORKER else r.message.worker
            out[other] = out.get(other, 0) + r.message.price
        return out

    def total(self) -> int:
        return sum(r.message.price for r in self._receipts)


@dataclass(frozen=True, slots=True)
class AcceptedJob:
    """A job a worker accepted and delivered a result for (from the worker's store)."""

    client: PeerId
    job_id: bytes
    price: int
    delivered_at: int


def owed(
    delivered: Iterable[AcceptedJob],
    settled: Iterable[tuple[PeerId, bytes]],
    now: int,
    grace_ms: int = DEFAULT_RECEIPT_GRACE_MS,
) -> dict[PeerId, tuple[AcceptedJob, ...]]:
    """Per client, the delivered jobs with neither a receipt nor a rejection (``settled``: (client, job id)) whose
    grace period has passed. A worker may decline new jobs from a client listed here (``client_owes``)."""
    done = set(settled)
    out: dict[PeerId, list[AcceptedJob]] = {}
    for job in delivered:
        if (job.client, job.job_id) not in done and job.delivered_at + grace_ms <= now:
            out.setdefault(job.client, []).append(job)
    return {client: tuple(jobs) for client, jobs in out.items()}
