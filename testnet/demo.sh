#!/usr/bin/env bash
# The main demo, from a fresh checkout: set up .venv, then start a local testnet of 5 real peer
# processes on loopback (each a worker with a warm executor process), wait until every peer holds every
# other peer's signed GPU advert, then run a demo job end to end: a client bootstrapped at the first peer
# finds workers through the network, runs a small MLP on them, checks the result equals local execution,
# and pays. Then a verification trial: 20 more jobs while one worker cheats (random outputs); the cheater's
# first wrong result fails the client's check of its committed trace: rejected, reported with evidence any peer
# can redo, and never chosen again.
# Prints the market, the results and the timings; writes testnet-report.json; exits non-zero if the network
# did not converge, the job failed or differed, or a wrong result was accepted. Extra arguments go to
# `p2pcompute testnet`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec .venv/bin/p2pcompute testnet --scenario testnet/scenarios/small.toml --demo \
    --jobs 20 --cheaters 1 --cheat-mode random --report testnet-report.json "$@"
