"""SQLite persistence of what a peer must not lose: accepted jobs, its ledger of receipts, reputation.

One file per peer (``<data dir>/store.sqlite3``) in WAL mode with ``synchronous=NORMAL``: a committed
write survives a crash of the process (WAL on a local disk), and readers never block the writer. Every
write is one short transaction; the calls are synchronous because each takes well under a millisecond
on a local disk, far below a network round trip (see ``benchmarks/`` for figures).

Jobs are kept by negotiation id with the signed envelopes of the exchange, so an interrupted job can be
explained (and audited) after a restart: :meth:`Store.recover` marks the jobs a previous run left open
as ``interrupted`` and returns them, so nothing is silently forgotten.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.ledger import Ledger, LedgerEntry, LedgerRole
from p2pcompute.core.reputation import PeerReputation, Reputation, ReputationPolicy
from p2pcompute.errors import Reason, StoreError

__all__ = ["STORE_FILE", "JobRecord", "JobRole", "JobState", "Store", "open_store"]

STORE_FILE = "store.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id BLOB NOT NULL,
    role TEXT NOT NULL,
    peer BLOB NOT NULL,
    job_digest BLOB NOT NULL,
    state TEXT NOT NULL,
    price INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    envelopes TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (id, role, peer)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (role, state);
CREATE TABLE IF NOT EXISTS ledger (
    owner TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    entry_hash BLOB NOT NULL,
    receipt BLOB NOT NULL,
    signature BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (owner, seq)
);
CREATE TABLE IF NOT EXISTS reputation (peer BLOB PRIMARY KEY, row TEXT NOT NULL);
"""


class JobRole(StrEnum):
    WORKER = "worker"
    CLIENT = "client"


class JobState(StrEnum):
    """Life of a job as the store records it (a coarser view than the negotiation machines)."""

    ACCEPTED = "accepted"  # both signed; inputs not yet all in
    RUNNING = "running"
    RESULT_SENT = "result_sent"  # worker: attestation sent, receipt pending
    PAID = "paid"  # receipt received (worker) or sent (client)
    REJECTED = "rejected"  # client signed a rejection
    FAILED = "failed"  # worker signed JobFailed, or the exchange broke after accept
    INTERRUPTED = "interrupted"  # the peer stopped while the job was open

    @property
    def open(self) -> bool:
        return self in _OPEN_STATES


_OPEN_STATES = frozenset({JobState.ACCEPTED, JobState.RUNNING, JobState.RESULT_SENT})


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """One job of one negotiation as a peer remembers it; ``envelopes`` maps message kind to envelope bytes."""

    id: bytes
    role: JobRole
    peer: bytes  # the counterparty's raw peer id
    job_digest: bytes
    state: JobState
    price: int
    created_ms: int
    updated_ms: int
    envelopes: dict[str, bytes] = field(default_factory=dict)
    detail: str = ""


class Store:
    """A peer's SQLite store. Use :func:`open_store`; one instance per process, used from one thread."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._conn:
                yield self._conn
        except sqlite3.Error as exc:
            raise StoreError(Reason.STORE_FAILED, f"{self.path}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()

    # --- jobs ---

    def put_job(self, record: JobRecord) -> None:
        """Insert a new job record (one transaction, durable when this returns).

        A job is never overwritten: a record with the same (id, role, peer) raises :class:`StoreError`
        (``duplicate_id``) and leaves the stored one as it was, envelopes and all.
        """
        try:
            self._write_job(record, "INSERT")
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise StoreError(
                    Reason.DUPLICATE_ID, f"a {record.role.value} job {record.id.hex()} with this peer exists"
                ) from exc
            raise

    def has_job(self, job_id: bytes, role: JobRole, peer: bytes) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND role = ? AND peer = ?", (job_id, role.value, peer)
        ).fetchone()
        return row is not None

    def _write_job(self, record: JobRecord, verb: str) -> None:
        envelopes = json.dumps({k: v.hex() for k, v in sorted(record.envelopes.items())})
        with self._tx() as conn:
            conn.execute(
                f"{verb} INTO jobs (id, role, peer, job_digest, state, price, created_ms, updated_ms,"
                " envelopes, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.role.value,
                    record.peer,
                    record.job_digest,
                    record.state.value,
                    record.price,
                    record.created_ms,
                    record.updated_ms,
                    envelopes,
                    record.detail,
                ),
            )

    def update_job(
        self,
        job_id: bytes,
        role: JobRole,
        peer: bytes,
        *,
        state: JobState,
        now: int,
        envelopes: dict[str, bytes] | None = None,
        detail: str | None = None,
    ) -> JobRecord:
        """Move a job to ``state``, adding envelopes; raises :class:`StoreError` if the job is unknown."""
        record = self.get_job(job_id, role, peer)
        if record is None:
            raise StoreError(Reason.STORE_FAILED, f"no {role.value} job {job_id.hex()} with {peer.hex()[:16]}")
        merged = dict(record.envelopes)
        merged.update(envelopes or {})
        updated = replace(
            record,
            state=state,
            updated_ms=now,
            envelopes=merged,
            detail=record.detail if detail is None else detail,
        )
        self._write_job(updated, "REPLACE")
        return updated

    def get_job(self, job_id: bytes, role: JobRole, peer: bytes) -> JobRecord | None:
        row = self._conn.execute(
            "SELECT * FROM jobs WHERE id = ? AND role = ? AND peer = ?", (job_id, role.value, peer)
        ).fetchone()
        return None if row is None else _job_from_row(row)

    def jobs(self, role: JobRole | None = None, states: Sequence[JobState] | None = None) -> list[JobRecord]:
        """Jobs, oldest first, optionally of one role and some states."""
        sql = "SELECT * FROM jobs"
        clauses: list[str] = []
        args: list[Any] = []
        if role is not None:
            clauses.append("role = ?")
            args.append(role.value)
        if states is not None:
            clauses.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(s.value for s in states)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY created_ms, id"
        return [_job_from_row(row) for row in self._conn.execute(sql, args)]

    def recover(self, now: int) -> list[JobRecord]:
        """At start-up: mark every job a previous run left open as ``interrupted``; return them as they were."""
        left_open = self.jobs(states=sorted(_OPEN_STATES))
        for record in left_open:
            if record.state is JobState.RESULT_SENT:
                continue  # the work is done and attested; only the receipt is outstanding
            self.update_job(
                record.id,
                record.role,
                record.peer,
                state=JobState.INTERRUPTED,
                now=now,
                detail=f"interrupted in state {record.state.value} by a restart",
            )
        return left_open

    def count_jobs(self, role: JobRole, state: JobState) -> int:
        row = self._conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE role = ? AND state = ?", (role.value, state.value)
        ).fetchone()
        return int(row[0])

    # --- ledger (hash-chained receipts; the chain rules live in core/ledger.py) ---

    def append_ledger(
        self, owner: str, seq: int, prev_hash: bytes, entry_hash: bytes, receipt: bytes, signature: bytes = b""
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO ledger (owner, seq, prev_hash, entry_hash, receipt, signature) VALUES (?, ?, ?, ?, ?, ?)",
                (owner, seq, prev_hash, entry_hash, receipt, signature),
            )

    def ledger_rows(self, owner: str) -> list[tuple[int, bytes, bytes, bytes, bytes]]:
        """``(seq, prev_hash, entry_hash, receipt, signature)`` rows of one ledger, in order."""
        rows = self._conn.execute(
            "SELECT seq, prev_hash, entry_hash, receipt, signature FROM ledger WHERE owner = ? ORDER BY seq", (owner,)
        ).fetchall()
        return [(int(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3]), bytes(r[4])) for r in rows]

    # --- reputation (rows produced by core/reputation.py) ---

    def put_reputation(self, peer: bytes, row: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO reputation (peer, row) VALUES (?, ?)", (peer, json.dumps(row, sort_keys=True))
            )

    def reputation_rows(self) -> dict[bytes, dict[str, Any]]:
        return {bytes(peer): json.loads(row) for peer, row in self._conn.execute("SELECT peer, row FROM reputation")}

    def load_reputation(self, policy: ReputationPolicy | None = None) -> Reputation:
        """The reputation this peer recorded before (rows are checked; a bad row is a :class:`StoreError`)."""
        peers = [PeerReputation.from_row(_unhex(row)) for row in self.reputation_rows().values()]
        return Reputation(policy, peers)

    def save_reputation(self, record: PeerReputation) -> None:
        row = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in record.to_row().items()}
        self.put_reputation(record.peer.raw, row)

    def load_ledger(self, owner: PeerId | KeyPair, role: LedgerRole) -> Ledger:
        """The owner's ledger of ``role``, its whole chain re-checked (``chain_broken`` on tampering).

        Given the owner's :class:`KeyPair` the ledger can be appended to, and a ledger stored before entries were
        signed is signed now (once, in one transaction). Given only a :class:`PeerId` it is an audit: every entry
        must carry the owner's signature.
        """
        signer = owner if isinstance(owner, KeyPair) else None
        peer = owner.peer_id if isinstance(owner, KeyPair) else owner
        name = f"{role.value}:{peer}"
        entries = [
            LedgerEntry(seq=seq, prev_hash=prev, receipt=receipt, entry_hash=h, signature=sig)
            for seq, prev, h, receipt, sig in self.ledger_rows(name)
        ]
        ledger = Ledger(peer, role, entries, signer=signer)
        if ledger.newly_signed:
            with self._tx() as conn:
                conn.executemany(
                    "UPDATE ledger SET signature = ? WHERE owner = ? AND seq = ? AND entry_hash = ?",
                    [(e.signature, name, e.seq, e.entry_hash) for e in ledger.newly_signed],
                )
        return ledger

    def append_to_ledger(self, ledger: Ledger, receipt: bytes) -> LedgerEntry:
        """Append a receipt to ``ledger`` and persist the signed entry in the same step (nothing if it is refused)."""
        entry = ledger.append(receipt)
        self.append_ledger(
            f"{ledger.role.value}:{ledger.owner}",
            entry.seq,
            entry.prev_hash,
            entry.entry_hash,
            receipt,
            entry.signature,
        )
        return entry

    def unpaid_clients(self, now: int, grace_ms: int) -> set[PeerId]:
        """Clients with a delivered result (``result_sent``) but neither receipt nor rejection after ``grace_ms``."""
        rows = self._conn.execute(
            "SELECT DISTINCT peer FROM jobs WHERE role = ? AND state = ? AND updated_ms + ? <= ?",
            (JobRole.WORKER.value, JobState.RESULT_SENT.value, grace_ms, now),
        ).fetchall()
        return {PeerId(bytes(r[0])) for r in rows}


def _unhex(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (bytes.fromhex(v) if k == "peer" and isinstance(v, str) else v) for k, v in row.items()}


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    try:
        envelopes = {k: bytes.fromhex(v) for k, v in json.loads(row["envelopes"]).items()}
        return JobRecord(
            id=bytes(row["id"]),
            role=JobRole(row["role"]),
            peer=bytes(row["peer"]),
            job_digest=bytes(row["job_digest"]),
            state=JobState(row["state"]),
            price=int(row["price"]),
            created_ms=int(row["created_ms"]),
            updated_ms=int(row["updated_ms"]),
            envelopes=envelopes,
            detail=str(row["detail"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(Reason.STORE_FAILED, f"corrupt job row: {exc}") from exc


def open_store(path: Path) -> Store:
    """Open (creating if needed) the store at ``path``; raises :class:`StoreError` if it is unusable."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        with conn:
            conn.executescript(_SCHEMA)
            if "signature" not in {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}:
                # a store from before ledger entries were signed: its entries are signed on the owner's next load
                conn.execute("ALTER TABLE ledger ADD COLUMN signature BLOB NOT NULL DEFAULT x''")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    Reason.STORE_FAILED, f"{path}: schema version {row[0]}, this p2pcompute uses {SCHEMA_VERSION}"
                )
    except sqlite3.Error as exc:
        raise StoreError(Reason.STORE_FAILED, f"cannot open {path}: {exc}") from exc
    return Store(conn, path)
