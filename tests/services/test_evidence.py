"""p2pcompute.services.evidence: evidence over gossip changes reputation once its signatures hold; check evidence
waits in a bounded queue until its check is redone, and counts only when confirmed; real hosts on 127.0.0.1."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.reputation import Reputation
from p2pcompute.core.verification import ValidCheckEvidence
from p2pcompute.errors import RemoteProtocolError
from p2pcompute.net.gossip import Gossip, GossipConfig
from p2pcompute.net.protocols import EVIDENCE_TOPIC
from p2pcompute.services.changes import Changes
from p2pcompute.services.evidence import RECHECK_QUEUE, EvidenceGossip
from p2pcompute.testing.net import NodeConfig, connect_line, open_nodes, wait_until
from tests.core.test_verification import CLIENT, NOW, W, _evidence_bytes
from tests.services.helpers import Received

WAIT_S = 20.0
GOSSIP = NodeConfig(gossip=GossipConfig())


def _service(gossip: Gossip, peer_id: PeerId, reputation: Reputation, received: Received) -> EvidenceGossip:
    return EvidenceGossip(
        peer_id=peer_id, gossip=gossip, reputation=reputation, store=None, clock=lambda: NOW,
        received=received.counter, changes=Changes(),
    )  # fmt: skip


async def test_evidence_published_at_one_peer_counts_against_the_accused_at_another() -> None:
    accused = W[0].peer_id
    async with open_nodes("services/evidence/gossip", [GOSSIP, GOSSIP]) as (a, b), trio.open_nursery() as nursery:
        sender = _service(a.pubsub, KeyPair.from_seed(b"a" * 32).peer_id, Reputation(), Received("sent"))
        reputation, received = Reputation(), Received("evidence")
        receiver = _service(b.pubsub, KeyPair.from_seed(b"b" * 32).peer_id, reputation, received)
        await nursery.start(sender.run)
        await nursery.start(receiver.run)
        await connect_line([a, b])
        await wait_until(lambda: b.host.get_id() in a.pubsub.topic_peers(EVIDENCE_TOPIC))
        data = _evidence_bytes()  # the client's report; peer a merely passes it on
        await sender.publish(data)
        await wait_until(lambda: received["counted"] == 1)
        assert reputation.get(accused).reports == 1
        # A copy delivered twice: no change, no penalty; garbage: refused (gossip scores the forwarder).
        receiver.validate(a.host.get_id(), data)
        with pytest.raises(RemoteProtocolError):
            receiver.validate(a.host.get_id(), b"\x92\x01\x02")
        assert reputation.get(accused).reports == 1
        assert received["counted"] == 1 and received["not_a_map"] == 1
        nursery.cancel_scope.cancel()


async def test_our_own_report_is_not_counted_twice() -> None:
    async with open_nodes("services/evidence/own", [GOSSIP]) as (a,):
        reputation = Reputation()
        ours = _service(a.pubsub, CLIENT.peer_id, reputation, Received("evidence"))
        ours.validate(a.host.get_id(), _evidence_bytes())  # already applied as an own observation
        assert not reputation.known(W[0].peer_id)


class _CheckInbox:
    """Stands in for the inbox: every message is check evidence whose signatures held (core tests check that)."""

    def __init__(self, reporter: PeerId, accused: PeerId) -> None:
        message = SimpleNamespace(reporter=reporter, accused=accused, job_digest=b"j" * 32)
        fields: dict[str, Any] = dict(evidence=SimpleNamespace(message=message), accused_result=None, spec=None)
        self.valid = ValidCheckEvidence(**fields, leaves={}, tensors={})

    def receive(self, data: bytes, now: int) -> ValidCheckEvidence:
        return self.valid


async def test_check_evidence_counts_only_once_its_check_is_redone() -> None:
    reporter, accused = W[1].peer_id, W[2].peer_id
    verdicts, verdicts_out = trio.open_memory_channel[tuple[bool, str]](0)

    async def recheck(valid: ValidCheckEvidence) -> tuple[bool, str]:
        assert valid.accused == accused
        return await verdicts_out.receive()

    async with open_nodes("services/evidence/check", [GOSSIP]) as (a,), trio.open_nursery() as nursery:
        reputation, received = Reputation(), Received("evidence")
        service = _service(a.pubsub, KeyPair.from_seed(b"s" * 32).peer_id, reputation, received)
        service.inbox = _CheckInbox(reporter, accused)  # type: ignore[assignment]
        await nursery.start(service.run)
        origin = a.host.get_id()
        with trio.fail_after(WAIT_S):
            # No rechecker (a peer that cannot redo checks): kept unconfirmed.
            service.validate(origin, b"")
            await wait_until(lambda: received["not_rechecked"] == 1)
            service.rechecker = recheck
            service.validate(origin, b"")
            assert received["check_counted"] == 0  # queued: nothing counted yet
            await verdicts.send((True, "node 3 differs"))
            await wait_until(lambda: received["check_counted"] == 1)
            assert reputation.get(accused).reports == 1
            # Refuted: the reporter pays for false evidence.
            service.validate(origin, b"")
            await verdicts.send((False, "node 3 agrees"))
            await wait_until(lambda: received["check_refuted"] == 1)
            assert reputation.get(reporter).bad_evidence == 1
            # Bounded: one being redone, RECHECK_QUEUE waiting, the next passed on unconfirmed.
            for _ in range(RECHECK_QUEUE + 2):
                service.validate(origin, b"")
                await trio.testing.wait_all_tasks_blocked()
            assert received["recheck_queue_full"] == 1
        nursery.cancel_scope.cancel()
