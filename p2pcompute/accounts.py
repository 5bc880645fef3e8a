"""What ``p2pcompute ledger`` shows: a peer's earnings (worker ledger) and spending (client ledger), audited.

Both ledgers are read from the peer's SQLite store and their hash chains re-checked in full (``core.ledger``),
so a tampered store is reported (``chain_broken``) instead of summed. Unpaid work — results delivered without a
receipt or a rejection — is listed per client, as the worker's admission sees it (``client_owes``).
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

from p2pcompute.config import MICRO_CREDITS
from p2pcompute.core.ledger import DEFAULT_RECEIPT_GRACE_MS, Ledger, LedgerRole
from p2pcompute.errors import KeyFileError, Reason
from p2pcompute.keys import read_key_file
from p2pcompute.store import STORE_FILE, JobRole, JobState, open_store

__all__ = ["ledger_report"]


def _credits(micro: int) -> str:
    return str(Decimal(micro) / MICRO_CREDITS)


def _side(ledger: Ledger, counterparty: str) -> dict[str, Any]:
    per_peer = ledger.totals()
    return {
        "entries": len(ledger),
        "head": ledger.head.hex(),
        "total_micro_credits": ledger.total(),
        "total_credits": _credits(ledger.total()),
        counterparty: [
            {"peer": str(peer), "micro_credits": amount, "credits": _credits(amount)}
            for peer, amount in sorted(per_peer.items(), key=lambda kv: -kv[1])
        ],
    }


def ledger_report(data_dir: Path, *, now: int, grace_ms: int = DEFAULT_RECEIPT_GRACE_MS) -> dict[str, Any]:
    """Earnings, spending and unpaid work of the peer whose data directory is ``data_dir``.

    Raises :class:`KeyFileError` without an identity there and :class:`StoreError` (``chain_broken``) when a
    ledger does not audit.
    """
    store_path = data_dir / STORE_FILE
    if not store_path.exists():
        raise KeyFileError(Reason.KEY_FILE_MISSING, f"no store at {store_path}: not a p2pcompute data directory")
    owner = read_key_file(data_dir / "identity.key").peer_id
    store = open_store(store_path)
    try:
        earnings = store.load_ledger(owner, LedgerRole.WORKER)
        spending = store.load_ledger(owner, LedgerRole.CLIENT)
        unpaid = sorted(str(peer) for peer in store.unpaid_clients(now, grace_ms))
        pending = _count(store.jobs(JobRole.WORKER, [JobState.RESULT_SENT]))
        return {
            "peer_id": str(owner),
            "earnings": _side(earnings, "clients"),
            "spending": _side(spending, "workers"),
            "awaiting_receipt": pending,
            "clients_owing": unpaid,
            "audit": "ok",
        }
    finally:
        store.close()


def _count(records: Iterable[object]) -> int:
    return sum(1 for _ in records)
