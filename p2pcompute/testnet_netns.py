"""A testnet in network namespaces: ``p2pcompute testnet --netns`` (root only).

Every peer runs in its own network namespace (:mod:`p2pcompute.testing.netns`): public peers on one bridged LAN
(the "internet", 10.77.0.0/24), workers behind NAT routers (nftables masquerade; nothing can dial in), one public
relay that is everyone's bootstrap peer and serves circuit relay v2, and the client in a namespace of its own
(:mod:`p2pcompute.testing.netclient`)::

    client 10.77.0.x ──┐
    relay  10.77.0.2 ──┤ br0 (10.77.0.1, no forwarding)
    w1     10.77.0.3 ──┤
    nat1   10.77.0.y ──┘── lan 192.168.1.1 ── n1 192.168.1.2   (masquerade; inbound: only replies)

**Faults on every link.** With ``[netns.faults]`` (or ``--delay-ms``/``--loss``) each peer's namespace gets a fault
proxy (:mod:`p2pcompute.testing.faultproxy`) on port :data:`PROXY_PORT`, and nftables there redirect every
connection arriving on its interface for the node's port :data:`NODE_PORT` to the proxy, which forwards it to the
node: so every connection crosses exactly one proxy, the one of the peer it was dialled to, and the node still
listens on (and is known by) its namespace address. Every other new inbound TCP connection is reset, so a worker's
data-channel port cannot be reached from outside and tensors take the libp2p-stream fallback through the proxy
too (specs/reachability.md §8). Bandwidth caps come from the proxy (``bandwidth_bps``) or from ``tbf`` on the link
(``rate_bps``). A proxied node sees every inbound connection come from its own address (the proxy), so AutoNAT
cannot work there: peers say ``nat = "public"`` or ``"private"`` (the defaults).

**Kills and churn.** The client prints each job's phases; with ``kill_rate`` the testnet SIGKILLs (the process
group: node and executors) the worker a chosen job is on when it reaches ``kill_phase`` (``running``: inputs sent,
work under way), and restarts it on the same data directory after ``restart_after`` seconds. A job is chosen with
chance ``kill_rate`` (seeded); when its worker is already down, the kill passes to the next job, so about that
share of the jobs lose their worker. With ``churn = R``
it stops R workers a minute (never the relay), alternately with SIGKILL and a clean SIGINT (``churn_mode =
"alternate"``) or at random (``"random"``, seeded), and restarts each after ``churn_down`` seconds; the client keeps
running jobs for ``duration`` seconds. At least one worker is always left running.

**Accounting.** After the run every worker is back up and then stopped cleanly, and the testnet reads the ledgers
from the SQLite stores (:class:`LedgerAccount`): every receipt in the client's ledger must be in its worker's
ledger (``lost`` otherwise: a result the client accepted whose payment the worker does not know), no receipt twice
in any ledger and no job paid to more workers than agreed on it (``double``), no worker receipt the client did not
sign (``unknown``), and every accepted result paid (``unpaid``).

``run_netns_testnet`` builds the namespaces, starts the proxies and peers, runs the client and the faults, and
removes every namespace on the way out (also on errors and Ctrl-C; a run killed outright leaves them for
``netns.remove_stale()``, which every run calls first).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import trio

from p2pcompute.config import CHEAT_MODES
from p2pcompute.errors import ConfigError, P2PComputeError, Reason
from p2pcompute.testing.faultproxy import FaultSpec

__all__ = [
    "CHURN_MODES",
    "KILL_PHASES",
    "NODE_PORT",
    "PROXY_PORT",
    "LedgerAccount",
    "NetnsConfig",
    "NetnsPeerConfig",
    "NetnsReport",
    "account_ledgers",
    "netns_config",
    "require_netns",
    "run_netns_testnet",
]

log = logging.getLogger(__name__)

NODE_PORT: Final = 4001  # every node listens on <its namespace address>:4001 (namespaces do not share ports)
PROXY_PORT: Final = 14001  # the fault proxy in front of it, in the same namespace
ROLES: Final = ("relay", "worker")
NAT_MODES: Final = ("auto", "public", "private")
CHURN_MODES: Final = ("alternate", "random")
KILL_PHASES: Final = ("negotiating", "uploading", "running", "downloading")
WORKLOADS: Final = ("mlp", "chain", "bulk")  # = p2pcompute.testing.netclient.WORKLOADS
PROXY_START_TIMEOUT_S: Final = 30.0
READY_TIMEOUT_S: Final = 90.0  # one node from spawn to "ready" (a cold worker imports torch on 2 busy cores)
START_CONCURRENCY: Final = 3  # nodes starting at once
CLIENT_START_TIMEOUT_S: Final = 180.0  # the client: export, open, market wait (its own bound is 60 s)
CLIENT_TIMEOUT_PER_JOB_S: Final = 60.0
STOP_TIMEOUT_S: Final = 15.0
STATUS_TIMEOUT_S: Final = 5.0
MIN_ALIVE: Final = 1  # kills and churn always leave this many workers running
CLIENT_NAME: Final = "client"
RELAY_CONFIG: Final = "serve_jobs = false\n"  # a relay is no worker: no executors, no torch


class NetnsTestnetError(P2PComputeError):
    """The namespace testnet could not be set up or run (one line)."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.BAD_CONFIG, detail)


def require_netns() -> None:
    """Raise :class:`NetnsTestnetError` (one line) unless this process may build namespaces (root, ``ip``, ``nft``,
    ``tc``)."""
    from p2pcompute.testing.netns import NetnsError, require_root

    try:
        require_root("nft", "tc")
    except NetnsError as exc:
        raise NetnsTestnetError(exc.detail) from None


# --- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetnsPeerConfig:
    """One peer of the topology (a ``[[netns.peer]]`` table)."""

    name: str
    role: str = "worker"  # "relay": public, serves circuit relay v2, bootstraps everyone, runs no jobs
    router: str | None = None  # behind this NAT router (created on first mention)
    nat: str = ""  # the node's --nat; default: "public" for a public peer, "private" behind a NAT
    hole_punch: bool = True
    cheat_mode: str = ""  # a worker that cheats (p2pcompute.testing.peer)
    slots: int = 1
    rate_bps: int = 0  # tbf on its link, both directions
    drop_percent: int = 0  # real random packet drop on its link
    faults: FaultSpec | None = None  # its proxy's faults; None: the scenario's
    egress: tuple[str, ...] | None = None  # it may open connections only to these peers (None: to anyone)

    @property
    def nat_mode(self) -> str:
        return self.nat or ("private" if self.router else "public")

    def validate(self) -> NetnsPeerConfig:
        if self.role not in ROLES:
            raise ConfigError(f"peer {self.name}: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.nat and self.nat not in NAT_MODES:
            raise ConfigError(f"peer {self.name}: nat must be one of {', '.join(NAT_MODES)}")
        if self.cheat_mode and self.cheat_mode not in CHEAT_MODES:
            raise ConfigError(f"peer {self.name}: cheat_mode must be one of {', '.join(CHEAT_MODES)}")
        if self.role == "relay" and (self.router or self.cheat_mode):
            raise ConfigError(f"peer {self.name}: a relay is public and honest")
        if not 1 <= self.slots <= 16:
            raise ConfigError(f"peer {self.name}: slots must be 1..16")
        return self


@dataclass(frozen=True, slots=True)
class NetnsConfig:
    """What ``--netns`` runs: the topology, the faults, the client's work, kills and churn."""

    peers: tuple[NetnsPeerConfig, ...]
    client: NetnsPeerConfig = NetnsPeerConfig(CLIENT_NAME)
    faults: FaultSpec = field(default_factory=FaultSpec)  # every peer's proxy (none at all when transparent)
    workload: str = "mlp"
    jobs: int = 0
    duration_s: float = 0.0  # the client starts jobs for this long (0: --jobs only)
    concurrency: int = 1
    each_worker: bool = False  # every job goes to each worker in turn (per-worker figures)
    redundancy: int | None = None
    job_deadline_s: float = 120.0
    linger_s: float = 3.0  # the client stays this long after its last job (receipts still in flight arrive)
    kill_rate: float = 0.0  # chance per job that its worker is SIGKILLed at kill_phase, then restarted
    kill_phase: str = "running"
    restart_after_s: float = 2.0
    churn: float = 0.0  # workers stopped (and restarted) per minute
    churn_mode: str = "alternate"
    churn_down_s: float = 3.0
    seed: int = 0
    advertise_interval_s: float = 5.0
    public_subnet: str = ""  # the "internet" (netns default 10.77.0.0/24, private scope; a global range models it)

    @property
    def workers(self) -> tuple[NetnsPeerConfig, ...]:
        return tuple(p for p in self.peers if p.role == "worker")

    @property
    def bootstrap(self) -> NetnsPeerConfig:
        """The relay (else the first public peer): everyone joins through it."""
        relays = [p for p in self.peers if p.role == "relay"]
        return relays[0] if relays else next(p for p in self.peers if p.router is None)

    def validate(self) -> NetnsConfig:
        for peer in (*self.peers, self.client):
            peer.validate()
        names = [p.name for p in self.peers]
        if CLIENT_NAME in names:
            raise ConfigError(f"{CLIENT_NAME!r} is the client's namespace; name the peer otherwise")
        if len(set(names)) != len(names):
            raise ConfigError("netns peer names must be unique")
        for peer in (*self.peers, self.client):
            unknown = set(peer.egress or ()) - {*names, CLIENT_NAME}
            if unknown:
                raise ConfigError(f"peer {peer.name}: egress names no peer {', '.join(sorted(unknown))}")
        workers = self.workers
        if not workers:
            raise ConfigError("a netns testnet needs at least one worker")
        if any(p.router for p in self.peers) and not any(p.role == "relay" for p in self.peers):
            raise ConfigError("workers behind NAT need a relay: add a peer with role = 'relay'")
        if not any(p.router is None for p in self.peers):
            raise ConfigError("a netns testnet needs a public peer (the relay) to bootstrap through")
        honest = [p for p in workers if not p.cheat_mode]
        if len(honest) <= len(workers) - len(honest):
            raise ConfigError("cheating workers must leave honest workers a majority")
        if self.workload not in WORKLOADS:
            raise ConfigError(f"workload must be one of {', '.join(WORKLOADS)}")
        if self.jobs < 0 or self.duration_s < 0 or (not self.jobs and not self.duration_s):
            raise ConfigError("a netns testnet runs --jobs N (N > 0) or for --duration S")
        if not 0.0 <= self.kill_rate <= 1.0 or self.kill_phase not in KILL_PHASES:
            raise ConfigError(f"kill_rate must be 0..1 and kill_phase one of {', '.join(KILL_PHASES)}")
        if self.churn < 0 or self.churn > 60 or self.churn_mode not in CHURN_MODES:
            raise ConfigError(f"churn must be 0..60 per minute and churn_mode one of {', '.join(CHURN_MODES)}")
        if (self.kill_rate or self.churn) and len(workers) < 2:
            raise ConfigError("kills and churn need at least two workers (one is always left running)")
        if self.concurrency < 1 or min(self.restart_after_s, self.churn_down_s, self.linger_s) < 0:
            raise ConfigError("concurrency must be >= 1, restart_after, churn_down and linger >= 0")
        return self


def _faults(table: Mapping[str, Any], base: FaultSpec | None = None) -> FaultSpec:
    known = {"delay_ms", "loss", "reset", "bandwidth_bps", "seed", "reset_max_bytes"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"faults: unknown key(s) {', '.join(sorted(unknown))}")
    return replace(base or FaultSpec(), **dict(table))


def _peer(table: Mapping[str, Any], faults: FaultSpec) -> NetnsPeerConfig:
    known = {
        "name",
        "role",
        "nat_router",
        "nat",
        "hole_punch",
        "cheat_mode",
        "slots",
        "rate_bps",
        "drop_percent",
        "faults",
        "egress",
    }
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"netns peer: unknown key(s) {', '.join(sorted(unknown))}")
    egress = table.get("egress")
    if egress is not None and (not isinstance(egress, list) or not all(isinstance(e, str) for e in egress)):
        raise ConfigError("netns peer: egress is a list of peer names")
    if "name" not in table:
        raise ConfigError("every [[netns.peer]] needs a name")
    return NetnsPeerConfig(
        name=str(table["name"]),
        role=str(table.get("role", "worker")),
        router=str(table["nat_router"]) if table.get("nat_router") else None,
        nat=str(table.get("nat", "")),
        hole_punch=bool(table.get("hole_punch", True)),
        cheat_mode=str(table.get("cheat_mode", "")),
        slots=int(table.get("slots", 1)),
        rate_bps=int(table.get("rate_bps", 0)),
        drop_percent=int(table.get("drop_percent", 0)),
        faults=_faults(table["faults"], faults) if "faults" in table else None,
        egress=None if egress is None else tuple(egress),
    ).validate()


def generated_peers(
    peers: int, nat_workers: int, cheaters: int, cheat_mode: str, hole_punch: bool
) -> tuple[NetnsPeerConfig, ...]:
    """The default topology: a relay, ``peers - 1 - nat_workers`` public workers (the first ``cheaters`` of them
    cheat) and ``nat_workers`` workers each behind a NAT router of its own."""
    public = peers - 1 - nat_workers
    if peers < 2 or nat_workers < 0 or public < 0:
        raise ConfigError(f"--peers {peers} must count the relay and at least one worker, --nat-workers included")
    if cheaters > public:
        raise ConfigError("cheaters are public workers: --cheaters must be at most --peers - 1 - --nat-workers")
    mode = "random" if cheat_mode == "mixed" else cheat_mode
    out = [NetnsPeerConfig("relay", role="relay")]
    out += [NetnsPeerConfig(f"w{i + 1}", cheat_mode=mode if i < cheaters else "") for i in range(public)]
    out += [NetnsPeerConfig(f"n{i + 1}", router=f"nat{i + 1}", hole_punch=hole_punch) for i in range(nat_workers)]
    return tuple(out)


def netns_config(values: Mapping[str, Any]) -> NetnsConfig:
    """The :class:`NetnsConfig` of a scenario's values (top-level keys and the ``[netns]`` table)."""
    raw = values.get("netns")
    table: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    known = {
        "faults",
        "peer",
        "client",
        "nat_workers",
        "hole_punch",
        "each_worker",
        "redundancy",
        "kill_phase",
        "restart_after",
        "churn_down",
        "job_deadline",
        "linger",
        "public_subnet",
    }
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"[netns]: unknown key(s) {', '.join(sorted(unknown))}")
    faults = _faults(table.get("faults", {}))
    overrides = {k: values[k] for k in ("delay_ms", "loss") if values.get(k) is not None}
    if overrides:
        faults = replace(faults, **overrides)
    if "peer" in table:
        peers = tuple(_peer(p, faults) for p in table["peer"])
    else:
        peers = generated_peers(
            int(values.get("peers", 3)),
            int(table.get("nat_workers", values.get("nat_workers") or 0)),
            int(values.get("cheaters", 0)),
            str(values.get("cheat_mode", "random")),
            bool(table.get("hole_punch", True)),
        )
    client_table = dict(table.get("client", {}))
    client_table.setdefault("name", CLIENT_NAME)
    client = _peer(client_table, faults)
    redundancy = table.get("redundancy")
    return NetnsConfig(
        peers=peers,
        client=client,
        faults=faults,
        workload=str(values.get("workload", "mlp")),
        jobs=int(values.get("jobs", 0)),
        duration_s=float(values.get("duration", 0.0)),
        concurrency=int(values.get("concurrency", 1)),
        each_worker=bool(table.get("each_worker", False)),
        redundancy=None if redundancy is None else int(redundancy),
        job_deadline_s=float(table.get("job_deadline", 120.0)),
        linger_s=float(table.get("linger", 3.0)),
        public_subnet=str(table.get("public_subnet", "")),
        kill_rate=float(values.get("kill_rate", 0.0)),
        kill_phase=str(table.get("kill_phase", "running")),
        restart_after_s=float(table.get("restart_after", 2.0)),
        churn=float(values.get("churn", 0.0)),
        churn_mode=str(values.get("churn_mode", "alternate")),
        churn_down_s=float(table.get("churn_down", 3.0)),
        seed=int(values.get("seed", 0)),
        advertise_interval_s=float(values.get("advertise_interval", 5.0)),
    ).validate()


# --- the report --------------------------------------------------------------------------------------------------


@dataclass
class LedgerAccount:
    """What the ledgers say after the run (see the module docstring)."""

    client_receipts: int = 0
    worker_receipts: int = 0  # receipts from this client in the workers' ledgers
    lost: list[dict[str, Any]] = field(default_factory=list)
    double: list[dict[str, Any]] = field(default_factory=list)
    unknown: list[dict[str, Any]] = field(default_factory=list)
    unpaid: list[int] = field(default_factory=list)  # accepted jobs (indices) without a receipt for their worker
    audit_errors: list[str] = field(default_factory=list)
    interrupted: int = 0  # this client's jobs the workers' stores mark interrupted (they stopped mid-job)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double or self.unknown or self.unpaid or self.audit_errors)

    def to_json(self) -> dict[str, Any]:
        return {
            "client_receipts": self.client_receipts,
            "worker_receipts": self.worker_receipts,
            "lost": self.lost,
            "double": self.double,
            "unknown": self.unknown,
            "unpaid": self.unpaid,
            "audit_errors": self.audit_errors,
            "interrupted": self.interrupted,
            "ok": self.ok,
        }

    def _lost_states(self) -> str:
        if not self.lost:
            return ""
        states = Counter(str(item.get("worker_state")) for item in self.lost)
        return " (worker's store: " + ", ".join(f"{n} {state}" for state, n in sorted(states.items())) + ")"

    def line(self) -> str:
        return (
            f"ledgers:    {self.client_receipts} receipts in the client's, {self.worker_receipts} in the workers'; "
            f"lost {len(self.lost)}{self._lost_states()}, double {len(self.double)}, unknown {len(self.unknown)}, "
            f"unpaid {len(self.unpaid)}; {self.interrupted} job(s) interrupted in the workers' stores"
            + (f"; audit: {'; '.join(self.audit_errors)}" if self.audit_errors else "")
        )


@dataclass
class PeerSummary:
    name: str
    role: str
    ip: str
    public_ip: str
    router: str | None
    peer_id: str
    cheat_mode: str = ""
    nat: str = ""
    hole_punch: bool = True
    kills: int = 0  # SIGKILLed (mid-job kills and churn)
    stops: int = 0  # stopped cleanly by churn
    starts: int = 0
    ready_s: list[float] = field(default_factory=list)  # each start: spawn to "ready", seconds
    reach: dict[str, Any] | None = None  # its status document's reachability part, at the end
    proxy: dict[str, Any] | None = None  # its fault proxy's counters

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class NetnsReport:
    config: NetnsConfig
    peers: list[PeerSummary] = field(default_factory=list)
    client: dict[str, Any] = field(default_factory=dict)  # netclient's report
    startup_s: float = 0.0
    run_s: float = 0.0
    kills: list[dict[str, Any]] = field(default_factory=list)  # {job, worker, t}
    churn: list[dict[str, Any]] = field(default_factory=list)  # {t, peer, action, back_after_s}
    ledger: LedgerAccount = field(default_factory=LedgerAccount)
    error: str = ""

    @property
    def jobs(self) -> list[dict[str, Any]]:
        return list(self.client.get("jobs", []))

    @property
    def accepted(self) -> int:
        return sum(1 for j in self.jobs if j["accepted"])

    @property
    def wrong(self) -> int:
        return sum(1 for j in self.jobs if j["accepted"] and j["wrong"])

    @property
    def completion(self) -> float:
        return self.accepted / len(self.jobs) if self.jobs else 0.0

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.jobs) and self.accepted > 0 and self.wrong == 0 and self.ledger.ok

    def paths(self) -> dict[str, dict[str, Any]]:
        """Accepted jobs by the path their result came over: count, time to result (first and median) and
        upload rate (median), relayed beside direct."""
        out: dict[str, dict[str, Any]] = {}
        for kind, relayed in (("relayed", True), ("direct", False)):
            jobs = [j for j in self.jobs if j["accepted"] and j.get("relayed") is relayed]
            firsts = [j["first_result_s"] for j in jobs if j.get("first_result_s") is not None]
            rates = [j["upload_rate_bps"] for j in jobs if j.get("upload_rate_bps")]
            out[kind] = {
                "jobs": len(jobs),
                "first_result_s": firsts[0] if firsts else None,
                "median_result_s": _median(firsts),
                "median_upload_rate_bps": _median(rates),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "netns": True,
            "ok": self.ok,
            "error": self.error,
            "startup_seconds": round(self.startup_s, 3),
            "run_seconds": round(self.run_s, 3),
            "faults": {k: getattr(c.faults, k) for k in ("delay_ms", "loss", "reset", "bandwidth_bps", "seed")},
            "workload": c.workload,
            "kill_rate": c.kill_rate,
            "churn_per_minute": c.churn,
            "churn_mode": c.churn_mode,
            "seed": c.seed,
            "peers": [p.to_json() for p in self.peers],
            "summary": {
                "jobs": len(self.jobs),
                "accepted": self.accepted,
                "completion": round(self.completion, 4),
                "wrong_accepted": self.wrong,
                "jobs_with_worker_killed": len({k["job"] for k in self.kills}),
                "churn_events": len(self.churn),
                "paths": self.paths(),
            },
            "kills": self.kills,
            "churn": self.churn,
            "ledger": self.ledger.to_json(),
            "client": self.client,
        }

    def lines(self) -> list[str]:
        c = self.config
        jobs = self.jobs
        lines = [
            f"jobs:       {self.accepted} of {len(jobs)} accepted ({self.completion:.1%}), "
            f"{self.wrong} wrong result(s) accepted",
        ]
        if c.kill_rate:
            killed = len({k["job"] for k in self.kills})
            lines.append(f"kills:      {killed} job(s) lost their worker mid-job ({c.kill_phase}), each restarted")
        if c.churn:
            kinds = Counter(e["action"] for e in self.churn)
            lines.append(
                f"churn:      {len(self.churn)} stops in {self.run_s:.0f} s "
                f"({kinds.get('kill', 0)} SIGKILL, {kinds.get('stop', 0)} clean), each restarted"
            )
        for kind, path in self.paths().items():
            if path["jobs"]:
                rate = path["median_upload_rate_bps"]
                lines.append(
                    f"{kind + ':':<11} {path['jobs']} job(s); first result {_s(path['first_result_s'])}, "
                    f"median {_s(path['median_result_s'])}; upload {_rate(rate)}"
                )
        lines.append(self.ledger.line())
        if self.error:
            lines.append(f"error:      {self.error}")
        return lines


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _rate(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 2**20:.2f} MiB/s"


# --- ledgers -------------------------------------------------------------------------------------------------------


def _worker_job_states(store_path: Path, client_id: str) -> dict[bytes, str]:
    """The state the worker's store records for each job of this client (job id -> state)."""
    from p2pcompute.core.identity import PeerId
    from p2pcompute.store import JobRole, open_store

    client = PeerId.from_base58(client_id).raw
    store = open_store(store_path)
    try:
        return {r.id: r.state.value for r in store.jobs(JobRole.WORKER) if r.peer == client}
    finally:
        store.close()


def _receipts(store_path: Path, owner: str, role: str) -> tuple[list[Any], str]:
    """Every receipt (a JobReceipt) in ``owner``'s ledger of ``role``, read row by row (duplicates kept), and the
    chain audit's error ("" when the chain, every signature included, checks)."""
    from p2pcompute.core.envelope import open_envelope
    from p2pcompute.core.identity import PeerId
    from p2pcompute.core.ledger import LedgerRole
    from p2pcompute.core.messages import JobReceipt
    from p2pcompute.store import open_store

    store = open_store(store_path)
    try:
        rows = store.ledger_rows(f"{role}:{owner}")
        receipts = [open_envelope(receipt, expect=JobReceipt).message for _, _, _, receipt, _ in rows]
        audit = ""
        try:
            store.load_ledger(PeerId.from_base58(owner), LedgerRole(role))
        except P2PComputeError as exc:
            audit = f"{role} ledger of {owner[-8:]}: {exc}"
        return receipts, audit
    finally:
        store.close()


def account_ledgers(
    client_dir: Path, client_id: str, workers: Mapping[str, Path], jobs: Sequence[Mapping[str, Any]]
) -> LedgerAccount:
    """Check the client's ledger against every worker's (``workers``: peer id -> data directory) and the client's
    job records (see :class:`LedgerAccount`)."""
    from p2pcompute.store import STORE_FILE

    account = LedgerAccount()
    paid, audit = _receipts(client_dir / STORE_FILE, client_id, "client")
    if audit:
        account.audit_errors.append(audit)
    account.client_receipts = len(paid)
    held: dict[str, Counter[bytes]] = {}
    states: dict[str, dict[bytes, str]] = {}
    for worker_id, data_dir in workers.items():
        store = data_dir / STORE_FILE
        if not store.exists():
            held[worker_id] = Counter()
            continue
        states[worker_id] = _worker_job_states(store, client_id)
        account.interrupted += sum(1 for state in states[worker_id].values() if state == "interrupted")
        earned, audit = _receipts(store, worker_id, "worker")
        if audit:
            account.audit_errors.append(audit)
        mine = [r for r in earned if str(r.client) == client_id]
        account.worker_receipts += len(mine)
        held[worker_id] = Counter(r.id for r in mine)
        for job_id, n in held[worker_id].items():
            if n > 1:
                account.double.append({"ledger": worker_id, "job_id": job_id.hex(), "times": n})
    by_key = Counter((str(r.worker), r.id) for r in paid)
    for (worker_id, job_id), n in by_key.items():
        if n > 1:
            account.double.append({"ledger": "client", "worker": worker_id, "job_id": job_id.hex(), "times": n})
    digests = {bytes.fromhex(j["job_digest"]): j for j in jobs if j.get("job_digest")}
    per_digest: dict[bytes, list[str]] = {}
    for r in paid:
        worker_id = str(r.worker)
        per_digest.setdefault(r.job_digest, []).append(worker_id)
        if held.get(worker_id, Counter())[r.id] == 0:
            job = digests.get(r.job_digest)
            # What the worker's store says of the job: result_sent/interrupted (the receipt never reached it),
            # paid (received but not in its ledger), none (the store forgot the job).
            state = states.get(worker_id, {}).get(r.id, "none")
            account.lost.append(
                {
                    "worker": worker_id,
                    "job_id": r.id.hex(),
                    "job": None if job is None else job["index"],
                    "worker_state": state,
                }
            )
    for digest, paid_workers in per_digest.items():
        job = digests.get(digest)
        agreed = set(job["paid"]) if job is not None and job["accepted"] else set()
        extra = len(paid_workers) - len(set(paid_workers) & agreed)
        if extra > 0:
            account.double.append(
                {"job": None if job is None else job["index"], "job_digest": digest.hex(), "receipts": paid_workers}
            )
    client_keys = {(str(r.worker), r.id) for r in paid}
    for worker_id, ids in held.items():
        for job_id in ids:
            if (worker_id, job_id) not in client_keys:
                account.unknown.append({"worker": worker_id, "job_id": job_id.hex()})
    for job in jobs:
        if job["accepted"] and job["worker"] not in per_digest.get(bytes.fromhex(job["job_digest"]), []):
            account.unpaid.append(int(job["index"]))
    return account


# --- status endpoints inside namespaces ----------------------------------------------------------------------------

_CLONE_NEWNET: Final = 0x40000000
_setns_lock = threading.Lock()


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _connect_in(netns_name: str, host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection made from inside ``netns_name`` (the socket stays there; this thread goes back)."""
    with _setns_lock:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{netns_name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                return socket.create_connection((host, port), timeout=timeout_s)
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)


def fetch_status_in(netns_name: str, url: str, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """GET a node's status document (``http://127.0.0.1:<port>/status``) from inside its namespace."""
    import http.client

    parts = urlsplit(url)
    sock = _connect_in(netns_name, parts.hostname or "127.0.0.1", parts.port or 80, timeout_s)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout_s)
    conn.sock = sock
    try:
        conn.request("GET", parts.path or "/status")
        response = conn.getresponse()
        data: dict[str, Any] = json.loads(response.read())
        return data
    finally:
        conn.close()


# --- processes -----------------------------------------------------------------------------------------------------


@dataclass
class _Peer:
    config: NetnsPeerConfig
    netns: str
    ip: str
    public_ip: str
    device: str
    data_dir: Path
    peer_id: str
    summary: PeerSummary
    process: Any = None  # testnet.PeerProcess while running
    proxy: trio.Process | None = None
    alive: bool = False
    restarting: bool = False

    @property
    def addr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{NODE_PORT}/p2p/{self.peer_id}"


def _proxy_rules(device: str) -> str:
    """nftables of a proxied peer: its node's port is redirected to the proxy; other new inbound TCP is reset."""
    return f"""table ip p2pct_proxy {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{device}" tcp dport {NODE_PORT} redirect to :{PROXY_PORT}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{device}" ct state established,related accept
        iifname "{device}" tcp dport {PROXY_PORT} accept
        iifname "{device}" meta l4proto tcp reject with tcp reset
    }}
}}
"""


def _egress_rules(device: str, allowed: Sequence[str]) -> str:
    """nftables of a peer that may open connections only to ``allowed`` addresses (an egress firewall)."""
    addresses = ", ".join(allowed) if allowed else "127.0.0.1"
    return f"""table ip p2pct_egress {{
    chain output {{
        type filter hook output priority filter; policy accept;
        oifname "{device}" ct state new ip daddr != {{ {addresses} }} reject
    }}
}}
"""


class _Net:
    """The running testnet: peers, proxies, the client; kills, restarts and churn."""

    def __init__(self, config: NetnsConfig, base: Path, hardware: Path, nursery: trio.Nursery) -> None:
        self.config = config
        self.base = base
        self.hardware = hardware
        self.nursery = nursery
        self.peers: dict[str, _Peer] = {}  # by name
        self.by_id: dict[str, _Peer] = {}
        self.client: _Peer | None = None
        self.report = NetnsReport(config)
        self.rng = random.Random(config.seed)
        self.started = trio.current_time()
        self.pending_restarts = 0
        self.restarted = trio.Event()
        self.doomed: dict[int, bool] = {}  # job -> will its worker be killed
        self.killed_jobs: set[int] = set()
        self.kill_debt = 0  # doomed jobs whose worker could not be killed (already down): later jobs take them
        self.churn_count = 0

    def t(self) -> float:
        return round(trio.current_time() - self.started, 3)

    # -- building -----------------------------------------------------------------------------------------------

    def topology_spec(self) -> Any:
        from p2pcompute.testing.netns import LinkSpec, NatSpec, PeerSpec, TopologySpec

        def spec(p: NetnsPeerConfig) -> Any:
            return PeerSpec(p.name, LinkSpec(rate_bps=p.rate_bps, drop_percent=p.drop_percent))

        routers: dict[str, list[Any]] = {}
        public = []
        for p in (*self.config.peers, self.config.client):
            if p.router:
                routers.setdefault(p.router, []).append(spec(p))
            else:
                public.append(spec(p))
        nats = tuple(NatSpec(n, tuple(ps)) for n, ps in routers.items())
        if self.config.public_subnet:
            return TopologySpec(public=tuple(public), nats=nats, public_subnet=self.config.public_subnet)
        return TopologySpec(public=tuple(public), nats=nats)

    def add_peers(self, topology: Any) -> None:
        from p2pcompute.keys import KEY_FILE_NAME, load_or_create_key

        for config in (*self.config.peers, self.config.client):
            ns = topology.peers[config.name]
            data_dir = self.base / config.name
            data_dir.mkdir(parents=True, exist_ok=True)
            keypair, _ = load_or_create_key(data_dir / KEY_FILE_NAME)
            peer_id = str(keypair.peer_id)
            summary = PeerSummary(
                name=config.name,
                role="client" if config.name == CLIENT_NAME else config.role,
                ip=ns.ip,
                public_ip=ns.public_ip,
                router=ns.router,
                peer_id=peer_id,
                cheat_mode=config.cheat_mode,
                nat=config.nat_mode,
                hole_punch=config.hole_punch,
            )
            peer = _Peer(config, ns.netns, ns.ip, ns.public_ip, ns.device, data_dir, peer_id, summary)
            self.report.peers.append(summary)
            if config.name == CLIENT_NAME:
                self.client = peer
            else:
                self.peers[config.name] = peer
                self.by_id[peer_id] = peer

    async def apply_egress(self, peer: _Peer) -> None:
        from p2pcompute.testing.netns import exec_argv, sh

        if peer.config.egress is None:
            return
        everyone = {**self.peers}
        if self.client is not None:
            everyone[CLIENT_NAME] = self.client
        # A peer behind NAT is reached at its router's address, or at its own from the same LAN.
        allowed = sorted({ip for name in peer.config.egress for ip in (everyone[name].ip, everyone[name].public_ip)})
        rules = _egress_rules(peer.device, allowed)
        await trio.to_thread.run_sync(lambda: sh(exec_argv(peer.netns, ["nft", "-f", "-"]), input=rules))

    async def start_proxy(self, peer: _Peer) -> None:
        from p2pcompute.testing.netns import exec_argv, faultproxy_argv, open_process_in, sh

        spec = peer.config.faults if peer.config.faults is not None else self.config.faults
        if spec.is_transparent:
            return
        if spec.seed is not None:  # one seed per run, a different stream per peer
            names = [*self.peers, CLIENT_NAME]
            spec = replace(spec, seed=spec.seed * 1009 + names.index(peer.config.name) + 1)
        argv = faultproxy_argv(peer.ip, {PROXY_PORT: NODE_PORT}, spec, target_host=peer.ip)
        rules = _proxy_rules(peer.device)
        await trio.to_thread.run_sync(lambda: sh(exec_argv(peer.netns, ["nft", "-f", "-"]), input=rules))
        log_file = open(peer.data_dir / "proxy.log", "ab")  # noqa: SIM115 (closed with the process)
        process = await open_process_in(
            peer.netns, argv, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL
        )
        log_file.close()
        peer.proxy = process
        assert process.stdout is not None
        buffer = b""
        with trio.move_on_after(PROXY_START_TIMEOUT_S):
            async for chunk in process.stdout:
                buffer += chunk
                if b'"listening"' in buffer:
                    break
        if b'"listening"' not in buffer:
            raise NetnsTestnetError(f"the fault proxy of {peer.config.name} did not start (see {peer.data_dir})")
        self.nursery.start_soon(self._read_proxy, peer, process, buffer)

    async def _read_proxy(self, peer: _Peer, process: trio.Process, buffer: bytes) -> None:
        assert process.stdout is not None
        with contextlib.suppress(trio.ClosedResourceError, OSError):
            async for chunk in process.stdout:
                buffer += chunk
        for line in buffer.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "stats":
                    peer.summary.proxy = {k: v for k, v in event.items() if k not in ("event", "listen", "target")}

    def node_argv(self, peer: _Peer) -> list[str]:
        config, relay = peer.config, self.peers[self.config.bootstrap.name]
        level = "warning"
        if config.cheat_mode:
            argv = [
                sys.executable, "-m", "p2pcompute.testing.peer", "--log-level", level,
                "--cheat-mode", config.cheat_mode, "--",
            ]  # fmt: skip
        else:
            argv = [sys.executable, "-m", "p2pcompute.cli", "--log-level", level, "node", "run"]
        interval = self.config.advertise_interval_s
        argv += [
            "--json-events",
            "--data-dir", str(peer.data_dir),
            "--listen", f"/ip4/{peer.ip}/tcp/{NODE_PORT}",
            "--status-port", "0",
            "--no-benchmark",
            "--advertise-interval", str(interval),
            "--advert-ttl", str(max(interval * 3, 30.0)),
            "--nat", config.nat_mode,
            "--hole-punch" if config.hole_punch else "--no-hole-punch",
        ]  # fmt: skip
        if config.role == "relay":
            argv += ["--relay-service", "--config", str(peer.data_dir / "relay.toml")]
        else:
            argv += ["--slots", str(config.slots)]
        if peer is not relay:
            argv += ["--bootstrap", relay.addr]
            if relay.config.role == "relay" and config.router:
                argv += ["--relay", relay.addr]
        return argv

    async def start_node(self, peer: _Peer) -> None:
        from p2pcompute.compute.gpu import CACHE_FILE
        from p2pcompute.testing.netns import exec_argv
        from p2pcompute.testnet import PeerProcess, _read_events, _read_stderr

        if peer.config.role == "relay":
            (peer.data_dir / "relay.toml").write_text(RELAY_CONFIG)
        else:
            shutil.copy(self.hardware, peer.data_dir / CACHE_FILE)
        process = await trio.lowlevel.open_process(
            exec_argv(peer.netns, self.node_argv(peer)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a kill takes its executors too
        )
        spawned = trio.current_time()
        proc = PeerProcess(index=len(self.by_id), data_dir=peer.data_dir, process=process)
        peer.process = proc
        self.nursery.start_soon(_read_events, proc)
        self.nursery.start_soon(_read_stderr, proc)
        with trio.move_on_after(READY_TIMEOUT_S):
            async with trio.open_nursery() as waiter:

                async def exited() -> None:
                    await process.wait()
                    waiter.cancel_scope.cancel()

                async def ready() -> None:
                    await proc.ready.wait()
                    waiter.cancel_scope.cancel()

                waiter.start_soon(exited)
                waiter.start_soon(ready)
        if not proc.ready.is_set():
            code = process.returncode
            self._kill_group(peer)
            await trio.sleep(0.2)
            last = next((line.strip() for line in reversed(proc.stderr_tail) if line.strip()), "no output")
            state = "not ready in time" if code is None else f"exit code {code}"
            raise NetnsTestnetError(f"{peer.config.name} did not become ready ({state}): {last}")
        if proc.peer_id != peer.peer_id:
            raise NetnsTestnetError(f"{peer.config.name} started as {proc.peer_id}, expected {peer.peer_id}")
        peer.alive = True
        peer.summary.starts += 1
        peer.summary.ready_s.append(round(trio.current_time() - spawned, 2))

    def _kill_group(self, peer: _Peer) -> None:
        if peer.process is None:
            return
        process = peer.process.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    async def kill(self, peer: _Peer) -> None:
        """SIGKILL the node and its executors (its process group), as when a machine dies."""
        peer.alive = False
        self._kill_group(peer)
        if peer.process is not None:
            await peer.process.process.wait()
        peer.summary.kills += 1

    async def stop(self, peer: _Peer) -> None:
        """SIGINT: a clean stop (the node closes its host and its executors)."""
        from p2pcompute.testnet import _stop_peers

        peer.alive = False
        if peer.process is not None:
            await _stop_peers([peer.process])
            self._kill_group(peer)  # anything it left behind
        peer.summary.stops += 1

    def restart_later(self, peer: _Peer, after_s: float) -> None:
        peer.restarting = True
        self.pending_restarts += 1

        async def restart() -> None:
            try:
                await trio.sleep(after_s)
                await self.start_node(peer)
            except NetnsTestnetError as exc:
                log.warning("restarting %s failed: %s", peer.config.name, exc)
                self.report.error = self.report.error or f"restart: {exc}"
            finally:
                peer.restarting = False
                self.pending_restarts -= 1
                if not self.pending_restarts:
                    self.restarted.set()

        self.restarted = trio.Event()
        self.nursery.start_soon(restart)

    async def wait_for_restarts(self) -> None:
        if self.pending_restarts:
            with trio.move_on_after(READY_TIMEOUT_S + max(self.config.restart_after_s, self.config.churn_down_s)):
                await self.restarted.wait()

    def _alive_workers(self) -> list[_Peer]:
        return [p for p in self.peers.values() if p.config.role == "worker" and p.alive and not p.restarting]

    # -- faults during the run ----------------------------------------------------------------------------------

    async def on_phase(self, job: int, worker: str, phase: str) -> None:
        config = self.config
        if not config.kill_rate or job in self.killed_jobs:
            return
        if job not in self.doomed:
            doomed = self.rng.random() < config.kill_rate
            if not doomed and self.kill_debt:  # a kill that could not happen before is owed: this job pays it
                self.kill_debt -= 1
                doomed = True
            self.doomed[job] = doomed
        if not self.doomed[job] or phase != config.kill_phase:
            return
        peer = self.by_id.get(worker)
        if peer is None or not peer.alive or peer.restarting or len(self._alive_workers()) <= MIN_ALIVE:
            # Its worker is already down (or too few are up): the kill moves to a later job, so that about
            # kill_rate of the jobs lose their worker.
            self.doomed[job] = False
            self.kill_debt += 1
            return
        self.killed_jobs.add(job)
        await self.kill(peer)
        self.report.kills.append({"job": job, "worker": peer.config.name, "phase": phase, "t": self.t()})
        log.info("killed %s mid-job %d (%s)", peer.config.name, job, phase)
        self.restart_later(peer, config.restart_after_s)

    async def churn(self) -> None:
        """Stop a worker every 60/churn seconds (SIGKILL or clean), restart it churn_down seconds later."""
        config = self.config
        interval = 60.0 / config.churn
        while True:
            await trio.sleep(interval)
            candidates = self._alive_workers()
            if len(candidates) <= MIN_ALIVE:
                continue
            victim = self.rng.choice(candidates)
            if config.churn_mode == "alternate":
                action = "kill" if self.churn_count % 2 == 0 else "stop"
            else:
                action = self.rng.choice(("kill", "stop"))
            self.churn_count += 1
            at = self.t()
            if action == "kill":
                await self.kill(victim)
            else:
                await self.stop(victim)
            self.report.churn.append(
                {"t": at, "peer": victim.config.name, "action": action, "down_s": config.churn_down_s}
            )
            log.info("churn: %s %s", action, victim.config.name)
            self.restart_later(victim, config.churn_down_s)

    # -- the client ---------------------------------------------------------------------------------------------

    def client_argv(self, report: Path) -> list[str]:
        config, client, relay = self.config, self.client, self.peers[self.config.bootstrap.name]
        assert client is not None
        workers = [p for p in self.peers.values() if p.config.role == "worker"]
        argv = [
            sys.executable, "-m", "p2pcompute.testing.netclient",
            "--bootstrap", relay.addr,
            "--data-dir", str(client.data_dir),
            "--listen", f"/ip4/{client.ip}/tcp/{NODE_PORT}",
            "--workers", str(len(workers)),
            "--jobs", str(config.jobs),
            "--duration", str(config.duration_s),
            "--workload", config.workload,
            "--concurrency", str(config.concurrency),
            "--deadline", str(config.job_deadline_s),
            "--linger", str(config.linger_s),
            "--seed", str(config.seed),
            "--report", str(report),
        ]  # fmt: skip
        for worker in workers:
            argv += ["--expect", worker.peer_id]
            if worker.config.router:
                argv += ["--wait-relayed", worker.peer_id]
        if config.each_worker:
            argv += ["--each-worker"]
            for worker in workers:
                argv += ["--only", worker.peer_id]
        if config.redundancy is not None:
            argv += ["--redundancy", str(config.redundancy)]
        return argv

    async def run_client(self, *, market_wait_s: float) -> None:
        from p2pcompute.testing.netns import exec_argv

        client, config = self.client, self.config
        assert client is not None
        report_path = client.data_dir / "client-report.json"
        log_file = open(client.data_dir / "client.log", "ab")  # noqa: SIM115 (closed below)
        try:
            process = await trio.lowlevel.open_process(
                exec_argv(client.netns, [*self.client_argv(report_path), "--market-wait", str(market_wait_s)]),
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log_file.close()
        limit = (
            market_wait_s + CLIENT_START_TIMEOUT_S + config.duration_s + CLIENT_TIMEOUT_PER_JOB_S * max(config.jobs, 1)
        )
        try:
            with trio.move_on_after(limit) as scope:
                assert process.stdout is not None
                buffer = b""
                async for chunk in process.stdout:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        await self._client_event(line)
                await process.wait()
            if scope.cancelled_caught:
                self.report.error = f"the client did not finish within {limit:.0f} s"
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT_S):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        with contextlib.suppress(OSError, ValueError):
            self.report.client = json.loads(report_path.read_text())
        if self.report.client.get("error") and not self.report.error:
            self.report.error = f"client: {self.report.client['error']}"
        elif not self.report.client and not self.report.error:
            self.report.error = f"the client wrote no report (exit code {process.returncode}; see client.log)"

    async def _client_event(self, line: bytes) -> None:
        if not line.startswith(b"{"):
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        if event.get("event") == "phase":
            await self.on_phase(int(event["job"]), str(event["worker"]), str(event["phase"]))
        elif event.get("event") == "ready":
            log.info("client ready after %.1f s", event.get("open_s", 0.0))

    # -- the end ------------------------------------------------------------------------------------------------

    async def read_reachability(self) -> None:
        for peer in self.peers.values():
            if not peer.alive or peer.process is None or not peer.process.status_url:
                continue
            try:
                status = await trio.to_thread.run_sync(fetch_status_in, peer.netns, peer.process.status_url)
            except (OSError, ValueError) as exc:
                log.info("status of %s: %s", peer.config.name, exc)
                continue
            reach = status.get("reach") or status.get("reachability")
            if isinstance(reach, dict):
                peer.summary.reach = reach
            elif reach is not None:
                peer.summary.reach = {"reachability": reach}

    async def stop_all(self) -> None:
        from p2pcompute.testnet import _stop_peers

        with trio.CancelScope(shield=True):
            running = [p.process for p in self.peers.values() if p.process is not None]
            await _stop_peers(running)
            for peer in self.peers.values():
                self._kill_group(peer)
                peer.alive = False
            proxies = [p.proxy for p in (*self.peers.values(), self.client) if p is not None and p.proxy is not None]
            for proxy in proxies:
                if proxy.returncode is None:
                    proxy.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT_S):
                for proxy in proxies:
                    await proxy.wait()
            for proxy in proxies:
                if proxy.returncode is None:
                    proxy.kill()
            await trio.sleep(0.1)  # the proxies' readers take their last stats lines


async def run_netns_testnet(
    config: NetnsConfig,
    *,
    base_dir: Path | None = None,
    timeout_s: float = 120.0,
    on_phase: Callable[[str], None] | None = None,
) -> NetnsReport:
    """Build the namespaces, start proxies and peers, run the client (with kills and churn), stop everything,
    account the ledgers; return the report. Raises :class:`NetnsTestnetError` when the testnet cannot be set up;
    what goes wrong during the run is in the report (``error``)."""
    from p2pcompute.compute.gpu import CACHE_FILE, load_or_probe
    from p2pcompute.testing import netns

    config.validate()
    require_netns()
    say = on_phase or (lambda message: None)
    await trio.to_thread.run_sync(netns.remove_stale)
    owned = base_dir is None
    base = Path(tempfile.mkdtemp(prefix="p2pcompute-netns-")) if base_dir is None else base_dir
    base.mkdir(parents=True, exist_ok=True)
    try:
        shared = base / "shared"
        shared.mkdir(exist_ok=True)
        await trio.to_thread.run_sync(lambda: load_or_probe(shared))
        failure: NetnsTestnetError | None = None
        async with trio.open_nursery() as nursery:
            net = _Net(config, base, shared / CACHE_FILE, nursery)
            try:
                topology = await trio.to_thread.run_sync(netns.build, net.topology_spec())
            except netns.NetnsError as exc:
                raise NetnsTestnetError(exc.detail) from None
            try:
                net.add_peers(topology)
                await _run(net, say, timeout_s)
            except NetnsTestnetError as exc:
                failure = exc  # raised below, outside the nursery, as itself rather than in an ExceptionGroup
            finally:
                with trio.CancelScope(shield=True):
                    await net.stop_all()
                    await trio.to_thread.run_sync(netns.cleanup, topology.prefix)
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return net.report
    finally:
        if owned:
            shutil.rmtree(base, ignore_errors=True)


async def _run(net: _Net, say: Callable[[str], None], timeout_s: float) -> None:
    config, report = net.config, net.report
    begun = trio.current_time()
    for peer in (*net.peers.values(), net.client):
        assert peer is not None
        await net.apply_egress(peer)
        await net.start_proxy(peer)
    relay = net.peers[config.bootstrap.name]
    say(f"starting {relay.config.name} ({relay.ip}) ...")
    limit = timeout_s + READY_TIMEOUT_S
    with trio.move_on_after(limit) as startup:
        await net.start_node(relay)
    if startup.cancelled_caught:
        raise NetnsTestnetError(f"{relay.config.name} did not start within {limit:.0f} s")
    client_done = trio.Event()
    async with trio.open_nursery() as during:
        # The client starts beside the workers (it imports torch and exports its job meanwhile) and waits for them
        # in its market; it starts its jobs once it holds all of them.
        async def run_client() -> None:
            try:
                await net.run_client(market_wait_s=limit)
            finally:
                client_done.set()

        net.started = run_started = trio.current_time()
        during.start_soon(run_client)
        others = [p for p in net.peers.values() if p is not relay]
        say(f"starting {len(others)} worker(s): {', '.join(f'{p.config.name} ({p.ip})' for p in others)} ...")
        with trio.move_on_after(limit) as startup:
            limiter = trio.CapacityLimiter(START_CONCURRENCY)
            failures: list[NetnsTestnetError] = []

            async def start(peer: _Peer) -> None:
                async with limiter:
                    try:
                        await net.start_node(peer)
                    except NetnsTestnetError as exc:
                        failures.append(exc)

            async with trio.open_nursery() as starters:
                for peer in others:
                    starters.start_soon(start, peer)
            if failures:
                raise failures[0]
        if startup.cancelled_caught:
            raise NetnsTestnetError(f"the workers did not all start within {limit:.0f} s")
        report.startup_s = trio.current_time() - begun
        say(f"all {len(net.peers)} peers ready in {report.startup_s:.1f} s; the client runs its jobs")
        if config.churn:
            during.start_soon(net.churn)
        await client_done.wait()
        during.cancel_scope.cancel()
    report.run_s = trio.current_time() - run_started
    await net.wait_for_restarts()
    await net.read_reachability()
    await net.stop_all()
    client = net.client
    assert client is not None
    workers = {p.peer_id: p.data_dir for p in net.peers.values() if p.config.role == "worker"}
    if report.client.get("peer_id"):
        try:
            report.ledger = await trio.to_thread.run_sync(
                account_ledgers, client.data_dir, report.client["peer_id"], workers, report.jobs
            )
        except (P2PComputeError, OSError) as exc:
            report.ledger.audit_errors.append(f"could not read the ledgers: {exc}")
