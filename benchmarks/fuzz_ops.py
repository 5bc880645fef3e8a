"""The op fuzzer: every allow-listed op with adversarial arguments, run as jobs in sacrificial child processes.

    .venv/bin/python -m benchmarks.fuzz_ops --cases 100000 --seed 1 [--children 2]
    .venv/bin/python -m benchmarks.fuzz_ops --seed 1 --case 4711      # reproduce one case, in this process

Prints ops x cases, crashes (deaths by signal), canary reads (an output that changes with the bytes around an
argument's view), timeouts, refusals by stage and reason, and a per-op table; exits 1 when anything was found.
Case generation, the canary scheme and the children are in ``p2pcompute/testing/fuzz_ops.py``.
"""

from __future__ import annotations

import argparse
import sys

from p2pcompute.testing.fuzz_ops import CASE_TIMEOUT_S, FINDING_KINDS, make_case, run_case, run_fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="first case index")
    parser.add_argument("--children", type=int, default=1, help="child processes running cases in parallel")
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S, help="seconds one case may take")
    parser.add_argument("--case", type=int, default=None, help="run only this case, in this process, and show it")
    parser.add_argument("--verbose", action="store_true", help="let the children's stderr through")
    args = parser.parse_args()
    if args.case is not None:
        case = make_case(args.seed, args.case)
        print(case.describe())
        for node in case.specs[0].nodes:
            print("  ", node)
        outcome = run_case(case)
        print(outcome)
        return 1 if outcome.kind in FINDING_KINDS else 0

    def progress(done: int) -> None:
        if done % 10_000 == 0:
            print(f"  {done} cases", file=sys.stderr, flush=True)

    report = run_fuzz(
        cases=args.cases,
        seed=args.seed,
        children=args.children,
        start=args.start,
        case_timeout=args.timeout,
        quiet=not args.verbose,
        progress=progress,
    )
    print(f"command: python -m benchmarks.fuzz_ops --cases {args.cases} --seed {args.seed} --children {args.children}")
    print(report.format())
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
