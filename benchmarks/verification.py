"""P4: verification under attack — wrong results accepted, compute overhead, jobs until each cheater is caught.

    .venv/bin/python -m benchmarks.verification --peers 20 --cheaters 6 --jobs 500

Two local testnets of real peer processes (``p2pcompute.testnet.run_testnet``), one after the other: the first
with ``--cheaters`` workers cheating (``mixed``: half of them collude, the rest return random, zero, stale or
half-done outputs), the second with none, measured after as many warm-up jobs (trust earned). In each, a
client runs ``--jobs`` jobs with adaptive replication and
compares every accepted result with the truth (``p2pcompute.trial``). Prints both side by side with the goals.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import trio

from p2pcompute.testnet import TestnetConfig, run_testnet
from p2pcompute.trial import TrialReport


def _trial(peers: int, cheaters: int, jobs: int, kill_rate: float, warmup: int = 0) -> TrialReport:
    config = TestnetConfig(
        peers=peers, jobs=jobs, cheaters=cheaters, cheat_mode="mixed", kill_rate=kill_rate, warmup=warmup
    )
    report = trio.run(run_testnet, config)
    if report.trial is None:
        raise SystemExit(f"the testnet did not converge (adverts per peer: {report.adverts_per_peer})")
    return report.trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=20, help="worker peers (each a process) [20]")
    parser.add_argument("--cheaters", type=int, default=6, help="cheating workers in the first run [6]")
    parser.add_argument("--jobs", type=int, default=500, help="jobs per run [500]")
    parser.add_argument("--kill-rate", type=float, default=0.0, help="chance per job of killing a worker [0]")
    parser.add_argument("--json", type=Path, default=None, help="also write both trial reports here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    for name in ("libp2p", "multiaddr"):  # the client's DHT logs every clean end of stream
        logging.getLogger(name).setLevel(logging.CRITICAL)
    print(f"P4 attacked: {args.peers} workers, {args.cheaters} cheating (mixed), {args.jobs} jobs", flush=True)
    attacked = _trial(args.peers, args.cheaters, args.jobs, args.kill_rate)
    print(f"P4 clean: {args.peers} honest workers, {args.jobs} jobs after {args.jobs} warm-up jobs", flush=True)
    clean = _trial(args.peers, 0, args.jobs, 0.0, warmup=args.jobs)
    print()
    print(f"{'':34} {'attacked':>12} {'no cheaters':>12}   goal")
    rows = [
        ("jobs accepted / run", f"{attacked.accepted}/{attacked.jobs}", f"{clean.accepted}/{clean.jobs}", ""),
        (
            "wrong results accepted",
            f"{100 * attacked.wrong_accepted / max(1, attacked.accepted):.2f}%",
            f"{100 * clean.wrong_accepted / max(1, clean.accepted):.2f}%",
            "<= 0.1%",
        ),
        ("compute per job, whole run", f"{attacked.overhead():.3f}x", f"{clean.overhead():.3f}x", ""),
        (
            "compute per job, second half",
            f"{attacked.overhead(second_half=True):.3f}x",
            f"{clean.overhead(second_half=True):.3f}x",
            "<= 1.3x / <= 1.15x",
        ),
        ("honest workers flagged", str(len(attacked.honest_flagged)), str(len(clean.honest_flagged)), "0"),
        ("trial time", f"{attacked.elapsed_s:.1f} s", f"{clean.elapsed_s:.1f} s", ""),
    ]
    for name, a, c, goal in rows:
        print(f"{name:34} {a:>12} {c:>12}   {goal}")
    caught = [c for c in attacked.cheaters.values() if c["detected"]]
    print(f"cheaters caught: {len(caught)}/{len(attacked.cheaters)}")
    for peer_id, c in attacked.cheaters.items():
        print(f"  ...{peer_id[-8:]} {c['mode']:8} in {c['jobs']:3} jobs, caught after {c['jobs_until_detected']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"attacked": attacked.to_json(), "clean": clean.to_json()}, indent=2))


if __name__ == "__main__":
    main()
