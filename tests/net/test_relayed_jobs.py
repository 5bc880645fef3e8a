"""Jobs to a worker no one can dial directly: it holds a slot on a relay, and the client reaches it through it.

Loopback has no NAT, so the worker is made undialable from the client: it announces a port where nothing listens
(as a broken port forward would), says ``nat = "private"``, and the client's connection gate refuses the worker's IP
(127.0.0.2), which the DHT and Identify would otherwise hand it. Real hosts and executors in one trio process; the
namespace testnet (tests/e2e/test_netns.py) runs the same behind a real NAT.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from p2pcompute.client import Client
from p2pcompute.config import NodeConfig
from p2pcompute.net.reach import is_relayed
from p2pcompute.testing.jobs import WorkerPeer, client_of, cluster
from tests.net.test_jobs import EXPENSIVE, MAX_PRICE, TEST_TIMEOUT_S, mlp_job


async def _unreachable(host: IHost, worker: WorkerPeer) -> None:
    """From now on the client cannot open a connection to the worker's own IP (nor take one from it)."""
    host.get_network().connection_gate.add_to_deny_list("127.0.0.2")  # type: ignore[attr-defined]
    await host.disconnect(ID(worker.peer.raw))  # whatever discovery connected before


async def _wait_for_relayed_advert(client: Client, worker: WorkerPeer) -> None:
    def relayed_advert() -> bool:
        return any(
            e.peer_id == worker.peer and any("/p2p-circuit/" in a for a in e.advert.addrs)
            for e in client.node.market.adverts(client.clock())
        )

    await client.node.wait_for(relayed_advert)


def _behind_relay(dead_port: int, *, hole_punch: bool) -> Callable[[int, NodeConfig], NodeConfig]:
    def configure(index: int, config: NodeConfig) -> NodeConfig:
        if index == 0:  # the bootstrap peer: public, offers relaying, priced out of the jobs
            return replace(config, nat="public", relay_service=True, price_per_second=EXPENSIVE)
        return replace(
            config,
            nat="private",
            relays=config.bootstrap,
            announce=(f"/ip4/127.0.0.{index + 1}/tcp/{dead_port}",),  # a forward that goes nowhere
            hole_punch=hole_punch,
        )

    return configure


async def test_a_worker_reachable_only_through_a_relay_serves_a_verified_job(tmp_path: Path) -> None:
    model, x, job = mlp_job()
    with socket.socket() as dead, trio.fail_after(TEST_TIMEOUT_S):
        dead.bind(("127.0.0.2", 0))
        configure = _behind_relay(dead.getsockname()[1], hole_punch=False)
        async with cluster(tmp_path, 2, configure=configure) as workers, client_of(workers, tmp_path / "c") as client:
            worker = workers[1]
            await _unreachable(client.node.host, worker)
            await _wait_for_relayed_advert(client, worker)
            result = await client.run(job, max_price=MAX_PRICE, deadline=30, redundancy=1)
            assert result.worker == worker.peer
            assert is_relayed(client.node.host, ID(worker.peer.raw))  # no direct path was ever made
    with torch.no_grad():
        assert torch.equal(result.outputs[0], model(x))


async def test_with_hole_punching_the_relayed_connection_becomes_direct_and_the_job_completes(tmp_path: Path) -> None:
    model, x, job = mlp_job()
    with socket.socket() as dead, trio.fail_after(TEST_TIMEOUT_S):
        dead.bind(("127.0.0.2", 0))
        configure = _behind_relay(dead.getsockname()[1], hole_punch=True)
        async with cluster(tmp_path, 2, configure=configure) as workers, client_of(workers, tmp_path / "c") as client:
            worker = workers[1]
            await _unreachable(client.node.host, worker)
            await _wait_for_relayed_advert(client, worker)
            result = await client.run(job, max_price=MAX_PRICE, deadline=30, redundancy=1)
            assert result.worker == worker.peer
            # The worker dials the (public) client back: DCUtR's direct upgrade replaces the relayed connection.
            peer = ID(worker.peer.raw)
            while is_relayed(client.node.host, peer) or not client.node.host.get_network().get_connections(peer):
                await trio.sleep(0.1)
            again = await client.run(job, max_price=MAX_PRICE, deadline=30, redundancy=1)
            assert torch.equal(again.outputs[0], result.outputs[0])
    with torch.no_grad():
        assert torch.equal(result.outputs[0], model(x))
