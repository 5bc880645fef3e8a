"""Protocol ids spoken by a p2pcompute peer.

Our own protocols are named ``/p2pcompute/<name>/<semver>``; a breaking change is a new version.
The DHT speaks libp2p's own Kademlia protocol so that any libp2p tooling can inspect it.
"""

from __future__ import annotations

from typing import Final

from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import PROTOCOL_ID as _KAD_PROTOCOL_ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID as _MESHSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as _MESHSUB_V11
from libp2p.security.noise.transport import PROTOCOL_ID as _NOISE_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as _YAMUX_PROTOCOL_ID

__all__ = [
    "ADVERTS_SYNC_PROTOCOL",
    "ADVERTS_TOPIC",
    "EVIDENCE_TOPIC",
    "CAPABILITY_KEY_PREFIX",
    "DATA_PROTOCOL",
    "GOSSIPSUB_PROTOCOLS",
    "JOB_PROTOCOL",
    "KAD_PROTOCOL",
    "NOISE_PROTOCOL",
    "YAMUX_PROTOCOL",
]

#: Gossipsub topic carrying signed GPU adverts.
ADVERTS_TOPIC: Final = "/p2pcompute/adverts/1.0.0"

#: Gossipsub topic carrying signed evidence of cheating (specs/verification.md).
EVIDENCE_TOPIC: Final = "/p2pcompute/evidence/1.0.0"

#: Request/response stream: "send me the adverts you hold" (a joining peer's catch-up, specs/adverts.md).
ADVERTS_SYNC_PROTOCOL: Final = TProtocol("/p2pcompute/adverts-sync/1.0.0")
#: Stream protocol for job negotiation (request / offer / accept / inputs / result / receipt).
JOB_PROTOCOL: Final = TProtocol("/p2pcompute/job/1.0.0")
#: A job's tensors when no direct TCP path to the worker's data channel exists: the data channel's session, byte for
#: byte, on the libp2p connection (specs/data-channel.md §10).
DATA_PROTOCOL: Final = TProtocol("/p2pcompute/data/1.0.0")

#: Kademlia DHT: libp2p's own id (``/ipfs/kad/1.0.0``).
KAD_PROTOCOL: Final = TProtocol(_KAD_PROTOCOL_ID)

#: Namespace of DHT provider keys for capabilities: key = sha256(prefix + capability).
CAPABILITY_KEY_PREFIX: Final = b"/p2pcompute/capability/1.0.0/"

#: The only security transport we offer or accept.
NOISE_PROTOCOL: Final = TProtocol(_NOISE_PROTOCOL_ID)

#: The only stream multiplexer we offer or accept.
YAMUX_PROTOCOL: Final = TProtocol(_YAMUX_PROTOCOL_ID)

#: Gossipsub versions we speak, preferred first. 1.1 is the first with peer scoring. We do not offer
#: 1.2: its IDONTWANT control message goes to every mesh peer for every message, which in 0.8.1 costs
#: about as much as forwarding the message itself (measured: it doubles the CPU a 30-peer testnet spends
#: on adverts), and adverts are far smaller than the messages IDONTWANT exists to save.
GOSSIPSUB_PROTOCOLS: Final = (TProtocol(_MESHSUB_V11), TProtocol(_MESHSUB_V10))
