"""Fixtures for the network tests; the node factories live in :mod:`p2pcompute.testing.net`."""

from __future__ import annotations

import pytest


@pytest.fixture
def test_name(request: pytest.FixtureRequest) -> str:
    """Seeds derive from it, so every test has its own peer ids, the same on every run."""
    return str(request.node.nodeid)
