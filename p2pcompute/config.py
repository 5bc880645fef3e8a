"""Node configuration: a TOML file plus command-line overrides, validated into a frozen dataclass.

Example ``node.toml`` (every key optional)::

    data_dir = "~/.local/share/p2pcompute"
    listen = ["/ip4/0.0.0.0/tcp/4001"]
    announce = ["/ip4/203.0.113.7/tcp/4001"]  # the public addresses adverts carry (default: the listen addresses)
    bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
    price = 0.002            # credits per job-second
    slots = 2                # jobs run at once
    advertise_interval = 30  # seconds between adverts (also sent when free capacity changes)
    advert_ttl = 120         # seconds an advert stays valid
    status_port = 8470       # status/metrics HTTP endpoint on 127.0.0.1 (0: any free port)
    log_level = "info"
    mdns = false
    connections_low = 16     # the host dials known peers while it has fewer than (low + high) / 2
    connections_high = 96    # ... and prunes connections above this
    serve_jobs = true        # run jobs for others (false: a bootstrap/relay-only peer)
    job_memory_bytes = 4294967296  # the most memory one job may use (enforced on the executor child)
    sandbox = "auto"         # executor sandbox: "auto" (every layer the kernel offers), "required" or "off"
    data_channel_clear = false  # true: tensors cross the data channel unsealed (loopback testnets only)
    request_timeout = 5      # seconds a new job stream may stay silent before its request
    accept_timeout = 10      # seconds from an offer to the client's accept
    inputs_timeout = 60      # seconds from an accept until every input arrived (the slot is freed then)
    receipt_timeout = 30     # seconds from a result to the client's receipt or rejection
    nat = "auto"             # reachability: "auto" (ask peers with AutoNAT), "public" or "private" (behind NAT)
    relays = ["/ip4/203.0.113.9/tcp/4001/p2p/12D3KooW..."]  # relays to hold a slot on when unreachable
    hole_punch = true        # upgrade relayed connections to direct ones (DCUtR) where the NATs allow
    relay_service = false    # serve as a relay for peers behind NAT (a reachable node only; opt-in)
    relay_max_reservations = 32  # peers holding a slot on this relay at once
    relay_max_circuits = 16      # relayed connections at once
    relay_circuit_mib = 128      # MiB one relayed connection may carry
    relay_circuit_seconds = 600  # seconds one relayed connection may stay open
    autonat_confirmations = 2    # agreeing dial-back verdicts (distinct address groups) that set reachability
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, fields, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pcompute.errors import ConfigError
from p2pcompute.keys import default_data_dir

if TYPE_CHECKING:
    from p2pcompute.net.reach import ReachSettings

__all__ = ["MICRO_CREDITS", "NodeConfig", "load_config", "parse_price"]

MICRO_CREDITS = 1_000_000  # price units per credit
# The adversary modes the `testnet` and `trial` commands accept; the cheating itself lives only in
# p2pcompute.testing.adversary (started through p2pcompute.testing.peer), never in a node's config.
CHEAT_MODES = ("random", "zeros", "stale", "lazy", "collude", "sleeper", "ring", "sybil")
DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)
DEFAULT_STATUS_PORT = 8470
LOG_LEVELS = ("debug", "info", "warning", "error")
SANDBOX_MODES = ("auto", "required", "off")  # p2pcompute.compute.sandbox.SandboxMode
NAT_MODES = ("auto", "public", "private")  # p2pcompute.core.reach.NatMode

# Named timeouts (seconds) used at the adapter edge.
PROBE_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 10.0
STATUS_REQUEST_TIMEOUT_S = 5.0


def parse_price(value: str | float | int) -> int:
    """Credits per job-second (a decimal, e.g. ``"0.002"``) to integer micro-credits."""
    try:
        micro = Decimal(str(value)) * MICRO_CREDITS
    except InvalidOperation as exc:
        raise ConfigError(f"price {value!r} is not a number") from exc
    if micro < 0 or micro != micro.to_integral_value():
        raise ConfigError(f"price {value!r} must be >= 0 with at most 6 decimal places")
    return int(micro)


def check_announce_address(addr: str) -> None:
    """An address a node may announce: ``/ip4|ip6/<concrete address>/tcp/<port>`` or
    ``/dns|dns4|dns6/<name>/tcp/<port>``, without ``/p2p/`` (the node adds its own id)."""
    parts = addr.split("/")
    if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[3] != "tcp":
        raise ConfigError(f"announce: {addr!r} is not /ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>")
    if not parts[4].isdigit() or not 1 <= int(parts[4]) <= 65535:
        raise ConfigError(f"announce: {addr!r} needs a port 1..65535")
    if parts[1] in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(parts[2])
        except ValueError:
            raise ConfigError(f"announce: {addr!r}: {parts[2]!r} is not an {parts[1]} address") from None
        if ip.version != int(parts[1][2]) or ip.is_unspecified:
            raise ConfigError(f"announce: {addr!r}: announce a concrete {parts[1]} address others can dial")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    data_dir: Path
    listen: tuple[str, ...] = DEFAULT_LISTEN
    bootstrap: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()  # public addresses for adverts and bootstrapping (empty: the listen addresses)
    price_per_second: int = 1000  # micro-credits (0.001 credit) per job-second
    slots: int = 1
    advertise_interval: float = 30.0
    advert_ttl: float = 120.0
    status_port: int = DEFAULT_STATUS_PORT
    log_level: str = "info"
    mdns: bool = False
    probe_benchmark: bool = True
    # Connection manager: below (low + high) / 2 connections the host dials known peers; above high it prunes.
    connections_low: int = 16
    connections_high: int = 96
    serve_jobs: bool = True  # run jobs for others (a worker); false: a relay/bootstrap-only peer
    job_memory_bytes: int = 4 * 1024**3  # the most memory one job may use on this worker
    sandbox: str = "auto"  # executor sandbox layers: "auto" (what the kernel offers), "required" (all or refuse), "off"
    sandbox_uid_base: int = 2_000_000_000  # a root node runs executor children as this uid/gid plus an offset
    # Each phase of a job stream has its own bound (seconds; specs/negotiation.md §Timeouts).
    request_timeout: float = 5.0
    accept_timeout: float = 10.0
    inputs_timeout: float = 60.0
    receipt_timeout: float = 30.0
    # Data-channel tickets without a key (tensors unsealed on the wire): an explicit opt-in for loopback testnets.
    data_channel_clear: bool = False
    # Reachability (specs/reachability.md): AutoNAT, circuit relay v2 and DCUtR.
    nat: str = "auto"
    relays: tuple[str, ...] = ()
    hole_punch: bool = True
    relay_service: bool = False
    relay_max_reservations: int = 32
    relay_max_circuits: int = 16
    relay_circuit_mib: int = 128
    relay_circuit_seconds: int = 600
    autonat_confirmations: int = 2

    def validate(self) -> NodeConfig:
        if not self.listen:
            raise ConfigError("listen: at least one address is needed")
        for addr in (*self.listen, *self.bootstrap):
            if not addr.startswith("/"):
                raise ConfigError(f"{addr!r} is not a multiaddr (e.g. /ip4/127.0.0.1/tcp/4001)")
        for addr in self.announce:
            check_announce_address(addr)
        for addr in (*self.bootstrap, *self.relays):
            if "/p2p-circuit" in addr:
                raise ConfigError(f"{addr!r} is a relayed address: give the relay's own address")
        for addr in self.relays:
            if not addr.startswith("/") or "/p2p/" not in addr or "/" in addr.rsplit("/p2p/", 1)[1]:
                raise ConfigError(f"relay address {addr!r} must be /ip4|ip6/<host>/tcp/<port>/p2p/<peer id>")
        if self.nat not in NAT_MODES:
            raise ConfigError(f"nat must be one of {', '.join(NAT_MODES)}, got {self.nat!r}")
        for name, low, high in (
            ("relay_max_reservations", 1, 4096),
            ("relay_max_circuits", 1, 4096),
            ("relay_circuit_mib", 1, 65536),
            ("relay_circuit_seconds", 10, 86400),
            ("autonat_confirmations", 1, 16),
        ):
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"{name} must be {low}..{high}, got {getattr(self, name)}")
        for addr in self.bootstrap:
            if "/p2p/" not in addr or "/" in addr.rsplit("/p2p/", 1)[1]:
                raise ConfigError(f"bootstrap address {addr!r} must end in /p2p/<peer id>")
        if not 1 <= self.slots <= 1024:
            raise ConfigError(f"slots must be 1..1024, got {self.slots}")
        if self.price_per_second < 0:
            raise ConfigError("price must not be negative")
        if not 0.1 <= self.advertise_interval <= 3600:
            raise ConfigError(f"advertise_interval must be 0.1..3600 s, got {self.advertise_interval}")
        if not self.advertise_interval < self.advert_ttl <= 600:
            raise ConfigError(
                f"advert_ttl must be longer than advertise_interval and at most 600 s, got {self.advert_ttl}"
            )
        if not 0 <= self.connections_low <= self.connections_high <= 1024:
            raise ConfigError("need 0 <= connections_low <= connections_high <= 1024")
        if self.sandbox not in SANDBOX_MODES:
            raise ConfigError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}, got {self.sandbox!r}")
        if not 1 <= self.sandbox_uid_base <= 2_000_000_000:
            raise ConfigError(f"sandbox_uid_base must be 1..2000000000, got {self.sandbox_uid_base}")
        for name in ("request_timeout", "accept_timeout", "inputs_timeout", "receipt_timeout"):
            if not 0.1 <= getattr(self, name) <= 3600:
                raise ConfigError(f"{name} must be 0.1..3600 s, got {getattr(self, name)}")
        if self.job_memory_bytes < 1024**2:
            raise ConfigError(f"job_memory_bytes must be at least 1 MiB, got {self.job_memory_bytes}")
        if not 0 <= self.status_port <= 65535:
            raise ConfigError(f"status_port must be 0..65535, got {self.status_port}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        return self

    @property
    def key_path(self) -> Path:
        return self.data_dir / "identity.key"

    def reach_settings(self) -> ReachSettings:
        """What the reachability service (p2pcompute.net.reach) runs with."""
        from p2pcompute.core.reach import NatMode, ReachPolicy
        from p2pcompute.net.reach import ReachSettings, RelayServiceLimits

        return ReachSettings(
            mode=NatMode(self.nat),
            relay_service=self.relay_service,
            relays=self.relays,
            reserve=self.serve_jobs,
            hole_punch=self.hole_punch,
            announce=self.announce,
            policy=ReachPolicy(confirmations=self.autonat_confirmations),
            limits=RelayServiceLimits(
                reservations=self.relay_max_reservations,
                circuits=self.relay_max_circuits,
                circuit_bytes=self.relay_circuit_mib * 1024**2,
                circuit_seconds=self.relay_circuit_seconds,
            ),
        )


_KEYS = {f.name for f in fields(NodeConfig)} | {"price"}


def _from_mapping(base: NodeConfig, values: dict[str, Any], where: str) -> NodeConfig:
    unknown = set(values) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    changes: dict[str, Any] = {}
    try:
        for key, value in values.items():
            if value is None:
                continue
            if key == "price":
                changes["price_per_second"] = parse_price(value)
            elif key == "data_dir":
                changes[key] = Path(str(value)).expanduser()
            elif key in ("listen", "bootstrap", "announce", "relays"):
                if isinstance(value, str):
                    value = [value]
                changes[key] = tuple(str(v) for v in value)
            elif key in (
                "slots",
                "status_port",
                "price_per_second",
                "connections_low",
                "connections_high",
                "job_memory_bytes",
                "sandbox_uid_base",
                "relay_max_reservations",
                "relay_max_circuits",
                "relay_circuit_mib",
                "relay_circuit_seconds",
                "autonat_confirmations",
            ):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{where}: {key} must be an integer")
                changes[key] = value
            elif key in (
                "advertise_interval",
                "advert_ttl",
                "request_timeout",
                "accept_timeout",
                "inputs_timeout",
                "receipt_timeout",
            ):
                changes[key] = float(value)
            elif key in ("mdns", "probe_benchmark", "serve_jobs", "data_channel_clear", "hole_punch", "relay_service"):
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}: {key} must be true or false")
                changes[key] = value
            else:
                changes[key] = str(value).lower()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return replace(base, **changes)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Defaults, then the TOML file (if given), then command-line overrides (``None`` = not given)."""
    config = NodeConfig(data_dir=default_data_dir())
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        config = _from_mapping(config, values, str(path))
    if overrides:
        config = _from_mapping(config, overrides, "command line")
    return config.validate()
