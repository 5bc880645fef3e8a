"""p2pcompute.services.status: /status and /metrics of a node, read by its injected clock; a taken port is replaced
by a free one; the human table of a status document."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from libp2p.abc import IHost

from p2pcompute.core.adverts import MarketView
from p2pcompute.core.envelope import seal
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.net.discovery import Discovery, DiscoveryConfig
from p2pcompute.net.host import host_addrs, open_host
from p2pcompute.net.reach import ReachService, ReachSettings
from p2pcompute.services.status import NodeMetrics, StatusServer, advert_table
from p2pcompute.testing.net import LOOPBACK
from tests.services.helpers import advert, wall_ms

if TYPE_CHECKING:
    from p2pcompute.worker import Worker

PAIR = KeyPair.from_seed(b"status".ljust(32, b"."))
SELLER = KeyPair.from_seed(b"seller".ljust(32, b"."))


@dataclass
class _Node:
    """What the status server reads of a node (``NodeView``), with a clock the test moves."""

    host: IHost
    discovery: Discovery
    started_at_ms: int
    peer_id: PeerId = PAIR.peer_id
    market: MarketView = field(default_factory=MarketView)
    worker: Worker | None = None
    free_slots: int = 1
    now: int = 0
    reach: ReachService = field(init=False)

    def __post_init__(self) -> None:
        self.reach = ReachService(self.host, ReachSettings(), clock=self.clock)

    def clock(self) -> int:
        return self.now

    def capabilities(self) -> list[str]:
        return ["cpu"]

    def advert_addrs(self) -> tuple[str, ...]:
        return ("/ip4/198.51.100.7/tcp/4001/p2p/" + str(self.peer_id),)


async def test_status_and_metrics_follow_the_injected_clock() -> None:
    start = wall_ms()
    async with open_host(PAIR.seed, LOOPBACK) as host, trio.open_nursery() as nursery:
        node = _Node(host=host, discovery=Discovery(host, DiscoveryConfig()), started_at_ms=start, now=start + 2500)
        node.market.offer(seal(SELLER, advert(SELLER, start)), start)
        metrics = NodeMetrics(node)
        port = await nursery.start(StatusServer(node, metrics, port=0).run)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=5.0) as http:
            status = (await http.get(f"{base}/status")).json()
            assert (await http.get(f"{base}/")).json()["peer_id"] == status["peer_id"]
            metrics_text = (await http.get(f"{base}/metrics")).text
            node.now = start + 61_000  # the advert expired, by the node's clock
            later = (await http.get(f"{base}/metrics")).text
            missing = await http.get(f"{base}/nope")
            post = await http.post(f"{base}/status")
        assert status["peer_id"] == str(PAIR.peer_id)
        assert status["addrs"] == host_addrs(host)
        assert status["uptime_s"] == 2.5
        assert status["advertised_addrs"] == list(node.advert_addrs())
        assert status["reach"]["reachability"] == "unknown" and status["reach"]["relayed_addrs"] == []
        assert status["capabilities"] == ["cpu"] and status["free_slots"] == 1 and status["jobs"] is None
        [entry] = status["market"]
        assert entry["peer_id"] == str(SELLER.peer_id) and entry["advert_age_s"] == 2.5
        assert "p2pcompute_market_adverts 1.0" in metrics_text
        assert "p2pcompute_market_adverts 0.0" in later
        assert "p2pcompute_slot_busy_seconds" not in metrics_text  # no worker
        assert (missing.status_code, post.status_code) == (404, 405)
        rows = advert_table(status)
        assert rows == [
            {
                "peer": str(SELLER.peer_id)[-12:], "devices": "Test CPU", "TFLOPS": "0.100", "price/s": "0.000001",
                "slots": "1/1", "advert age": "2.5 s",
            }
        ]  # fmt: skip
        nursery.cancel_scope.cancel()


async def test_a_taken_status_port_is_replaced_by_a_free_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p2pcompute.services.status")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        wanted = taken.getsockname()[1]
        async with open_host(PAIR.seed, LOOPBACK) as host, trio.open_nursery() as nursery:
            node = _Node(host=host, discovery=Discovery(host, DiscoveryConfig()), started_at_ms=0)
            port = await nursery.start(StatusServer(node, NodeMetrics(node), port=wanted).run)
            assert port != wanted
            assert f"status port {wanted} on 127.0.0.1 is not available" in caplog.text
            nursery.cancel_scope.cancel()
