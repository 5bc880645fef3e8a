"""Network figures: advert convergence, DHT find-peer latency and memory per peer, for several sizes.

    .venv/bin/python -m benchmarks.network --sizes 10 20 50

For each size N it prints, side by side:
- testnet (N real peer processes, `p2pcompute testnet`): start-up time, advert convergence time after the last peer
  was ready, and the resident memory of a peer process (median, max);
- DHT (N light in-process hosts in a line, each connected to the previous one): find-peer latency (p50, p95, max)
  for up to 20 lookups, each from a different peer, of a random peer it is neither connected to nor has in its
  routing table, and the success rate;
"""

from __future__ import annotations

import argparse
import logging
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

from p2pcompute.net.discovery import DiscoveryConfig
from p2pcompute.net.host import HostConfig, connect
from p2pcompute.testing.net import NodeConfig, open_nodes, wait_until
from p2pcompute.testnet import PeerProcess, TestnetConfig, run_testnet

LOOKUPS = 20


def _rss_mib(pid: int | None = None) -> float:
    path = Path(f"/proc/{pid}/status") if pid else Path("/proc/self/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_testnet(n: int) -> dict[str, Any]:
    rss: list[float] = []

    def started(peers: list[PeerProcess]) -> None:
        rss.extend(_rss_mib(p.process.pid) for p in peers)

    report = await run_testnet(TestnetConfig(peers=n, timeout_s=180.0), on_started=started)
    return {
        "startup_s": report.startup_s,
        "convergence_s": report.convergence_s,
        "converged": report.converged,
        "rss_median_mib": statistics.median(rss),
        "rss_max_mib": max(rss),
    }


async def bench_dht(n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    # No auto-dialling: the lookups must cross the DHT, not an already open connection.
    config = NodeConfig(
        host=HostConfig(low_watermark=0, high_watermark=64, max_connections=128),
        discovery=DiscoveryConfig(refresh_interval_s=3600.0),
    )
    async with open_nodes(f"bench-dht-{n}-{seed}", [config] * n) as nodes:
        # A line: node i knows only node i-1, so a lookup of a far node must walk the DHT hop by hop.
        for i in range(1, n):
            await connect(nodes[i].host, nodes[i - 1].addr)
        for i in range(1, n):
            await wait_until(lambda i=i: nodes[i - 1].host.get_id() in nodes[i].dht.routing_table_peers(), timeout_s=30)
        latencies: list[float] = []
        failures = 0
        sources = list(range(n))
        rng.shuffle(sources)
        for a_index in sources:
            if len(latencies) + failures >= LOOKUPS:
                break
            a = nodes[a_index]
            far = [
                b
                for b in nodes
                if b is not a
                and b.host.get_id() not in a.host.get_connected_peers()
                and b.host.get_id() not in a.dht.routing_table_peers()
            ]
            if not far:
                continue
            b = rng.choice(far)
            start = time.perf_counter()
            found = await a.dht.find_peer(b.host.get_id())
            elapsed = time.perf_counter() - start
            if found is None:
                failures += 1
            else:
                latencies.append(elapsed)
    return {
        "find_peer_p50_ms": 1000 * _pct(latencies, 0.5) if latencies else float("nan"),
        "find_peer_p95_ms": 1000 * _pct(latencies, 0.95) if latencies else float("nan"),
        "find_peer_max_ms": 1000 * max(latencies) if latencies else float("nan"),
        "found": f"{len(latencies)}/{len(latencies) + failures}",
    }


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-testnet", action="store_true", help="only the in-process DHT figures")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        print(f"N={n}: DHT ...", flush=True)
        dht = trio.run(bench_dht, n, args.seed)
        net: dict[str, Any] = {}
        if not args.skip_testnet:
            print(f"N={n}: testnet ...", flush=True)
            net = trio.run(bench_testnet, n)
        rows.append((n, net, dht))
    print()
    print(
        f"{'N':>4} {'startup s':>10} {'converge s':>11} {'peer RSS MiB (med/max)':>23} "
        f"{'find_peer ms p50/p95/max':>26} {'found':>7}"
    )
    for n, net, dht in rows:
        if net:
            conv = f"{net['convergence_s']:.2f}" if net["converged"] else "no"
            startup = f"{net['startup_s']:.1f}"
            rss = f"{net['rss_median_mib']:.0f}/{net['rss_max_mib']:.0f}"
        else:
            conv = startup = rss = "-"
        lat = f"{dht['find_peer_p50_ms']:.0f}/{dht['find_peer_p95_ms']:.0f}/{dht['find_peer_max_ms']:.0f}"
        print(f"{n:>4} {startup:>10} {conv:>11} {rss:>23} {lat:>26} {dht['found']:>7}")
    print(f"\nmax RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
