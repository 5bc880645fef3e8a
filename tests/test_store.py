"""The SQLite store: jobs survive a reopen, open jobs are recovered as interrupted, bad files are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.ledger import GENESIS_HASH, LedgerEntry, LedgerRole
from p2pcompute.core.messages import JobReceipt
from p2pcompute.errors import Reason, StoreError
from p2pcompute.store import STORE_FILE, JobRecord, JobRole, JobState, open_store

PEER = b"\x00\x24" + b"p" * 36


def record(job_id: bytes, state: JobState, role: JobRole = JobRole.WORKER) -> JobRecord:
    return JobRecord(
        id=job_id,
        role=role,
        peer=PEER,
        job_digest=b"d" * 32,
        state=state,
        price=1234,
        created_ms=1_000,
        updated_ms=1_000,
        envelopes={"request": b"req", "accept": b"acc"},
    )


def test_jobs_survive_a_reopen_and_open_ones_are_recovered(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    store = open_store(path)
    store.put_job(record(b"a" * 16, JobState.ACCEPTED))
    store.put_job(record(b"b" * 16, JobState.RUNNING))
    store.put_job(record(b"c" * 16, JobState.RESULT_SENT))
    store.put_job(record(b"d" * 16, JobState.PAID))
    store.put_job(record(b"e" * 16, JobState.ACCEPTED, role=JobRole.CLIENT))
    store.update_job(b"d" * 16, JobRole.WORKER, PEER, state=JobState.PAID, now=2_000, envelopes={"receipt": b"r"})
    store.close()  # a crash after commit loses nothing: every write was its own transaction

    store = open_store(path)
    left_open = store.recover(now=5_000)
    assert sorted(r.id[:1] for r in left_open) == [b"a", b"b", b"c", b"e"]
    assert store.get_job(b"a" * 16, JobRole.WORKER, PEER).state is JobState.INTERRUPTED  # type: ignore[union-attr]
    assert store.get_job(b"b" * 16, JobRole.WORKER, PEER).detail == "interrupted in state running by a restart"  # type: ignore[union-attr]
    # an attested result is not interrupted: only its receipt is outstanding
    assert store.get_job(b"c" * 16, JobRole.WORKER, PEER).state is JobState.RESULT_SENT  # type: ignore[union-attr]
    paid = store.get_job(b"d" * 16, JobRole.WORKER, PEER)
    assert paid is not None
    assert paid.envelopes == {"request": b"req", "accept": b"acc", "receipt": b"r"}
    assert paid.updated_ms == 2_000
    assert store.count_jobs(JobRole.WORKER, JobState.INTERRUPTED) == 2
    assert [r.id[:1] for r in store.jobs(JobRole.CLIENT)] == [b"e"]
    assert store.recover(now=6_000) == [store.get_job(b"c" * 16, JobRole.WORKER, PEER)]
    store.close()


def test_update_of_an_unknown_job_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path / STORE_FILE)
    with pytest.raises(StoreError) as info:
        store.update_job(b"x" * 16, JobRole.WORKER, PEER, state=JobState.PAID, now=1)
    assert info.value.reason is Reason.STORE_FAILED
    store.close()


def test_ledger_and_reputation_rows_round_trip(tmp_path: Path) -> None:
    store = open_store(tmp_path / STORE_FILE)
    store.append_ledger("worker", 0, b"\x00" * 32, b"h" * 32, b"receipt-0")
    store.append_ledger("worker", 1, b"h" * 32, b"i" * 32, b"receipt-1")
    with pytest.raises(StoreError):
        store.append_ledger("worker", 1, b"h" * 32, b"j" * 32, b"again")  # one entry per position
    assert [row[0] for row in store.ledger_rows("worker")] == [0, 1]
    assert store.ledger_rows("client") == []
    store.put_reputation(PEER, {"score": 3.5, "streak": 2})
    store.put_reputation(PEER, {"score": 4.0, "streak": 3})
    assert store.reputation_rows() == {PEER: {"score": 4.0, "streak": 3}}
    store.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as info:
        open_store(path)
    assert info.value.reason is Reason.STORE_FAILED


def test_a_store_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    open_store(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(path)


# --- the ledger: signed entries, and a store from before ledger entries were signed ---


def _receipts(worker: KeyPair, n: int) -> list[bytes]:
    client = KeyPair.from_seed(b"\x51" * 32)
    return [
        seal(
            client,
            JobReceipt(
                id=bytes([i]) * 16,
                nonce=i,
                expires_at=2_000_000_000_000,
                client=client.peer_id,
                worker=worker.peer_id,
                result_hash=bytes([i]) * 32,
                job_digest=bytes([i + 1]) * 32,
                output_digest=bytes([i + 2]) * 32,
                price=1000 * (i + 1),
                issued_at=1_900_000_000_000,
            ),
        )
        for i in range(n)
    ]


def _legacy_store(path: Path, worker: KeyPair, receipts: list[bytes]) -> None:
    """A store as the first schema wrote it: ledger rows without a signature column."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute(
            "CREATE TABLE ledger (owner TEXT NOT NULL, seq INTEGER NOT NULL, prev_hash BLOB NOT NULL,"
            " entry_hash BLOB NOT NULL, receipt BLOB NOT NULL, PRIMARY KEY (owner, seq))"
        )
        prev = GENESIS_HASH
        for seq, data in enumerate(receipts):
            entry = LedgerEntry.make(seq, prev, data)
            conn.execute(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, ?)",
                (f"worker:{worker.peer_id}", seq, prev, entry.entry_hash, data),
            )
            prev = entry.entry_hash
    conn.close()


def test_a_ledger_from_before_signatures_is_signed_once_by_its_owner(tmp_path: Path) -> None:
    worker = KeyPair.from_seed(b"\x52" * 32)
    path = tmp_path / STORE_FILE
    _legacy_store(path, worker, _receipts(worker, 3))
    store = open_store(path)  # adds the signature column
    with pytest.raises(StoreError) as unsigned:  # an audit with the peer id alone refuses unsigned entries
        store.load_ledger(worker.peer_id, LedgerRole.WORKER)
    assert unsigned.value.reason is Reason.CHAIN_BROKEN
    assert store.load_ledger(worker, LedgerRole.WORKER).total() == 6000  # the owner signs them
    store.close()
    store = open_store(path)
    audited = store.load_ledger(worker.peer_id, LedgerRole.WORKER)
    assert audited.total() == 6000 and all(len(e.signature) == 64 for e in audited.entries)
    store.close()


def test_a_reordered_ledger_with_recomputed_hashes_does_not_load(tmp_path: Path) -> None:
    worker = KeyPair.from_seed(b"\x53" * 32)
    store = open_store(tmp_path / STORE_FILE)
    ledger = store.load_ledger(worker, LedgerRole.WORKER)
    receipts = _receipts(worker, 3)
    for data in receipts:
        store.append_to_ledger(ledger, data)
    store.close()
    conn = sqlite3.connect(tmp_path / STORE_FILE)
    with conn:  # swap entries 0 and 1 and recompute every hash; the signatures cannot be recomputed
        prev = GENESIS_HASH
        for seq, data in enumerate([receipts[1], receipts[0], receipts[2]]):
            h = LedgerEntry.make(seq, prev, data).entry_hash
            conn.execute(
                "UPDATE ledger SET prev_hash = ?, entry_hash = ?, receipt = ? WHERE seq = ?", (prev, h, data, seq)
            )
            prev = h
    conn.close()
    store = open_store(tmp_path / STORE_FILE)
    for owner in (worker.peer_id, worker):
        with pytest.raises(StoreError) as info:
            store.load_ledger(owner, LedgerRole.WORKER)
        assert info.value.reason is Reason.CHAIN_BROKEN and info.value.detail.startswith("entry 0:")
    store.close()
