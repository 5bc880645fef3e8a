"""A local testnet: N real peer processes on loopback (127.0.0.1 ... 127.0.0.N), one bootstrap, the rest joining.

``p2pcompute testnet --peers N`` probes the hardware once (shared by every peer), starts the peers,
waits until every peer holds every other peer's advert, prints the market table and the convergence
time, optionally writes a JSON report, and stops every peer (also on Ctrl-C). It exits non-zero when
the network does not converge in time.

With ``--demo`` it then runs a job end to end from the testnet process: a small MLP with fixed weights is
exported, a client bootstrapped at the first peer runs it on a worker it finds through the network, and the
result is checked against local execution of the same module (:func:`run_demo`).

With ``--map M`` it runs M tasks of that MLP (seeded random inputs) through ``client.map`` over every peer, checks
each result against local execution, and reports the map's summary and the workers' utilisation: the slot-seconds
their status counters say they held the client's jobs during the map, over the sum of their slots times the map's
wall time (:func:`run_map_tasks`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from p2pcompute.compute.gpu import CACHE_FILE, load_or_probe
from p2pcompute.config import CHEAT_MODES, STATUS_REQUEST_TIMEOUT_S, parse_price
from p2pcompute.errors import P2PComputeError, Reason
from p2pcompute.taskfile import MapSummary
from p2pcompute.trial import GROUP_MODES, TrialConfig, TrialReport, assign_modes, run_trial

if TYPE_CHECKING:
    from p2pcompute.tasks import MapProgress
    from p2pcompute.testnet_netns import NetnsConfig

__all__ = [
    "DemoReport",
    "MapReport",
    "PeerProcess",
    "TestnetConfig",
    "TestnetError",
    "TestnetReport",
    "run_demo",
    "run_map_tasks",
    "run_testnet",
]

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0  # one peer process from spawn to "ready" ...
READY_TIMEOUT_PER_PEER_S = 2.0  # ... plus this much per peer of the testnet
STOP_TIMEOUT_S = 15.0  # SIGINT to exit, before SIGKILL
POLL_INTERVAL_S = 0.25  # status polling while waiting for convergence
START_CONCURRENCY = 6  # peer processes starting at once (each imports libp2p: CPU-bound)
DEMO_TIMEOUT_S = 120.0  # the whole demo: client start, matching, the job, payment
DEMO_DEADLINE_S = 60.0  # the job's own deadline, given to the worker
DEMO_MAX_PRICE = "0.01"  # credits
DEMO_SEED = 0
TRIAL_TIMEOUT_PER_JOB_S = 10.0
MAP_TIMEOUT_S = 120.0  # the map phase: client start and market wait, then ...
MAP_TIMEOUT_PER_TASK_S = 2.0  # ... this much per task at most
MAP_SEED = 1  # the map's inputs (torch.Generator seed)
MAX_PEER_IP = 253  # 127.0.0.254 is the trial's client


class TestnetError(P2PComputeError):
    """The testnet could not be started or did not converge."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.BAD_CONFIG, detail)


@dataclass(frozen=True, slots=True)
class TestnetConfig:
    peers: int = 5
    base_dir: Path | None = None  # default: a temporary directory, removed afterwards
    timeout_s: float = 120.0  # convergence deadline, counted from the last peer being ready
    advertise_interval_s: float = 30.0
    log_level: str = "warning"
    extra_args: tuple[str, ...] = ()  # passed to every `p2pcompute node run`
    demo: bool = False  # after convergence, run a demo job through the network (run_demo)
    jobs: int = 0  # then a verification trial of this many jobs (p2pcompute.trial)
    cheaters: int = 0  # workers that cheat in it
    cheat_mode: str = "random"  # a mode of p2pcompute.testing.adversary, or "mixed"
    kill_rate: float = 0.0  # chance per trial job of killing a worker mid-job
    warmup: int = 0  # trial jobs run first and not counted (trust earned): the steady state
    honest_jobs: int = 0  # cheaters are honest for their first K jobs (sleeper, sybil)
    ring_unreplicated_rate: float = 0.0  # a ring member cheats on this fraction of the jobs it seems to run alone
    ring_oracle: bool = False  # the trial tells the ring each job's replicas (else the ring's window rule)
    sybil_new_address: bool = False  # a flagged sybil comes back on a new loopback address (else its own)
    map_tasks: int = 0  # after convergence, run this many tasks of the demo job through client.map (run_map_tasks)
    netns: NetnsConfig | None = None  # a testnet in network namespaces instead (p2pcompute.testnet_netns)

    def cheat_modes(self) -> list[str]:
        """The cheat mode of each peer ("" = honest): cheaters spread over peers 1 .. N-1, never the bootstrap."""
        return assign_modes(self.peers, self.cheaters, self.cheat_mode)

    def validate(self) -> TestnetConfig:
        if self.netns is not None:  # its own rules (NetnsConfig.validate), and none of the loopback phases
            if self.demo or self.map_tasks or self.warmup or self.honest_jobs or self.ring_unreplicated_rate:
                raise TestnetError("--demo, --map, --warmup, --honest-jobs and the ring options are not for --netns")
            if self.timeout_s <= 0:
                raise TestnetError("--timeout must be positive")
            return self
        if self.cheaters and self.cheaters > (self.peers - 1) // 2:
            raise TestnetError(f"--cheaters must leave honest workers a majority: at most {(self.peers - 1) // 2}")
        if self.cheat_mode not in (*CHEAT_MODES, "mixed"):
            raise TestnetError(f"--cheat-mode must be one of {', '.join((*CHEAT_MODES, 'mixed'))}")
        if not 0.0 <= self.kill_rate <= 1.0 or self.jobs < 0 or self.map_tasks < 0:
            raise TestnetError("--kill-rate must be 0..1, --jobs and --map >= 0")
        if self.honest_jobs < 0 or not 0.0 <= self.ring_unreplicated_rate <= 1.0:
            raise TestnetError("--honest-jobs must be >= 0 and --ring-unreplicated-rate 0..1")
        if not 2 <= self.peers <= 200:  # 200 < 254: one loopback address each (peer_ip)
            raise TestnetError(f"--peers must be 2..200, got {self.peers}")
        if self.timeout_s <= 0:
            raise TestnetError("--timeout must be positive")
        return self


@dataclass
class PeerProcess:
    index: int
    data_dir: Path
    process: trio.Process
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    status_url: str = ""
    ready: trio.Event = field(default_factory=trio.Event)
    stderr_tail: list[str] = field(default_factory=list)


@dataclass
class TestnetReport:
    peers: int
    converged: bool
    startup_s: float
    convergence_s: float | None
    adverts_per_peer: dict[str, int]
    peer_ids: list[str]
    market: list[dict[str, Any]] = field(default_factory=list)
    demo: DemoReport | None = None
    trial: TrialReport | None = None
    map: MapReport | None = None

    @property
    def ok(self) -> bool:
        return self.converged and (self.demo is None or self.demo.ok) and (self.map is None or self.map.ok)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "peers": self.peers,
            "converged": self.converged,
            "startup_seconds": round(self.startup_s, 3),
            "convergence_seconds": None if self.convergence_s is None else round(self.convergence_s, 3),
            "adverts_per_peer": self.adverts_per_peer,
            "peer_ids": self.peer_ids,
        }
        if self.demo is not None:
            data["demo"] = self.demo.to_json()
        if self.trial is not None:
            data["trial"] = self.trial.to_json()
        if self.map is not None:
            data["map"] = self.map.to_json()
        return data


@dataclass
class DemoReport:
    """How the demo job went: ``ok`` when it ran and matched local execution of the same module."""

    ok: bool
    elapsed_s: float  # client.run(), end to end
    client_start_s: float = 0.0  # opening the client (host, bootstrap dial) until it knows the workers
    workers_known: int = 0  # eligible workers in the client's market view when the job started
    check: str = ""  # "exact" (torch.equal; a CPU worker) or "tolerance" (the job's rtol/atol; another device)
    max_abs_diff: float | None = None
    error: str | None = None
    summary: dict[str, Any] | None = None  # RunResult.summary()
    preview: list[float] = field(default_factory=list)  # the first output values

    def to_json(self) -> dict[str, Any]:
        summary = self.summary or {}
        return {
            "ok": self.ok,
            "worker": summary.get("worker"),
            "price": summary.get("price_credits"),
            "timings": summary.get("timings_ms"),
            "elapsed": round(self.elapsed_s, 3),
            "client_start": round(self.client_start_s, 3),
            "workers_known": self.workers_known,
            "check": self.check,
            "max_abs_diff": self.max_abs_diff,
            "error": self.error,
            "hardware_class": summary.get("hardware_class"),
            "job_digest": summary.get("job_digest"),
            "outputs": summary.get("outputs"),
            "attempts": summary.get("attempts"),
            "agreeing": summary.get("agreeing"),
        }


@dataclass
class MapReport:
    """How ``--map`` went: the map's summary, the results that differ from local execution, and what the workers'
    own counters say about their slots during the map (``slots``: the sum of their slots; ``slot_busy_s``: the
    slot-seconds they held admitted jobs, from admission to receipt; ``exec_s``: seconds in their executors)."""

    summary: MapSummary | None
    slots: int = 0
    slot_busy_s: float = 0.0
    exec_s: float = 0.0
    mismatches: int = 0
    error: str | None = None

    @property
    def utilisation(self) -> float:
        """Slot occupancy over the map: slot-seconds held over (sum of slots x wall time)."""
        if self.summary is None or self.slots <= 0 or self.summary.wall_s <= 0:
            return 0.0
        return self.slot_busy_s / (self.slots * self.summary.wall_s)

    @property
    def exec_share(self) -> float:
        """Time in the executors over (sum of slots x wall time)."""
        if self.summary is None or self.slots <= 0 or self.summary.wall_s <= 0:
            return 0.0
        return self.exec_s / (self.slots * self.summary.wall_s)

    @property
    def ok(self) -> bool:
        return self.error is None and self.summary is not None and self.summary.ok and self.mismatches == 0

    def lines(self) -> list[str]:
        lines = list(self.summary.lines()) if self.summary is not None else []
        if self.summary is not None and self.slots:
            lines.append(
                f"utilisation: {self.utilisation:.0%} of {self.slots} slots' time ({self.slot_busy_s:.1f} "
                f"slot-seconds held of {self.slots * self.summary.wall_s:.1f}; executors busy {self.exec_share:.0%})"
            )
        if self.summary is not None:
            same = self.summary.done - self.mismatches
            lines.append(f"check:      {same} of {self.summary.done} equal to local execution")
        if self.error:
            lines.append(f"error:      {self.error}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            **(self.summary.to_json() if self.summary is not None else {}),
            "slots": self.slots,
            "slot_busy_seconds": round(self.slot_busy_s, 3),
            "exec_seconds": round(self.exec_s, 3),
            "utilisation": round(self.utilisation, 4),
            "exec_share": round(self.exec_share, 4),
            "mismatches": self.mismatches,
            "ok": self.ok,
            "map_error": self.error,
        }


NETNS_KEYS = frozenset(
    {"netns", "churn", "churn_mode", "duration", "workload", "concurrency", "seed", "nat_workers", "delay_ms", "loss"}
)
"""Scenario keys of a testnet in network namespaces only (``netns``: its table, or true)."""
NETNS_DEFAULT_JOBS = 10  # --netns without --jobs or --duration


def load_scenario(path: Path | None, overrides: dict[str, Any]) -> TestnetConfig:
    """A scenario TOML file (keys: peers, timeout, advertise_interval, dir, demo, ...; a ``[netns]`` table or
    ``--netns`` for a testnet in network namespaces), then overrides (None = unset)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TestnetError(f"scenario {path}: {exc}") from exc
    if overrides.get("netns") and isinstance(values.get("netns"), dict):
        overrides = {k: v for k, v in overrides.items() if k != "netns"}  # --netns: the scenario's table stays
    values.update({k: v for k, v in overrides.items() if v is not None})
    keys = {
        "peers",
        "timeout",
        "advertise_interval",
        "dir",
        "demo",
        "jobs",
        "cheaters",
        "cheat_mode",
        "kill_rate",
        "warmup",
        "honest_jobs",
        "ring_unreplicated_rate",
        "ring_oracle",
        "sybil_new_address",
        "map",
        *NETNS_KEYS,
    }
    unknown = set(values) - keys
    if unknown:
        raise TestnetError(f"scenario: unknown key(s) {', '.join(sorted(unknown))}")
    netns: NetnsConfig | None = None
    if values.get("netns"):
        from p2pcompute.errors import ConfigError
        from p2pcompute.testnet_netns import netns_config

        if not values.get("jobs") and not values.get("duration"):
            values["jobs"] = NETNS_DEFAULT_JOBS
        try:
            netns = netns_config(values)
        except (ConfigError, TypeError, ValueError) as exc:
            raise TestnetError(f"scenario: {getattr(exc, 'detail', None) or exc}") from exc
    else:
        given = sorted(k for k in NETNS_KEYS if values.get(k))
        if given:
            raise TestnetError(f"{', '.join(given)}: only with --netns (a testnet in network namespaces)")
    try:
        return TestnetConfig(
            peers=len(netns.peers) if netns is not None else int(values.get("peers", 5)),
            timeout_s=float(values.get("timeout", 120.0)),
            advertise_interval_s=float(values.get("advertise_interval", 30.0)),
            base_dir=Path(values["dir"]) if "dir" in values else None,
            demo=bool(values.get("demo", False)),
            jobs=int(values.get("jobs", 0)),
            cheaters=int(values.get("cheaters", 0)),
            cheat_mode=str(values.get("cheat_mode", "random")),
            kill_rate=float(values.get("kill_rate", 0.0)),
            warmup=int(values.get("warmup", 0)),
            honest_jobs=int(values.get("honest_jobs", 0)),
            ring_unreplicated_rate=float(values.get("ring_unreplicated_rate", 0.0)),
            ring_oracle=bool(values.get("ring_oracle", False)),
            sybil_new_address=bool(values.get("sybil_new_address", False)),
            map_tasks=int(values.get("map", 0)),
            netns=netns,
        ).validate()
    except (TypeError, ValueError) as exc:
        raise TestnetError(f"scenario: {exc}") from exc


@dataclass
class _Launcher:
    """What starting a peer process needs (a sybil's re-entry starts one more)."""

    nursery: trio.Nursery
    base: Path
    bootstrap: Sequence[str]
    config: TestnetConfig
    hardware: Path
    started: list[PeerProcess]  # every process started, for the final stop
    reentries: int = 0


@dataclass
class _TrialPeer:
    """A testnet peer process as the verification trial sees it (``p2pcompute.trial.TrialPeer``)."""

    peer: PeerProcess
    cheat_mode: str
    launcher: _Launcher
    alive: bool = True

    @property
    def peer_id(self) -> str:
        return self.peer.peer_id

    async def kill(self) -> None:
        """SIGKILL, mid-job: no clean shutdown, as when a machine dies."""
        self.alive = False
        with contextlib.suppress(ProcessLookupError):
            self.peer.process.send_signal(signal.SIGKILL)

    async def reenter(self) -> None:
        """Stop the process; start a new one with a fresh data directory (a new key), on the same loopback address or
        (``sybil_new_address``) the next unused one."""
        launch = self.launcher
        await _stop_peers([self.peer])
        launch.reentries += 1
        n = launch.reentries
        ip = peer_ip(self.peer.index)
        if launch.config.sybil_new_address:
            if launch.config.peers + n > MAX_PEER_IP:
                raise TestnetError(f"no loopback address left for re-entry {n}")
            ip = peer_ip(launch.config.peers - 1 + n)
        self.peer = await _start_peer(
            launch.nursery,
            self.peer.index,
            launch.base,
            launch.bootstrap,
            launch.config,
            launch.hardware,
            data_dir=launch.base / f"peer-{self.peer.index:03d}-key{n}",
            ip=ip,
        )
        launch.started.append(self.peer)
        self.alive = True


async def _run_trial(
    config: TestnetConfig, data_dir: Path, peers: Sequence[PeerProcess], launcher: _Launcher
) -> TrialReport:
    from p2pcompute.client import open_client
    from p2pcompute.testing.adversary import DirectoryRing

    modes = config.cheat_modes()
    trial_peers = [_TrialPeer(p, modes[p.index], launcher) for p in peers]
    oracle = DirectoryRing(_ring_dir(launcher.base)) if config.ring_oracle and config.cheaters else None
    trial = TrialConfig(jobs=config.jobs, kill_rate=config.kill_rate, warmup=config.warmup)
    with trio.fail_after(TRIAL_TIMEOUT_PER_JOB_S * (config.jobs + config.warmup) + 60):
        async with open_client(peers[0].addrs[:1], data_dir=data_dir, listen=("/ip4/127.0.0.254/tcp/0",)) as client:
            with trio.move_on_after(30):
                await client.node.wait_for(lambda: len(client.node.market) >= len(peers))
            return await run_trial(client, trial_peers, trial, oracle=oracle)


def _ring_dir(base: Path) -> Path:
    """The group cheaters' side channel (``p2pcompute.testing.adversary.DirectoryRing``): out of the network's sight."""
    return base / "ring"


def peer_ip(index: int) -> str:
    """Peer ``index`` listens on its own loopback address (127.0.0.1, .2, ...): as on a real network, each worker
    is in its own address group, so jobs needing several independent workers can find them (core.matching)."""
    return f"127.0.0.{index + 1}"


def _node_command(
    index: int, data_dir: Path, bootstrap: Sequence[str], config: TestnetConfig, ip: str | None = None
) -> list[str]:
    # An honest peer is the production command; a cheater is the testnet-only entry point, whose options (how it
    # cheats) come before "--" and node run's after it.
    mode = config.cheat_modes()[index]
    if mode:
        command = [
            sys.executable, "-m", "p2pcompute.testing.peer", "--log-level", config.log_level,
            "--cheat-mode", mode, "--cheat-honest-jobs", str(config.honest_jobs),
        ]  # fmt: skip
        if mode in GROUP_MODES:
            command += ["--cheat-ring-dir", str(_ring_dir(data_dir.parent))]
        if mode == "ring":
            command += ["--cheat-unreplicated-rate", str(config.ring_unreplicated_rate)]
        command += ["--"]
    else:
        command = [sys.executable, "-m", "p2pcompute.cli", "--log-level", config.log_level, "node", "run"]
    command += [
        "--json-events",
        "--data-dir", str(data_dir),
        "--listen", f"/ip4/{ip or peer_ip(index)}/tcp/0",
        "--status-port", "0",
        "--advertise-interval", str(config.advertise_interval_s),
        "--advert-ttl", str(max(config.advertise_interval_s * 3, 30.0)),
    ]  # fmt: skip
    if bootstrap:
        # Dozens of peer processes share two cores: the joiners keep their connections few (the
        # library dials known peers up to (low + high) / 2); the bootstrap peer keeps its defaults,
        # so it never prunes a joiner that knows nobody else yet.
        command += ["--connections", "4", "24"]
    for addr in bootstrap:
        command += ["--bootstrap", addr]
    return command + list(config.extra_args)


async def _read_events(peer: PeerProcess) -> None:
    """Read the peer's stdout lines; the JSON ``ready`` event fills in its identity."""
    assert peer.process.stdout is not None
    buffer = b""
    async for chunk in peer.process.stdout:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "ready":
                peer.peer_id = event["peer_id"]
                peer.addrs = event["addrs"]
                peer.status_url = event["status_url"]
                peer.ready.set()


async def _read_stderr(peer: PeerProcess) -> None:
    """Keep the last lines in memory (for error messages) and the whole log in the peer's data dir."""
    assert peer.process.stderr is not None
    with open(peer.data_dir / "node.log", "ab") as log_file:
        async for chunk in peer.process.stderr:
            log_file.write(chunk)
            log_file.flush()
            peer.stderr_tail.extend(chunk.decode(errors="replace").splitlines())
            del peer.stderr_tail[:-20]


async def _start_peer(
    nursery: trio.Nursery,
    index: int,
    base: Path,
    bootstrap: Sequence[str],
    config: TestnetConfig,
    hardware: Path,
    *,
    data_dir: Path | None = None,
    ip: str | None = None,
) -> PeerProcess:
    data_dir = data_dir or base / f"peer-{index:03d}"
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(hardware, data_dir / CACHE_FILE)
    process = await trio.lowlevel.open_process(
        _node_command(index, data_dir, bootstrap, config, ip),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the testnet only; it stops the peers itself
    )
    peer = PeerProcess(index=index, data_dir=data_dir, process=process)
    nursery.start_soon(_read_events, peer)
    nursery.start_soon(_read_stderr, peer)
    # Start-up competes for the CPU with every peer already running: allow more time in larger testnets.
    with trio.move_on_after(READY_TIMEOUT_S + READY_TIMEOUT_PER_PEER_S * config.peers):
        async with trio.open_nursery() as waiter:

            async def exited() -> None:
                await process.wait()
                waiter.cancel_scope.cancel()

            async def ready() -> None:
                await peer.ready.wait()
                waiter.cancel_scope.cancel()

            waiter.start_soon(exited)
            waiter.start_soon(ready)
    if not peer.ready.is_set():
        code = process.returncode  # None: still starting when the wait ran out
        await _stop_peers([peer])
        await trio.sleep(0.2)  # let the stderr reader catch the last lines
        # One line: the peer's own last line says why (`node run` fails in one line); its whole log is node.log.
        last = next((line.strip() for line in reversed(peer.stderr_tail) if line.strip()), "no output")
        state = "not ready in time" if code is None else f"exit code {code}"
        raise TestnetError(f"peer {index} did not become ready ({state}): {last}")
    return peer


async def _stop_peers(peers: Sequence[PeerProcess]) -> None:
    with trio.CancelScope(shield=True):
        for peer in peers:
            if peer.process.returncode is None:
                peer.process.send_signal(signal.SIGINT)
        with trio.move_on_after(STOP_TIMEOUT_S):
            for peer in peers:
                await peer.process.wait()
        for peer in peers:
            if peer.process.returncode is None:
                log.warning("peer %d did not stop within %.0f s; killing it", peer.index, STOP_TIMEOUT_S)
                peer.process.kill()
                await peer.process.wait()


async def _market_counts(client: httpx.AsyncClient, peers: Sequence[PeerProcess]) -> dict[str, int]:
    counts: dict[str, int] = {}

    async def one(peer: PeerProcess) -> None:
        try:
            status = (await client.get(peer.status_url)).json()
            counts[peer.peer_id] = len(status["market"])
        except (httpx.HTTPError, ValueError, KeyError):
            counts[peer.peer_id] = -1

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(one, peer)
    return counts


async def run_testnet(
    config: TestnetConfig,
    *,
    on_started: Any = None,
    on_demo: Callable[[str], None] | None = None,
    on_map: Callable[[MapProgress], None] | None = None,
    then: Callable[[Path, Sequence[PeerProcess]], Awaitable[None]] | None = None,
) -> TestnetReport:
    """Start the peers, wait for advert convergence, run the demo job, the map and the trial if asked, stop them;
    return the report.

    ``on_demo`` is called with each phase of the demo job (for a progress line), ``on_map`` with the map's progress.
    ``then(base_dir, peers)``, when given, runs after the map and before the trial, on the converged testnet
    (benchmarks bring their own work; it raises, the peers are stopped all the same).
    """
    config.validate()
    owned_dir = config.base_dir is None
    base = Path(tempfile.mkdtemp(prefix="p2pcompute-testnet-")) if owned_dir else config.base_dir
    assert base is not None
    try:
        base.mkdir(parents=True, exist_ok=True)
        (base / "shared").mkdir(exist_ok=True)
    except OSError as exc:
        raise TestnetError(
            f"cannot use {base} for the peers' data ({exc.strerror or exc}); choose another with --dir"
        ) from exc
    peers: list[PeerProcess] = []
    try:
        shared = base / "shared"
        await trio.to_thread.run_sync(lambda: load_or_probe(shared))
        hardware = shared / CACHE_FILE
        start = trio.current_time()
        failure: TestnetError | None = None
        report: TestnetReport | None = None
        async with trio.open_nursery() as nursery:
            try:
                first = await _start_peer(nursery, 0, base, (), config, hardware)
                peers.append(first)
                limiter = trio.CapacityLimiter(START_CONCURRENCY)
                failures: list[TestnetError] = []

                async def start_one(i: int) -> None:
                    async with limiter:
                        try:
                            peers.append(await _start_peer(nursery, i, base, first.addrs[:1], config, hardware))
                        except TestnetError as exc:
                            failures.append(exc)

                async with trio.open_nursery() as starters:
                    for i in range(1, config.peers):
                        starters.start_soon(start_one, i)
                if failures:
                    raise failures[0]
                peers.sort(key=lambda p: p.index)
                startup_s = trio.current_time() - start
                if on_started is not None:
                    on_started(peers)
                report = await _await_convergence(config, peers, startup_s)
                if config.demo and report.converged:
                    report.demo = await run_demo(
                        base / "client", peers[0].addrs[:1], workers=len(peers), on_phase=on_demo
                    )
                if config.map_tasks and report.converged:
                    report.map = await run_map_tasks(base / "client", peers, config.map_tasks, progress=on_map)
                if then is not None and report.converged:
                    await then(base, list(peers))
                if config.jobs and report.converged:
                    launcher = _Launcher(nursery, base, first.addrs[:1], config, hardware, peers)
                    report.trial = await _run_trial(config, base / "client", list(peers), launcher)
            except TestnetError as exc:
                failure = exc  # raised below, outside the nursery, as itself rather than in an ExceptionGroup
            finally:
                await _stop_peers(peers)
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        assert report is not None
        return report
    finally:
        if owned_dir:
            shutil.rmtree(base, ignore_errors=True)


async def _await_convergence(config: TestnetConfig, peers: Sequence[PeerProcess], startup_s: float) -> TestnetReport:
    ready_at = trio.current_time()
    counts: dict[str, int] = {}
    converged = False
    async with httpx.AsyncClient(timeout=STATUS_REQUEST_TIMEOUT_S) as client:
        with trio.move_on_after(config.timeout_s):
            while True:
                counts = await _market_counts(client, peers)
                if all(n == config.peers for n in counts.values()):
                    converged = True
                    break
                await trio.sleep(POLL_INTERVAL_S)
        convergence_s = trio.current_time() - ready_at if converged else None
        market: list[dict[str, Any]] = []
        try:
            market = (await client.get(peers[0].status_url)).json()["market"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("could not read the market of peer 0: %s", exc)
    return TestnetReport(
        peers=config.peers,
        converged=converged,
        startup_s=startup_s,
        convergence_s=convergence_s,
        adverts_per_peer=counts,
        peer_ids=[p.peer_id for p in peers],
        market=market,
    )


def demo_module() -> tuple[Any, tuple[Any, ...]]:
    """The demo job: a small MLP with fixed weights (seeded, without touching the global RNG) and its input."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        x = torch.randn(32, 64)
    return model.eval(), (x,)


async def run_demo(
    data_dir: Path, bootstrap: Sequence[str], *, workers: int = 1, on_phase: Callable[[str], None] | None = None
) -> DemoReport:
    """Export the demo MLP, run it through a client bootstrapped at ``bootstrap``, compare with local execution.

    The client first waits (bounded) until it knows ``workers`` eligible workers.

    Never raises for a failed job: the failure is in the report (``ok`` false, ``error``).
    """
    with warnings.catch_warnings():  # torch's noise on a CPU-only install without numpy, and from torch.export
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
        import torch

        from p2pcompute.client import Job, ProgressEvent, open_client

        model, inputs = demo_module()
        job = await trio.to_thread.run_sync(lambda: Job.from_module(model, inputs))
    with torch.no_grad():
        expected = model(*inputs)
    phases: list[str] = []

    last: dict[str, str] = {}  # worker -> its last phase

    def progress(event: ProgressEvent) -> None:
        worker = str(event.worker or "")
        if last.get(worker) != event.phase:
            last[worker] = event.phase
            phases.append(event.phase)
            if on_phase is not None:
                on_phase(f"{event.phase} ({worker[-12:]})" if worker else event.phase)

    known = 0
    opened = started = trio.current_time()
    try:
        with trio.fail_after(DEMO_TIMEOUT_S):
            async with open_client(bootstrap, data_dir=data_dir) as client:
                # The demo shows the whole market: wait (bounded) until the client knows every worker.
                known = await client.wait_for_workers(job, parse_price(DEMO_MAX_PRICE), count=workers)
                started = trio.current_time()
                result = await client.run(job, max_price=DEMO_MAX_PRICE, deadline=DEMO_DEADLINE_S, progress=progress)
    except Exception as exc:  # any failure of the job is the demo's result, reported rather than raised
        leaf = _single_leaf(exc)
        if isinstance(leaf, trio.TooSlowError):
            error = f"the demo job did not finish within {DEMO_TIMEOUT_S:.0f} s (phases: {', '.join(phases)})"
        else:
            error = f"{type(leaf).__name__}: {leaf}"
        return DemoReport(
            ok=False,
            elapsed_s=trio.current_time() - started,
            client_start_s=started - opened,
            workers_known=known,
            error=error,
        )
    elapsed = trio.current_time() - started
    output = result.outputs[0]
    diff = float((output.double() - expected.double()).abs().max()) if output.shape == expected.shape else None
    compare = _job_compare(job.spec_bytes)
    if result.hardware_class.startswith("cpu:"):
        check, ok = "exact", bool(torch.equal(output, expected))
    else:  # another device computes in another order: the job's declared tolerance applies
        check = "tolerance"
        ok = output.shape == expected.shape and bool(
            torch.allclose(output.cpu(), expected, rtol=compare.rtol, atol=compare.atol)
        )
    return DemoReport(
        ok=ok,
        elapsed_s=elapsed,
        client_start_s=started - opened,
        workers_known=known,
        check=check,
        max_abs_diff=diff,
        error=None if ok else f"the result differs from local execution (max abs diff {diff})",
        summary=result.summary(),
        preview=[round(float(v), 6) for v in output.reshape(-1)[:6].tolist()],
    )


async def _work_counters(peers: Sequence[PeerProcess]) -> tuple[int, float, float]:
    """The workers' slots, slot-seconds held and executor seconds so far, summed (from their status endpoints)."""
    totals = [0, 0.0, 0.0]
    async with httpx.AsyncClient(timeout=STATUS_REQUEST_TIMEOUT_S) as http:

        async def one(peer: PeerProcess) -> None:
            jobs = (await http.get(peer.status_url)).json()["jobs"] or {}
            totals[0] += int(jobs.get("slots", 0))
            totals[1] += float(jobs.get("slot_busy_s", 0.0))
            totals[2] += float(jobs.get("exec_s", 0.0))

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
    return int(totals[0]), totals[1], totals[2]


async def run_map_tasks(
    data_dir: Path,
    peers: Sequence[PeerProcess],
    tasks: int,
    *,
    progress: Callable[[MapProgress], None] | None = None,
    redundancy: int | None = None,
) -> MapReport:
    """Run ``tasks`` tasks of the demo MLP (seeded random inputs of its shape) through ``client.map`` with a client
    bootstrapped at the first peer, once it knows every peer; check each result against local execution; read the
    workers' slot counters just before and just after the map. Never raises for a failed map: see ``error``."""
    from p2pcompute.taskfile import run_map

    with warnings.catch_warnings():  # torch's noise on a CPU-only install without numpy, and from torch.export
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
        import torch

        from p2pcompute.client import Job, open_client

        model, (example,) = demo_module()
        job = await trio.to_thread.run_sync(lambda: Job.from_module(model, (example,)))
    compare = _job_compare(job.spec_bytes)
    generator = torch.Generator().manual_seed(MAP_SEED)
    inputs = [(torch.randn(example.shape, generator=generator),) for _ in range(tasks)]
    report = MapReport(summary=None)

    def check(result: Any) -> None:
        with torch.no_grad():
            expected = model(*inputs[result.index])
        output = result.outputs[0].cpu()
        if output.shape != expected.shape or not torch.allclose(output, expected, rtol=compare.rtol, atol=compare.atol):
            report.mismatches += 1

    try:
        with trio.fail_after(MAP_TIMEOUT_S + MAP_TIMEOUT_PER_TASK_S * tasks):
            async with open_client(peers[0].addrs[:1], data_dir=data_dir, listen=("/ip4/127.0.0.254/tcp/0",)) as client:
                await client.wait_for_workers(job, parse_price(DEMO_MAX_PRICE), count=len(peers))
                slots, busy, spent = await _work_counters(peers)
                report.summary = await run_map(
                    client,
                    job,
                    inputs,
                    max_price=DEMO_MAX_PRICE,
                    task_deadline=DEMO_DEADLINE_S,
                    redundancy=redundancy,
                    progress=progress,
                    on_result=check,
                )
                _, busy_after, spent_after = await _work_counters(peers)
    except Exception as exc:  # the map's failure is its result, reported rather than raised
        leaf = _single_leaf(exc)
        report.error = (
            f"the map did not finish within {MAP_TIMEOUT_S + MAP_TIMEOUT_PER_TASK_S * tasks:.0f} s"
            if isinstance(leaf, trio.TooSlowError)
            else f"{type(leaf).__name__}: {leaf}"
        )
        return report
    report.slots = slots
    report.slot_busy_s = busy_after - busy
    report.exec_s = spent_after - spent
    if report.summary is not None and report.summary.failed:
        report.error = f"task {report.summary.failed_index}: {report.summary.error}"
    return report


def _job_compare(spec_bytes: bytes) -> Any:
    from p2pcompute.core.jobspec import decode_job

    return decode_job(spec_bytes).compare


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
