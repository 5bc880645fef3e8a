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
    default="warning",
    show_default=True,
    envvar="P2PCOMPUTE_LOG_LEVEL",
    help="Verbosity of log messages on stderr.",
)
def main(log_level: str) -> None:
    """p2pcompute: sell idle GPU time, or run PyTorch work on other people's GPUs, peer to peer."""
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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


if __name__ == "__main__":  # pragma: no cover
    main()
