"""The shared test harnesses let an exception raised in their body out.

The hazard: a helper that cancels its own nursery (``finally: nursery.cancel_scope.cancel()``) while the body's
exception unwinds code that awaits inside that nursery (a host's or a server's exit). The first checkpoint there
raises ``trio.Cancelled``, which replaces the exception, and the cancelled nursery then absorbs the Cancelled: the
exception is gone and a test whose assertion failed passes. Things whose exit awaits belong outside the nursery
that is cancelled (or the services stop on an event instead).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2pcompute.net.discovery import DiscoveryConfig
from p2pcompute.net.gossip import GossipConfig
from p2pcompute.testing import jobs, net
from p2pcompute.trial import Adversary, _cluster_peers

TEST_TIMEOUT_S = 120.0  # worker starts (an executor child each) on a loaded 2-core machine


class Probe(Exception):
    """What a test body raises (a failed assertion, say)."""


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


async def _assert_propagates(helper: AbstractAsyncContextManager[object]) -> None:
    """Raise a :class:`Probe` in ``helper``'s body: it must come out (a trio nursery may wrap it in groups)."""
    probe = Probe("raised in the body")
    with pytest.raises(BaseException) as caught:  # which one: checked below
        async with helper:
            raise probe
    assert any(leaf is probe for leaf in _leaves(caught.value)), f"{probe!r} was replaced by {caught.value!r}"


@asynccontextmanager
async def _awaits_on_exit() -> AsyncIterator[None]:
    try:
        yield
    finally:
        await trio.sleep(0)  # a checkpoint, as a host's close has


@asynccontextmanager
async def _swallowing() -> AsyncIterator[None]:
    """The bad pattern: something whose exit awaits, entered inside the nursery that ``finally`` cancels."""
    async with trio.open_nursery() as nursery, _awaits_on_exit():
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def test_the_check_catches_a_helper_that_swallows() -> None:
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        await _assert_propagates(_swallowing())


async def test_open_nodes() -> None:
    config = net.NodeConfig(gossip=GossipConfig(), discovery=DiscoveryConfig())

    @asynccontextmanager
    async def connected() -> AsyncIterator[None]:
        async with net.open_nodes("test_harness/open_nodes", [config, config]) as nodes:
            await net.connect_line(nodes)  # services running, a connection to close
            yield

    with trio.fail_after(TEST_TIMEOUT_S):
        await _assert_propagates(connected())


async def test_cluster(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        await _assert_propagates(jobs.cluster(tmp_path, 1))


async def test_client_of(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with jobs.cluster(tmp_path, 1) as workers:
            await _assert_propagates(jobs.client_of(workers, tmp_path / "client", wait_for=1))


async def test_the_trials_cluster(tmp_path: Path) -> None:
    """run_cluster_trial's workers: a cluster inside a nursery that is cancelled on the way out."""
    with trio.fail_after(TEST_TIMEOUT_S):
        await _assert_propagates(_cluster_peers(tmp_path, 1, Adversary()))
