"""The hash-chained, owner-signed ledger: appends, totals, audits, tamper detection at every field (re-hashed
reorders and drops included), signing a ledger from before signatures, and what clients owe."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.ledger import (
    GENESIS_HASH,
    AcceptedJob,
    Ledger,
    LedgerEntry,
    LedgerRole,
    entry_hash,
    entry_signing_bytes,
    owed,
    verify_chain,
)
from p2pcompute.core.messages import JobReceipt, PeerRecord
from p2pcompute.errors import LocalProtocolError, Reason, ReplayError, SchemaError, SignatureError, StoreError

NOW = 1_800_000_000_000
WORKER = KeyPair.from_seed(b"w" * 32)
OTHER_WORKER = KeyPair.from_seed(b"v" * 32)
CLIENTS = [KeyPair.from_seed(bytes([i + 90]) * 32) for i in range(3)]


def receipt(client: KeyPair, n: int, price: int = 1000, worker: KeyPair = WORKER, **changes: Any) -> bytes:
    fields: dict[str, Any] = dict(
        id=hashlib.sha256(client.public_key + n.to_bytes(4, "big")).digest()[:16], nonce=n, expires_at=NOW + 60_000,
        client=client.peer_id, worker=worker.peer_id, result_hash=hashlib.sha256(b"r%d" % n).digest(),
        job_digest=hashlib.sha256(b"j%d" % n).digest(), output_digest=hashlib.sha256(b"o%d" % n).digest(),
        price=price, issued_at=NOW,
    )  # fmt: skip
    fields.update(changes)
    return seal(client, JobReceipt(**fields))


def worker_ledger(n: int = 5) -> Ledger:
    ledger = Ledger(WORKER.peer_id, LedgerRole.WORKER, signer=WORKER)
    for i in range(n):
        ledger.append(receipt(CLIENTS[i % 3], i, price=100 * (i + 1)))
    return ledger


def broken_at(entries: list[LedgerEntry], **kw: Any) -> int:
    kw = {"owner": WORKER.peer_id, "role": LedgerRole.WORKER, **kw}
    with pytest.raises(StoreError) as info:
        verify_chain(entries, **kw)
    assert info.value.reason is Reason.CHAIN_BROKEN
    prefix = info.value.detail.split(":")[0]
    assert prefix.startswith("entry ")
    return int(prefix.removeprefix("entry "))


def test_append_chains_entries_and_totals_earnings() -> None:
    ledger = worker_ledger()
    entries = ledger.entries
    assert [e.seq for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(entries[i].prev_hash == entries[i - 1].entry_hash for i in range(1, 5))
    assert ledger.head == entries[-1].entry_hash
    verify_chain(entries, owner=WORKER.peer_id, role=LedgerRole.WORKER)
    assert ledger.totals() == {
        CLIENTS[0].peer_id: 100 + 400,
        CLIENTS[1].peer_id: 200 + 500,
        CLIENTS[2].peer_id: 300,
    }
    assert ledger.total() == 1500
    assert len(ledger) == 5 and len(ledger.receipts) == 5
    first = ledger.receipts[0].message
    assert ledger.paid(first.client, first.worker, first.id)
    # a ledger rebuilt from stored entries is the same ledger
    assert Ledger(WORKER.peer_id, LedgerRole.WORKER, entries).totals() == ledger.totals()


def test_client_ledger_totals_spending_per_worker() -> None:
    ledger = Ledger(CLIENTS[0].peer_id, LedgerRole.CLIENT, signer=CLIENTS[0])
    ledger.append(receipt(CLIENTS[0], 1, 10))
    ledger.append(receipt(CLIENTS[0], 2, 20, worker=OTHER_WORKER))
    ledger.append(receipt(CLIENTS[0], 3, 30))
    assert ledger.totals() == {WORKER.peer_id: 40, OTHER_WORKER.peer_id: 20}
    with pytest.raises(SchemaError) as info:
        ledger.append(receipt(CLIENTS[1], 4))
    assert info.value.reason is Reason.INCONSISTENT


def test_append_refuses_bad_receipts() -> None:
    ledger = worker_ledger(1)
    with pytest.raises(SchemaError) as other:
        ledger.append(receipt(CLIENTS[0], 9, worker=OTHER_WORKER))
    assert other.value.reason is Reason.INCONSISTENT
    forged = bytearray(receipt(CLIENTS[0], 9))
    forged[-3] ^= 1
    with pytest.raises(SignatureError):
        ledger.append(bytes(forged))
    record = PeerRecord(
        id=b"\x01" * 16, nonce=1, expires_at=NOW, peer_id=WORKER.peer_id, seq=1, addrs=("/ip4/127.0.0.1/tcp/1",)
    )
    with pytest.raises(SignatureError) as wrong_type:
        ledger.append(seal(WORKER, record))
    assert wrong_type.value.reason is Reason.UNEXPECTED_PAYLOAD_TYPE
    with pytest.raises(ReplayError) as dup:
        ledger.append(receipt(CLIENTS[0], 0, price=999, nonce=77))  # a second receipt for job 0
    assert dup.value.reason is Reason.REPLAYED
    assert len(ledger) == 1


@pytest.mark.parametrize("field", ["seq", "prev_hash", "receipt", "entry_hash", "signature"])
@pytest.mark.parametrize("index", [0, 2, 4])
def test_tampering_with_any_field_is_detected_at_that_entry(field: str, index: int) -> None:
    entries = list(worker_ledger().entries)
    e = entries[index]
    value = getattr(e, field)
    tampered = value + 1 if isinstance(value, int) else bytes([value[0] ^ 1]) + value[1:]
    changes: dict[str, Any] = {field: tampered}
    entries[index] = dataclasses.replace(e, **changes)
    assert broken_at(entries) == index


@given(data=st.data())
def test_any_flipped_byte_is_detected(data: st.DataObject) -> None:
    entries = list(worker_ledger(3).entries)
    index = data.draw(st.integers(0, 2))
    field = data.draw(st.sampled_from(["prev_hash", "receipt", "entry_hash", "signature"]))
    value: bytes = getattr(entries[index], field)
    pos = data.draw(st.integers(0, len(value) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = value[:pos] + bytes([value[pos] ^ (1 << bit)]) + value[pos + 1 :]
    changes: dict[str, Any] = {field: flipped}
    entries[index] = dataclasses.replace(entries[index], **changes)
    assert broken_at(entries) == index


def rechain(receipts: list[bytes], signer: KeyPair | None = None) -> list[LedgerEntry]:
    """What a tamperer builds: a fresh chain over these receipts with every hash recomputed (signed only when the
    tamperer holds ``signer``)."""
    out: list[LedgerEntry] = []
    for i, r in enumerate(receipts):
        prev = out[-1].entry_hash if out else GENESIS_HASH
        out.append(LedgerEntry.make(i, prev, r, signer=signer, role=LedgerRole.WORKER))
    return out


def test_rechained_forged_receipt_is_detected() -> None:
    # Even the owner, re-hashing and re-signing after changing a receipt, cannot forge the client's signature.
    entries = list(worker_ledger(3).entries)
    raw = bytearray(entries[1].receipt)
    raw[-3] ^= 1
    assert broken_at(rechain([entries[0].receipt, bytes(raw), entries[2].receipt], signer=WORKER)) == 1


def test_dropped_reordered_and_duplicated_entries_are_detected() -> None:
    entries = list(worker_ledger().entries)
    assert broken_at(entries[:2] + entries[3:]) == 2
    assert broken_at([entries[1], entries[0], *entries[2:]]) == 0
    dup = [
        *entries,
        LedgerEntry.make(5, entries[-1].entry_hash, entries[0].receipt, signer=WORKER, role=LedgerRole.WORKER),
    ]
    assert broken_at(dup) == 5


def test_a_reordered_chain_with_every_hash_recomputed_is_detected() -> None:
    # The tamperer recomputes seq, prev_hash and entry_hash: the chain is consistent, but the owner's signatures
    # (copied along, or missing) do not cover the new hashes.
    receipts = [e.receipt for e in worker_ledger().entries]
    reordered = rechain([receipts[1], receipts[0], *receipts[2:]])
    assert broken_at(reordered) == 0
    old = {e.receipt: e.signature for e in worker_ledger().entries}
    assert broken_at([dataclasses.replace(e, signature=old[e.receipt]) for e in reordered]) == 0
    with pytest.raises(StoreError):  # nor does a ledger loaded by anyone but its owner accept it
        Ledger(WORKER.peer_id, LedgerRole.WORKER, reordered)


def test_a_dropped_entry_with_every_hash_recomputed_is_detected() -> None:
    entries = list(worker_ledger().entries)
    old = {e.receipt: e.signature for e in entries}
    dropped = rechain([e.receipt for i, e in enumerate(entries) if i != 2])
    resigned = [dataclasses.replace(e, signature=old[e.receipt]) for e in dropped]
    assert broken_at(resigned) == 2  # entries 0 and 1 are unchanged; the first re-hashed one is caught
    assert broken_at(dropped) == 0  # unsigned entries are never accepted by an audit


def test_only_the_owner_can_rewrite_its_chain() -> None:
    # What the signatures do not stop (specs/ledger.md §5): the owner itself may rebuild its own ledger. Totals
    # still come only from receipts its clients signed.
    receipts = [e.receipt for e in worker_ledger().entries]
    verify_chain(rechain(receipts[::-1], signer=WORKER), owner=WORKER.peer_id, role=LedgerRole.WORKER)
    assert broken_at(rechain(receipts[::-1], signer=OTHER_WORKER)) == 0


def test_an_entry_signed_for_the_other_role_is_refused() -> None:
    entries = list(worker_ledger(2).entries)
    as_client = WORKER.sign(entry_signing_bytes(LedgerRole.CLIENT, entries[1].entry_hash))
    assert broken_at([entries[0], dataclasses.replace(entries[1], signature=as_client)]) == 1


def test_audit_against_an_owner() -> None:
    entries = list(worker_ledger(2).entries)
    assert broken_at(entries, owner=OTHER_WORKER.peer_id, role=LedgerRole.WORKER) == 0
    with pytest.raises(StoreError):
        Ledger(OTHER_WORKER.peer_id, LedgerRole.WORKER, entries)
    with pytest.raises(LocalProtocolError) as wrong_key:
        Ledger(WORKER.peer_id, LedgerRole.WORKER, entries, signer=OTHER_WORKER)
    assert wrong_key.value.reason is Reason.SIGNER_MISMATCH


def test_a_ledger_without_its_owners_key_audits_but_cannot_append() -> None:
    view = Ledger(WORKER.peer_id, LedgerRole.WORKER, worker_ledger(2).entries)
    assert view.total() == 300 and view.newly_signed == ()
    with pytest.raises(LocalProtocolError) as info:
        view.append(receipt(CLIENTS[0], 7))
    assert info.value.reason is Reason.SIGNER_MISMATCH
    assert len(view) == 2


def test_a_ledger_from_before_signatures_is_signed_by_its_owner() -> None:
    unsigned = [dataclasses.replace(e, signature=b"") for e in worker_ledger(3).entries]
    assert broken_at(unsigned) == 0  # an auditor refuses it
    with pytest.raises(StoreError):
        Ledger(WORKER.peer_id, LedgerRole.WORKER, unsigned)
    ledger = Ledger(WORKER.peer_id, LedgerRole.WORKER, unsigned, signer=WORKER)  # its owner signs it, once
    assert len(ledger.newly_signed) == 3 and ledger.entries == ledger.newly_signed
    verify_chain(ledger.entries, owner=WORKER.peer_id, role=LedgerRole.WORKER)
    assert Ledger(WORKER.peer_id, LedgerRole.WORKER, ledger.entries, signer=WORKER).newly_signed == ()
    # a tamperer cannot strip some signatures to have its reordered tail signed: partly signed ledgers never load
    signed = list(ledger.entries)
    tail = rechain([e.receipt for e in signed])[1:]
    with pytest.raises(StoreError):
        Ledger(WORKER.peer_id, LedgerRole.WORKER, [signed[0], *tail], signer=WORKER)


def test_entry_hash_covers_every_part() -> None:
    base = entry_hash(1, GENESIS_HASH, b"r")
    assert base != entry_hash(2, GENESIS_HASH, b"r")
    assert base != entry_hash(1, b"\x01" * 32, b"r")
    assert base != entry_hash(1, GENESIS_HASH, b"s")
    with pytest.raises(ValueError):
        entry_hash(-1, GENESIS_HASH, b"r")


def test_owed_lists_unsettled_jobs_after_the_grace_period() -> None:
    a, b = CLIENTS[0].peer_id, CLIENTS[1].peer_id
    jobs = [
        AcceptedJob(client=a, job_id=b"\x01" * 16, price=5, delivered_at=NOW),
        AcceptedJob(client=a, job_id=b"\x02" * 16, price=5, delivered_at=NOW),
        AcceptedJob(client=b, job_id=b"\x03" * 16, price=5, delivered_at=NOW + 500),
        AcceptedJob(client=b, job_id=b"\x04" * 16, price=5, delivered_at=NOW),
    ]
    settled = [(a, b"\x01" * 16), (b, b"\x04" * 16)]
    assert owed(jobs, settled, NOW + 999, grace_ms=1000) == {}
    assert owed(jobs, settled, NOW + 1000, grace_ms=1000) == {a: (jobs[1],)}
    assert owed(jobs, settled, NOW + 1500, grace_ms=1000) == {a: (jobs[1],), b: (jobs[2],)}
    # a receipt from a different client for the same job id does not settle it
    assert owed(jobs[:1], [(b, b"\x01" * 16)], NOW + 1000, grace_ms=1000) == {a: (jobs[0],)}
