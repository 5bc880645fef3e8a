#!/usr/bin/env bash
# A 30-peer local testnet (set up .venv first if needed); the JSON report lands in testnet-report-30.json.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/p2pcompute ] || bash .ci/setup
exec .venv/bin/p2pcompute testnet --scenario testnet/scenarios/thirty.toml --report testnet-report-30.json "$@"
