"""p2pcompute.testnet_netns without namespaces: scenario parsing and validation, the one-line refusal when not root,
and the ledger accounting (lost, double, unknown and unpaid receipts) on real stores.

The namespace runs themselves are in ``tests/e2e/test_netns.py`` (root only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from p2pcompute.cli import main
from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.core.ledger import LedgerRole
from p2pcompute.core.messages import JobReceipt
from p2pcompute.errors import ConfigError
from p2pcompute.store import STORE_FILE, JobRecord, JobRole, JobState, open_store
from p2pcompute.testing.faultproxy import FaultSpec
from p2pcompute.testnet import TestnetError as ScenarioError
from p2pcompute.testnet import load_scenario
from p2pcompute.testnet_netns import (
    NetnsConfig,
    NetnsPeerConfig,
    NetnsTestnetError,
    account_ledgers,
    generated_peers,
    require_netns,
)

SCENARIOS = Path(__file__).parent.parent / "testnet" / "scenarios"
NETNS_SCENARIOS = ("nat.toml", "nat-both.toml", "faults.toml", "kill.toml", "churn.toml")


# --- scenarios ---


def test_generated_topology_relay_public_workers_cheaters_and_nat_workers() -> None:
    peers = generated_peers(5, nat_workers=2, cheaters=1, cheat_mode="zeros", hole_punch=False)
    assert [(p.name, p.role, p.router, p.cheat_mode, p.nat_mode) for p in peers] == [
        ("relay", "relay", None, "", "public"),
        ("w1", "worker", None, "zeros", "public"),
        ("w2", "worker", None, "", "public"),
        ("n1", "worker", "nat1", "", "private"),
        ("n2", "worker", "nat2", "", "private"),
    ]
    assert not any(p.hole_punch for p in peers[3:])


@pytest.mark.parametrize("name", NETNS_SCENARIOS)
def test_every_netns_scenario_file_loads(name: str) -> None:
    config = load_scenario(SCENARIOS / name, {})
    assert config.netns is not None
    assert config.peers == len(config.netns.peers)


def test_the_shipped_scenarios_say_what_the_figures_need() -> None:
    nat = load_scenario(SCENARIOS / "nat.toml", {}).netns
    assert nat is not None and nat.each_worker and nat.workload == "bulk" and nat.public_subnet == "11.77.0.0/24"
    by_name = {p.name: p for p in nat.peers}
    assert by_name["n-relay"].router and not by_name["n-relay"].hole_punch and by_name["n-relay"].egress == ("relay",)
    assert by_name["n-punch"].router and by_name["n-punch"].hole_punch and by_name["n-punch"].egress is None
    faults = load_scenario(SCENARIOS / "faults.toml", {}).netns
    assert faults is not None and faults.faults.delay_ms == 50 and faults.faults.loss == 0.2
    assert sum(1 for p in faults.workers if p.cheat_mode) == 1
    kill = load_scenario(SCENARIOS / "kill.toml", {}).netns
    assert kill is not None and kill.kill_rate == 0.3 and kill.kill_phase == "running" and kill.jobs >= 100
    churn = load_scenario(SCENARIOS / "churn.toml", {}).netns
    assert churn is not None and churn.duration_s == 600 and churn.churn == 2 and churn.churn_mode == "alternate"


def test_netns_flag_and_overrides(tmp_path: Path) -> None:
    config = load_scenario(None, {"netns": True, "peers": 4, "nat_workers": 1, "delay_ms": 30.0, "loss": 0.1})
    assert config.netns is not None
    assert [p.name for p in config.netns.peers] == ["relay", "w1", "w2", "n1"]
    assert config.netns.faults == FaultSpec(delay_ms=30.0, loss=0.1)
    assert config.netns.jobs == 10  # neither --jobs nor --duration: a default
    # --netns beside a scenario's [netns] table keeps the table
    scenario = tmp_path / "s.toml"
    scenario.write_text('jobs = 3\n[[netns.peer]]\nname = "r"\nrole = "relay"\n[[netns.peer]]\nname = "w"\n')
    config = load_scenario(scenario, {"netns": True, "seed": 7})
    assert config.netns is not None and [p.name for p in config.netns.peers] == ["r", "w"]
    assert config.netns.seed == 7 and config.netns.jobs == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("churn = 2\n", "churn: only with --netns"),
        ('[netns]\nwhat = 1\n[[netns.peer]]\nname = "r"\nrole = "relay"\n', "[netns]: unknown key(s) what"),
        ('[[netns.peer]]\nname = "r"\ncolour = 1\n', "unknown key(s) colour"),
        ('[[netns.peer]]\nname = "w"\nnat_router = "home"\n', "workers behind NAT need a relay"),
        ('[[netns.peer]]\nname = "r"\nrole = "relay"\n', "at least one worker"),
        ('[[netns.peer]]\nname = "w"\negress = ["nobody"]\n', "egress names no peer nobody"),
        ('[[netns.peer]]\nname = "client"\n', "the client's namespace"),
        ('[[netns.peer]]\nname = "w"\ncheat_mode = "zeros"\n', "honest workers a majority"),
        ('kill_rate = 0.5\n[[netns.peer]]\nname = "w"\n', "at least two workers"),
        ('churn = 100\n[[netns.peer]]\nname = "w"\n', "churn must be 0..60"),
        ('demo = true\n[[netns.peer]]\nname = "w"\n', "not for --netns"),
        ('[netns.faults]\nloss = 1.5\n[[netns.peer]]\nname = "w"\n', "loss must be a probability"),
        ('[netns.faults]\nlag = 1\n[[netns.peer]]\nname = "w"\n', "faults: unknown key(s) lag"),
    ],
)
def test_bad_netns_scenarios_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    scenario = tmp_path / "bad.toml"
    scenario.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(scenario, {})
    assert message in info.value.detail
    assert "\n" not in info.value.detail


def test_config_validation_directly() -> None:
    worker = NetnsPeerConfig("w")
    NetnsConfig(peers=(worker,), jobs=1).validate()
    with pytest.raises(ConfigError, match="kill_phase"):
        NetnsConfig(peers=(worker, NetnsPeerConfig("v")), jobs=1, kill_rate=0.1, kill_phase="later").validate()
    with pytest.raises(ConfigError, match="a relay is public and honest"):
        NetnsPeerConfig("r", role="relay", router="home").validate()
    with pytest.raises(ConfigError, match="--jobs N"):
        NetnsConfig(peers=(worker,)).validate()


# --- not root: one line ---


def test_not_root_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(NetnsTestnetError) as info:
        require_netns()
    assert info.value.detail == "network namespaces need root; run as root or drop --netns"
    result = CliRunner().invoke(main, ["testnet", "--netns", "--jobs", "2"])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()  # the house one-line form: detail [reason]
    assert line == "Error: network namespaces need root; run as root or drop --netns [bad_config]"


# --- ledgers ---

CLIENT = KeyPair.from_seed(b"c" * 32)
OTHER_CLIENT = KeyPair.from_seed(b"o" * 32)
WORKERS = [KeyPair.from_seed(bytes([0x70 + i]) * 32) for i in range(2)]


def _receipt(worker: KeyPair, n: int, *, client: KeyPair = CLIENT) -> bytes:
    return seal(
        client,
        JobReceipt(
            id=bytes([n]) * 16,
            nonce=n,
            expires_at=2_000_000_000_000,
            client=client.peer_id,
            worker=worker.peer_id,
            result_hash=bytes([n]) * 32,
            job_digest=bytes([n + 100]) * 32,
            output_digest=bytes([n]) * 32,
            price=1000,
            issued_at=1_900_000_000_000,
        ),
    )


def _ledger(data_dir: Path, owner: KeyPair, role: LedgerRole, receipts: list[bytes]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(data_dir / STORE_FILE)
    try:
        ledger = store.load_ledger(owner, role)
        for receipt in receipts:
            store.append_to_ledger(ledger, receipt)
    finally:
        store.close()


def _job(n: int, worker: KeyPair, *, accepted: bool = True) -> dict[str, Any]:
    return {
        "index": n,
        "job_digest": (bytes([n + 100]) * 32).hex(),
        "accepted": accepted,
        "worker": str(worker.peer_id) if accepted else "",
        "paid": [str(worker.peer_id)] if accepted else [],
    }


def _dirs(tmp_path: Path) -> dict[str, Path]:
    return {str(w.peer_id): tmp_path / f"w{i}" for i, w in enumerate(WORKERS)}


def test_ledgers_that_agree(tmp_path: Path) -> None:
    w0, w1 = WORKERS
    paid = [_receipt(w0, 1), _receipt(w1, 2), _receipt(w0, 3)]
    _ledger(tmp_path / "client", CLIENT, LedgerRole.CLIENT, paid)
    _ledger(tmp_path / "w0", w0, LedgerRole.WORKER, [paid[0], paid[2], _receipt(w0, 9, client=OTHER_CLIENT)])
    _ledger(tmp_path / "w1", w1, LedgerRole.WORKER, [paid[1]])
    jobs = [_job(1, w0), _job(2, w1), _job(3, w0), _job(4, w1, accepted=False)]
    account = account_ledgers(tmp_path / "client", str(CLIENT.peer_id), _dirs(tmp_path), jobs)
    assert account.ok, account.to_json()
    assert (account.client_receipts, account.worker_receipts) == (3, 3)  # another client's receipt is not ours
    assert "lost 0, double 0, unknown 0, unpaid 0" in account.line()


def test_a_receipt_the_worker_lacks_is_lost_with_what_its_store_says(tmp_path: Path) -> None:
    w0, w1 = WORKERS
    paid = [_receipt(w0, 1), _receipt(w1, 2)]
    _ledger(tmp_path / "client", CLIENT, LedgerRole.CLIENT, paid)
    _ledger(tmp_path / "w0", w0, LedgerRole.WORKER, [paid[0]])
    _ledger(tmp_path / "w1", w1, LedgerRole.WORKER, [])
    store = open_store(tmp_path / "w1" / STORE_FILE)
    try:  # the worker delivered its result and never got the receipt
        store.put_job(
            JobRecord(
                id=bytes([2]) * 16,
                role=JobRole.WORKER,
                peer=CLIENT.peer_id.raw,
                job_digest=bytes([102]) * 32,
                state=JobState.RESULT_SENT,
                price=1000,
                created_ms=1,
                updated_ms=1,
            )
        )
    finally:
        store.close()
    account = account_ledgers(tmp_path / "client", str(CLIENT.peer_id), _dirs(tmp_path), [_job(1, w0), _job(2, w1)])
    assert not account.ok
    assert account.lost == [
        {"worker": str(w1.peer_id), "job_id": (bytes([2]) * 16).hex(), "job": 2, "worker_state": "result_sent"}
    ]
    assert "lost 1 (worker's store: 1 result_sent)" in account.line()


def test_a_receipt_only_the_worker_holds_is_unknown_and_an_accepted_job_without_one_unpaid(tmp_path: Path) -> None:
    w0, w1 = WORKERS
    _ledger(tmp_path / "client", CLIENT, LedgerRole.CLIENT, [_receipt(w0, 1)])
    _ledger(tmp_path / "w0", w0, LedgerRole.WORKER, [_receipt(w0, 1), _receipt(w0, 5)])
    account = account_ledgers(tmp_path / "client", str(CLIENT.peer_id), _dirs(tmp_path), [_job(1, w0), _job(2, w1)])
    assert account.unknown == [{"worker": str(w0.peer_id), "job_id": (bytes([5]) * 16).hex()}]
    assert account.unpaid == [2]
    assert not account.lost and not account.double


def test_a_job_paid_to_more_workers_than_agreed_and_a_duplicated_row_are_double(tmp_path: Path) -> None:
    w0, w1 = WORKERS
    one = _receipt(w0, 1)
    same_job_other_worker = seal(
        CLIENT,
        JobReceipt(
            id=bytes([7]) * 16,
            nonce=7,
            expires_at=2_000_000_000_000,
            client=CLIENT.peer_id,
            worker=w1.peer_id,
            result_hash=bytes([7]) * 32,
            job_digest=bytes([101]) * 32,  # job 1's digest: paid to w1 as well, though only w0 agreed
            output_digest=bytes([7]) * 32,
            price=1000,
            issued_at=1_900_000_000_000,
        ),
    )
    _ledger(tmp_path / "client", CLIENT, LedgerRole.CLIENT, [one, same_job_other_worker])
    _ledger(tmp_path / "w0", w0, LedgerRole.WORKER, [one])
    _ledger(tmp_path / "w1", w1, LedgerRole.WORKER, [same_job_other_worker])
    store = open_store(tmp_path / "w0" / STORE_FILE)
    try:  # a second row of the same receipt, as a broken store would keep it (the Ledger itself refuses it)
        store.append_ledger(f"worker:{w0.peer_id}", 1, b"\0" * 32, b"\1" * 32, one)
    finally:
        store.close()
    account = account_ledgers(tmp_path / "client", str(CLIENT.peer_id), _dirs(tmp_path), [_job(1, w0)])
    kinds = sorted("ledger" in d for d in account.double)
    assert kinds == [False, True]  # one job paid to two workers; one receipt twice in w0's ledger
    assert account.audit_errors and "worker ledger" in account.audit_errors[0]  # and its chain no longer checks
