#!/usr/bin/env bash
# The main demo, from a fresh checkout: set up .venv, then start a local testnet of 5 real peer
# processes on 127.0.0.1, wait until every peer holds every other peer's signed GPU advert, print the
# market and the convergence time, and stop them all. Extra arguments go to `p2pcompute testnet`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec .venv/bin/p2pcompute testnet --scenario testnet/scenarios/small.toml --report testnet-report.json "$@"
