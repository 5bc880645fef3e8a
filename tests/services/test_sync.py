"""p2pcompute.services.sync: a peer fetches the adverts another holds (both sides), at start and on request; the
protocol is served only while the server runs. The bound on concurrent syncs: tests/net/test_node.py."""

from __future__ import annotations

import pytest
import trio
from libp2p.host.exceptions import StreamFailure

from p2pcompute.core.adverts import MarketView
from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair
from p2pcompute.net.protocols import ADVERTS_SYNC_PROTOCOL
from p2pcompute.services.changes import Changes
from p2pcompute.services.sync import SyncClient, SyncServer
from p2pcompute.testing.net import NodeConfig, connect_line, open_nodes
from tests.services.helpers import advert, wall_ms

WAIT_S = 20.0


def _market_of(*names: str) -> tuple[MarketView, list[KeyPair]]:
    """A market holding one advert of each of ``names``' peers."""
    market, now = MarketView(), wall_ms()
    pairs = [KeyPair.from_seed(name.encode().ljust(32, b".")) for name in names]
    for pair in pairs:
        market.offer(seal(pair, advert(pair, now)), now)
    return market, pairs


async def test_sync_from_fetches_what_the_server_holds_once() -> None:
    held, pairs = _market_of("alice", "bob")
    ours, changes = MarketView(), Changes()
    async with open_nodes("services/sync/once", [NodeConfig(), NodeConfig()]) as (a, b):
        await connect_line([a, b])
        async with trio.open_nursery() as nursery:
            await nursery.start(SyncServer(host=a.host, market=held, clock=wall_ms).run)
            client = SyncClient(host=b.host, market=ours, clock=wall_ms, changes=changes, advertise_interval=30.0)
            with trio.fail_after(WAIT_S):
                assert await client.sync_from(a.host.get_id()) == 2
                assert await client.sync_from(a.host.get_id()) == 0  # nothing new the second time
            assert {e.peer_id for e in ours} == {p.peer_id for p in pairs}
            nursery.cancel_scope.cancel()
        # The server stopped: its protocol is no longer spoken.
        with trio.fail_after(WAIT_S), pytest.raises(StreamFailure):
            await b.host.new_stream(a.host.get_id(), [ADVERTS_SYNC_PROTOCOL])


async def test_the_client_catches_up_from_connected_peers_at_start() -> None:
    held, pairs = _market_of("carol")
    ours, changes = MarketView(), Changes()
    async with open_nodes("services/sync/start", [NodeConfig(), NodeConfig()]) as (a, b), trio.open_nursery() as n:
        await n.start(SyncServer(host=a.host, market=held, clock=wall_ms).run)
        await connect_line([a, b])
        client = SyncClient(host=b.host, market=ours, clock=wall_ms, changes=changes, advertise_interval=300.0)
        await n.start(client.run)
        with trio.fail_after(WAIT_S):
            await changes.wait_for(lambda: pairs[0].peer_id in ours)
        n.cancel_scope.cancel()
