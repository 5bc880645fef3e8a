"""P4: verification under attack — wrong results accepted, compute overhead, jobs until each cheater is caught.

    .venv/bin/python -m benchmarks.verification --workers 20 --cheat-fraction 0.3 --jobs 500

Starts the workers as real peers in this trio process (``p2pcompute.node.serve``: libp2p host, gossip, DHT,
a warm executor child each, the data channel, SQLite), a share of them cheating: half of the cheaters collude
(the same wrong output), the rest cycle through ``random``, ``zeros``, ``stale`` and ``lazy``. A client runs the
jobs with adaptive replication (``p2pcompute.trial``), then the same number of jobs again with no cheaters on a
fresh testnet once trust is earned, and prints both side by side with the goals.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from p2pcompute.testing.jobs import cluster
from p2pcompute.trial import TrialConfig, TrialReport, run_trial

OTHER_MODES = ("random", "zeros", "stale", "lazy")


@dataclass
class _Peer:
    peer_id: str
    cheat_mode: str
    worker: object
    alive: bool = True

    async def kill(self) -> None:
        self.alive = False
        await self.worker.stop()  # type: ignore[attr-defined]


def _modes(workers: int, cheaters: int) -> list[str]:
    colluders = cheaters // 2
    modes = ["collude"] * colluders + [OTHER_MODES[i % len(OTHER_MODES)] for i in range(cheaters - colluders)]
    # spread cheaters over the indices (worker 0 is the bootstrap and stays honest)
    out = [""] * workers
    for k, mode in enumerate(modes):
        out[1 + (k * (workers - 1)) // max(1, cheaters)] = mode
    return out


async def _trial(workers: int, cheaters: int, jobs: int, warmup: int, seed: int, kill_rate: float) -> TrialReport:
    from p2pcompute.testing.jobs import client_of

    modes = _modes(workers, cheaters)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)

        def configure(index: int, config):  # type: ignore[no-untyped-def]
            from dataclasses import replace

            return replace(config, cheat_mode=modes[index], advertise_interval=30.0, advert_ttl=120.0)

        started = time.monotonic()
        async with cluster(base, workers, configure=configure) as peers:
            print(f"  {workers} workers ready in {time.monotonic() - started:.1f} s", flush=True)
            async with client_of(peers, base / "client", wait_for=workers) as client:
                trial_peers = [_Peer(str(p.peer), modes[i], p) for i, p in enumerate(peers)]
                if warmup:
                    honest = [p for p in trial_peers if not p.cheat_mode]
                    await run_trial(client, honest, TrialConfig(jobs=warmup, seed=seed + 1))
                return await run_trial(client, trial_peers, TrialConfig(jobs=jobs, seed=seed, kill_rate=kill_rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--cheat-fraction", type=float, default=0.3)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-rate", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None, help="also write both reports here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("libp2p", "multiaddr", "p2pcompute"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cheaters = round(args.workers * args.cheat_fraction)
    print(f"P4 attacked: {args.workers} workers, {cheaters} cheating, {args.jobs} jobs", flush=True)
    attacked = trio.run(_trial, args.workers, cheaters, args.jobs, 0, args.seed, args.kill_rate)
    print(f"P4 clean: {args.workers} honest workers, {args.jobs} jobs after {args.jobs} warm-up jobs", flush=True)
    clean = trio.run(_trial, args.workers, 0, args.jobs, args.jobs, args.seed, 0.0)
    print()
    print(f"{'':38} {'attacked':>12} {'no cheaters':>12}   goal")
    rows = [
        ("jobs accepted / run", f"{attacked.accepted}/{attacked.jobs}", f"{clean.accepted}/{clean.jobs}", ""),
        (
            "wrong results accepted",
            f"{100 * attacked.wrong_accepted / max(1, attacked.accepted):.2f}%",
            f"{100 * clean.wrong_accepted / max(1, clean.accepted):.2f}%",
            "<= 0.1%",
        ),
        ("compute overhead, whole run", f"{attacked.overhead():.3f}x", f"{clean.overhead():.3f}x", ""),
        (
            "compute overhead, second half",
            f"{attacked.overhead(second_half=True):.3f}x",
            f"{clean.overhead(second_half=True):.3f}x",
            "<= 1.3x / <= 1.15x",
        ),
        ("honest workers flagged", str(len(attacked.honest_flagged)), str(len(clean.honest_flagged)), "0"),
        ("elapsed", f"{attacked.elapsed_s:.1f} s", f"{clean.elapsed_s:.1f} s", ""),
    ]
    for name, a, c, goal in rows:
        print(f"{name:38} {a:>12} {c:>12}   {goal}")
    caught = [c for c in attacked.cheaters.values() if c["detected"]]
    print(f"cheaters caught: {len(caught)}/{len(attacked.cheaters)}")
    for peer_id, c in attacked.cheaters.items():
        print(f"  {peer_id[-8:]} {c['mode']:8} jobs {c['jobs']:3}  caught after {c['jobs_until_detected']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"attacked": attacked.to_json(), "clean": clean.to_json()}, indent=2))


if __name__ == "__main__":
    main()
