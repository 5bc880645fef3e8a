"""p2pcompute.testing.netns: topologies in real network namespaces (root, ``ip`` and ``nft`` needed; skipped without).

Traffic is made by ``netprobe.py`` run inside the namespaces. Negative checks ("cannot connect") wait on a short
connect timeout: a dropped SYN never comes back, so no longer wait could change the answer.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pcompute.errors import ConfigError
from p2pcompute.testing import faultproxy, netns
from p2pcompute.testing.faultproxy import FaultSpec
from p2pcompute.testing.netns import (
    LinkSpec,
    NatSpec,
    NetnsError,
    PeerSpec,
    Topology,
    TopologySpec,
    cleanup,
    exec_argv,
    faultproxy_argv,
    list_namespaces,
    new_prefix,
    open_process_in,
    remove_stale,
    require_root,
    set_drop,
    set_rate,
    sh,
    topology,
)

PROBE = str(Path(__file__).with_name("netprobe.py"))
WAIT_S = 10.0
#: How long a negative connect waits for a SYN-ACK that a drop never lets come.
NEGATIVE_TIMEOUT_S = 0.7
SERVE_S = 20  # probe servers exit by themselves after this


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nft", "tc", "sysctl") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install iproute2 nftables procps)"
    return None


UNAVAILABLE = _unavailable()
needs_netns = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")

SPEC = TopologySpec(
    public=(PeerSpec("a"), PeerSpec("b")),
    nats=(NatSpec("home", (PeerSpec("x"), PeerSpec("y"))),),
)


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology(SPEC) as built:
        yield built


# --- helpers ----------------------------------------------------------------------------------------------------


class Lines:
    """JSON lines from a process's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> dict[str, Any]:
        with trio.fail_after(WAIT_S):
            while b"\n" not in self.buf:
                data = await self.stream.receive_some()
                assert data, "the process ended"
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))


@asynccontextmanager
async def started(netns_name: str, argv: list[str]) -> AsyncIterator[Lines]:
    """Run ``argv`` in a namespace; yield its JSON lines after the first (its 'listening' line); kill it after."""
    process = await open_process_in(netns_name, argv, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        lines = Lines(process.stdout)
        first = await lines.next()
        assert "listening" in first or first.get("event") == "listening", first
        yield lines
    finally:
        process.kill()
        with trio.move_on_after(WAIT_S):
            await process.wait()


async def probe(netns_name: str, *args: object) -> dict[str, Any]:
    """Run a short netprobe command in a namespace; its one JSON line."""
    with trio.fail_after(WAIT_S):
        done = await trio.run_process(
            exec_argv(netns_name, [sys.executable, PROBE, *map(str, args)]), capture_stdout=True
        )
    return dict(json.loads(done.stdout))


def serve_tcp(port: int, host: str = "0.0.0.0") -> list[str]:
    return [sys.executable, PROBE, "tcp-serve", host, str(port), str(SERVE_S)]


# --- without root -----------------------------------------------------------------------------------------------


def test_not_root_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError) as caught:
        require_root()
    assert caught.value.detail == "network namespaces need root; run as root or drop --netns"
    assert isinstance(caught.value, ConfigError)
    with pytest.raises(NetnsError, match="need root"):
        netns.build(SPEC)


@pytest.mark.skipif(shutil.which("ip") is None, reason="no `ip`")
def test_a_failing_command_names_itself_and_its_stderr() -> None:
    with pytest.raises(NetnsError) as caught:
        sh(["ip", "link", "show", "dev", "p2pct-no-such-dev"])
    message = str(caught.value)
    assert "`ip link show dev p2pct-no-such-dev` failed (exit 1)" in message
    assert "does not exist" in message and "\n" not in message
    with pytest.raises(NetnsError, match="is not installed"):
        sh(["p2pct-no-such-tool"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PeerSpec("Bad Name"), "name is"),
        (lambda: PeerSpec("net"), "public bridge"),
        (lambda: TopologySpec(public=(PeerSpec("a"),), nats=(NatSpec("a"),)), "repeated: a"),
        (lambda: TopologySpec(nats=(NatSpec("r", (PeerSpec("a"), PeerSpec("a"))),)), "repeated: a"),
        (lambda: TopologySpec(public_subnet="10.77.0.5/24"), "IPv4 network"),
        (lambda: TopologySpec(public=(PeerSpec("a"), PeerSpec("b")), public_subnet="10.0.0.0/30"), "too small"),
        (lambda: TopologySpec(nats=(NatSpec("r"),), public_subnet="192.168.1.0/24"), "overlaps"),
        (lambda: LinkSpec(rate_bps=100), "rate_bps"),
        (lambda: LinkSpec(drop_percent=101), "drop_percent"),
    ],
)
def test_spec_validation(make: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_prefixes_are_unique_and_carry_the_pid() -> None:
    prefixes = {new_prefix() for _ in range(50)}
    assert len(prefixes) == 50
    assert all(p.startswith(f"p2pct-{os.getpid()}-") and p.endswith("-") for p in prefixes)
    with pytest.raises(ConfigError, match="refusing"):
        cleanup("p2pct-")


def test_faultproxy_argv_is_the_proxy_command_line() -> None:
    spec = FaultSpec(delay_ms=30, loss=0.01, seed=3)
    argv = faultproxy_argv("10.77.0.2", [4001, 4002], spec, python="python3")
    assert argv[:3] == ["python3", "-m", "p2pcompute.testing.faultproxy"]
    params = faultproxy.main.make_context("faultproxy", argv[3:]).params
    assert params["maps"] == ("10.77.0.2:4001=127.0.0.1:4001", "10.77.0.2:4002=127.0.0.1:4002")
    assert (params["delay_ms"], params["loss"], params["seed"]) == (30, 0.01, 3)
    assert "10.77.0.2:80=127.0.0.1:8080" in faultproxy_argv("10.77.0.2", {80: 8080}, spec)


# --- in namespaces ----------------------------------------------------------------------------------------------


@needs_netns
async def test_public_peer_reaches_another_public_peer(topo: Topology) -> None:
    a, b = topo.peers["a"], topo.peers["b"]
    async with started(a.netns, serve_tcp(7001)) as server:
        assert await probe(b.netns, "tcp-connect", a.ip, 7001, WAIT_S) == {"result": "ok", "reply": "hi"}
        assert (await server.next())["peer"][0] == b.ip


@needs_netns
async def test_private_peer_reaches_a_public_peer_from_the_routers_address(topo: Topology) -> None:
    a, x = topo.peers["a"], topo.peers["x"]
    router = topo.routers["home"]
    assert x.public_ip == router.public_ip != x.ip
    async with started(a.netns, serve_tcp(7002)) as server:
        assert await probe(x.netns, "tcp-connect", a.ip, 7002, WAIT_S) == {"result": "ok", "reply": "hi"}
        assert (await server.next())["peer"][0] == router.public_ip  # the masquerade


@needs_netns
async def test_no_inbound_connection_to_a_private_peer(topo: Topology) -> None:
    a, x = topo.peers["a"], topo.peers["x"]
    router = topo.routers["home"]
    results: dict[str, dict[str, Any]] = {}

    async def attempt(name: str, *args: object) -> None:
        results[name] = await probe(a.netns, "tcp-connect", *args)

    async with started(x.netns, serve_tcp(7003)):
        async with trio.open_nursery() as nursery:
            # No route to the private subnet: the SYN goes to the public gateway, which drops it.
            nursery.start_soon(attempt, "private ip", x.ip, 7003, NEGATIVE_TIMEOUT_S)
            # The router's public address, no mapping for the port: the router itself refuses.
            nursery.start_soon(attempt, "router ip", router.public_ip, 7003, NEGATIVE_TIMEOUT_S)
        # A neighbour that routes the private subnet through the router: its forward chain drops new inbound.
        route = ["ip", "-n", a.netns, "route", "add", router.private_subnet, "via", router.public_ip]
        sh(route)
        try:
            await attempt("routed via router", x.ip, 7003, NEGATIVE_TIMEOUT_S)
        finally:
            sh(["ip", "-n", a.netns, "route", "del", router.private_subnet])
    assert results["private ip"]["result"] == "timeout"
    assert results["router ip"]["result"] == "ConnectionRefusedError"
    assert results["routed via router"]["result"] == "timeout"


@needs_netns
async def test_nat_mapping_is_endpoint_independent_and_filtering_address_and_port_dependent(topo: Topology) -> None:
    a, b, x, y = (topo.peers[n] for n in "abxy")
    public_ip = topo.routers["home"].public_ip
    udp_serve = [sys.executable, PROBE, "udp-serve", "7100", str(SERVE_S)]
    async with started(a.netns, udp_serve) as at_a, started(b.netns, udp_serve) as at_b:
        seen_by_x = await probe(x.netns, "udp-probe", 41000, 0.3, f"{a.ip}:7100", f"{b.ip}:7100")
        from_x = [(await at_a.next())["peer"], (await at_b.next())["peer"]]
        # y uses the same private port towards a: a collision, so conntrack picks another public port.
        await probe(y.netns, "udp-probe", 41000, 0.1, f"{a.ip}:7100")
        from_y = (await at_a.next())["peer"]
    # Mapping: x's port is kept and is the same towards both destinations (endpoint-independent).
    assert from_x == [[public_ip, 41000], [public_ip, 41000]]
    assert from_y[0] == public_ip and from_y[1] != 41000
    # Filtering: only the exact endpoint x sent to gets through, not another port of the same host.
    assert sorted(seen_by_x["replies"]) == sorted([["same", a.ip, 7100], ["same", b.ip, 7100]])


@needs_netns
async def test_faultproxy_runs_inside_a_namespace(topo: Topology) -> None:
    a, b = topo.peers["a"], topo.peers["b"]
    proxy_argv = faultproxy_argv(a.ip, {7201: 7200}, FaultSpec(delay_ms=20, seed=1))
    async with (
        started(a.netns, serve_tcp(7200, host="127.0.0.1")) as server,
        started(a.netns, proxy_argv),
    ):
        assert await probe(b.netns, "tcp-connect", a.ip, 7201, WAIT_S) == {"result": "ok", "reply": "hi"}
        assert (await server.next())["peer"][0] == "127.0.0.1"  # it came through the proxy


@needs_netns
async def test_kernel_rate_and_drop(topo: Topology) -> None:
    a, b = topo.peers["a"], topo.peers["b"]
    set_rate(a.netns, "eth0", 10_000_000)
    assert "tbf" in sh(["tc", "-n", a.netns, "qdisc", "show", "dev", "eth0"])
    set_rate(a.netns, "eth0", 0)
    assert "tbf" not in sh(["tc", "-n", a.netns, "qdisc", "show", "dev", "eth0"])
    set_drop(a.netns, "eth0", 100)
    set_drop(a.netns, "eth0", 100)  # replacing is fine
    try:
        set_drop(a.netns, "eth0", 30)
        assert "numgen random mod 100 < 30" in netns.run_in(a.netns, ["nft", "list", "ruleset"])
        set_drop(a.netns, "eth0", 100)
        async with started(a.netns, serve_tcp(7300)):
            assert (await probe(b.netns, "tcp-connect", a.ip, 7300, NEGATIVE_TIMEOUT_S))["result"] == "timeout"
    finally:
        set_drop(a.netns, "eth0", 0)
    assert "p2pc_drop" not in netns.run_in(a.netns, ["nft", "list", "ruleset"])


@needs_netns
async def test_cleanup_leaves_nothing_and_kills_what_ran_inside() -> None:
    root_links = sh(["ip", "-o", "link", "show"])
    spec = TopologySpec(
        public=(PeerSpec("p", LinkSpec(rate_bps=1_000_000, drop_percent=1)),),
        nats=(NatSpec("r", (PeerSpec("q"),), LinkSpec(rate_bps=2_000_000)),),
    )
    with pytest.raises(KeyboardInterrupt), topology(spec) as built:
        prefix = built.prefix
        assert sorted(n for n in list_namespaces() if n.startswith(prefix)) == sorted(built.namespaces())
        sleeper = await open_process_in(built.peers["q"].netns, ["sleep", "60"])
        raise KeyboardInterrupt  # as if Ctrl-C hit the body
    with trio.fail_after(WAIT_S):
        assert await sleeper.wait() != 0  # killed by the cleanup
    assert not [n for n in list_namespaces() if n.startswith(prefix)]
    assert sh(["ip", "-o", "link", "show"]) == root_links  # nothing was ever made in the root namespace
    assert prefix not in sh(["ip", "-o", "link", "show"])


@needs_netns
def test_a_failure_while_building_removes_what_was_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_nat_ruleset", lambda wan, lan: "table ip broken { chain c { nonsense } }\n")
    prefix = new_prefix()
    with pytest.raises(NetnsError) as caught:
        netns.build(SPEC, prefix)
    message = str(caught.value)
    assert "nft -f -" in message and "syntax error" in message  # nft's own stderr
    assert not [n for n in list_namespaces() if n.startswith(prefix)]


@needs_netns
def test_remove_stale_takes_dead_runs_only(topo: Topology) -> None:
    dead = f"p2pct-4194305-{secrets.token_hex(3)}-"  # above PID_MAX_LIMIT (2**22): no such process can exist
    sh(["ip", "netns", "add", dead + "z"])
    try:
        assert dead + "z" in remove_stale()
    finally:
        cleanup(dead)
    assert topo.bridge_netns in list_namespaces()  # our own (live) run is spared
