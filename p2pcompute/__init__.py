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
    FramingError,
    KeyFileError,
    LocalProtocolError,
    P2PComputeError,
    Reason,
    RemoteProtocolError,
    ReplayError,
    SchemaError,
    SignatureError,
)

try:
    __version__ = version("p2pcompute")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_REGISTRY",
    "ConfigError",
    "DecodeError",
    "FramingError",
    "KeyFileError",
    "KeyPair",
    "LocalProtocolError",
    "Message",
    "MessageRegistry",
    "Opened",
    "P2PComputeError",
    "PeerId",
    "PeerRecord",
    "Reason",
    "RemoteProtocolError",
    "ReplayError",
    "SchemaError",
    "SeenCache",
    "SignatureError",
    "__version__",
    "open_envelope",
    "seal",
]
