"""p2pcompute.testing.faultproxy: the pure pieces (token bucket, segment schedule) with an injected clock, and the
proxy on real sockets on 127.0.0.1. Timings are asserted as lower bounds only."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.errors import ConfigError, HostStartError
from p2pcompute.testing.faultproxy import (
    MAX_RTO_S,
    RTO_S,
    SEGMENT_SIZE,
    FaultProxy,
    FaultSpec,
    PortMap,
    ProxyLimits,
    SegmentSchedule,
    TokenBucket,
    main,
    parse_map,
)

LOCALHOST = "127.0.0.1"
WAIT_S = 15.0

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# --- FaultSpec --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("delay_ms", -1),
        ("delay_ms", math.nan),
        ("delay_ms", 120_000),
        ("delay_ms", True),
        ("loss", 1.0),
        ("loss", -0.1),
        ("loss", "0.1"),
        ("reset", 1.5),
        ("bandwidth_bps", 100),
        ("bandwidth_bps", 1.5e6),
        ("bandwidth_bps", -8000),
        ("seed", 1.5),
        ("reset_max_bytes", -1),
    ],
)
def test_fault_spec_rejects_out_of_range_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        FaultSpec(**{field: value})  # type: ignore[arg-type]


def test_fault_spec_cli_args_give_the_same_spec() -> None:
    spec = FaultSpec(delay_ms=12.5, loss=0.01, reset=0.2, bandwidth_bps=8_000_000, seed=9, reset_max_bytes=100)
    ctx = main.make_context("faultproxy", ["--map", "127.0.0.1:0=127.0.0.1:1", *spec.cli_args()])
    params = ctx.params
    assert (
        FaultSpec(
            delay_ms=params["delay_ms"],
            loss=params["loss"],
            reset=params["reset"],
            bandwidth_bps=params["bandwidth_bps"],
            seed=params["seed"],
            reset_max_bytes=params["reset_max_bytes"],
        )
        == spec
    )
    assert FaultSpec().is_transparent and not spec.is_transparent


def test_parse_map() -> None:
    assert parse_map("10.0.0.2:4001=127.0.0.1:4002") == PortMap("10.0.0.2", 4001, "127.0.0.1", 4002)
    assert parse_map("[::1]:0=[::1]:80") == PortMap("::1", 0, "::1", 80)
    for bad in ("10.0.0.2:4001", "10.0.0.2=1.2.3.4:5", "a:70000=b:1", ":1=b:2"):
        with pytest.raises(ConfigError):
            parse_map(bad)


def test_proxy_rejects_bad_addresses() -> None:
    with pytest.raises(ConfigError, match="IP address"):
        FaultProxy("localhost", 0, LOCALHOST, 80)
    with pytest.raises(ConfigError, match="port"):
        FaultProxy(LOCALHOST, 0, LOCALHOST, 0)
    with pytest.raises(ConfigError, match="max_connections"):
        ProxyLimits(max_connections=0)


# --- TokenBucket (pure, injected clock) -------------------------------------------------------------------------


def test_token_bucket_starts_full_then_queues_at_the_rate() -> None:
    bucket = TokenBucket(rate_bytes_per_s=1000, burst_bytes=500)
    assert bucket.reserve(500, now=10.0) == 0.0  # the burst passes at once
    assert bucket.reserve(500, now=10.0) == pytest.approx(0.5)  # then the rate
    assert bucket.reserve(100, now=10.0) == pytest.approx(0.6)  # behind the debt: first come, first served
    assert bucket.reserve(200, now=10.7) == pytest.approx(0.1)  # 700 refilled against 600 owed, 100 short
    assert bucket.reserve(0, now=100.0) == 0.0
    assert bucket.tokens == 500  # refills no higher than the burst


def test_token_bucket_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket(rate_bytes_per_s=100, burst_bytes=100)
    assert bucket.reserve(100, now=5.0) == 0.0
    assert bucket.reserve(50, now=1.0) == pytest.approx(0.5)  # nothing refilled
    with pytest.raises(ValueError):
        bucket.reserve(-1, now=6.0)
    with pytest.raises(ValueError):
        TokenBucket(rate_bytes_per_s=0, burst_bytes=1)


def test_token_bucket_for_bandwidth_is_in_bits() -> None:
    bucket = TokenBucket.for_bandwidth(80_000_000)  # 10 MB/s
    assert bucket.rate_bytes_per_s == 10_000_000
    assert bucket.burst_bytes == 200_000  # 20 ms
    assert TokenBucket.for_bandwidth(8_000).burst_bytes == 16 * 1024  # the minimum depth


@given(
    rate=st.floats(min_value=1, max_value=1e9),
    burst=st.integers(min_value=1, max_value=10**7),
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=10), st.integers(min_value=0, max_value=10**7)), max_size=60
    ),
)
def test_token_bucket_never_releases_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = t0 = 1000.0
    released: list[tuple[float, int]] = []
    for dt, nbytes in steps:
        now += dt
        released.append((now + bucket.reserve(nbytes, now), nbytes))
    for when, _ in released:
        passed = sum(n for t, n in released if t <= when)
        assert passed <= burst + rate * (when - t0) + 1e-6 * max(1.0, passed)


# --- SegmentSchedule (pure) -------------------------------------------------------------------------------------


def test_schedule_without_loss_adds_the_delay_and_does_not_serialise() -> None:
    schedule = SegmentSchedule(delay_s=0.05, loss=0.0, rng=random.Random(0))
    # Ten chunks read at the same moment are all released one delay later: latency, not a sleep per chunk.
    assert [schedule.schedule(10_000, now=1.0) for _ in range(10)] == [(1.05, 0)] * 10
    assert schedule.schedule(1, now=2.0) == (2.05, 0)
    assert schedule.schedule(0, now=2.0) == (2.05, 0)  # end of stream, after what came before


def test_schedule_stalls_back_off_like_tcp() -> None:
    schedule = SegmentSchedule(delay_s=0.0, loss=0.5, rng=random.Random(0))
    assert schedule.stall(0) == 0
    assert schedule.stall(1) == pytest.approx(RTO_S)
    assert schedule.stall(2) == pytest.approx(3 * RTO_S)
    assert schedule.stall(3) == pytest.approx(7 * RTO_S)
    assert schedule.stall(10) == pytest.approx(63 * RTO_S + 4 * MAX_RTO_S)  # capped RTOs after 0.2 * 2**5


class _Scripted(random.Random):
    """A 'random' source that returns the given values in turn."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_schedule_holds_a_lost_segment_and_everything_behind_it() -> None:
    # Segment 0 lost twice then delivered; segment 1 delivered at once.
    schedule = SegmentSchedule(delay_s=0.01, loss=0.3, rng=_Scripted([0.1, 0.2, 0.9, 0.9]))
    release, lost = schedule.schedule(SEGMENT_SIZE, now=0.0)
    assert lost == 2 and release == pytest.approx(0.01 + 3 * RTO_S)
    # The next chunk has no loss, yet waits for the stalled one (in-order delivery).
    assert schedule.schedule(SEGMENT_SIZE, now=0.02) == (release, 0)


def test_schedule_losses_follow_the_stream_not_the_read_sizes() -> None:
    def losses(chunk: int) -> int:
        schedule = SegmentSchedule(delay_s=0.0, loss=0.1, rng=random.Random(7))
        total = 0
        for start in range(0, 1_000_000, chunk):
            total += schedule.schedule(min(chunk, 1_000_000 - start), now=0.0)[1]
        return total

    assert losses(1000) == losses(65536) == losses(SEGMENT_SIZE) > 0


# --- the proxy on real sockets ----------------------------------------------------------------------------------


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 running ``handler`` per connection; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOCALHOST))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def fault_proxy(target_port: int, spec: FaultSpec, **kwargs: object) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(LOCALHOST, 0, LOCALHOST, target_port, spec, **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


async def receive_all(stream: trio.SocketStream) -> bytes:
    buf = bytearray()
    async for data in stream:
        buf += data
    return bytes(buf)


async def echo_through(port: int, payload: bytes) -> bytes:
    """Send ``payload`` while reading the echo; return what came back."""
    stream = await trio.open_tcp_stream(LOCALHOST, port)
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)

        nursery.start_soon(send)
        return await receive_exactly(stream, len(payload))


async def test_bytes_pass_unchanged_in_both_directions_with_half_close() -> None:
    rng = random.Random(1)
    upstream = rng.randbytes(700_000)
    downstream = rng.randbytes(500_000)

    async def server(stream: trio.SocketStream) -> None:
        # Talk first, then read the client's bytes to their end, then answer with their digest.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, downstream)
            received = await receive_all(stream)
        await stream.send_all(hashlib.sha256(received).digest())
        await stream.send_eof()

    async with tcp_server(server) as port, fault_proxy(port, FaultSpec(delay_ms=1)) as proxy:
        with trio.fail_after(WAIT_S):
            stream = await trio.open_tcp_stream(LOCALHOST, proxy.port or 0)
            async with stream, trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(upstream)
                    await stream.send_eof()  # the half-close reaches the server through the proxy

                nursery.start_soon(send)
                answer = await receive_all(stream)
            while proxy.stats.active:
                await trio.sleep(0.01)
    assert answer == downstream + hashlib.sha256(upstream).digest()
    stats = proxy.stats
    assert (stats.connections, stats.bytes_to_target, stats.bytes_to_client) == (1, len(upstream), len(answer))
    assert (stats.resets, stats.aborted, stats.segments_lost, stats.active) == (0, 0, 0, 0)


async def test_delay_is_added_one_way() -> None:
    delay_ms = 80.0
    arrived = trio.Event()
    arrival: list[float] = []

    async def server(stream: trio.SocketStream) -> None:
        await stream.receive_some(1)
        arrival.append(trio.current_time())
        arrived.set()
        await echo(stream)

    async with tcp_server(server) as port, fault_proxy(port, FaultSpec(delay_ms=delay_ms)) as proxy:
        with trio.fail_after(WAIT_S):
            stream = await trio.open_tcp_stream(LOCALHOST, proxy.port or 0)
            async with stream:
                sent = trio.current_time()
                await stream.send_all(b"x")
                await arrived.wait()
                ping = trio.current_time()
                await stream.send_all(b"ping")
                assert await receive_exactly(stream, 4) == b"ping"
                rtt = trio.current_time() - ping
    assert arrival[0] - sent >= delay_ms / 1000
    assert rtt >= 2 * delay_ms / 1000


async def test_loss_stalls_and_counts_but_never_corrupts_or_reorders() -> None:
    payload = random.Random(2).randbytes(300_000)  # 208 segments each way
    async with tcp_server(echo) as port:
        results = []
        for _ in range(2):  # the same seed gives the same losses
            async with fault_proxy(port, FaultSpec(loss=0.02, seed=11)) as proxy:
                with trio.fail_after(WAIT_S * 2):
                    start = trio.current_time()
                    back = await echo_through(proxy.port or 0, payload)
                    elapsed = trio.current_time() - start
            assert back == payload
            results.append(proxy.stats.segments_lost)
            assert proxy.stats.segments_lost > 0
            assert elapsed >= RTO_S  # at least one stall
    assert results[0] == results[1]


async def test_reset_rate_over_many_connections() -> None:
    n, rate = 40, 0.3
    payload = bytes(8192)  # more than reset_max_bytes: a doomed connection is always reset before the end

    async def run_all(seed: int) -> tuple[list[int], FaultProxy]:
        failed = []
        spec = FaultSpec(reset=rate, reset_max_bytes=4096, seed=seed)
        async with fault_proxy(port, spec) as proxy:
            for i in range(n):
                with trio.fail_after(WAIT_S):
                    try:
                        back = await echo_through(proxy.port or 0, payload)
                    except* trio.BrokenResourceError:  # ECONNRESET: the RST of SO_LINGER 0
                        back = b""
                if back != payload:
                    failed.append(i)
            with trio.fail_after(WAIT_S):
                while proxy.stats.active:
                    await trio.sleep(0.01)
        return failed, proxy

    async with tcp_server(echo) as port:
        failed, proxy = await run_all(seed=5)
        again, _ = await run_all(seed=5)
    assert failed == again  # seeded: the same connections are reset
    assert proxy.stats.resets == len(failed)
    assert proxy.stats.connections == n and proxy.stats.aborted == 0
    assert abs(len(failed) - n * rate) <= 9  # binomial(40, 0.3): sd 2.9


async def is_reset(port: int) -> bool:
    """Whether a connection to ``port`` is reset (at connect, where the RST beats it, or at the first read)."""
    try:
        stream = await trio.open_tcp_stream(LOCALHOST, port)
    except OSError as exc:
        return isinstance(exc.__cause__, ExceptionGroup) and all(
            isinstance(e, ConnectionResetError) for e in exc.__cause__.exceptions
        )
    async with stream:
        try:
            await stream.receive_some(1)
        except trio.BrokenResourceError as exc:
            return isinstance(exc.__cause__, ConnectionResetError)
    return False


async def test_refuses_over_max_connections_and_resets_when_target_is_down() -> None:
    release = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        await release.wait()

    async with tcp_server(hold) as port, fault_proxy(port, FaultSpec(), limits=ProxyLimits(max_connections=2)) as proxy:
        with trio.fail_after(WAIT_S):
            held = [await trio.open_tcp_stream(LOCALHOST, proxy.port or 0) for _ in range(2)]
            while proxy.stats.connections < 2:
                await trio.sleep(0.01)
            assert await is_reset(proxy.port or 0)
            assert proxy.stats.refused == 1
            release.set()
            for stream in held:
                await stream.aclose()

    # A target that is not listening: the client is reset, the proxy goes on.
    async with tcp_server(echo) as closed_port:
        pass
    async with fault_proxy(closed_port, FaultSpec()) as proxy:
        with trio.fail_after(WAIT_S):
            assert await is_reset(proxy.port or 0)
        assert proxy.stats.connect_failed == 1


async def test_listening_on_a_busy_port_is_a_host_start_error() -> None:
    async with tcp_server(echo) as port, fault_proxy(port, FaultSpec()) as proxy:
        busy = FaultProxy(LOCALHOST, proxy.port or 0, LOCALHOST, port)
        with pytest.raises(HostStartError, match="cannot listen"):
            await busy.run()


async def test_libp2p_dial_through_the_proxy() -> None:
    from libp2p.custom_types import TProtocol

    from p2pcompute.net.host import connect, open_host
    from p2pcompute.testing.net import LOOPBACK, seed_for, tcp_port

    protocol = TProtocol("/p2pcompute-test/echo/1.0.0")
    payload = random.Random(3).randbytes(200_000)

    async def handler(stream: object) -> None:
        data = await stream.read(len(payload))  # type: ignore[attr-defined]
        while len(data) < len(payload):
            data += await stream.read(len(payload) - len(data))  # type: ignore[attr-defined]
        await stream.write(data)  # type: ignore[attr-defined]
        await stream.close()  # type: ignore[attr-defined]

    async with (
        open_host(seed_for(__name__, 0), LOOPBACK) as dialer,
        open_host(seed_for(__name__, 1), LOOPBACK) as listener,
    ):
        listener.set_stream_handler(protocol, handler)
        spec = FaultSpec(delay_ms=20, loss=0.01, seed=1)
        async with fault_proxy(tcp_port(listener), spec) as proxy:
            with trio.fail_after(WAIT_S * 2):
                peer = await connect(dialer, f"/ip4/{LOCALHOST}/tcp/{proxy.port}/p2p/{listener.get_id()}")
                assert peer == listener.get_id()
                stream = await dialer.new_stream(peer, [protocol])
                await stream.write(payload)
                back = b""
                while len(back) < len(payload):
                    back += await stream.read(len(payload) - len(back))
                await stream.close()
            assert back == payload
            assert proxy.stats.connections == 1
            assert proxy.stats.bytes_to_target > len(payload) and proxy.stats.bytes_to_client > len(payload)


# --- the command line -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--map", "127.0.0.1:0=127.0.0.1:1", "--loss", "1.5"], "loss must be a probability"),
        (["--map", "127.0.0.1:0"], "expected LISTEN_HOST:LPORT=TARGET_HOST:TPORT"),
        (["--listen", "127.0.0.1:0"], "--listen and --target go together"),
        ([], "nothing to proxy"),
        (["--map", "localhost:0=127.0.0.1:1"], "must be an IP address"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1


async def test_cli_proxies_several_pairs_and_prints_stats_on_sigterm() -> None:
    async with tcp_server(echo) as port_a, tcp_server(echo) as port_b:
        argv = [
            sys.executable,
            "-m",
            "p2pcompute.testing.faultproxy",
            "--map",
            f"127.0.0.1:0=127.0.0.1:{port_a}",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"127.0.0.1:{port_b}",
            "--delay-ms",
            "5",
            "--seed",
            "4",
        ]
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, env={**os.environ})
        assert process.stdout is not None
        lines: list[dict[str, object]] = []
        buf = b""
        try:
            with trio.fail_after(WAIT_S):
                while len(lines) < 2:
                    data = await process.stdout.receive_some()
                    assert data, "the proxy exited before listening"
                    buf += data
                    *done, buf = buf.split(b"\n")
                    lines += [json.loads(line) for line in done]
                assert [line["event"] for line in lines] == ["listening", "listening"]
                assert lines[0]["target"] == f"127.0.0.1:{port_b}"  # --listen/--target come first
                assert {line["seed"] for line in lines} == {4}
                for line, size in zip(lines, (1000, 3000), strict=True):
                    assert await echo_through(int(str(line["port"])), bytes(size)) == bytes(size)
                process.send_signal(signal.SIGTERM)
                rest = buf
                async for data in process.stdout:
                    rest += data
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        stats = [json.loads(line) for line in rest.splitlines()]
        assert [(s["event"], s["connections"], s["bytes_to_target"]) for s in stats] == [
            ("stats", 1, 1000),
            ("stats", 1, 3000),
        ]
