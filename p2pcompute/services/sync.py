"""Advert sync (``/p2pcompute/adverts-sync/1.0.0``): a joining peer catches up on the adverts others already hold.

:class:`SyncServer` answers: one request frame in, advert frames and an empty frame out, at most
:data:`MAX_CONCURRENT_SYNCS` requests at once. :class:`SyncClient` asks: a few connected peers at start, then one
random peer now and then; every advert received goes through ``MarketView.offer`` (full validation).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost, INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from p2pcompute.core import codec
from p2pcompute.core.adverts import MarketView, SyncRequest
from p2pcompute.core.schema import from_wire, to_wire
from p2pcompute.errors import P2PComputeError, RemoteProtocolError
from p2pcompute.net.protocols import ADVERTS_SYNC_PROTOCOL
from p2pcompute.net.stream import FramedStream
from p2pcompute.services.adverts import IGNORED_REASONS
from p2pcompute.services.changes import Changes

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio stubs that do not export TaskStatus.
    from trio_typing import TaskStatus

__all__ = [
    "MAX_CONCURRENT_SYNCS",
    "MIN_RESYNC_INTERVAL_S",
    "SYNC_PEERS",
    "SYNC_REQUEST_MAX_BYTES",
    "SYNC_TIMEOUT_S",
    "SyncClient",
    "SyncServer",
]

log = logging.getLogger(__name__)

SYNC_TIMEOUT_S = 10.0  # one whole advert-sync exchange
SYNC_PEERS = 3  # peers asked at start
MIN_RESYNC_INTERVAL_S = 30.0
MAX_CONCURRENT_SYNCS = 8  # sync requests served at once; more are reset
SYNC_REQUEST_MAX_BYTES = 256


class SyncServer:
    """Serves the adverts of ``market`` to peers that ask, at most :data:`MAX_CONCURRENT_SYNCS` at once."""

    def __init__(self, *, host: IHost, market: MarketView, clock: Callable[[], int]) -> None:
        self._host = host
        self._market = market
        self._clock = clock
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT_SYNCS)  # one for the node's whole life

    @property
    def serving(self) -> int:
        """Sync requests being served now."""
        return int(self._limiter.statistics().borrowed_tokens)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the protocol until cancelled (set up before the first dial)."""
        self._host.set_stream_handler(ADVERTS_SYNC_PROTOCOL, self.handle)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._host.remove_stream_handler(ADVERTS_SYNC_PROTOCOL)

    async def handle(self, stream: INetStream) -> None:
        """Answer one sync request: one request frame in, advert frames and an empty frame out."""
        if self.serving >= self._limiter.total_tokens:
            await stream.reset()  # bounded: never queue up work for a flood of sync requests
            return
        async with self._limiter:
            framed = FramedStream(stream, max_frame_size=SYNC_REQUEST_MAX_BYTES)
            try:
                with trio.fail_after(SYNC_TIMEOUT_S):
                    frame = await framed.receive()
                    if frame is None:
                        return
                    request = from_wire(SyncRequest, codec.unpack(frame))
                    framed = FramedStream(stream)
                    for entry in self._market.adverts(self._clock())[: request.max_adverts]:
                        await framed.send(entry.opened.envelope)
                    await framed.send(b"")
            except (P2PComputeError, BaseLibp2pError, trio.TooSlowError, OSError) as exc:
                log.info("advert sync request from %s failed: %s", stream.muxed_conn.peer_id, exc)
            finally:
                with trio.move_on_after(SYNC_TIMEOUT_S), contextlib.suppress(BaseLibp2pError):
                    await stream.close()


class SyncClient:
    """Fetches adverts from connected peers into ``market``: from a few at start, then from one every so often."""

    def __init__(
        self,
        *,
        host: IHost,
        market: MarketView,
        clock: Callable[[], int],
        changes: Changes,
        advertise_interval: float,
        rng: random.Random | None = None,
    ) -> None:
        self._host = host
        self._market = market
        self._clock = clock
        self._changes = changes
        self._interval = max(advertise_interval * 2, MIN_RESYNC_INTERVAL_S)
        self._rng = rng if rng is not None else random.Random()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Catch up from a few connected peers at once (start it once connected), then again every interval."""
        task_status.started()
        while True:
            peers = list(self._host.get_connected_peers())
            self._rng.shuffle(peers)
            for peer in peers[:SYNC_PEERS]:
                try:
                    n = await self.sync_from(peer)
                    log.debug("synced %d adverts from %s", n, peer)
                except (P2PComputeError, BaseLibp2pError, trio.TooSlowError, OSError) as exc:
                    # a peer that is still starting, gone, or speaks another version: try others later
                    log.info("advert sync from %s failed: %s", peer, exc)
            await trio.sleep(self._interval)

    async def sync_from(self, peer: ID) -> int:
        """Fetch the adverts ``peer`` holds into our market; returns how many were new to us."""
        accepted = 0
        with trio.fail_after(SYNC_TIMEOUT_S):
            stream = await self._host.new_stream(peer, [ADVERTS_SYNC_PROTOCOL])
            try:
                framed = FramedStream(stream)
                await framed.send(codec.pack(to_wire(SyncRequest(max_adverts=self._market.policy.max_peers))))
                for _ in range(self._market.policy.max_peers + 1):
                    frame = await framed.receive()
                    if not frame:  # empty frame: end of the list; None: the peer closed early
                        break
                    try:
                        self._market.offer(frame, self._clock())
                        accepted += 1
                    except RemoteProtocolError as exc:
                        if exc.reason not in IGNORED_REASONS:
                            log.info("sync from %s: dropped an advert: %s", peer, exc)
            finally:
                await stream.close()
        if accepted:
            self._changes.notify()
        return accepted
