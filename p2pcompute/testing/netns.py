"""Network namespaces for testnets: a public LAN, public peers, NAT routers with private peers behind them (root only).

Every namespace of one run is named ``<prefix><name>`` with a prefix unique to the run (:func:`new_prefix`:
``p2pct-<pid>-<6 hex>-``), so parallel runs never collide, :func:`cleanup` removes exactly one run, and
:func:`remove_stale` removes the leftovers of runs whose process is gone (never those of a live process). Nothing
is created in the root namespace: every interface lives inside one of the run's namespaces, so deleting them
deletes everything (veths, bridges, qdiscs, nftables rules, conntrack state)::

    <prefix>net   the "internet": bridge br0, 10.77.0.1/24 (no forwarding: packets off the subnet are dropped,
     │            as an ISP drops private addresses)
     ├── p0 ── eth0  <prefix>a     public peer 10.77.0.2, default via .1
     ├── p1 ── eth0  <prefix>b     public peer 10.77.0.3
     └── r0 ── wan   <prefix>home  NAT router 10.77.0.4; bridge "lan" 192.168.1.1/24; ip_forward=1;
                      │           nftables: masquerade out of wan, forward only lan->wan and established/related
                      └── p0 ── eth0  <prefix>x  private peer 192.168.1.2, default via 192.168.1.1

Addresses are given in the order of the :class:`TopologySpec`: public peers from ``.2`` of the public subnet, then
routers; the k-th router (from 1) gets ``192.168.<k>.0/24`` with its peers from ``.2``.

**NAT type, as measured here** (Linux 6.18, nftables 1.0.6, ``masquerade`` on the router's public side; UDP and
TCP; ``tests/testing/test_netns.py`` checks it): the mapping keeps the private source port when it is free, and
one private socket keeps the same public port towards different destinations, so it is *endpoint-independent
mapping* as long as no two private hosts use the same source port. On such a collision conntrack picks another
port only for the clashing 5-tuple, so the mapping then depends on the destination. Filtering is *address and
port dependent*: only the exact remote endpoint a private socket sent to gets through (a reply from another port
of the same host is dropped), since conntrack matches the whole 5-tuple; the forward chain drops every new
inbound connection (RFC 4787 terms; "port-restricted cone" in RFC 3489's). A public peer has no route to a
private subnet, and a packet for the router's public address on an unmapped port is answered by the router
itself (a TCP RST: "connection refused").

**Link conditions** (:class:`LinkSpec`, per peer and per router uplink): ``rate_bps`` is a ``tbf`` qdisc on both
ends of the link (each direction); ``drop_percent`` is a real random packet drop in both directions
(``numgen random mod 100 < N drop`` in a netdev table on the peer's interface, ARP spared); ``faults`` is a
:class:`~p2pcompute.testing.faultproxy.FaultSpec` that this module does not apply itself: run a fault proxy in the
peer's namespace (:func:`faultproxy_argv`) in front of the ports it listens on. The kernel has no ``netem``, so
the proxy is the only way to add latency. Measured: ``rate_bps=8_000_000`` moved 2 MB in 2.08 s each way (7.7 Mbit/s).

Commands run in a namespace through ``ip netns exec`` (:func:`exec_argv`, :func:`open_process_in`,
:func:`run_in`). Every shell-out goes through :func:`sh`, which raises :class:`NetnsError` with the failing
command and its stderr. The building functions are synchronous (a few ms per ``ip`` command); call them from
trio with ``trio.to_thread.run_sync`` if the event loop must not pause. ``python -m p2pcompute.testing.netns
remove-stale`` removes leftovers from the command line.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final

import click
import trio

from p2pcompute.errors import ConfigError
from p2pcompute.testing.faultproxy import FaultSpec

__all__ = [
    "BRIDGE_NAME",
    "PREFIX_ROOT",
    "LinkSpec",
    "NatSpec",
    "NetnsError",
    "NetnsPeer",
    "NetnsRouter",
    "PeerSpec",
    "Topology",
    "TopologySpec",
    "build",
    "cleanup",
    "exec_argv",
    "faultproxy_argv",
    "list_namespaces",
    "new_prefix",
    "open_process_in",
    "remove_stale",
    "require_root",
    "run_in",
    "set_drop",
    "set_rate",
    "sh",
    "topology",
]

logger = logging.getLogger(__name__)

#: Every namespace this module makes starts with this.
PREFIX_ROOT: Final = "p2pct-"
_PREFIX_RE: Final = re.compile(r"^p2pct-(\d+)-([0-9a-f]{6})-")
#: The name (after the prefix) of the namespace holding the public bridge; no peer or router may take it.
BRIDGE_NAME: Final = "net"
_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
#: One ``ip``/``nft``/``tc`` command; they take milliseconds.
CMD_TIMEOUT_S: Final = 10.0
DEFAULT_PUBLIC_SUBNET: Final = "10.77.0.0/24"
#: Routers' private subnets are 192.168.<k>.0/24, k from 1.
MAX_ROUTERS: Final = 254
MAX_PEERS_PER_SUBNET: Final = 250
#: tbf: queue at most this long before dropping; bucket depth 10 ms of the rate, at least TBF_MIN_BURST_BYTES.
TBF_LATENCY_MS: Final = 100
TBF_MIN_BURST_BYTES: Final = 16 * 1024
MIN_RATE_BPS: Final = 8_000
_NOT_ROOT: Final = "network namespaces need root; run as root or drop --netns"


class NetnsError(ConfigError):
    """Network namespaces cannot be set up here: not root, a missing tool, or a failing ``ip``/``nft``/``tc``.

    A :class:`~p2pcompute.errors.ConfigError` (the host's configuration does not allow what was asked).
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)


def require_root(*tools: str) -> None:
    """Raise :class:`NetnsError` (one line) unless we are root and ``ip`` (and every tool named) is installed."""
    if os.geteuid() != 0:
        raise NetnsError(_NOT_ROOT)
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            package = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables"}.get(tool, tool)
            raise NetnsError(f"network namespaces need `{tool}`; install {package}")


def sh(argv: Sequence[str], *, input: str | None = None) -> str:
    """Run one command; return its stdout. Failing, missing or hanging: :class:`NetnsError` with its stderr."""
    command = shlex.join(argv)
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise NetnsError(f"`{argv[0]}` is not installed (running {command})") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{command}` did not finish within {CMD_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        stderr = " | ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        if "Operation not permitted" in stderr and os.geteuid() != 0:
            raise NetnsError(_NOT_ROOT)
        raise NetnsError(f"`{command}` failed (exit {done.returncode}): {stderr or 'no message'}")
    return done.stdout


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``netns`` (prefix it to a command line of your own launcher)."""
    return ["ip", "netns", "exec", netns, *argv]


def run_in(netns: str, argv: Sequence[str], *, input: str | None = None) -> str:
    """Run a short command inside ``netns`` (bounded by CMD_TIMEOUT_S); return its stdout."""
    return sh(exec_argv(netns, argv), input=input)


async def open_process_in(netns: str, argv: Sequence[str], **options: Any) -> trio.Process:
    """Start ``argv`` inside ``netns``; ``options`` go to :func:`trio.lowlevel.open_process` (stdout=..., env=...).

    The caller owns the process: wait for it, or kill it. :func:`cleanup` also kills whatever still runs in the
    run's namespaces.
    """
    return await trio.lowlevel.open_process(exec_argv(netns, argv), **options)


# --- the description (what a scenario file says) ---------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"a peer or router name is [a-z][a-z0-9_-]{{0,31}}, got {name!r}")
    if name == BRIDGE_NAME:
        raise ConfigError(f"{BRIDGE_NAME!r} is the public bridge's namespace; pick another name")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """Conditions of one link (a peer's, or a router's uplink)."""

    #: Faults a fault proxy in the peer's namespace applies (see faultproxy_argv); not applied by build().
    faults: FaultSpec = field(default_factory=FaultSpec)
    #: tbf rate in bits per second on both ends (each direction); 0: none.
    rate_bps: int = 0
    #: Real random packet drop in each direction, in percent [0, 100]; 0: none.
    drop_percent: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.faults, FaultSpec):
            raise ConfigError(f"faults must be a FaultSpec, got {self.faults!r}")
        if not _is_int(self.rate_bps) or not (self.rate_bps == 0 or self.rate_bps >= MIN_RATE_BPS):
            raise ConfigError(f"rate_bps must be 0 or an integer >= {MIN_RATE_BPS}, got {self.rate_bps!r}")
        if not _is_int(self.drop_percent) or not 0 <= self.drop_percent <= 100:
            raise ConfigError(f"drop_percent must be an integer in [0, 100], got {self.drop_percent!r}")


@dataclass(frozen=True, slots=True)
class PeerSpec:
    name: str
    link: LinkSpec = LinkSpec()

    def __post_init__(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True, slots=True)
class NatSpec:
    """A NAT router and the private peers behind it; ``link`` is its uplink to the public LAN."""

    name: str
    peers: tuple[PeerSpec, ...] = ()
    link: LinkSpec = LinkSpec()

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.peers) > MAX_PEERS_PER_SUBNET:
            raise ConfigError(f"router {self.name}: at most {MAX_PEERS_PER_SUBNET} private peers")


@dataclass(frozen=True, slots=True)
class TopologySpec:
    public: tuple[PeerSpec, ...] = ()
    nats: tuple[NatSpec, ...] = ()
    public_subnet: str = DEFAULT_PUBLIC_SUBNET

    def __post_init__(self) -> None:
        names = (
            [p.name for p in self.public] + [n.name for n in self.nats] + [p.name for n in self.nats for p in n.peers]
        )
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"peer and router names must be unique; repeated: {', '.join(duplicates)}")
        if len(self.nats) > MAX_ROUTERS:
            raise ConfigError(f"at most {MAX_ROUTERS} NAT routers")
        try:
            subnet = ipaddress.IPv4Network(self.public_subnet)
        except ValueError as exc:
            raise ConfigError(f"public_subnet must be an IPv4 network like 10.77.0.0/24: {exc}") from None
        needed = 1 + len(self.public) + len(self.nats)  # the bridge's gateway, the peers, the routers
        if subnet.num_addresses - 2 < needed:
            raise ConfigError(f"public_subnet {subnet} is too small for {needed} addresses")
        if subnet.overlaps(ipaddress.IPv4Network("192.168.0.0/16")) and self.nats:
            raise ConfigError(f"public_subnet {subnet} overlaps the routers' private 192.168.0.0/16")


# --- what build() made --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetnsPeer:
    name: str
    netns: str
    #: Its own address (a private one behind a NAT).
    ip: str
    #: The address others see it come from: its own, or its router's public address.
    public_ip: str
    #: The router it sits behind; None for a public peer.
    router: str | None
    link: LinkSpec
    #: Its interface (in its namespace).
    device: str = "eth0"

    @property
    def is_public(self) -> bool:
        return self.router is None

    def argv(self, argv: Sequence[str]) -> list[str]:
        return exec_argv(self.netns, argv)


@dataclass(frozen=True, slots=True)
class NetnsRouter:
    name: str
    netns: str
    public_ip: str
    private_ip: str
    private_subnet: str
    peers: tuple[str, ...]
    link: LinkSpec


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    #: The namespace of the public bridge (the "internet").
    bridge_netns: str
    public_subnet: str
    gateway_ip: str
    peers: Mapping[str, NetnsPeer]
    routers: Mapping[str, NetnsRouter]

    def namespaces(self) -> list[str]:
        return [self.bridge_netns, *(r.netns for r in self.routers.values()), *(p.netns for p in self.peers.values())]


# --- building ---------------------------------------------------------------------------------------------------


def new_prefix() -> str:
    """A prefix unique to this run: ``p2pct-<pid>-<6 hex>-`` (the pid lets remove_stale spare live runs)."""
    return f"{PREFIX_ROOT}{os.getpid()}-{secrets.token_hex(3)}-"


def list_namespaces() -> list[str]:
    """The names of every network namespace ``ip netns`` knows."""
    return [line.split()[0] for line in sh(["ip", "netns", "list"]).splitlines() if line.strip()]


def _add_namespace(netns: str, *, has_bridge: bool = False) -> None:
    sh(["ip", "netns", "add", netns])
    sh(["ip", "-n", netns, "link", "set", "lo", "up"])
    if has_bridge:
        # Bridged frames skip the IP hooks (the default 1 would run them through the router's forward chain).
        run_in(netns, ["sysctl", "-q", "-e", "-w", "net.bridge.bridge-nf-call-iptables=0"])


def _veth(netns_a: str, dev_a: str, netns_b: str, dev_b: str) -> None:
    """A veth pair made straight inside the two namespaces (nothing ever appears in the root namespace)."""
    sh(["ip", "link", "add", dev_a, "netns", netns_a, "type", "veth", "peer", "name", dev_b, "netns", netns_b])


def _up(netns: str, dev: str, *, address: str | None = None, master: str | None = None) -> None:
    if address is not None:
        sh(["ip", "-n", netns, "addr", "add", address, "dev", dev])
    if master is not None:
        sh(["ip", "-n", netns, "link", "set", dev, "master", master])
    sh(["ip", "-n", netns, "link", "set", dev, "up"])


def _bridge(netns: str, name: str, *, address: str | None = None) -> None:
    sh(["ip", "-n", netns, "link", "add", name, "type", "bridge"])
    _up(netns, name, address=address)


def _nat_ruleset(wan: str, lan: str) -> str:
    return f"""table ip p2pc_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{lan}" oifname "{wan}" accept
    }}
}}
"""


def build(spec: TopologySpec, prefix: str | None = None) -> Topology:
    """Create the namespaces of ``spec``; on any failure (or Ctrl-C) remove what was made and re-raise.

    Prefer :func:`topology`, which also removes everything on exit.
    """
    require_root("nft")
    prefix = prefix or new_prefix()
    if not _PREFIX_RE.match(prefix):
        raise ConfigError(f"a prefix looks like p2pct-<pid>-<6 hex>- (new_prefix()), got {prefix!r}")
    try:
        return _build(spec, prefix)
    except BaseException as exc:
        try:
            cleanup(prefix)
        except NetnsError as cleanup_exc:
            exc.add_note(f"and cleaning up failed too: {cleanup_exc}")
        raise


def _build(spec: TopologySpec, prefix: str) -> Topology:
    subnet = ipaddress.IPv4Network(spec.public_subnet)
    hosts = iter(subnet.hosts())
    gateway = next(hosts)
    plen = subnet.prefixlen
    bridge_ns = prefix + BRIDGE_NAME
    _add_namespace(bridge_ns, has_bridge=True)
    _bridge(bridge_ns, "br0", address=f"{gateway}/{plen}")

    peers: dict[str, NetnsPeer] = {}
    routers: dict[str, NetnsRouter] = {}
    for i, peer_spec in enumerate(spec.public):
        ip = str(next(hosts))
        netns = prefix + peer_spec.name
        _add_namespace(netns)
        _veth(netns, "eth0", bridge_ns, f"p{i}")
        _up(bridge_ns, f"p{i}", master="br0")
        _up(netns, "eth0", address=f"{ip}/{plen}")
        sh(["ip", "-n", netns, "route", "add", "default", "via", str(gateway)])
        peers[peer_spec.name] = NetnsPeer(peer_spec.name, netns, ip, ip, None, peer_spec.link)
        _apply_link(netns, "eth0", bridge_ns, f"p{i}", peer_spec.link)

    for k, nat in enumerate(spec.nats, start=1):
        public_ip = str(next(hosts))
        private = ipaddress.IPv4Network(f"192.168.{k}.0/24")
        private_hosts = iter(private.hosts())
        private_ip = str(next(private_hosts))
        router_ns = prefix + nat.name
        _add_namespace(router_ns, has_bridge=True)
        _veth(router_ns, "wan", bridge_ns, f"r{k - 1}")
        _up(bridge_ns, f"r{k - 1}", master="br0")
        _up(router_ns, "wan", address=f"{public_ip}/{plen}")
        sh(["ip", "-n", router_ns, "route", "add", "default", "via", str(gateway)])
        _bridge(router_ns, "lan", address=f"{private_ip}/24")
        run_in(router_ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        sh(exec_argv(router_ns, ["nft", "-f", "-"]), input=_nat_ruleset("wan", "lan"))
        _apply_link(router_ns, "wan", bridge_ns, f"r{k - 1}", nat.link)
        for j, peer_spec in enumerate(nat.peers):
            ip = str(next(private_hosts))
            netns = prefix + peer_spec.name
            _add_namespace(netns)
            _veth(netns, "eth0", router_ns, f"p{j}")
            _up(router_ns, f"p{j}", master="lan")
            _up(netns, "eth0", address=f"{ip}/24")
            sh(["ip", "-n", netns, "route", "add", "default", "via", private_ip])
            peers[peer_spec.name] = NetnsPeer(peer_spec.name, netns, ip, public_ip, nat.name, peer_spec.link)
            _apply_link(netns, "eth0", router_ns, f"p{j}", peer_spec.link)
        routers[nat.name] = NetnsRouter(
            nat.name, router_ns, public_ip, private_ip, str(private), tuple(p.name for p in nat.peers), nat.link
        )
    logger.info("network namespaces %s*: %d peers, %d NAT routers", prefix, len(peers), len(routers))
    return Topology(prefix, bridge_ns, str(subnet), str(gateway), peers, routers)


def _apply_link(netns: str, dev: str, other_netns: str, other_dev: str, link: LinkSpec) -> None:
    """Kernel-level link conditions: tbf on both ends, random drop on this end (both directions)."""
    if link.rate_bps:
        set_rate(netns, dev, link.rate_bps)
        set_rate(other_netns, other_dev, link.rate_bps)
    if link.drop_percent:
        set_drop(netns, dev, link.drop_percent)


def set_rate(netns: str, dev: str, rate_bps: int) -> None:
    """Cap what ``dev`` sends (egress) to ``rate_bps`` bits/s with a tbf qdisc; 0 removes the cap."""
    require_root("tc")
    if rate_bps == 0:
        current = sh(["tc", "-n", netns, "qdisc", "show", "dev", dev, "root"])
        if "tbf" in current:
            sh(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"])
        return
    if not _is_int(rate_bps) or rate_bps < MIN_RATE_BPS:
        raise ConfigError(f"rate_bps must be 0 or an integer >= {MIN_RATE_BPS}, got {rate_bps!r}")
    burst = max(TBF_MIN_BURST_BYTES, rate_bps // 8 // 100)
    sh(
        [
            "tc",
            "-n",
            netns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            f"{rate_bps}bit",
            "burst",
            str(burst),
            "latency",
            f"{TBF_LATENCY_MS}ms",
        ]
    )


def set_drop(netns: str, dev: str, percent: int) -> None:
    """Drop ``percent`` % of the IP packets ``dev`` receives and sends, at random (nftables, netdev family).

    0 removes the rule. ARP is spared, so neighbours still resolve.
    """
    if not _is_int(percent) or not 0 <= percent <= 100:
        raise ConfigError(f"drop percent must be an integer in [0, 100], got {percent!r}")
    table = f"p2pc_drop_{dev}"
    # Declaring then deleting the table makes the replacement one atomic transaction, present or not.
    ruleset = f"table netdev {table} {{}}\ndelete table netdev {table}\n"
    if percent:
        # numgen ... mod 100 yields 0..99: "< 100" is out of its range, so 100 % is a plain drop.
        match = "" if percent == 100 else f"numgen random mod 100 < {percent} "
        ruleset += f"""table netdev {table} {{
    chain ingress {{
        type filter hook ingress device "{dev}" priority filter; policy accept;
        meta protocol ip {match}counter drop
    }}
    chain egress {{
        type filter hook egress device "{dev}" priority filter; policy accept;
        meta protocol ip {match}counter drop
    }}
}}
"""
    sh(exec_argv(netns, ["nft", "-f", "-"]), input=ruleset)


def faultproxy_argv(
    listen_ip: str,
    ports: Sequence[int] | Mapping[int, int],
    spec: FaultSpec,
    *,
    target_host: str = "127.0.0.1",
    python: str = sys.executable,
) -> list[str]:
    """The command line of a fault proxy that forwards ``listen_ip:<port>`` to ``target_host:<port>``.

    ``ports``: the ports to proxy (same number on both sides), or a mapping of listen port to target port. Run it
    inside the peer's namespace (``peer.argv(...)``) with the peer listening on ``target_host``: every connection
    *to* that peer then crosses the proxy, in both directions of its bytes.
    """
    pairs = ports.items() if isinstance(ports, Mapping) else ((p, p) for p in ports)
    argv = [python, "-m", "p2pcompute.testing.faultproxy"]
    for listen_port, target_port in pairs:
        argv += ["--map", f"{listen_ip}:{listen_port}={target_host}:{target_port}"]
    return argv + spec.cli_args()


# --- removing ---------------------------------------------------------------------------------------------------


def cleanup(prefix: str) -> list[str]:
    """Kill every process left in the namespaces named ``prefix*`` and delete them; return their names.

    Tries every namespace even when one fails, then raises :class:`NetnsError` naming the failures.
    """
    if not prefix.startswith(PREFIX_ROOT) or len(prefix) <= len(PREFIX_ROOT):
        raise ConfigError(f"refusing to clean up namespaces by the prefix {prefix!r}")
    removed: list[str] = []
    errors: list[str] = []
    for netns in list_namespaces():
        if not netns.startswith(prefix):
            continue
        try:
            _kill_processes(netns)
            sh(["ip", "netns", "delete", netns])
            removed.append(netns)
        except NetnsError as exc:
            errors.append(str(exc))
    if errors:
        raise NetnsError(f"could not remove every namespace of {prefix}*: {'; '.join(errors)}")
    if removed:
        logger.info("removed network namespaces %s", ", ".join(removed))
    return removed


def _kill_processes(netns: str) -> None:
    """SIGKILL each process still inside ``netns`` (only ever one of our run's namespaces), by pid."""
    for pid_text in sh(["ip", "netns", "pids", netns]).split():
        with suppress(ProcessLookupError):
            os.kill(int(pid_text), signal.SIGKILL)


def remove_stale() -> list[str]:
    """Remove the namespaces of runs whose process is gone (``p2pct-<pid>-...`` with no such pid); return them."""
    stale_prefixes = set()
    for netns in list_namespaces():
        match = _PREFIX_RE.match(netns)
        if match is not None and not _alive(int(match.group(1))):
            stale_prefixes.add(match.group(0))
    removed: list[str] = []
    for prefix in sorted(stale_prefixes):
        removed += cleanup(prefix)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def topology(spec: TopologySpec, *, prefix: str | None = None) -> Iterator[Topology]:
    """Build ``spec`` in namespaces and remove them all on the way out (errors and Ctrl-C included).

    A process killed outright (SIGKILL) leaves its namespaces behind: :func:`remove_stale` takes them.
    """
    built = build(spec, prefix)
    try:
        yield built
    finally:
        cleanup(built.prefix)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Network namespaces of p2pcompute testnets."""


@main.command("remove-stale")
def _remove_stale_command() -> None:
    """Remove the namespaces left by runs whose process is gone."""
    try:
        require_root()
        removed = remove_stale()
    except ConfigError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(f"removed {len(removed)} namespace(s)" + (f": {', '.join(removed)}" if removed else ""))


@main.command("list")
def _list_command() -> None:
    """List the namespaces of p2pcompute runs."""
    try:
        names = [n for n in list_namespaces() if n.startswith(PREFIX_ROOT)]
    except ConfigError as exc:
        raise click.ClickException(exc.detail) from None
    for name in names:
        click.echo(name)


if __name__ == "__main__":  # pragma: no cover
    main()
