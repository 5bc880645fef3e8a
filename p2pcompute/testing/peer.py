"""A testnet's cheating peer: ``p2pcompute node run`` with an adversary in front of its executor.

Usage::

    python -m p2pcompute.testing.peer [--log-level L] --cheat-mode MODE [--cheat-honest-jobs K]
        [--cheat-ring-dir DIR] [--cheat-unreplicated-rate R] -- <the options of `p2pcompute node run`>

Everything after ``--`` is parsed by ``node run``'s own command and run by the same code
(:func:`p2pcompute.cli.run_node`), with ``serve(..., wrap_executor=CheatSettings(...).wrap_executor)``: the only
way a process peer cheats. The production command has no cheat options. ``p2pcompute.testnet`` starts its cheaters
here; modes are those of :mod:`p2pcompute.testing.adversary`.
"""

from __future__ import annotations

from pathlib import Path

import click

from p2pcompute.cli import _LOG_LEVELS, _setup_logging, node_run, one_line_errors, run_node
from p2pcompute.config import CHEAT_MODES
from p2pcompute.testing.adversary import CheatSettings

__all__ = ["main"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default=None,
    envvar="P2PCOMPUTE_LOG_LEVEL",
    help="As `p2pcompute --log-level` [default: info, as for `node run`].",
)
@click.option("--cheat-mode", type=click.Choice(CHEAT_MODES), required=True, help="How this worker cheats.")
@click.option("--cheat-honest-jobs", type=int, default=0, show_default=True, help="Honest for its first K jobs.")
@click.option(
    "--cheat-ring-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The group cheaters' side channel (ring: required).",
)
@click.option(
    "--cheat-unreplicated-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="ring: chance of cheating on a job it seems to run alone.",
)
@click.argument("node_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def main(
    ctx: click.Context,
    log_level: str | None,
    cheat_mode: str,
    cheat_honest_jobs: int,
    cheat_ring_dir: Path | None,
    cheat_unreplicated_rate: float,
    node_args: tuple[str, ...],
) -> None:
    """Run a cheating peer (testnets only): the options before -- say how it cheats, those after it are the
    options of `p2pcompute node run`."""
    _setup_logging(log_level or "warning")
    with one_line_errors("testing.peer"):
        settings = CheatSettings(
            mode=cheat_mode,
            honest_jobs=cheat_honest_jobs,
            ring_dir=cheat_ring_dir,
            unreplicated_rate=cheat_unreplicated_rate,
        ).validate()
        with node_run.make_context(f"{ctx.command_path} [CHEAT OPTIONS] --", list(node_args)) as sub:
            run_node(log_level, wrap_executor=settings.wrap_executor, **sub.params)


if __name__ == "__main__":  # pragma: no cover
    main()
