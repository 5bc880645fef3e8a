"""Test-wide settings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Hypothesis' deadline and "too slow" health check are wall-clock judgements: on a shared 2-core machine
# (or next to a running testnet) they fail tests that are correct. Correctness is what tests check;
# speed is measured in benchmarks/.
settings.register_profile("p2pcompute", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("p2pcompute")
