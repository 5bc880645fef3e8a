"""`p2pcompute ledger`'s report: earnings and spending from the store, audited; tampering is reported."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from p2pcompute.accounts import ledger_report
from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.ledger import LedgerEntry, LedgerRole
from p2pcompute.core.messages import JobReceipt
from p2pcompute.errors import KeyFileError, Reason, StoreError
from p2pcompute.keys import write_key_file
from p2pcompute.store import STORE_FILE, open_store

NOW = 1_800_000_000_000
WORKER = KeyPair.from_seed(b"\x31" * 32)
CLIENTS = [KeyPair.from_seed(bytes([0x40 + i]) * 32) for i in range(2)]


def receipt(client: KeyPair, worker: KeyPair, n: int, price: int) -> bytes:
    message = JobReceipt(
        id=bytes([n]) * 16,
        nonce=n,
        expires_at=NOW + 60_000,
        client=client.peer_id,
        worker=worker.peer_id,
        result_hash=bytes([n]) * 32,
        job_digest=bytes([n + 1]) * 32,
        output_digest=bytes([n + 2]) * 32,
        price=price,
        issued_at=NOW,
    )
    return seal(client, message)


def worker_dir(tmp_path: Path) -> Path:
    write_key_file(tmp_path / "identity.key", WORKER)
    store = open_store(tmp_path / STORE_FILE)
    ledger = store.load_ledger(WORKER, LedgerRole.WORKER)
    for n, (client, price) in enumerate([(CLIENTS[0], 1000), (CLIENTS[1], 2500), (CLIENTS[0], 500)]):
        store.append_to_ledger(ledger, receipt(client, WORKER, n, price))
    store.close()
    return tmp_path


def test_report_sums_earnings_per_client_and_audits(tmp_path: Path) -> None:
    report = ledger_report(worker_dir(tmp_path), now=NOW)
    assert report["peer_id"] == str(WORKER.peer_id)
    assert report["audit"] == "ok"
    earnings = report["earnings"]
    assert earnings["entries"] == 3
    assert earnings["total_micro_credits"] == 4000
    assert earnings["total_credits"] == "0.004"
    assert [(c["peer"], c["micro_credits"]) for c in earnings["clients"]] == [
        (str(CLIENTS[1].peer_id), 2500),
        (str(CLIENTS[0].peer_id), 1500),
    ]
    assert report["spending"]["entries"] == 0
    assert report["clients_owing"] == []


def test_a_tampered_ledger_is_reported_not_summed(tmp_path: Path) -> None:
    data_dir = worker_dir(tmp_path)
    conn = sqlite3.connect(data_dir / STORE_FILE)
    with conn:  # raise the price of the second receipt by re-signing nothing: the chain must break
        conn.execute("UPDATE ledger SET receipt = ? WHERE seq = 1", (receipt(CLIENTS[1], WORKER, 1, 9_999_999),))
    conn.close()
    with pytest.raises(StoreError) as info:
        ledger_report(data_dir, now=NOW)
    assert info.value.reason is Reason.CHAIN_BROKEN
    assert "entry 1" in info.value.detail


def test_a_directory_without_a_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no store"):
        ledger_report(tmp_path, now=NOW)


def test_ledger_command_prints_earnings_and_refuses_a_tampered_store(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from p2pcompute.cli import main

    data_dir = worker_dir(tmp_path)
    result = CliRunner().invoke(main, ["ledger", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "ledger audit: ok" in result.output
    assert "earnings: 0.004 credits in 3 receipt(s)" in result.output
    conn = sqlite3.connect(data_dir / STORE_FILE)
    with conn:
        conn.execute("DELETE FROM ledger WHERE seq = 1")
    conn.close()
    result = CliRunner().invoke(main, ["ledger", "--data-dir", str(data_dir)])
    assert result.exit_code == 1
    assert "chain_broken" in result.output


def test_a_reordered_ledger_with_recomputed_hashes_is_reported(tmp_path: Path) -> None:
    data_dir = worker_dir(tmp_path)
    conn = sqlite3.connect(data_dir / STORE_FILE)
    rows = conn.execute("SELECT seq, receipt FROM ledger ORDER BY seq").fetchall()
    with conn:  # drop entry 1 and recompute every later hash: only the owner's key could re-sign them
        conn.execute("DELETE FROM ledger WHERE seq = 1")
        prev = conn.execute("SELECT entry_hash FROM ledger WHERE seq = 0").fetchone()[0]
        entry = LedgerEntry.make(1, prev, rows[2][1])
        conn.execute("UPDATE ledger SET seq = 1, prev_hash = ?, entry_hash = ? WHERE seq = 2", (prev, entry.entry_hash))
    conn.close()
    with pytest.raises(StoreError) as info:
        ledger_report(data_dir, now=NOW)
    assert info.value.reason is Reason.CHAIN_BROKEN and info.value.detail.startswith("entry 1:")


def test_ledger_command_signs_a_ledger_from_before_signatures(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from p2pcompute.cli import main

    data_dir = worker_dir(tmp_path)
    conn = sqlite3.connect(data_dir / STORE_FILE)
    with conn:  # as a store written before ledger entries were signed
        conn.execute("UPDATE ledger SET signature = x''")
    conn.close()
    with pytest.raises(StoreError):  # an audit with the peer id alone refuses it
        ledger_report(data_dir, now=NOW)
    result = CliRunner().invoke(main, ["ledger", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "earnings: 0.004 credits in 3 receipt(s)" in result.output
    assert ledger_report(data_dir, now=NOW)["audit"] == "ok"
