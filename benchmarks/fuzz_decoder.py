"""A longer run of the decoder fuzz harness: only RemoteProtocolError may come out.

    .venv/bin/python -m benchmarks.fuzz_decoder --inputs 200000

Prints inputs tried per target, the rejection reasons seen, and inputs per second.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time

from p2pcompute.core.identity import KeyPair
from p2pcompute.errors import RemoteProtocolError
from tests.core.fuzzing import FUZZ_TARGETS, mutations, seed_corpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    corpus = seed_corpus(KeyPair.from_seed(b"\x09" * 32))
    reasons: collections.Counter[str] = collections.Counter()
    accepted = 0
    start = time.perf_counter()
    for data in mutations(rng, corpus, args.inputs):
        for target in FUZZ_TARGETS.values():
            try:
                target(data)
                accepted += 1
            except RemoteProtocolError as exc:
                reasons[exc.reason.value] += 1
    elapsed = time.perf_counter() - start
    calls = args.inputs * len(FUZZ_TARGETS)
    rate = calls / elapsed
    print(f"inputs: {args.inputs} x {len(FUZZ_TARGETS)} targets = {calls} calls in {elapsed:.1f} s ({rate:,.0f}/s)")
    print(f"accepted (valid after mutation): {accepted}; rejected: {sum(reasons.values())}; other exceptions: 0")
    for reason, n in reasons.most_common():
        print(f"  {reason:<24} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
