"""The local status endpoint: ``/status`` (JSON) and ``/metrics`` (Prometheus) over HTTP/1.1 (h11) on 127.0.0.1.

:class:`NodeMetrics` is a node's own metrics registry (no global state); :class:`StatusServer` serves it and the
status document, read from the node (:class:`NodeView`) on every request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import h11
import prometheus_client
import trio
from libp2p.abc import IHost
from prometheus_client.core import CounterMetricFamily, Metric

from p2pcompute import __version__
from p2pcompute.config import STATUS_REQUEST_TIMEOUT_S
from p2pcompute.core.adverts import MarketView
from p2pcompute.core.identity import PeerId
from p2pcompute.errors import HostStartError
from p2pcompute.net.discovery import Discovery
from p2pcompute.net.host import host_addrs

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio stubs that do not export TaskStatus.
    from trio_typing import TaskStatus

    from p2pcompute.net.reach import ReachService
    from p2pcompute.worker import Worker

__all__ = ["NodeMetrics", "NodeView", "StatusServer", "advert_table"]

log = logging.getLogger(__name__)

MAX_STATUS_REQUEST_BYTES = 16 * 1024


class NodeView(Protocol):
    """What the status document and the metrics read of a node (:class:`p2pcompute.node.Node`)."""

    host: IHost
    market: MarketView
    discovery: Discovery
    clock: Callable[[], int]
    started_at_ms: int
    worker: Worker | None
    reach: ReachService

    @property
    def peer_id(self) -> PeerId: ...

    def advert_addrs(self) -> tuple[str, ...]: ...

    @property
    def free_slots(self) -> int: ...

    def capabilities(self) -> list[str]: ...


class NodeMetrics:
    """Prometheus metrics of one node, in the node's own registry; gauges read ``node`` when scraped."""

    def __init__(self, node: NodeView) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.adverts_received = prometheus_client.Counter(
            "p2pcompute_adverts_received", "Adverts received over gossip, by result", ["result"], registry=r
        )
        self.evidence_received = prometheus_client.Counter(
            "p2pcompute_evidence_received", "Cheating evidence received over gossip, by result", ["result"], registry=r
        )
        self.adverts_published = prometheus_client.Counter(
            "p2pcompute_adverts_published", "Adverts this peer published", registry=r
        )
        prometheus_client.Gauge("p2pcompute_connected_peers", "Peers with an open connection", registry=r).set_function(
            lambda: len(node.host.get_connected_peers())
        )
        prometheus_client.Gauge(
            "p2pcompute_market_adverts", "Unexpired adverts in the market view", registry=r
        ).set_function(lambda: len(node.market.adverts(node.clock())))
        prometheus_client.Gauge(
            "p2pcompute_routing_table_peers", "Peers in the DHT routing table", registry=r
        ).set_function(lambda: len(node.discovery.routing_table_peers()))
        prometheus_client.Gauge("p2pcompute_free_slots", "Free job slots", registry=r).set_function(
            lambda: node.free_slots
        )
        r.register(_WorkCollector(node))


class _WorkCollector:
    """A worker's slot occupancy and executor time, as counters (read from the worker when scraped)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        worker = self.node.worker
        if worker is None:
            return
        busy = "Slot-seconds held by admitted jobs (utilisation)"
        yield CounterMetricFamily("p2pcompute_slot_busy_seconds", busy, value=worker.slot_busy_s())
        yield CounterMetricFamily("p2pcompute_exec_seconds", "Seconds of job runs", value=worker.exec_s())


class StatusServer:
    """Serves ``/status`` and ``/metrics`` of ``node`` on 127.0.0.1, port ``port`` (0: any free one)."""

    def __init__(self, node: NodeView, metrics: NodeMetrics, *, port: int) -> None:
        self._node = node
        self._metrics = metrics
        self._port = port

    def status(self) -> dict[str, Any]:
        """The status document: this peer, its connections, its jobs and its market view."""
        node = self._node
        now = node.clock()
        market = []
        for entry in node.market.adverts(now):
            a = entry.advert
            market.append(
                {
                    "peer_id": str(entry.peer_id),
                    "devices": [
                        {"kind": d.kind.value, "name": d.name, "memory_bytes": d.memory_bytes, "tflops": d.tflops}
                        for d in a.devices
                    ],
                    "tflops": round(sum(d.tflops for d in a.devices), 4),
                    "price_per_second": a.price_per_second,
                    "slots_free": a.slots_free,
                    "slots_total": a.slots_total,
                    "seq": a.seq,
                    "advert_age_s": round((now - a.issued_at) / 1000, 3),
                    "expires_in_s": round((a.expires_at - now) / 1000, 3),
                    "addrs": list(a.addrs),
                }
            )
        return {
            "version": __version__,
            "peer_id": str(node.peer_id),
            "addrs": host_addrs(node.host),
            "advertised_addrs": list(node.advert_addrs()),
            "reach": node.reach.status(),
            "uptime_s": round((node.clock() - node.started_at_ms) / 1000, 3),
            "connected_peers": sorted(str(p) for p in node.host.get_connected_peers()),
            "routing_table_peers": len(node.discovery.routing_table_peers()),
            "capabilities": node.capabilities(),
            "free_slots": node.free_slots,
            "jobs": node.worker.status() if node.worker is not None else None,
            "market": market,
        }

    async def run(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started(port)`` once listening. When the configured port is taken (a second
        node on this machine), take any free port instead and say so: the endpoint is local, and node.json and the
        start-up output name the port. Only when no port at all can be had does the node refuse to start."""
        wanted = self._port
        try:
            listeners = await trio.open_tcp_listeners(wanted, host="127.0.0.1")
        except OSError as exc:
            if wanted == 0:
                raise HostStartError(f"cannot serve status on 127.0.0.1: {exc.strerror or exc}") from exc
            try:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            except OSError as again:
                raise HostStartError(f"cannot serve status on 127.0.0.1: {again.strerror or again}") from again
            log.warning(
                "status port %d on 127.0.0.1 is not available (%s); serving status on port %d instead "
                "(choose one with --status-port or status_port)",
                wanted, exc.strerror or exc, listeners[0].socket.getsockname()[1],
            )  # fmt: skip
        port = listeners[0].socket.getsockname()[1]
        task_status.started(port)
        await trio.serve_listeners(self._handle_connection, listeners)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(STATUS_REQUEST_TIMEOUT_S):
            try:
                await _answer_http(stream, self._route)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                log.debug("status connection failed: %s", exc)
        await trio.aclose_forcefully(stream)

    def _route(self, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if path in ("/", "/status"):
            return 200, "application/json", json.dumps(self.status(), indent=2).encode()
        if path == "/metrics":
            return 200, prometheus_client.CONTENT_TYPE_LATEST, prometheus_client.generate_latest(self._metrics.registry)
        return 404, "text/plain", b"not found: try /status or /metrics\n"


async def _answer_http(stream: trio.SocketStream, route: Callable[[str], tuple[int, str, bytes]]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_STATUS_REQUEST_BYTES)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            if event.method != b"GET":
                status, ctype, body = 405, "text/plain", b"only GET\n"
            else:
                status, ctype, body = route(event.target.decode("ascii", "replace"))
            headers = [("content-type", ctype), ("content-length", str(len(body))), ("connection", "close")]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        return


def advert_table(status: dict[str, Any]) -> list[dict[str, str]]:
    """Rows for a human table of a status document's market view."""
    rows = []
    for entry in status.get("market", []):
        devices = ", ".join(d["name"] for d in entry["devices"])
        rows.append(
            {
                "peer": entry["peer_id"][-12:],
                "devices": devices[:40],
                "TFLOPS": f"{entry['tflops']:.3f}",
                "price/s": f"{entry['price_per_second'] / 1_000_000:.6f}",
                "slots": f"{entry['slots_free']}/{entry['slots_total']}",
                "advert age": f"{entry['advert_age_s']:.1f} s",
            }
        )
    return rows
