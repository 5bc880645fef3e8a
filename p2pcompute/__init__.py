"""p2pcompute: a peer-to-peer GPU compute network.

The public API is re-exported here; submodules are implementation detail unless documented.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from p2pcompute.core.envelope import Opened, open_envelope, seal
from p2pcompute.core.identity import KeyPair, PeerId
from p2pcompute.core.messages import DEFAULT_REGISTRY, Message, MessageRegistry, PeerRecord
from p2pcompute.core.replay import SeenCache
from p2pcompute.errors import (
    ConfigError,
    DecodeError,
    ExecutionError,
    FramingError,
    JobError,
    JobFormatError,
    KeyFileError,
    LocalProtocolError,
    NegotiationFailed,
    NoWorkersError,
    P2PComputeError,
    Reason,
    RemoteProtocolError,
    ReplayError,
    SchemaError,
    SignatureError,
    StoreError,
    TransferError,
    VerificationError,
)

# The client library imports trio, py-libp2p and (for results) torch: loaded on first use, not on import.
_LAZY = {"Job": "p2pcompute.client", "RunResult": "p2pcompute.client", "open_client": "p2pcompute.client",
         "run_job": "p2pcompute.client"}  # fmt: skip


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'p2pcompute' has no attribute {name!r}")


try:
    __version__ = version("p2pcompute")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_REGISTRY",
    "ConfigError",
    "DecodeError",
    "ExecutionError",
    "FramingError",
    "Job",
    "JobError",
    "JobFormatError",
    "KeyFileError",
    "KeyPair",
    "LocalProtocolError",
    "Message",
    "MessageRegistry",
    "NegotiationFailed",
    "NoWorkersError",
    "Opened",
    "P2PComputeError",
    "PeerId",
    "PeerRecord",
    "Reason",
    "RemoteProtocolError",
    "ReplayError",
    "RunResult",
    "SchemaError",
    "SeenCache",
    "SignatureError",
    "StoreError",
    "TransferError",
    "VerificationError",
    "__version__",
    "open_client",
    "open_envelope",
    "run_job",
    "seal",
]
