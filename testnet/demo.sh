#!/usr/bin/env bash
# The main demo, from a fresh checkout: set up .venv, then create and show a peer identity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
export P2PCOMPUTE_HOME=$home
.venv/bin/p2pcompute keys new
.venv/bin/p2pcompute keys show
