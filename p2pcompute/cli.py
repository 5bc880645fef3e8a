"""The ``p2pcompute`` command."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from p2pcompute import __version__
from p2pcompute.errors import P2PComputeError
from p2pcompute.keys import default_key_path, generate_keypair, read_key_file, write_key_file

F = TypeVar("F", bound=Callable[..., Any])

_LOG_LEVELS = ["debug", "info", "warning", "error"]


def _friendly_errors(func: F) -> F:
    """Turn a P2PComputeError into a one-line message and exit status 1 (no traceback)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except P2PComputeError as exc:
            raise click.ClickException(f"{exc.detail or exc.reason.value} [{exc.reason.value}]") from exc

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="p2pcompute")
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default=None,
    envvar="P2PCOMPUTE_LOG_LEVEL",
    help="Verbosity of log messages on stderr [default: warning; info for `node run`].",
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
@_friendly_errors
def keys_new(path: Path | None, force: bool) -> None:
    """Create a new identity key (file mode 0600)."""
    path = path or default_key_path()
    keypair = generate_keypair()
    write_key_file(path, keypair, force=force)
    click.echo(f"created {path}")
    click.echo(f"peer id: {keypair.peer_id}")


@keys.command("show")
@_path_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_friendly_errors
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
@click.option("--price", help="Credits per job-second, e.g. 0.002.")
@click.option("--slots", type=int, help="Jobs run at once.")
@click.option("--advertise-interval", type=float, help="Seconds between adverts.")
@click.option("--advert-ttl", type=float, help="Seconds an advert stays valid.")
@click.option("--status-port", type=int, help="Port of the status/metrics endpoint on 127.0.0.1 (0: any).")
@click.option("--mdns/--no-mdns", default=None, help="Find peers on the local network with mDNS.")
@click.option("--connections", type=(int, int), default=None, help="Connection watermarks LOW HIGH [default: 16 96].")
@click.option("--no-benchmark", is_flag=True, default=None, help="Skip the matmul benchmark of the hardware probe.")
@click.option("--json-events", is_flag=True, help="Also print machine-readable JSON lines (used by the testnet).")
@click.pass_context
@_friendly_errors
def node_run(
    ctx: click.Context,
    config_file: Path | None,
    data_dir: Path | None,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    price: str | None,
    slots: int | None,
    advertise_interval: float | None,
    advert_ttl: float | None,
    status_port: int | None,
    mdns: bool | None,
    connections: tuple[int, int] | None,
    no_benchmark: bool | None,
    json_events: bool,
) -> None:
    """Run a peer until SIGINT/SIGTERM; print its peer id and the addresses others can dial."""
    import trio

    from p2pcompute.config import load_config

    overrides: dict[str, Any] = {
        "data_dir": data_dir,
        "listen": listen or None,
        "bootstrap": bootstrap or None,
        "price": price,
        "slots": slots,
        "advertise_interval": advertise_interval,
        "advert_ttl": advert_ttl,
        "status_port": status_port,
        "mdns": mdns,
        "connections_low": connections[0] if connections else None,
        "connections_high": connections[1] if connections else None,
        "probe_benchmark": False if no_benchmark else None,
        "log_level": ctx.obj["log_level"],
    }
    config = load_config(config_file, overrides)
    _setup_logging(config.log_level)
    trio.run(_run_node, config, json_events)


async def _run_node(config: Any, json_events: bool) -> None:
    import signal

    import trio

    from p2pcompute.node import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve, config)
            click.echo(f"peer id: {info.peer_id}")
            for addr in info.addrs:
                click.echo(f"listening: {addr}")
            click.echo(f"status: {info.status_url}")
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
    if info.exists():
        return str(json.loads(info.read_text())["status_url"])
    return f"http://127.0.0.1:{DEFAULT_STATUS_PORT}/status"


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
@_friendly_errors
def testnet_cmd(
    peers: int | None,
    scenario: Path | None,
    report: Path | None,
    timeout: float | None,
    base_dir: Path | None,
    advertise_interval: float | None,
) -> None:
    """Start real peers on 127.0.0.1 and wait until every peer holds every other peer's advert.

    Exits 0 when the network converged, 1 when it did not. Options override the scenario file.
    """
    import trio

    from p2pcompute.node import advert_table
    from p2pcompute.testnet import load_scenario, run_testnet

    config = load_scenario(
        scenario,
        {"peers": peers, "timeout": timeout, "advertise_interval": advertise_interval, "dir": base_dir},
    )
    click.echo(f"starting {config.peers} peers on 127.0.0.1 ...")

    def started(procs: list[Any]) -> None:
        click.echo(f"all {len(procs)} peers ready; bootstrap: {procs[0].addrs[0]}")

    result = trio.run(lambda: run_testnet(config, on_started=started))
    print_table(advert_table({"market": result.market}))
    counts = sorted(result.adverts_per_peer.values())
    click.echo(f"startup: {result.startup_s:.2f} s; adverts held per peer: min {counts[0]}, max {counts[-1]}")
    if report:
        report.write_text(json.dumps(result.to_json(), indent=2))
        click.echo(f"report: {report}")
    if not result.converged:
        raise click.ClickException(f"not converged within {config.timeout_s:.0f} s: adverts per peer {counts}")
    click.echo(
        f"converged: every peer holds all {config.peers} adverts, "
        f"{result.convergence_s:.2f} s after the last peer was ready"
    )


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
