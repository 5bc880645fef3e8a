"""Bulk transfer on loopback, side by side: raw TCP, a py-libp2p Noise+yamux stream, the data channel, and the
data channel's session over a ``/p2pcompute/data/1.0.0`` libp2p stream (the fallback when no direct TCP path exists).

    .venv/bin/python -m benchmarks.transfer [--mib 256] [--libp2p-mib 64] [--repeats 3] [--two-processes]
        [--skip-one-process] [--skip-libp2p]

By default both ends run in this one trio process (they share one thread, as in the network tests);
``--two-processes`` adds raw TCP (into a reused buffer, and into a fresh one of the full size) and the data channel
with the far end in a child process. Each figure is the best of ``--repeats`` rounds, run round-robin, and the last
column the ratio of the medians; compare ratios to the raw TCP of the same run, not absolute figures across runs
(on a shared machine they vary up to 2x). The fallback stream moves ``--libp2p-mib`` (it is as slow as the libp2p
stream under it), sealed with AES-256-GCM and in clear mode. The data channel runs in each of its modes: sealed
with AES-256-GCM (the default where the CPU has AES instructions), sealed with ChaCha20-Poly1305 (the default
elsewhere), and clear (an explicit opt-in). Also printed: the single-core speed of the primitives (SHA-256,
AES-256-GCM and ChaCha20-Poly1305 from cryptography/OpenSSL, ChaCha20-Poly1305 from PyNaCl).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import mmap
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from p2pcompute.net.host import connect, host_addrs, open_host
from p2pcompute.net.protocols import DATA_PROTOCOL
from p2pcompute.net.transfer import (
    CHUNK_SIZE,
    Cipher,
    DataChannelConfig,
    DataServer,
    download,
    download_over,
    upload,
    upload_over,
)

MIB = 1 << 20
LOOPBACK = "127.0.0.1"
BENCH_PROTOCOL = TProtocol("/p2pcompute/bench-transfer/1.0.0")
LIBP2P_WRITE = 1 * MIB
LIBP2P_READ = 1 * MIB
BLOBS = 4
#: The data channel's modes: clear, or sealed with the named cipher.
MODES = ("clear", Cipher.AES_256_GCM.value, Cipher.CHACHA20_POLY1305.value)
MODE_NAMES = {"clear": "clear", "aes-256-gcm": "AES-256-GCM", "chacha20-poly1305": "ChaCha20-Poly1305"}


def channel_config(mode: str, max_ticket_bytes: int) -> DataChannelConfig:
    """The config of both ends for ``mode`` ("clear" or a cipher name)."""
    if mode == "clear":
        return DataChannelConfig(clear=True, max_ticket_bytes=max_ticket_bytes)
    return DataChannelConfig(cipher=Cipher(mode), max_ticket_bytes=max_ticket_bytes)


async def bench_raw_tcp(total: int, *, fresh: bool = False) -> float:
    """Seconds to move ``total`` bytes over one trio TCP connection in 1 MiB writes.

    The receiver reads with ``recv_into``: into one reused 1 MiB buffer (``fresh=False``: the wire alone), or
    into a buffer of ``total`` bytes allocated inside the timed region (``fresh=True``: what any receiver that
    keeps the bytes pays, the data channel included).
    """
    data = os.urandom(CHUNK_SIZE)
    done = trio.Event()

    async def receive(stream: trio.SocketStream) -> None:
        buffer = memoryview(bytearray(total if fresh else CHUNK_SIZE))
        got = 0
        while got < total:
            n = await stream.socket.recv_into(buffer[got:] if fresh else buffer)
            if n == 0:
                break
            got += n
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, receive, 0, host=LOOPBACK))
        port = listeners[0].socket.getsockname()[1]
        start = time.perf_counter()
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            sent = 0
            while sent < total:
                piece = memoryview(data)[: min(CHUNK_SIZE, total - sent)]
                await stream.send_all(piece)
                sent += len(piece)
            await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


async def bench_libp2p(total: int) -> float:
    """Seconds to move ``total`` bytes over one Noise+yamux stream between two hosts."""
    data = os.urandom(LIBP2P_WRITE)
    done = trio.Event()

    async def handler(stream: INetStream) -> None:
        got = 0
        while got < total:
            chunk = await stream.read(LIBP2P_READ)
            if not chunk:
                break
            got += len(chunk)
        done.set()
        await stream.close()

    async with (
        open_host(hashlib.sha256(b"bench-transfer/a").digest(), [f"/ip4/{LOOPBACK}/tcp/0"]) as a,
        open_host(hashlib.sha256(b"bench-transfer/b").digest(), [f"/ip4/{LOOPBACK}/tcp/0"]) as b,
    ):
        b.set_stream_handler(BENCH_PROTOCOL, handler)
        peer = await connect(a, host_addrs(b)[0])
        stream = await a.new_stream(peer, [BENCH_PROTOCOL])
        start = time.perf_counter()
        sent = 0
        while sent < total:
            piece = data[: min(LIBP2P_WRITE, total - sent)]
            await stream.write(piece)
            sent += len(piece)
        with trio.fail_after(600):
            await done.wait()
        elapsed = time.perf_counter() - start
        await stream.close()
    return elapsed


def _blobs(total: int) -> dict[bytes, bytes]:
    sizes = [total // BLOBS] * (BLOBS - 1) + [total - (total // BLOBS) * (BLOBS - 1)]
    blobs = [os.urandom(size) for size in sizes]
    return {hashlib.sha256(blob).digest(): blob for blob in blobs}


async def bench_data_channel(blobs: dict[bytes, bytes], *, mode: str, direction: str) -> float:
    """Seconds for one upload (or download) of ``blobs`` through a DataServer on loopback."""
    config = channel_config(mode, sum(map(len, blobs.values())))
    server = DataServer(LOOPBACK, config=config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        start = time.perf_counter()
        if direction == "upload":
            ticket = server.expect_upload((digest, len(data)) for digest, data in blobs.items())
            nursery.start_soon(partial(upload, LOOPBACK, port, ticket.token, ticket.key, blobs, config=config))
            received = await server.receive_upload(ticket)
        else:
            ticket = server.offer_download(blobs)
            received = await download(LOOPBACK, port, ticket.token, ticket.key, ticket.blobs, config=config)
        elapsed = time.perf_counter() - start
        assert received.keys() == blobs.keys()
        nursery.cancel_scope.cancel()
    return elapsed


async def bench_data_stream(blobs: dict[bytes, bytes], *, mode: str, direction: str) -> float:
    """Seconds for one upload (or download) of ``blobs`` over a ``/p2pcompute/data/1.0.0`` stream between two
    hosts (the data server's ``handle_stream``), from opening the stream to the last check."""
    config = channel_config(mode, sum(map(len, blobs.values())))
    server = DataServer(LOOPBACK, config=config)
    async with (
        open_host(hashlib.sha256(b"bench-transfer/worker").digest(), [f"/ip4/{LOOPBACK}/tcp/0"]) as worker,
        open_host(hashlib.sha256(b"bench-transfer/client").digest(), [f"/ip4/{LOOPBACK}/tcp/0"]) as client,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(server.serve)
        worker.set_stream_handler(DATA_PROTOCOL, server.handle_stream)
        peer = await connect(client, host_addrs(worker)[0])
        start = time.perf_counter()
        stream = await client.new_stream(peer, [DATA_PROTOCOL])
        if direction == "upload":
            ticket = server.expect_upload((digest, len(data)) for digest, data in blobs.items())
            nursery.start_soon(partial(upload_over, stream, ticket.token, ticket.key, blobs, config=config))
            received = await server.receive_upload(ticket)
        else:
            ticket = server.offer_download(blobs)
            received = await download_over(stream, ticket.token, ticket.key, ticket.blobs, config=config)
        elapsed = time.perf_counter() - start
        assert received.keys() == blobs.keys()
        nursery.cancel_scope.cancel()
    return elapsed


# -- the same, with each end in its own process (as in a deployment: the two ends never share a core) ----------------


def _child_main(conn: Connection, kind: str, mode: str) -> None:
    """The receiving (or, for a download, serving) end, in a child process; talks to the parent over ``conn``."""
    trio.run(_child, conn, kind, mode)


async def _child(conn: Connection, kind: str, mode: str) -> None:
    job = conn.recv()
    if kind in ("raw", "raw-fresh"):
        total = job
        done = trio.Event()

        async def receive(stream: trio.SocketStream) -> None:
            # "raw-fresh": into a new buffer of the full size, mapped as the data channel maps a large blob (huge
            # pages), as any receiver that keeps the bytes must; "raw": into one reused 1 MiB buffer (the wire alone).
            buffer = fresh_buffer(total) if kind == "raw-fresh" else memoryview(bytearray(CHUNK_SIZE))
            got = 0
            while got < total:
                n = await stream.socket.recv_into(buffer[got:] if kind == "raw-fresh" else buffer)
                if n == 0:
                    break
                got += n
            await stream.send_all(b"\x01")
            done.set()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, receive, 0, host=LOOPBACK))
            conn.send(listeners[0].socket.getsockname()[1])
            await done.wait()
            nursery.cancel_scope.cancel()
        return
    config = channel_config(mode, 1 << 40)
    server = DataServer(LOOPBACK, config=config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        if kind == "upload":
            ticket = server.expect_upload(job)
            conn.send((port, ticket.token, ticket.key, ticket.blobs))
            await server.receive_upload(ticket)
        else:
            ticket = server.offer_download(job)
            conn.send((port, ticket.token, ticket.key, ticket.blobs))
        await trio.to_thread.run_sync(conn.recv)  # the parent has its answer
        nursery.cancel_scope.cancel()


def fresh_buffer(nbytes: int) -> memoryview:
    """A new anonymous mapping advised to use transparent huge pages (what the data channel receives a blob into)."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(region)


def two_processes(kind: str, blobs: dict[bytes, bytes], *, mode: str = "clear") -> float:
    """Seconds for the parent's end of one transfer (dial to last check) with the other end in a child process."""
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_child_main, args=(child, kind, mode))
    process.start()
    total = sum(map(len, blobs.values()))
    try:
        if kind in ("raw", "raw-fresh"):
            parent.send(total)
        elif kind == "upload":
            parent.send([(digest, len(data)) for digest, data in blobs.items()])
        else:
            parent.send(blobs)
        answer = parent.recv()
        return trio.run(_parent, kind, answer, blobs, total, channel_config(mode, 1 << 40))
    finally:
        parent.send("done")
        process.join(60)


async def _parent(
    kind: str,
    answer: tuple[int, bytes, bytes | None, list[tuple[bytes, int]]] | int,
    blobs: dict[bytes, bytes],
    total: int,
    config: DataChannelConfig,
) -> float:
    start = time.perf_counter()
    if isinstance(answer, int):
        data = memoryview(os.urandom(CHUNK_SIZE))
        async with await trio.open_tcp_stream(LOOPBACK, answer) as stream:
            start = time.perf_counter()
            sent = 0
            while sent < total:
                piece = data[: min(CHUNK_SIZE, total - sent)]
                await stream.send_all(piece)
                sent += len(piece)
            assert await stream.receive_some(1) == b"\x01"
    elif kind == "upload":
        port, token, key, _ = answer
        await upload(LOOPBACK, port, token, key, blobs, config=config)
    else:
        port, token, key, specs = answer
        received = await download(LOOPBACK, port, token, key, specs, config=config)
        assert received.keys() == blobs.keys()
    return time.perf_counter() - start


def primitives() -> list[tuple[str, float]]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

    data = os.urandom(CHUNK_SIZE)
    key, nonce = os.urandom(32), bytes(12)
    aead, aes = ChaCha20Poly1305(key), AESGCM(key)
    out = bytearray(CHUNK_SIZE + 16)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("SHA-256 (hashlib)", lambda: hashlib.sha256(data).digest()),
        ("AES-256-GCM seal (cryptography, encrypt_into)", lambda: aes.encrypt_into(nonce, data, None, out)),
        ("ChaCha20-Poly1305 seal (cryptography, encrypt_into)", lambda: aead.encrypt_into(nonce, data, None, out)),
        ("ChaCha20-Poly1305 seal (PyNaCl)", lambda: crypto_aead_chacha20poly1305_ietf_encrypt(data, None, nonce, key)),
    ]
    rows = []
    for name, fn in cases:
        fn()
        n = 64
        start = time.perf_counter()
        for _ in range(n):
            fn()
        rows.append((name, n / (time.perf_counter() - start)))
    return rows


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB per raw TCP / data channel run")
    parser.add_argument("--libp2p-mib", type=int, default=64, help="MiB per libp2p run (it is ~10x slower)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-libp2p", action="store_true")
    parser.add_argument("--two-processes", action="store_true", help="also: each end in its own process")
    parser.add_argument("--skip-one-process", action="store_true", help="with --two-processes: only those cases")
    args = parser.parse_args()
    total = args.mib * MIB
    blobs = _blobs(total)
    cases: list[tuple[str, int, Callable[[], float]]] = []
    if not (args.skip_one_process and args.two_processes):
        cases += [
            (
                "raw trio TCP, into a reused 1 MiB buffer",
                total,
                lambda: trio.run(partial(bench_raw_tcp, total, fresh=False)),
            ),
            (
                "raw trio TCP, into a fresh bytearray",
                total,
                lambda: trio.run(partial(bench_raw_tcp, total, fresh=True)),
            ),
        ]
        libp2p_total = args.libp2p_mib * MIB
        if not args.skip_libp2p:
            cases.append(("py-libp2p Noise+yamux stream", libp2p_total, lambda: trio.run(bench_libp2p, libp2p_total)))
        for direction in ("upload", "download"):
            for mode in MODES:
                name = f"data channel {direction}, {MODE_NAMES[mode]}"
                bench = partial(bench_data_channel, blobs, mode=mode, direction=direction)
                cases.append((name, total, partial(trio.run, bench)))
        if not args.skip_libp2p:
            stream_blobs = _blobs(libp2p_total)
            for direction in ("upload", "download"):
                for mode in (Cipher.AES_256_GCM.value, "clear"):
                    name = f"data over a libp2p stream (fallback) {direction}, {MODE_NAMES[mode]}"
                    bench = partial(bench_data_stream, stream_blobs, mode=mode, direction=direction)
                    cases.append((name, libp2p_total, partial(trio.run, bench)))
    if args.two_processes:
        cases.append(("2 processes: raw trio TCP, reused buffer", total, partial(two_processes, "raw", blobs)))
        cases.append(("2 processes: raw trio TCP, fresh buffer", total, partial(two_processes, "raw-fresh", blobs)))
        for direction in ("upload", "download"):
            for mode in MODES:
                name = f"2 processes: data channel {direction}, {MODE_NAMES[mode]}"
                cases.append((name, total, partial(two_processes, direction, blobs, mode=mode)))
    # Round-robin, best of the repeats: on a shared machine a burst of load hits one round, not one case. The
    # median of the rounds is printed too: one lucky raw round (or one unlucky first touch of fresh memory) moves
    # a best-of ratio a long way on a shared machine.
    times: list[list[float]] = [[] for _ in cases]
    for round_ in range(args.repeats):
        for i, (name, _, fn) in enumerate(cases):
            print(f"round {round_ + 1}/{args.repeats}: {name} ...", flush=True)
            times[i].append(fn())
    print(f"\nloopback, best of {args.repeats} rounds; ratios to the raw TCP of the same setting")
    print(f"{'path':<60} {'MiB':>5} {'MiB/s':>7} {'x raw (reused)':>15} {'x raw (fresh)':>14} {'median x reused':>16}")
    wire = fresh = wire_median = 0.0
    for (name, nbytes, _), seconds in zip(cases, times, strict=True):
        rate, median = nbytes / min(seconds), nbytes / statistics.median(seconds)
        if name.startswith("raw") or name.startswith("2 processes: raw"):
            if "reused" in name:
                wire, wire_median = rate, median
                fresh = 0.0 if name.startswith("2 processes") else fresh
            else:
                fresh = rate
        ratio_fresh = f"{rate / fresh:>14.2f}" if fresh else f"{'-':>14}"
        print(
            f"{name:<60} {nbytes // MIB:>5} {rate / MIB:>7.0f} {rate / wire:>15.2f} {ratio_fresh}"
            f" {median / wire_median:>16.2f}"
        )
    print("\nprimitives, one core, 1 MiB buffers")
    for name, per_s in primitives():
        print(f"{name:<52} {per_s:>15.0f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
