"""Evidence of cheating over gossip (specs/verification.md): validated on receipt, applied to reputation.

Evidence whose every signature holds changes reputation at once, except check evidence: whether the accused really
fails a check needs the check redone (torch), so that waits in a bounded queue for the ``rechecker`` and counts only
once confirmed. The evidence itself and the reputation rules are ``core.verification`` and ``core.reputation``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import prometheus_client
import trio
from libp2p.peer.id import ID

from p2pcompute.core.identity import PeerId
from p2pcompute.core.reputation import Outcome, PeerReputation, Reputation
from p2pcompute.core.verification import EvidenceInbox, ValidCheckEvidence
from p2pcompute.errors import P2PComputeError, Reason, RemoteProtocolError, ReplayError
from p2pcompute.net.gossip import Gossip
from p2pcompute.net.protocols import EVIDENCE_TOPIC
from p2pcompute.services.changes import Changes

if TYPE_CHECKING:
    # trio-typing (a py-libp2p dependency) ships trio stubs that do not export TaskStatus.
    from trio_typing import TaskStatus

    from p2pcompute.store import Store

__all__ = ["RECHECK_QUEUE", "RECHECK_TIMEOUT_S", "EvidenceGossip", "Rechecker"]

log = logging.getLogger(__name__)

RECHECK_QUEUE = 16  # check evidence waiting to be redone; more is passed on unconfirmed
RECHECK_TIMEOUT_S = 30.0  # redoing one node check

Rechecker = Callable[[ValidCheckEvidence], Awaitable[tuple[bool, str]]]
"""Redoes the check of received check evidence: ``(confirmed, detail)``."""


class EvidenceGossip:
    """The evidence topic: its validator, the queue of check evidence to redo, and publishing our own reports."""

    def __init__(
        self,
        *,
        peer_id: PeerId,
        gossip: Gossip,
        reputation: Reputation,
        store: Store | None,
        clock: Callable[[], int],
        received: prometheus_client.Counter,
        changes: Changes,
    ) -> None:
        self._peer_id = peer_id
        self._gossip = gossip
        self._reputation = reputation
        self._store = store
        self._clock = clock
        self._received = received  # labelled by result
        self._changes = changes
        self.inbox = EvidenceInbox()
        # check evidence waiting for its check to be redone (a client: in a thread; a worker: in its executor)
        self.rechecker: Rechecker | None = None
        self._rechecks_send, self._rechecks_recv = trio.open_memory_channel[ValidCheckEvidence](RECHECK_QUEUE)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the evidence topic with :meth:`validate` (gossip must be running); ``started()``; redo checks."""
        await self._gossip.subscribe(EVIDENCE_TOPIC, self.validate)
        task_status.started()
        await self._recheck()

    async def publish(self, data: bytes) -> None:
        await self._gossip.publish(EVIDENCE_TOPIC, data)

    def validate(self, origin: ID, data: bytes) -> None:
        """The evidence topic validator: every signature is checked before anything changes; raise to reject."""
        now = self._clock()
        try:
            valid = self.inbox.receive(data, now)
        except ReplayError as exc:
            if exc.reason is Reason.REPLAYED:
                return  # a copy gossip delivered twice: no change, no penalty
            self._received.labels(result=exc.reason.value).inc()
            raise
        except RemoteProtocolError as exc:
            self._received.labels(result=exc.reason.value).inc()
            log.info("rejected evidence from %s: %s", origin, exc)
            raise
        if valid.reporter == self._peer_id:
            return  # our own report: already applied as an own observation
        if isinstance(valid, ValidCheckEvidence):
            # signatures, proofs and tensors hold; whether the node really fails needs the check redone (torch):
            # queued, and counted only once confirmed. The message itself is passed on either way.
            try:
                self._rechecks_send.send_nowait(valid)
            except trio.WouldBlock:
                self._received.labels(result="recheck_queue_full").inc()
                log.info("check evidence against %s not rechecked: the queue is full", valid.accused)
            return
        effect = self._reputation.record_report(valid.reporter, valid.accused, valid.job_digest, now)
        self._save(self._reputation.get(valid.accused))
        self._received.labels(result=effect.value).inc()
        log.info("evidence from %s against %s (%s): %s", valid.reporter, valid.accused, valid.strength, effect.value)
        self._changes.notify()

    async def _recheck(self) -> None:
        """Redo the checks of received check evidence (``rechecker``) and count what they confirm."""
        async for valid in self._rechecks_recv:
            if self.rechecker is None:
                self._received.labels(result="not_rechecked").inc()
                log.info("check evidence against %s kept unconfirmed: this peer cannot redo checks", valid.accused)
                continue
            try:
                with trio.fail_after(RECHECK_TIMEOUT_S):
                    confirmed, detail = await self.rechecker(valid)
            except (trio.TooSlowError, P2PComputeError) as exc:
                log.info("rechecking evidence against %s failed: %s", valid.accused, exc)
                continue
            now = self._clock()
            if confirmed:
                effect = self._reputation.record_report(valid.reporter, valid.accused, valid.job_digest, now)
                self._save(self._reputation.get(valid.accused))
                self._received.labels(result=f"check_{effect.value}").inc()
                log.info("check evidence from %s against %s confirmed: %s", valid.reporter, valid.accused, detail)
            else:
                self._save(self._reputation.record(valid.reporter, Outcome.BAD_EVIDENCE, now))
                self._received.labels(result="check_refuted").inc()
                log.info("check evidence from %s against %s refuted: %s", valid.reporter, valid.accused, detail)
            self._changes.notify()

    def _save(self, record: PeerReputation) -> None:
        if self._store is not None:
            self._store.save_reputation(record)
