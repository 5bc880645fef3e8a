"""The ``p2pcompute`` command.

Every failure of every command is **one line** on stderr (``Error: ...``, with the option to change where there is
one) and exit status 1; click's usage errors exit 2. The traceback is logged at DEBUG: ``--log-level debug`` shows it.
py-libp2p's own log records are kept at DEBUG too (:mod:`p2pcompute.net.logs`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from p2pcompute import __version__
from p2pcompute.config import CHEAT_MODES
from p2pcompute.errors import ConfigError, DialError, HostStartError, P2PComputeError, Reason
from p2pcompute.keys import default_key_path, generate_keypair, read_key_file, write_key_file

if TYPE_CHECKING:
    from p2pcompute.config import NodeConfig
    from p2pcompute.node import ExecutorWrapper

_LOG_LEVELS = ["debug", "info", "warning", "error"]


log = logging.getLogger(__name__)

# What passes through the one-line handler untouched: click's own exits, and the user's Ctrl-C.
_PASS_THROUGH = (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt)


class _OneLineErrors(click.Group):
    """The command group: whatever a command raises becomes one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_errors(ctx.invoked_subcommand or "p2pcompute"):
            return super().invoke(ctx)


@contextmanager
def one_line_errors(what: str) -> Iterator[None]:
    """Whatever the body raises becomes one line (a ``ClickException``); the traceback is logged at DEBUG."""
    try:
        yield
    except _PASS_THROUGH:
        raise
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, (*_PASS_THROUGH, SystemExit)):
            raise leaf from None
        log.debug("%s failed", what, exc_info=exc)
        raise click.ClickException(one_line(leaf)) from exc


def one_line(exc: BaseException) -> str:
    """The message of a failure, on one line: ``detail [reason]`` for our errors, else what the exception says."""
    if isinstance(exc, P2PComputeError):
        text = f"{exc.detail or exc.reason.value} [{exc.reason.value}]"
    elif isinstance(exc, click.ClickException):
        text = exc.format_message()
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = f"unexpected {type(exc).__name__}: {exc} (--log-level debug shows where)"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def _leaf(exc: BaseException) -> BaseException:
    """The failure that matters inside (nested) exception groups: ours first, then any other but a cancellation."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = list(_leaves(exc))
    for kind in (KeyboardInterrupt, P2PComputeError, click.ClickException, OSError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return next((leaf for leaf in leaves if type(leaf).__name__ != "Cancelled"), leaves[0] if leaves else exc)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _check_addrs(what: str, addrs: Sequence[str], where: str, *, peer: bool = False) -> None:
    """Refuse, in one line naming where to fix it, a multiaddr the network layer could not use (before any work)."""
    import multiaddr

    for addr in addrs:
        try:
            multiaddr.Multiaddr(addr)
        except Exception as exc:  # multiaddr raises several ValueError subclasses, and others on odd input
            why = str(exc).split(" (string: ")[0].split("': ", 1)[-1]
            raise ConfigError(f"{what} {addr!r} is not a multiaddr: {why}; fix {where}") from exc
        if peer and not addr.rpartition("/p2p/")[2]:
            raise ConfigError(f"{what} {addr!r} does not end in /p2p/<peer id>; fix {where}")


def _check_data_dir(path: Path, where: str) -> None:
    """Create ``path`` (mode 0700) if needed and make sure files can be made there; one line naming ``where``."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"data directory {path} is not usable ({exc.strerror or exc}); choose another with {where}"
        ) from exc


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="p2pcompute")
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default=None,
    envvar="P2PCOMPUTE_LOG_LEVEL",
    help="Verbosity of log messages on stderr [default: warning; info for `node run`, error for `submit`].",
)
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """p2pcompute: sell idle GPU time, or run PyTorch work on other people's GPUs, peer to peer."""
    ctx.obj = {"log_level": log_level}
    _setup_logging(log_level or "warning")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # py-libp2p logs every clean end of a DHT stream as a warning ("Failed to read DHT message").
    logging.getLogger("libp2p.kad_dht").setLevel(max(logging.ERROR, logging.getLogger().level))


@main.group()
def keys() -> None:
    """Create and inspect the peer's Ed25519 identity key."""


_path_option = click.option(
    "--path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Key file (default: identity.key in $P2PCOMPUTE_HOME or the user data directory).",
)


@keys.command("new")
@_path_option
@click.option("--force", is_flag=True, help="Replace an existing key file (its identity is lost).")
def keys_new(path: Path | None, force: bool) -> None:
    """Create a new identity key (file mode 0600)."""
    path = path or default_key_path()
    keypair = generate_keypair()
    try:
        write_key_file(path, keypair, force=force)
    except OSError as exc:
        raise click.ClickException(f"cannot create {path}: {exc.strerror or exc}; choose another with --path") from exc
    click.echo(f"created {path}")
    click.echo(f"peer id: {keypair.peer_id}")


@keys.command("show")
@_path_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def keys_show(path: Path | None, as_json: bool) -> None:
    """Show the peer id and public key of a key file."""
    path = path or default_key_path()
    keypair = read_key_file(path)
    info = {"peer_id": str(keypair.peer_id), "public_key": keypair.public_key.hex(), "path": str(path)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for name, value in info.items():
            click.echo(f"{name + ':':<12} {value}")


# --- node ---------------------------------------------------------------------------------------


@main.group()
def node() -> None:
    """Run a peer that sells this machine's compute."""


@node.command("run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help="TOML config file.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Key, caches and state.")
@click.option("--listen", multiple=True, help="Multiaddr to listen on (repeatable) [default: /ip4/0.0.0.0/tcp/4001].")
@click.option("--bootstrap", multiple=True, help="Peer to join through, /ip4/…/tcp/…/p2p/<id> (repeatable).")
@click.option(
    "--announce",
    multiple=True,
    help="Public address to advertise instead of the listen addresses, /ip4/…/tcp/… (repeatable; behind NAT: the "
    "router's forwarded address).",
)
@click.option("--price", help="Credits per job-second, e.g. 0.002.")
@click.option("--slots", type=int, help="Jobs run at once.")
@click.option("--advertise-interval", type=float, help="Seconds between adverts.")
@click.option("--advert-ttl", type=float, help="Seconds an advert stays valid.")
@click.option(
    "--status-port",
    type=int,
    help="Port of the status/metrics endpoint on 127.0.0.1 [default: 8470; if taken, any free port, printed] (0: any).",
)
@click.option("--mdns/--no-mdns", default=None, help="Find peers on the local network with mDNS.")
@click.option("--connections", type=(int, int), default=None, help="Connection watermarks LOW HIGH [default: 16 96].")
@click.option("--no-benchmark", is_flag=True, default=None, help="Skip the matmul benchmark of the hardware probe.")
@click.option("--json-events", is_flag=True, help="Also print machine-readable JSON lines (used by the testnet).")
@click.option(
    "--sandbox",
    type=click.Choice(["auto", "required", "off"]),
    default=None,
    help="Executor sandbox: every layer the kernel offers (auto), all or refuse to start (required), none (off).",
)
@click.option(
    "--nat",
    type=click.Choice(["auto", "public", "private"]),
    default=None,
    help="Reachability: ask peers (auto, default), or say this node is public or behind NAT (private).",
)
@click.option(
    "--relay",
    "relays",
    multiple=True,
    help="Relay to hold a slot on when unreachable, /ip4/…/tcp/…/p2p/<id> (repeatable; default: any peer that "
    "offers relaying).",
)
@click.option(
    "--relay-service/--no-relay-service",
    default=None,
    help="Serve as a relay for peers behind NAT (opt-in; limits: relay_* in the config file).",
)
@click.option("--hole-punch/--no-hole-punch", default=None, help="Upgrade relayed connections (DCUtR) [default: on].")
@click.pass_context
def node_run(ctx: click.Context, /, **options: Any) -> None:
    """Run a peer until SIGINT/SIGTERM; print its peer id and the addresses others can dial."""
    run_node(ctx.obj["log_level"], **options)


def run_node(
    log_level: str | None,
    *,
    config_file: Path | None,
    data_dir: Path | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    announce: tuple[str, ...],
    price: str | None,
    slots: int | None,
    advertise_interval: float | None,
    advert_ttl: float | None,
    status_port: int | None,
    mdns: bool | None,
    connections: tuple[int, int] | None,
    no_benchmark: bool | None,
    json_events: bool,
    sandbox: str | None,
    nat: str | None = None,
    relays: tuple[str, ...] = (),
    relay_service: bool | None = None,
    hole_punch: bool | None = None,
    wrap_executor: ExecutorWrapper | None = None,
) -> None:
    """Run a peer as ``node run`` does, from its parsed options (``node_run.params``).

    ``wrap_executor`` goes to ``serve`` as it is: ``node run`` passes none; a testnet's cheating peer
    (``python -m p2pcompute.testing.peer``) passes its adversary.
    """
    import trio

    from p2pcompute.config import load_config

    overrides: dict[str, Any] = {
        "data_dir": data_dir,
        "listen": listen or None,
        "bootstrap": bootstrap or None,
        "announce": announce or None,
        "price": price,
        "slots": slots,
        "advertise_interval": advertise_interval,
        "advert_ttl": advert_ttl,
        "status_port": status_port,
        "mdns": mdns,
        "connections_low": connections[0] if connections else None,
        "connections_high": connections[1] if connections else None,
        "sandbox": sandbox,
        "nat": nat,
        "relays": relays or None,
        "relay_service": relay_service,
        "hole_punch": hole_punch,
        "probe_benchmark": False if no_benchmark else None,
        "log_level": log_level,
    }
    config = load_config(config_file, overrides)
    _setup_logging(config.log_level)

    def where(option: str, key: str) -> str:
        return f"--{option}" + (f" (or `{key}` in {config_file})" if config_file else "")

    _check_addrs("listen address", config.listen, where("listen", "listen"))
    _check_addrs("bootstrap address", config.bootstrap, where("bootstrap", "bootstrap"), peer=True)
    _check_addrs("relay address", config.relays, where("relay", "relays"), peer=True)
    _check_data_dir(config.data_dir, where("data-dir", "data_dir"))
    try:
        trio.run(_run_node, config, json_events, wrap_executor)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, HostStartError) and "listen on" in leaf.detail:
            log.debug("node run failed", exc_info=exc)
            fix = where("listen", "listen")
            message = f"{leaf.detail}; choose another address or port with {fix} [{leaf.reason.value}]"
            raise click.ClickException(message) from exc
        raise


async def _run_node(config: NodeConfig, json_events: bool, wrap_executor: ExecutorWrapper | None) -> None:
    import functools
    import signal

    import trio

    from p2pcompute.net.logs import libp2p_logs_at_debug
    from p2pcompute.node import serve

    libp2p_logs_at_debug()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(functools.partial(serve, wrap_executor=wrap_executor), config)
            click.echo(f"peer id: {info.peer_id}")
            for addr in info.addrs:
                click.echo(f"listening: {addr}")
            click.echo(f"status: {info.status_url}")
            if info.sandbox:
                from p2pcompute.compute.sandbox import describe

                click.echo(f"sandbox: {describe(dict(info.sandbox))}")
            if json_events:
                click.echo(json.dumps({"event": "ready", **info.to_json()}))
            sys.stdout.flush()
            async for signum in signals:
                logging.getLogger("p2pcompute").info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    if json_events:
        click.echo(json.dumps({"event": "stopped"}))


_status_option = click.option(
    "--url", help="Status endpoint of the node [default: from node.json in the data directory, else port 8470]."
)
_data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path))


def _status_url(url: str | None, data_dir: Path | None) -> str:
    if url:
        return url
    from p2pcompute.config import DEFAULT_STATUS_PORT
    from p2pcompute.keys import default_data_dir
    from p2pcompute.node import NODE_INFO_FILE

    info = (data_dir or default_data_dir()) / NODE_INFO_FILE
    if not info.exists():
        return f"http://127.0.0.1:{DEFAULT_STATUS_PORT}/status"
    try:
        return str(json.loads(info.read_text())["status_url"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(
            f"cannot read the node's address from {info} ({type(exc).__name__}: {exc}); give it with --url"
        ) from exc


def _fetch_status(url: str) -> dict[str, Any]:
    import httpx

    from p2pcompute.config import STATUS_REQUEST_TIMEOUT_S

    try:
        response = httpx.get(url, timeout=STATUS_REQUEST_TIMEOUT_S)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise click.ClickException(
            f"cannot read the node status at {url}: {exc} (is `p2pcompute node run` up?)"
        ) from exc
    return data


@main.command("status")
@_status_option
@_data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
def status_cmd(url: str | None, data_dir: Path | None, as_json: bool) -> None:
    """Show a running node's identity, addresses, connections and market size."""
    status = _fetch_status(_status_url(url, data_dir))
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"peer id:          {status['peer_id']}")
    for addr in status["addrs"]:
        click.echo(f"listening:        {addr}")
    for addr in status.get("advertised_addrs", []):
        click.echo(f"advertised:       {addr}")
    reach = status.get("reach") or {}
    if reach:
        relay = ", serving as a relay" if reach.get("relay_service") else ""
        click.echo(f"reachability:     {reach['reachability']} (nat = {reach['nat']}{relay})")
    click.echo(f"uptime:           {status['uptime_s']:.0f} s")
    click.echo(f"connected peers:  {len(status['connected_peers'])}")
    click.echo(f"routing table:    {status['routing_table_peers']} peers")
    click.echo(f"capabilities:     {', '.join(status['capabilities'])}")
    click.echo(f"free slots:       {status['free_slots']}")
    click.echo(f"market:           {len(status['market'])} adverts")


@main.command("peers")
@_status_option
@_data_dir_option
def peers_cmd(url: str | None, data_dir: Path | None) -> None:
    """Show the adverts a running node holds: peer, devices, TFLOPS, price, slots, advert age."""
    from p2pcompute.node import advert_table

    print_table(advert_table(_fetch_status(_status_url(url, data_dir))))


@main.command("testnet")
@click.option("--peers", type=int, help="Peer processes to start [default: 5].")
@click.option("--scenario", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="TOML scenario file.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write a JSON report here.")
@click.option("--timeout", type=float, help="Seconds to wait for convergence [default: 120].")
@click.option("--dir", "base_dir", type=click.Path(file_okay=False, path_type=Path), help="Keep peer data here.")
@click.option("--advertise-interval", type=float, help="Seconds between a peer's adverts [default: 30].")
@click.option(
    "--demo/--no-demo",
    default=None,
    help="After convergence, run a small MLP job through the network and check it against local execution.",
)
@click.option(
    "--map",
    "map_tasks",
    type=click.IntRange(min=0),
    help="Then run this many tasks of the demo MLP through client.map over every peer; print the summary and the "
    "workers' slot utilisation [default: 0].",
)
@click.option("--jobs", type=click.IntRange(min=0), help="Then run this many verified jobs (a trial) [default: 0].")
@click.option("--cheaters", type=click.IntRange(min=0), help="Workers that cheat in the trial [default: 0].")
@click.option(
    "--cheat-mode",
    type=click.Choice([*CHEAT_MODES, "mixed"]),
    help="How cheaters cheat (p2pcompute.testing.adversary); mixed: half take the group modes (collude, sleeper, "
    "ring, sybil), the rest the others [default: random].",
)
@click.option("--kill-rate", type=click.FloatRange(0.0, 1.0), help="Chance per trial job of killing a worker mid-job.")
@click.option("--warmup", type=click.IntRange(min=0), help="Trial jobs run first and not counted (steady state).")
@click.option(
    "--honest-jobs", type=click.IntRange(min=0), help="Cheaters are honest for their first K jobs (sleeper, sybil)."
)
@click.option(
    "--ring-unreplicated-rate",
    type=click.FloatRange(0.0, 1.0),
    help="ring: also cheat on this fraction of the jobs a member seems to run alone [default: 0].",
)
@click.option(
    "--ring-oracle/--no-ring-oracle",
    default=None,
    help="ring: the trial tells the ring each job's replicas, so it knows when every replica is a member "
    "[default: no: members that received a job within a short window are taken to be its replicas].",
)
@click.option(
    "--sybil-same-address/--sybil-new-address",
    default=None,
    help="sybil: a flagged sybil comes back with a fresh key on its own address or a new one [default: same].",
)
@click.option(
    "--netns",
    is_flag=True,
    default=None,
    help="Peers in network namespaces (root only): a relay, workers (some behind NAT routers), a client in its "
    "own namespace; faults from a proxy on every link. --peers counts the relay and the workers [default: 3].",
)
@click.option("--nat-workers", type=click.IntRange(min=0), help="--netns: workers behind NAT routers [default: 0].")
@click.option(
    "--churn",
    type=click.FloatRange(0.0, 60.0),
    help="--netns: stop and restart this many workers per minute while the client works [default: 0].",
)
@click.option(
    "--churn-mode",
    type=click.Choice(["alternate", "random"]),
    help="--netns: SIGKILL and clean stops in turn, or at random (seeded) [default: alternate].",
)
@click.option("--duration", type=click.FloatRange(min=0.0), help="--netns: the client runs jobs for S seconds.")
@click.option(
    "--workload",
    type=click.Choice(["mlp", "chain", "bulk"]),
    help="--netns: the client's job: the demo MLP, a chain of products (long enough to be killed mid-job), a "
    "4 MiB input [default: mlp].",
)
@click.option("--concurrency", type=click.IntRange(min=1), help="--netns: jobs the client runs at once [default: 1].")
@click.option("--delay-ms", type=click.FloatRange(0.0, 60_000.0), help="--netns: one-way delay on every link.")
@click.option(
    "--loss", type=click.FloatRange(0.0, 1.0, max_open=True), help="--netns: segment loss on every link (0..1)."
)
@click.option("--seed", type=int, help="--netns: seed of kills, churn and the faults [default: 0].")
def testnet_cmd(
    peers: int | None,
    scenario: Path | None,
    report: Path | None,
    timeout: float | None,
    base_dir: Path | None,
    advertise_interval: float | None,
    demo: bool | None,
    map_tasks: int | None,
    jobs: int | None,
    cheaters: int | None,
    cheat_mode: str | None,
    kill_rate: float | None,
    warmup: int | None,
    honest_jobs: int | None,
    ring_unreplicated_rate: float | None,
    ring_oracle: bool | None,
    sybil_same_address: bool | None,
    netns: bool | None,
    nat_workers: int | None,
    churn: float | None,
    churn_mode: str | None,
    duration: float | None,
    workload: str | None,
    concurrency: int | None,
    delay_ms: float | None,
    loss: float | None,
    seed: int | None,
) -> None:
    """Start real peers on loopback addresses and wait until every peer holds every other peer's advert.

    With --demo, then run a job end to end: a client bootstrapped at the first peer finds a worker
    through the network, runs a small MLP there and checks the result equals local execution.
    Exits 0 when the network converged (and the demo job succeeded), 1 otherwise.

    With --netns (root only), the peers run in network namespaces instead: a relay, workers (--nat-workers of
    them behind NAT routers) and a client in its own namespace that runs --jobs verified jobs (or for
    --duration seconds); --delay-ms/--loss fault every link, --kill-rate kills a job's worker mid-job and
    restarts it, --churn stops and restarts workers. It exits 1 when a job's result was wrong, a ledger
    disagrees (a receipt lost or paid twice) or no job was accepted.
    Options override the scenario file.
    """
    import trio

    from p2pcompute.node import advert_table
    from p2pcompute.testnet import load_scenario, run_testnet

    config = load_scenario(
        scenario,
        {
            "peers": peers,
            "timeout": timeout,
            "advertise_interval": advertise_interval,
            "dir": base_dir,
            "demo": demo,
            "map": map_tasks,
            "jobs": jobs,
            "cheaters": cheaters,
            "cheat_mode": cheat_mode,
            "kill_rate": kill_rate,
            "warmup": warmup,
            "honest_jobs": honest_jobs,
            "ring_unreplicated_rate": ring_unreplicated_rate,
            "ring_oracle": ring_oracle,
            "sybil_new_address": None if sybil_same_address is None else not sybil_same_address,
            "netns": netns,
            "nat_workers": nat_workers,
            "churn": churn,
            "churn_mode": churn_mode,
            "duration": duration,
            "workload": workload,
            "concurrency": concurrency,
            "delay_ms": delay_ms,
            "loss": loss,
            "seed": seed,
        },
    )
    if config.netns is not None:
        _testnet_netns(config, report)
        return
    click.echo(f"starting {config.peers} peers on 127.0.0.1 ... 127.0.0.{config.peers} ...")

    def started(procs: list[Any]) -> None:
        click.echo(f"all {len(procs)} peers ready; bootstrap: {procs[0].addrs[0]}")

    def demo_phase(phase: str) -> None:
        click.echo(f"demo job: {phase}")

    bar: _MapProgressBar | None = None

    def map_progress(event: Any) -> None:
        nonlocal bar
        if bar is None:
            bar = _MapProgressBar("map", config.map_tasks)
        bar.update(event)

    on_map = map_progress if config.map_tasks and sys.stderr.isatty() else None
    try:
        result = trio.run(lambda: run_testnet(config, on_started=started, on_demo=demo_phase, on_map=on_map))
    finally:
        if bar is not None:
            bar.stop()
    print_table(advert_table({"market": result.market}))
    counts = sorted(result.adverts_per_peer.values())
    click.echo(f"startup: {result.startup_s:.2f} s; adverts held per peer: min {counts[0]}, max {counts[-1]}")
    if result.converged:
        click.echo(
            f"converged: every peer holds all {config.peers} adverts, "
            f"{result.convergence_s:.2f} s after the last peer was ready"
        )
    if result.demo is not None:
        _print_demo(result.demo)
    if result.map is not None:
        click.echo(f"map: {config.map_tasks} tasks of the demo MLP through client.map over {config.peers} workers:")
        for line in result.map.lines():
            click.echo(f"  {line}")
    if result.trial is not None:
        click.echo(f"trial: {config.jobs} jobs, {config.cheaters} cheating worker(s) ({config.cheat_mode}):")
        for line in result.trial.lines():
            click.echo(f"  {line}")
    if report:
        report.write_text(json.dumps(result.to_json(), indent=2))
        click.echo(f"report: {report}")
    if not result.converged:
        raise click.ClickException(f"not converged within {config.timeout_s:.0f} s: adverts per peer {counts}")
    if result.demo is not None and not result.demo.ok:
        raise click.ClickException(f"demo job failed: {result.demo.error}")
    if result.map is not None and not result.map.ok:
        why = result.map.error or f"{result.map.mismatches} result(s) differ from local execution"
        raise click.ClickException(f"map failed: {why}")
    if result.trial is not None and (result.trial.wrong_accepted or result.trial.honest_flagged):
        raise click.ClickException(
            f"trial: {result.trial.wrong_accepted} wrong result(s) accepted, "
            f"{len(result.trial.honest_flagged)} honest worker(s) flagged"
        )


def _testnet_netns(config: Any, report: Path | None) -> None:
    """``testnet --netns``: namespaces, the client's jobs, kills and churn, the report (p2pcompute.testnet_netns)."""
    import trio

    from p2pcompute.testnet_netns import require_netns, run_netns_testnet

    require_netns()  # one line, before anything is built, when not root
    netns = config.netns
    faults = netns.faults
    click.echo(
        f"network namespaces: {len(netns.peers)} peers ({sum(1 for p in netns.peers if p.router)} behind NAT), "
        f"a client; faults on every link: "
        + ("none" if faults.is_transparent else f"delay {faults.delay_ms:g} ms, loss {faults.loss:g}")
    )
    result = trio.run(
        lambda: run_netns_testnet(netns, base_dir=config.base_dir, timeout_s=config.timeout_s, on_phase=click.echo)
    )
    for peer in result.peers:
        where = f"{peer.ip} behind {peer.router} ({peer.public_ip})" if peer.router else peer.ip
        extra = f", cheats: {peer.cheat_mode}" if peer.cheat_mode else ""
        restarts = f", killed {peer.kills}, stopped {peer.stops}" if peer.kills or peer.stops else ""
        click.echo(f"  {peer.name:<8} {peer.role:<7} {where:<32} {peer.peer_id[-12:]}{extra}{restarts}")
    for line in result.lines():
        click.echo(line)
    if report:
        report.write_text(json.dumps(result.to_json(), indent=2))
        click.echo(f"report: {report}")
    if not result.ok:
        why = result.error or (
            f"{result.wrong} wrong result(s) accepted"
            if result.wrong
            else "no job accepted"
            if not result.accepted
            else "the ledgers disagree"
        )
        raise click.ClickException(f"netns testnet: {why}")


def _print_demo(demo: Any) -> None:
    click.echo("demo job (an MLP, 64 -> 128 -> 128 -> 10, batch 32):")
    if demo.summary is not None:
        summary = demo.summary
        timings = summary["timings_ms"]
        click.echo(f"  worker:     {summary['worker']}")
        if len(summary.get("agreeing", [])) > 1:
            click.echo(f"  agreed:     {len(summary['agreeing'])} workers ({', '.join(summary['agreeing'])})")
        click.echo(f"  hardware:   {summary['hardware_class']}")
        click.echo(f"  price paid: {summary['price_credits']} credits")
        click.echo(
            f"  timings:    {demo.elapsed_s * 1000:.0f} ms end to end "
            f"(client start {demo.client_start_s * 1000:.0f} ms before); "
            f"worker: queue {timings['queue']} ms, load {timings['load']} ms, exec {timings['exec']} ms"
        )
        click.echo(f"  output 0:   {summary['outputs'][0]['dtype']}{summary['outputs'][0]['shape']} {demo.preview} …")
        click.echo(f"  check:      {demo.check}, max abs diff vs local execution {demo.max_abs_diff}")
    click.echo(f"  result:     {'OK, equal to local execution' if demo.ok else 'FAILED: ' + str(demo.error)}")


@main.command("ledger")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="The peer's data directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def ledger_cmd(data_dir: Path | None, as_json: bool) -> None:
    """Show this peer's earnings (receipts from clients) and spending (receipts it signed), audited.

    Both chains are re-checked in full, every entry against this peer's signature; a tampered ledger is an
    error (chain_broken), not a sum. A ledger stored before entries were signed is signed once, here.
    Also lists clients that took results without paying or rejecting them (a worker declines their jobs).
    """
    import time

    from p2pcompute.accounts import ledger_report
    from p2pcompute.core.ledger import LedgerRole
    from p2pcompute.keys import KEY_FILE_NAME, default_data_dir, read_key_file
    from p2pcompute.store import STORE_FILE, open_store

    data_dir = data_dir or default_data_dir()
    if (data_dir / STORE_FILE).exists() and (data_dir / KEY_FILE_NAME).exists():
        store = open_store(data_dir / STORE_FILE)
        try:  # loading with the owner's key signs a ledger from before signatures (and audits it)
            for role in LedgerRole:
                store.load_ledger(read_key_file(data_dir / KEY_FILE_NAME), role)
        finally:
            store.close()
    report = ledger_report(data_dir, now=time.time_ns() // 1_000_000)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"peer {report['peer_id']} — ledger audit: {report['audit']}")
    for side, title, key in (("earnings", "earned from", "clients"), ("spending", "spent on", "workers")):
        data = report[side]
        click.echo(f"{side}: {data['total_credits']} credits in {data['entries']} receipt(s)")
        for row in data[key][:20]:
            click.echo(f"  {title} {row['peer']}: {row['credits']}")
    click.echo(f"results awaiting a receipt: {report['awaiting_receipt']}")
    if report["clients_owing"]:
        click.echo("clients owing (their new jobs are declined): " + ", ".join(report["clients_owing"]))


# --- jobs -----------------------------------------------------------------------------------------


@main.group()
def job() -> None:
    """Turn PyTorch code into job bundles that `p2pcompute submit` runs on the network."""


@job.command("export")
@click.argument("target", metavar="MODULE:NAME")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Bundle file to write.")
@click.option(
    "--inputs",
    "inputs_name",
    default="example_inputs",
    show_default=True,
    help="Attribute of MODULE holding the example inputs: a tuple of tensors, or a function returning one.",
)
@click.option(
    "--compare",
    type=click.Choice(["exact", "tolerance"]),
    default="tolerance",
    show_default=True,
    help="How redundant results are compared: bit for bit, or elementwise within rtol/atol.",
)
@click.option("--rtol", type=click.FloatRange(0.0, 1.0), default=1e-4, show_default=True, help="Relative tolerance.")
@click.option("--atol", type=click.FloatRange(0.0, 1e6), default=1e-5, show_default=True, help="Absolute tolerance.")
def job_export(target: str, out: Path, inputs_name: str, compare: str, rtol: float, atol: float) -> None:
    """Export NAME from MODULE, called on the module's example inputs, as a job bundle.

    \b
    MODULE is a dotted module name (importable from the current directory) or a path to a .py file;
    it is imported, so its top-level code runs.
    NAME is an nn.Module instance, an nn.Module subclass (instantiated with no arguments),
    or a function of tensors. The job computes NAME(*example_inputs), where example_inputs is
    a module-level tuple of tensors or a function returning one (--inputs picks another name).

    \b
    Example:  p2pcompute job export testnet/examples/mlp.py:model --out mlp.job
    """
    module_name, _, name = target.rpartition(":")
    if not module_name or not name:
        raise click.ClickException(f"expected MODULE:NAME (e.g. my_model.py:model), got {target!r}")
    with warnings.catch_warnings():
        # torch's own noise on a CPU-only install without numpy, and from inside torch.export
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
        from p2pcompute.client import Job
        from p2pcompute.compute.export import export_job
        from p2pcompute.core.jobspec import CompareMode, Comparison

        module = _import_target(module_name)
        program = _program(module, module_name, name)
        inputs = _example_inputs(module, module_name, inputs_name)
        exported = export_job(program, inputs, compare=Comparison(mode=CompareMode(compare), rtol=rtol, atol=atol))
        ready = Job.from_exported(exported)  # the dry run a worker does: shapes, memory, flops
    bundle = exported.bundle()
    try:
        out.write_bytes(bundle)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from exc
    spec = exported.spec
    click.echo(f"wrote {out} ({_size(len(bundle))})")
    click.echo(f"digest:     {exported.digest.hex()}")
    click.echo(f"ops:        {len(spec.nodes)}")
    click.echo(f"inputs:     {_metas(spec.inputs)}")
    click.echo(f"constants:  {len(spec.constants)} tensors, {_size(sum(m.nbytes for m in spec.constants))}")
    click.echo(f"outputs:    {', '.join(f'{dtype}{list(shape)}' for dtype, shape in ready.outputs)}")
    click.echo(f"needs:      {_size(ready.requirements.memory_bytes)} peak memory, ~{ready.requirements.flops:,} flops")
    click.echo(f"compare:    {_compare_text(exported.spec.compare)}")


def _import_target(module_name: str) -> Any:
    """Import the developer's module: a path to a .py file, else a dotted name from the current directory."""
    import importlib
    import importlib.util

    is_path = module_name.endswith(".py") or "/" in module_name
    try:
        if is_path:
            path = Path(module_name)
            if not path.is_file():
                raise click.ClickException(f"no such file: {module_name}")
            spec = importlib.util.spec_from_file_location(f"_p2pcompute_job_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise click.ClickException(f"cannot import {module_name}: not a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(path.resolve().parent))  # its sibling modules, as `python FILE` would
            try:
                spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.resolve().parent))
            return module
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # `python -m` semantics: modules in the current directory
        return importlib.import_module(module_name)
    except click.ClickException:
        raise
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"cannot import {module_name}: {exc}") from exc
    except Exception as exc:  # the developer's own code failed at import time
        raise click.ClickException(f"importing {module_name} failed: {type(exc).__name__}: {exc}") from exc


def _attribute(module: Any, module_name: str, name: str) -> Any:
    value = module
    for part in name.split("."):
        if not hasattr(value, part):
            raise click.ClickException(f"{module_name} has no attribute {name!r}")
        value = getattr(value, part)
    return value


def _program(module: Any, module_name: str, name: str) -> Any:
    from torch import nn

    value = _attribute(module, module_name, name)
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        try:
            return value()
        except Exception as exc:
            raise click.ClickException(
                f"{name}() failed ({type(exc).__name__}: {exc}): a module class must take no arguments; "
                "export an instance instead"
            ) from exc
    if callable(value) and not isinstance(value, type):
        return value
    raise click.ClickException(
        f"{module_name}:{name} is of type {type(value).__name__}: expected an nn.Module, a module class or a function"
    )


def _example_inputs(module: Any, module_name: str, inputs_name: str) -> tuple[Any, ...]:
    import torch

    if not hasattr(module, inputs_name):
        raise click.ClickException(
            f"{module_name} has no {inputs_name!r}: define {inputs_name} = (tensor, ...) or a function returning "
            "such a tuple, or name another attribute with --inputs"
        )
    value = getattr(module, inputs_name)
    if callable(value):
        try:
            value = value()
        except Exception as exc:
            raise click.ClickException(f"{inputs_name}() failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(value, torch.Tensor):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in value):
        raise click.ClickException(f"{inputs_name} must be a tuple of tensors, not {type(value).__name__}")
    return tuple(value)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _metas(metas: Any) -> str:
    return ", ".join(f"{m.dtype}{list(m.shape)}" for m in metas) + f" ({_size(sum(m.nbytes for m in metas))})"


def _compare_text(compare: Any) -> str:
    mode = str(compare.mode.value)
    return mode if mode == "exact" else f"{mode} (rtol {compare.rtol:g}, atol {compare.atol:g})"


@main.command("submit")
@click.argument("bundle", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--bootstrap",
    multiple=True,
    envvar="P2PCOMPUTE_BOOTSTRAP",
    help="Peer to join through, /ip4/…/tcp/…/p2p/<id> (repeatable; env P2PCOMPUTE_BOOTSTRAP, space-separated).",
)
@click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Run the job once per task in this file (.safetensors, or .pt/.pth read with weights_only=True), "
    "on as many workers as have room; the README's `submit --inputs` says how to lay it out.",
)
@click.option("--max-price", default="0.01", show_default=True, help="Most credits to pay for the job (each task).")
@click.option(
    "--deadline", type=click.FloatRange(min=1.0), default=60.0, show_default=True, help="Seconds (each task)."
)
@click.option(
    "--redundancy",
    type=click.IntRange(1, 16),
    help="Workers that must agree on the result [default: the client decides: one worker whose committed trace it "
    "checks, or replicas by proven work for jobs too big to check].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result summary as JSON (no progress bar).")
@click.option(
    "--save-outputs",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each output as output-<i>.pt (torch.save) and summary.json into this directory; with --inputs, "
    "each task's outputs as task-<index>.safetensors.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Client key and job records [default: client/ in $P2PCOMPUTE_HOME or the user data directory].",
)
@click.pass_context
def submit_cmd(
    ctx: click.Context,
    bundle: Path,
    bootstrap: tuple[str, ...],
    inputs_file: Path | None,
    max_price: str,
    deadline: float,
    redundancy: int | None,
    as_json: bool,
    save_outputs: Path | None,
    data_dir: Path | None,
) -> None:
    """Run a job bundle (from `p2pcompute job export`) on a worker found through the network.

    Prints the worker, the price paid, timings, the hardware class and the outputs.
    With --inputs FILE, runs it once per task of FILE (client.map: verified, paid, placed again when a worker
    fails) with a progress bar, then prints tasks done, workers used, credits, wall time and throughput.
    """
    import trio

    from p2pcompute.config import parse_price
    from p2pcompute.errors import NoWorkersError
    from p2pcompute.keys import default_data_dir

    if ctx.obj["log_level"] is None:
        _setup_logging("error")  # what goes wrong is the one error line; the network's warnings are noise here
    with warnings.catch_warnings():  # torch's noise on a CPU-only install without numpy
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        from p2pcompute.client import Job, open_client

    if not bootstrap:
        raise click.ClickException(
            "submit needs --bootstrap ADDR: the multiaddr of a running peer (`p2pcompute node run` prints it)"
        )
    parse_price(max_price)  # a bad price fails here, before any network work
    _check_addrs("bootstrap address", bootstrap, "--bootstrap (or $P2PCOMPUTE_BOOTSTRAP)", peer=True)
    _check_data_dir(data_dir or default_data_dir() / "client", "--data-dir")
    try:
        data = bundle.read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {bundle}: {exc.strerror or exc}") from exc
    job = Job.from_bundle(data)
    if inputs_file is not None:
        _submit_map(job, inputs_file, list(bootstrap), max_price, deadline, redundancy, as_json, save_outputs, data_dir)
        return

    async def run(progress: Any) -> Any:
        async with open_client(list(bootstrap), data_dir=data_dir) as client:
            if not client.node.host.get_connected_peers():
                raise DialError(
                    f"cannot reach any bootstrap peer ({' '.join(bootstrap)}): is it running, and is the network up? "
                    "(--bootstrap)"
                )
            options: dict[str, Any] = {} if redundancy is None else {"redundancy": redundancy}
            return await client.run(job, max_price=max_price, deadline=deadline, progress=progress, **options)

    progress = _ProgressBar(job.digest.hex()[:16]).update if not as_json and sys.stderr.isatty() else None
    try:
        result = trio.run(run, progress)
    except BaseException as exc:
        leaf = _leaf(exc)
        if not isinstance(leaf, NoWorkersError):
            raise
        hint = ""
        if leaf.reason is Reason.ALL_ATTEMPTS_FAILED and redundancy is None:
            hint = " (results from a worker not trusted yet need a second worker to agree; with one: --redundancy 1)"
        raise click.ClickException(f"{leaf.detail} [{leaf.reason.value}]{hint}") from exc
    summary = result.summary()
    if save_outputs is not None:
        _save_outputs(save_outputs, result.outputs, summary)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    print_result(summary, result.outputs)
    if save_outputs is not None:
        click.echo(f"outputs saved in {save_outputs}")


def _submit_map(
    job: Any,
    inputs_file: Path,
    bootstrap: list[str],
    max_price: str,
    deadline: float,
    redundancy: int | None,
    as_json: bool,
    save_outputs: Path | None,
    data_dir: Path | None,
) -> None:
    """`submit --inputs`: every task of the file through client.map, then the summary (stdout) and, when the map
    stopped at a task it could not do, that task's error as the one error line."""
    import trio

    from p2pcompute.client import open_client
    from p2pcompute.config import parse_price
    from p2pcompute.taskfile import read_task_inputs, result_line, run_map, save_task_outputs, write_summary

    inputs = read_task_inputs(inputs_file, job)  # a file that does not fit the job fails here, before any work
    if save_outputs is not None:
        try:
            save_outputs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.ClickException(f"cannot save outputs in {save_outputs}: {exc.strerror or exc}") from exc
    lines: list[dict[str, Any]] = []

    def keep(result: Any) -> None:
        if save_outputs is not None:
            try:
                save_task_outputs(save_outputs, result)
            except OSError as exc:
                raise click.ClickException(f"cannot save outputs in {save_outputs}: {exc.strerror or exc}") from exc
            lines.append(result_line(result))

    async def run(progress: Any) -> Any:
        async with open_client(bootstrap, data_dir=data_dir) as client:
            if not client.node.host.get_connected_peers():
                raise DialError(
                    f"cannot reach any bootstrap peer ({' '.join(bootstrap)}): is it running, and is the network up? "
                    "(--bootstrap)"
                )
            await client.wait_for_workers(job, parse_price(max_price))
            return await run_map(
                client,
                job,
                inputs,
                max_price=max_price,
                task_deadline=deadline,
                redundancy=redundancy,
                progress=progress,
                on_result=keep,
            )

    bar = _MapProgressBar(job.digest.hex()[:16], len(inputs)) if not as_json and sys.stderr.isatty() else None
    try:
        summary = trio.run(run, bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.stop()
    if save_outputs is not None:
        write_summary(save_outputs, summary, lines)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        click.echo(f"job:        {job.digest.hex()} ({len(inputs)} tasks from {inputs_file}: {inputs.layout})")
        for line in summary.lines():
            click.echo(line)
        if save_outputs is not None:
            click.echo(f"outputs saved in {save_outputs} (task-<index>.safetensors, summary.json)")
    if summary.failed:
        hint = ""
        if "all_attempts_failed" in summary.error and redundancy is None:
            hint = " (results from a worker not trusted yet need a second worker to agree; with one: --redundancy 1)"
        raise click.ClickException(
            f"task {summary.failed_index} could not be done, the map stopped: {summary.error}{hint}"
        )


class _MapProgressBar:
    """A rich progress bar on stderr for a map: tasks done of the total, elapsed, ETA, in flight, workers, credits."""

    def __init__(self, name: str, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn(f"job {name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task("tasks", total=total, info="finding workers")
        self.progress.start()

    def update(self, event: Any) -> None:
        from decimal import Decimal

        info = f"{event.in_flight} running, {event.workers} workers, {Decimal(event.credits) / 1_000_000} credits"
        if event.retried:
            info += f", {event.retried} placed again"
        self.progress.update(self.task, completed=event.done, info=info)

    def stop(self) -> None:
        self.progress.stop()


class _ProgressBar:
    """A rich progress bar on stderr fed by the client's progress events (one line per phase change)."""

    def __init__(self, name: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn(f"job {name}"),
            TextColumn("[bold]{task.description:<12}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task("starting", total=None)
        self.progress.start()

    def update(self, event: Any) -> None:
        total = event.total if event.total > 0 else None
        self.progress.update(self.task, description=event.phase, completed=event.done, total=total)
        if event.phase == "done":
            self.progress.stop()


def print_result(summary: dict[str, Any], outputs: list[Any]) -> None:
    """The human-readable result of a job (shared by `submit` and the testnet demo)."""
    timings = summary["timings_ms"]
    click.echo(f"job:        {summary['job_digest']}")
    click.echo(f"worker:     {summary['worker']}")
    agreeing = summary.get("agreeing", [])
    if len(agreeing) > 1:
        click.echo(f"agreed:     {len(agreeing)} workers ({', '.join(a[-12:] for a in agreeing)})")
    click.echo(f"price paid: {summary['price_credits']} credits")
    click.echo(f"hardware:   {summary['hardware_class']}")
    click.echo(
        f"timings:    {summary['elapsed_ms']} ms end to end; worker: queue {timings['queue']} ms, "
        f"load {timings['load']} ms, exec {timings['exec']} ms, total {timings['total']} ms"
    )
    for i, tensor in enumerate(outputs):
        click.echo(f"output {i}:   {str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)} {_preview(tensor)}")


def _preview(tensor: Any, count: int = 6) -> str:
    flat = tensor.detach().reshape(-1)
    values = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in flat[:count].tolist()]
    return "[" + ", ".join(values) + (", …]" if flat.numel() > count else "]")


def _save_outputs(directory: Path, outputs: list[Any], summary: dict[str, Any]) -> None:
    import torch

    try:
        directory.mkdir(parents=True, exist_ok=True)
        for i, tensor in enumerate(outputs):
            torch.save(tensor, directory / f"output-{i}.pt")
        (directory / "summary.json").write_text(json.dumps(summary, indent=2))
    except OSError as exc:
        raise click.ClickException(f"cannot save outputs in {directory}: {exc.strerror or exc}") from exc


def print_table(rows: list[dict[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    for column in rows[0] if rows else ["peer", "devices", "TFLOPS", "price/s", "slots", "advert age"]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console(width=120).print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
