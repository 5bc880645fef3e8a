"""Factories for real py-libp2p nodes on 127.0.0.1, all in the caller's trio run (tests, benchmarks).

Hosts start one after another (a few ms each) and close in parallel (0.8.1's close costs ~0.1-0.2 s
per connection in hard-coded sleeps). Seeds derive from a name (a test's id), so peer ids, and with
them DHT distances, are the same on every run.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost

from p2pcompute.net.discovery import Discovery, DiscoveryConfig
from p2pcompute.net.gossip import Gossip, GossipConfig
from p2pcompute.net.host import HostConfig, connect, host_addrs, open_host

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio-stubs that shadow trio's own types and do not
    # re-export TaskStatus.
    from trio_typing import TaskStatus

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
#: Upper bound for any single condition a test waits on.
WAIT_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.01


@dataclass(frozen=True, slots=True)
class NodeConfig:
    host: HostConfig = field(default_factory=HostConfig)
    #: None: no DHT service on the node.
    discovery: DiscoveryConfig | None = None
    #: None: no gossip service on the node.
    gossip: GossipConfig | None = None


@dataclass(frozen=True, slots=True)
class Node:
    host: IHost
    discovery: Discovery | None
    gossip: Gossip | None

    @property
    def addr(self) -> str:
        return host_addrs(self.host)[0]

    @property
    def dht(self) -> Discovery:
        assert self.discovery is not None
        return self.discovery

    @property
    def pubsub(self) -> Gossip:
        assert self.gossip is not None
        return self.gossip


def seed_for(name: str, index: int) -> bytes:
    return hashlib.sha256(f"p2pcompute-tests/{name}/{index}".encode()).digest()


async def _serve_node(
    seed: bytes,
    config: NodeConfig,
    stop: trio.Event,
    *,
    task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_host(seed, LOOPBACK, config=config.host) as host, trio.open_nursery() as services:
        gossip = discovery = None
        if config.gossip is not None:  # before any dial: pubsub only hears of later connections
            gossip = Gossip(host, config.gossip)
            await services.start(gossip.run)
        if config.discovery is not None:
            discovery = Discovery(host, config.discovery)
            await services.start(discovery.run)
        task_status.started(Node(host, discovery, gossip))
        await stop.wait()
        services.cancel_scope.cancel()


@asynccontextmanager
async def open_nodes(name: str, configs: Sequence[NodeConfig]) -> AsyncIterator[list[Node]]:
    """One node per config; all closed in parallel on exit."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        try:
            yield [
                await nursery.start(_serve_node, seed_for(name, i), config, stop) for i, config in enumerate(configs)
            ]
        finally:
            stop.set()


async def wait_until(predicate: Callable[[], bool], *, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Wait for a condition that no library event announces (fails the test after ``timeout_s``)."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(POLL_INTERVAL_S)


async def connect_line(nodes: Sequence[Node]) -> None:
    """Dial node i -> node i+1, and wait until both ends of every link see the connection."""
    for a, b in itertools.pairwise(nodes):
        assert await connect(a.host, b.addr) == b.host.get_id()
    await wait_until(lambda: all(a.host.get_id() in b.host.get_connected_peers() for a, b in itertools.pairwise(nodes)))


def tcp_port(host: IHost) -> int:
    return int(host.get_transport_addrs()[0].value_for_protocol("tcp") or 0)


async def timed(awaitable: Awaitable[object]) -> tuple[object, float]:
    start = trio.current_time()
    result = await awaitable
    return result, trio.current_time() - start
