"""The sandboxed executor: run job specs in a warm pool of killable worker processes.

A peer's network process never imports torch (~200 MB, seconds). :func:`open_executor` starts ``workers``
child processes (``python -m p2pcompute.compute._child``); each imports torch once, fixes the deterministic
settings (``torch.use_deterministic_algorithms(True)``, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, cuDNN benchmark
and TF32 off, a fixed intra-op thread count) and reports ``ready`` with its hardware class, e.g.
``cpu:<model>|torch 2.13.0|cuda none|threads 2``; the dtype of each job is appended to it in the result
(``...|float32``), so two results with equal hardware classes are expected to have equal digests.

Parent and child talk over the child's stdin/stdout: 8-byte length-prefixed frames, canonical msgpack headers
and raw tensor bytes (see :mod:`p2pcompute.compute._child`); nothing is pickled. Idle children wait in a
channel whose capacity is the pool size, so at most ``workers`` jobs run at once and the wait for a child is
the job's ``queue_ms``.

The worker prices and admits a job from its own numbers, never the client's: :meth:`Executor.estimate` runs the
job's meta dry run (peak bytes with per-tensor overhead, output bytes, flops) in a dedicated warm child, under
the same address-space ceiling and sandbox as a job, bounded by :data:`ESTIMATE_TIMEOUT_S`.

Every child confines itself (:mod:`p2pcompute.compute.sandbox`); a root node gives each its own uid
(``sandbox_uid_base + n``). :attr:`Executor.sandbox` says which layers are active; with ``sandbox="required"``
a missing layer makes :func:`open_executor` raise :class:`ConfigError` with a one-line reason.

Limits: the parent decodes the spec (pure :mod:`p2pcompute.core.jobspec`) and kills the child when the job
passes ``limits.wall_time_ms`` (``ExecutionError(wall_time)``); the child runs the meta-device dry run
(``check_memory``) against the job's ``memory_bytes`` (capped by the executor's ``memory_limit``) and, for a
CPU job, lowers ``RLIMIT_AS`` to its baseline plus the job's memory and outputs while it runs; the parent
refuses outputs past ``max_output_bytes`` before reading them. A child that dies (``worker_crashed``), passes
its wall time, is cancelled mid-job or hits its memory ceiling is killed and replaced by a fresh one started
in the pool's nursery; a rejected job (``JobFormatError``) or a failing op (``execution_failed``) leaves the
child in the pool.

Every job's result also carries its committed trace (specs/verification.md §10): one ``TraceLeaf`` per node, the
trace root, and the bytes of the intermediates the child kept within ``TRACE_BYTES_BUDGET``. The parent decodes and
checks what the child sends (schema, one leaf per node in order, the outputs the trace names, the kept bytes' sizes)
before it believes it; a child that sends anything else is treated as crashed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pcompute.compute import sandbox as sandbox_layers
from p2pcompute.compute._child import FRAME_PREFIX, MAX_HEADER_SIZE
from p2pcompute.core import codec
from p2pcompute.core.jobspec import DEFAULT_JOB_LIMITS, JobLimits, JobSpec, decode_job, tighter
from p2pcompute.core.messages import Timings
from p2pcompute.core.schema import from_wire
from p2pcompute.core.tensors import DIGEST_SIZE, TensorMeta, outputs_digest
from p2pcompute.core.trace import MAX_TRACE_LEAVES, TRACE_BYTES_BUDGET, TraceLeaf, check_trace, trace_root
from p2pcompute.errors import (
    ConfigError,
    DecodeError,
    ExecutionError,
    JobFormatError,
    P2PComputeError,
    Reason,
    SchemaError,
    TraceError,
)

__all__ = ["Estimate", "ExecResult", "Executor", "open_executor"]

log = logging.getLogger(__name__)

CHILD_START_TIMEOUT_S = 120.0  # python start + import torch + warm-up, on a loaded machine
ESTIMATE_TIMEOUT_S = 5.0  # one meta dry run in the estimator child (the client's offer timeout is 10 s)
ESTIMATE_CACHE = 256  # estimates kept by job digest
RECHECK_TIMEOUT_S = 30.0  # redoing one node check of received evidence
KILL_WAIT_S = 5.0  # how long to wait for a SIGKILLed child to be reaped
RESPAWN_ATTEMPTS = 3  # consecutive failed starts before a pool slot is given up
RESPAWN_BACKOFF_S = 1.0
READ_CHUNK = 1 << 20
PIPE_BUFFER_SIZE = 1 << 20  # Linux's default cap for unprivileged processes (/proc/sys/fs/pipe-max-size)
_CHILD_MODULE = "p2pcompute.compute._child"
_U32_MAX = (1 << 32) - 1

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What a finished job produced, where its time went, and its committed trace (empty when not traced)."""

    outputs: list[tuple[TensorMeta, bytes]]
    output_digest: bytes
    hardware_class: str
    timings: Timings
    trace: tuple[TraceLeaf, ...] = ()
    """One leaf per node of the job, in node order."""
    trace_root: bytes = b""
    """``core.trace.trace_root(trace)``: what a signed result commits to; empty when not traced."""
    trace_blobs: dict[bytes, bytes] = field(default_factory=dict)
    """Raw bytes of committed intermediates by digest, those of a prefix of the nodes within ``TRACE_BYTES_BUDGET``
    (the job's own inputs and constants are never among them)."""
    trace_complete: bool = False
    """Every committed digest that is not a job input or constant is in ``trace_blobs``."""


@dataclass(frozen=True, slots=True)
class Estimate:
    """The worker's own measurement of a job (its meta dry run): what admission and the price use."""

    peak_bytes: int
    output_bytes: int
    flops: int


class _ChildDied(Exception):
    """The child's stdout ended or broke."""


class _FrameReader:
    """Read exact frames from a child's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def read_exactly(self, n: int) -> bytes:
        parts = []
        have = min(n, len(self._buffer))
        if have:
            parts.append(bytes(self._buffer[:have]))
            del self._buffer[:have]
        while have < n:
            try:
                chunk = await self._stream.receive_some(min(n - have, READ_CHUNK))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ChildDied from exc
            if not chunk:
                raise _ChildDied
            need = n - have
            if len(chunk) > need:
                self._buffer += chunk[need:]
                chunk = chunk[:need]
            parts.append(chunk)
            have += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_frame(self, cap: int) -> bytes:
        (length,) = FRAME_PREFIX.unpack(await self.read_exactly(FRAME_PREFIX.size))
        if length > cap:
            raise _ChildDied(f"frame of {length} bytes, cap {cap}")
        return await self.read_exactly(length)

    async def read_header(self) -> dict[str, Any]:
        try:
            header = codec.unpack(await self.read_frame(MAX_HEADER_SIZE))
        except DecodeError as exc:
            raise _ChildDied(f"bad header from child: {exc}") from exc
        if not isinstance(header, dict) or not isinstance(header.get("type"), str):
            raise _ChildDied("child header is not a typed map")
        return header


@dataclass(eq=False)
class _Child:
    process: trio.Process
    reader: _FrameReader
    hardware_class: str
    device_kind: str
    sandbox: dict[str, str]
    uid: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    async def request(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        """One header and one frame to the child; its answer's header."""
        stdin = self.process.stdin
        assert stdin is not None
        packed = codec.pack(header)
        try:
            await stdin.send_all(FRAME_PREFIX.pack(len(packed)) + packed + FRAME_PREFIX.pack(len(payload)))
            await stdin.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ChildDied from exc
        return await self.reader.read_header()

    async def send_job(
        self, spec_bytes: bytes, blobs: Mapping[bytes, bytes], trace: bool = True, budget: int = TRACE_BYTES_BUDGET
    ) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        digests = list(blobs)
        header = codec.pack({"type": "job", "blobs": digests, "trace": trace, "trace_budget": budget})
        try:
            await stdin.send_all(FRAME_PREFIX.pack(len(header)) + header)
            await stdin.send_all(FRAME_PREFIX.pack(len(spec_bytes)) + spec_bytes)
            for digest in digests:
                blob = blobs[digest]
                await stdin.send_all(FRAME_PREFIX.pack(len(blob)))
                await stdin.send_all(blob)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ChildDied from exc


@dataclass(frozen=True, slots=True)
class _ChildArgs:
    device: str
    threads: int
    memory_limit: int | None
    sandbox: str = "auto"
    sandbox_uid_base: int = sandbox_layers.SANDBOX_UID_BASE

    def argv(self, uid: int | None) -> list[str]:
        argv = [sys.executable, "-m", _CHILD_MODULE, "--device", self.device, "--threads", str(self.threads)]
        if self.memory_limit is not None:
            argv += ["--memory-limit", str(self.memory_limit)]
        argv += ["--sandbox", self.sandbox]
        if uid is not None:
            argv += ["--sandbox-uid", str(uid)]
        return argv


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


async def _spawn(args: _ChildArgs, uid: int | None = None) -> _Child:
    """Start one child and wait for its ``ready``; raises ConfigError or ExecutionError(worker_crashed)."""
    process = await trio.lowlevel.open_process(
        args.argv(uid), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(args.threads)
    )
    assert process.stdout is not None and process.stdin is not None
    _widen_pipe(process.stdin)
    _widen_pipe(process.stdout)
    reader = _FrameReader(process.stdout)
    try:
        with trio.fail_after(CHILD_START_TIMEOUT_S):
            header = await reader.read_header()
    except BaseException as exc:
        process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT_S):
            await process.wait()
        if isinstance(exc, trio.TooSlowError):
            raise ExecutionError(Reason.WORKER_CRASHED, f"worker not ready in {CHILD_START_TIMEOUT_S} s") from exc
        if isinstance(exc, _ChildDied):
            raise ExecutionError(Reason.WORKER_CRASHED, f"worker exited while starting ({process.returncode})") from exc
        raise
    kind = header.get("type")
    if kind == "ready":
        hardware_class, device_kind = header.get("hardware_class"), header.get("device_kind")
        layers = header.get("sandbox")
        if isinstance(hardware_class, str) and device_kind in ("cpu", "cuda") and isinstance(layers, dict):
            report = {str(k): str(v) for k, v in layers.items()}
            return _Child(process, reader, hardware_class, str(device_kind), report, uid)
    process.kill()
    with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT_S):
        await process.wait()
    if kind == "fatal":
        raise ConfigError(str(header.get("detail", "worker cannot use the device")))
    raise ExecutionError(Reason.WORKER_CRASHED, f"unexpected first message {kind!r} from worker")


def _widen_pipe(stream: trio.abc.Stream | trio.abc.SendStream | trio.abc.ReceiveStream) -> None:
    """Best effort: a bigger pipe buffer (Linux) moves tensors in fewer, larger reads and writes."""
    fileno = getattr(stream, "fileno", None)
    if fileno is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(fileno(), fcntl.F_SETPIPE_SZ, PIPE_BUFFER_SIZE)


def _ms(seconds: float) -> int:
    return max(0, min(_U32_MAX, round(seconds * 1000)))


def _no_progress(stage: str) -> None:
    pass


@dataclass(eq=False)
class Executor:
    """A warm pool of worker processes. Make one with :func:`open_executor`."""

    hardware_class_base: str
    device_kind: str
    _args: _ChildArgs
    _nursery: trio.Nursery
    _idle_send: trio.MemorySendChannel[_Child]
    _idle_recv: trio.MemoryReceiveChannel[_Child]
    _children: set[_Child] = field(default_factory=set)
    _dying: set[trio.Process] = field(default_factory=set)
    _slots: int = 0
    _slots_total: int = 0
    _closed: bool = False
    sandbox: dict[str, str] = field(default_factory=dict)
    """Each sandbox layer of the children: ``active``, ``off`` or ``unavailable: <why>``."""
    _estimator: _Child | None = None
    _estimator_lock: trio.Lock = field(default_factory=trio.Lock)
    _estimates: collections.OrderedDict[bytes, Estimate] = field(default_factory=collections.OrderedDict)

    def _uid(self, index: int) -> int | None:
        """The sandbox uid of pool slot ``index`` (the estimator is slot ``workers``); None unless root."""
        if os.geteuid() != 0:
            return None
        return self._args.sandbox_uid_base + (os.getpid() % 1_000_000) * 2048 + index % 2048

    async def estimate(self, spec_bytes: bytes) -> Estimate:
        """The worker's own dry run of ``spec_bytes``: peak bytes (per-tensor overhead included), outputs, flops.

        Runs in the estimator child under the job's memory ceiling and the sandbox, bounded by
        :data:`ESTIMATE_TIMEOUT_S`. Raises :class:`JobFormatError` (the job breaks the format or the limits,
        e.g. ``memory_limit``) or :class:`ExecutionError` (``wall_time``: the dry run took too long;
        ``worker_crashed``; ``executor_closed``).
        """
        digest = hashlib.sha256(spec_bytes).digest()
        cached = self._estimates.get(digest)
        if cached is not None:
            self._estimates.move_to_end(digest)
            return cached
        header = await self._ask_estimator({"type": "estimate"}, spec_bytes, ESTIMATE_TIMEOUT_S, "dry run")
        estimate = Estimate(
            peak_bytes=_int(header.get("peak_bytes")),
            output_bytes=_int(header.get("output_bytes")),
            flops=_int(header.get("flops")),
        )
        self._estimates[digest] = estimate
        while len(self._estimates) > ESTIMATE_CACHE:
            self._estimates.popitem(last=False)
        return estimate

    async def recheck(self, evidence: bytes, now: int) -> tuple[bool, str]:
        """Redo the check of another client's check evidence (``compute.evidence.recheck``) in the sandboxed
        estimator child: the node process never imports torch, and the evidence's tensors come from strangers.
        Returns ``(confirmed, detail)``; raises :class:`P2PComputeError` as :meth:`estimate` does, or the
        evidence's own ``bad_evidence``."""
        header = await self._ask_estimator({"type": "recheck", "now": now}, evidence, RECHECK_TIMEOUT_S, "recheck")
        return bool(header.get("confirmed")), str(header.get("detail", ""))[:1000]

    async def _ask_estimator(
        self, request: dict[str, Any], payload: bytes, timeout_s: float, what: str
    ) -> dict[str, Any]:
        """One request to the estimator child (started again when it died), bounded by ``timeout_s``."""
        async with self._estimator_lock:
            if self._closed:
                raise ExecutionError(Reason.EXECUTOR_CLOSED, "the executor is closed")
            if self._estimator is None:
                self._estimator = await _spawn(self._args, self._uid(self._slots_total))
            child = self._estimator
            keep = False
            try:
                with trio.move_on_after(timeout_s) as scope:
                    header = await child.request(request, payload)
                if scope.cancelled_caught:
                    raise ExecutionError(Reason.WALL_TIME, f"the {what} took longer than {timeout_s} s")
                keep = not header.get("recycle", False)
                if header["type"] == "error":
                    raise _child_error(header)
                expected = "estimate" if request["type"] == "estimate" else "rechecked"
                if header["type"] != expected:
                    raise _ChildDied(f"unexpected message {header['type']!r} from the estimator")
            except _ChildDied as exc:
                if self._closed:
                    raise ExecutionError(Reason.EXECUTOR_CLOSED, f"the executor closed during a {what}") from exc
                raise ExecutionError(Reason.WORKER_CRASHED, str(exc) or "the estimator died") from exc
            finally:
                if not keep:
                    self._estimator = None
                    child.process.kill()
                    self._dying.add(child.process)
        return header

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the live workers (for monitoring, and for tests that kill one)."""
        return tuple(sorted(child.pid for child in self._children))

    async def run(
        self,
        spec_bytes: bytes,
        blobs: Mapping[bytes, bytes],
        *,
        progress: Progress | None = None,
        trace: bool = True,
        trace_budget: int = TRACE_BYTES_BUDGET,
    ) -> ExecResult:
        """Run one job in a warm worker.

        ``blobs`` maps digests to the raw bytes of the job's inputs and constants. ``progress`` is called with
        ``"queued"``, ``"sent to worker <pid>"``, ``"running"`` (the job passed its checks) and ``"done"``.
        ``trace=False`` runs it without committing to its intermediates (the result's trace fields stay empty);
        ``trace_budget`` (at most ``TRACE_BYTES_BUDGET``) bounds the bytes of intermediates kept, 0 for digests only.
        Raises :class:`JobFormatError` (the spec or its tensors break the job format or its limits) or
        :class:`ExecutionError` with ``wall_time``, ``memory_limit``, ``worker_crashed``, ``execution_failed``
        or ``executor_closed``. The wall time counts from handing the job to a worker to its last output byte.
        """
        start = trio.current_time()
        report = progress or _no_progress
        if self._closed:
            raise ExecutionError(Reason.EXECUTOR_CLOSED, "the executor is closed")
        spec = decode_job(spec_bytes)
        limits = tighter(spec.limits, DEFAULT_JOB_LIMITS)
        if not 0 <= trace_budget <= TRACE_BYTES_BUDGET:
            raise ConfigError(f"trace_budget must be 0 to {TRACE_BYTES_BUDGET}, not {trace_budget}")
        report("queued")
        try:
            child = await self._idle_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise ExecutionError(Reason.EXECUTOR_CLOSED, "the executor is closed") from exc
        dequeued = trio.current_time()
        keep = False
        try:
            report(f"sent to worker {child.pid}")
            with trio.move_on_after(limits.wall_time_ms / 1000) as scope:
                header, outputs, traced = await self._exchange(
                    child, spec, spec_bytes, blobs, limits, report, trace, trace_budget
                )
            if scope.cancelled_caught:
                raise ExecutionError(Reason.WALL_TIME, f"job passed its wall time of {limits.wall_time_ms} ms")
            keep = not header.get("recycle", False)
            if header["type"] == "error":
                raise _child_error(header)
        except _ChildDied as exc:
            if self._closed:
                raise ExecutionError(Reason.EXECUTOR_CLOSED, "the executor closed during the job") from exc
            detail = str(exc) or f"worker {child.pid} died during the job"
            raise ExecutionError(Reason.WORKER_CRASHED, detail) from exc
        finally:
            if keep:
                self._release(child)
            else:
                self._replace(child)
        finished = trio.current_time()
        dtype = header.get("dtype")
        timings = Timings(
            queue_ms=_ms(dequeued - start),
            load_ms=_ms(_int(header.get("load_ms")) / 1000),
            exec_ms=_ms(_int(header.get("exec_ms")) / 1000),
            total_ms=_ms(finished - start),
        )
        report("done")
        leaves, root, kept, complete = traced
        return ExecResult(
            outputs=outputs,
            output_digest=outputs_digest(meta for meta, _ in outputs),
            hardware_class=f"{child.hardware_class}|{dtype if isinstance(dtype, str) else 'none'}",
            timings=timings,
            trace=leaves,
            trace_root=root,
            trace_blobs=kept,
            trace_complete=complete,
        )

    async def _exchange(
        self,
        child: _Child,
        spec: JobSpec,
        spec_bytes: bytes,
        blobs: Mapping[bytes, bytes],
        limits: JobLimits,
        report: Progress,
        trace: bool,
        budget: int,
    ) -> tuple[dict[str, Any], list[tuple[TensorMeta, bytes]], _Trace]:
        await child.send_job(spec_bytes, blobs, trace, budget)
        while True:
            header = await child.reader.read_header()
            kind = header["type"]
            if kind == "progress":
                report(str(header.get("stage", "")))
            elif kind == "error":
                return header, [], ((), b"", {}, False)
            elif kind == "result":
                outputs = await self._read_outputs(child, header, limits.max_output_bytes)
                traced = await self._read_trace(child, header, spec, outputs, budget) if trace else ((), b"", {}, False)
                return header, outputs, traced
            else:
                raise _ChildDied(f"unexpected message {kind!r} from worker {child.pid}")

    @staticmethod
    async def _read_trace(
        child: _Child, header: dict[str, Any], spec: JobSpec, outputs: list[tuple[TensorMeta, bytes]], budget: int
    ) -> _Trace:
        """The committed trace after a result's outputs: leaf frames, then the kept intermediates (module docstring)."""
        n_frames, n_blobs, complete = (
            header.get("trace_frames"),
            header.get("trace_blobs"),
            header.get("trace_complete"),
        )
        if not (_is_count(n_frames) and _is_count(n_blobs) and isinstance(complete, bool)):
            raise _ChildDied("result without its trace counts")
        assert isinstance(n_frames, int) and isinstance(n_blobs, int)
        if n_frames > MAX_TRACE_LEAVES or n_frames > len(spec.nodes):
            raise _ChildDied(f"{n_frames} trace frames for {len(spec.nodes)} nodes")
        frames = [await child.reader.read_frame(MAX_HEADER_SIZE) for _ in range(n_frames)]
        metas = [meta for meta, _ in outputs]
        try:  # ~30 µs a leaf (default max_ops 10,000: 0.3 s): off the event loop
            leaves, root = await trio.to_thread.run_sync(functools.partial(_decode_trace, spec, frames, metas))
        except (DecodeError, SchemaError, TraceError) as exc:
            raise _ChildDied(f"bad trace from worker {child.pid}: {exc}") from exc
        sizes = {meta.digest: meta.nbytes for leaf in leaves for meta in leaf.outputs}
        kept: dict[bytes, bytes] = {}
        if n_blobs:
            digests = await child.reader.read_frame(DIGEST_SIZE * n_blobs)
            if len(digests) != DIGEST_SIZE * n_blobs:
                raise _ChildDied("trace digests frame of the wrong length")
            names = [digests[i : i + DIGEST_SIZE] for i in range(0, len(digests), DIGEST_SIZE)]
            if any(name not in sizes for name in names) or len(set(names)) != len(names):
                raise _ChildDied("kept trace bytes for a digest the trace does not name, or twice")
            if sum(sizes[name] for name in names) > budget:
                raise _ChildDied(f"worker kept more than {budget} bytes of its trace")
            for name in names:
                data = await child.reader.read_frame(sizes[name])
                if len(data) != sizes[name]:
                    raise _ChildDied("kept trace bytes of the wrong length")
                kept[name] = data
        return leaves, root, kept, complete

    @staticmethod
    async def _read_outputs(child: _Child, header: dict[str, Any], max_output: int) -> list[tuple[TensorMeta, bytes]]:
        wire = header.get("outputs")
        if not isinstance(wire, list):
            raise _ChildDied("result without an output list")
        try:
            metas = [from_wire(TensorMeta, item) for item in wire]
            sizes = [meta.nbytes for meta in metas]
        except (SchemaError, JobFormatError) as exc:
            raise _ChildDied(f"bad output metadata from worker: {exc}") from exc
        if sum(sizes) > max_output:
            raise _ChildDied(f"worker announced {sum(sizes)} output bytes, limit {max_output}")
        outputs = []
        for meta, size in zip(metas, sizes, strict=True):
            data = await child.reader.read_frame(size)
            if len(data) != size:
                raise _ChildDied("output frame length does not match its metadata")
            outputs.append((meta, data))
        return outputs

    def _release(self, child: _Child) -> None:
        try:
            self._idle_send.send_nowait(child)
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.WouldBlock):
            self._kill(child)

    def _kill(self, child: _Child) -> None:
        self._children.discard(child)
        if child.process.returncode is None:
            child.process.kill()
            self._dying.add(child.process)

    def _replace(self, child: _Child) -> None:
        """Kill ``child`` and start a fresh worker for its slot in the pool's nursery."""
        self._kill(child)
        self._nursery.start_soon(self._respawn, child)

    async def _respawn(self, old: _Child) -> None:
        with trio.move_on_after(KILL_WAIT_S):
            await old.process.wait()
            self._dying.discard(old.process)
        for attempt in range(1, RESPAWN_ATTEMPTS + 1):
            if self._closed:
                return
            try:
                child = await _spawn(self._args, old.uid)
            except P2PComputeError as exc:
                log.warning("worker start failed (attempt %d/%d): %s", attempt, RESPAWN_ATTEMPTS, exc)
                await trio.sleep(RESPAWN_BACKOFF_S * attempt)
                continue
            self._children.add(child)
            self._release(child)
            return
        self._slots -= 1
        log.error("a worker slot is given up; %d left", self._slots)
        if self._slots == 0:
            self._idle_send.close()

    async def _start(self, workers: int) -> None:
        self._slots_total = workers

        async def one(index: int) -> None:
            child = await _spawn(self._args, self._uid(index))
            self._children.add(child)
            self._slots += 1
            self._release(child)

        async def estimator() -> None:
            self._estimator = await _spawn(self._args, self._uid(workers))

        try:
            async with trio.open_nursery() as nursery:
                for index in range(workers):
                    nursery.start_soon(one, index)
                nursery.start_soon(estimator)
        except BaseExceptionGroup as group:
            failed, _ = group.split(P2PComputeError)
            if failed is None:
                raise
            first: BaseException = failed
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        classes = {child.hardware_class for child in self._children}
        if len(classes) != 1:
            raise ExecutionError(Reason.WORKER_CRASHED, f"workers disagree on their hardware class: {classes}")
        child = next(iter(self._children))
        self.hardware_class_base, self.device_kind = child.hardware_class, child.device_kind
        self.sandbox = dict(child.sandbox)

    def _close(self) -> None:
        self._closed = True
        self._idle_send.close()
        for child in list(self._children):
            self._kill(child)
        if self._estimator is not None:
            self._estimator.process.kill()
            self._dying.add(self._estimator.process)
            self._estimator = None

    async def _reap(self) -> None:
        """Wait (bounded, shielded) for every killed worker to exit."""
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT_S):
            for process in list(self._dying):
                await process.wait()
                self._dying.discard(process)


_Trace = tuple[tuple[TraceLeaf, ...], bytes, dict[bytes, bytes], bool]


def _decode_trace(spec: JobSpec, frames: list[bytes], outputs: list[TensorMeta]) -> tuple[tuple[TraceLeaf, ...], bytes]:
    """The leaves in a child's trace frames, checked against the job and its outputs, and their trace root."""
    leaves: list[TraceLeaf] = []
    for frame in frames:
        items = codec.unpack(frame)
        if not isinstance(items, list) or len(leaves) + len(items) > len(spec.nodes):
            raise TraceError(Reason.BAD_TRACE, "a trace frame that is not an array of the job's leaves")
        leaves.extend(from_wire(TraceLeaf, item) for item in items)
    check_trace(spec, leaves, outputs)
    return tuple(leaves), trace_root(leaves)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _child_error(header: dict[str, Any]) -> P2PComputeError:
    detail = str(header.get("detail", ""))
    try:
        reason = Reason(str(header.get("reason")))
    except ValueError:
        return ExecutionError(Reason.EXECUTION_FAILED, detail)
    if header.get("kind") == "job_format":
        return JobFormatError(reason, detail)
    return ExecutionError(reason, detail)


def _default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


@asynccontextmanager
async def open_executor(
    *,
    workers: int = 1,
    device: str = "auto",
    memory_limit: int | None = None,
    threads: int | None = None,
    sandbox: str = "auto",
    sandbox_uid_base: int = sandbox_layers.SANDBOX_UID_BASE,
) -> AsyncIterator[Executor]:
    """Start a warm pool of ``workers`` worker processes; kill them all on exit.

    ``device`` is ``"auto"`` (CUDA when torch sees it, else CPU), ``"cuda"`` or ``"cpu"``. ``memory_limit``
    caps every job's memory below its own ``memory_bytes``. ``threads`` is each worker's intra-op thread
    count (part of the hardware class); by default the CPU count divided among the workers. ``sandbox`` is
    ``"auto"`` (every layer the kernel offers), ``"required"`` (refuse to start without all of them) or
    ``"off"``; a root node runs its children as ``sandbox_uid_base`` plus a per-child offset.
    Raises :class:`ConfigError` for bad arguments, an unusable device or a required sandbox layer missing.
    """
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if memory_limit is not None and memory_limit < 1:
        raise ConfigError(f"memory_limit must be positive, not {memory_limit}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, not {threads}")
    if sandbox not in [mode.value for mode in sandbox_layers.SandboxMode]:
        raise ConfigError(f"sandbox must be 'auto', 'required' or 'off', not {sandbox!r}")
    args = _ChildArgs(device, threads or _default_threads(workers), memory_limit, sandbox, sandbox_uid_base)
    idle_send, idle_recv = trio.open_memory_channel[_Child](workers)
    body_exc: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            executor = Executor("", "", args, nursery, idle_send, idle_recv)
            try:
                await executor._start(workers)
                try:
                    yield executor
                except BaseException as exc:
                    body_exc = exc
                    raise
            finally:
                executor._close()
                nursery.cancel_scope.cancel()
                await executor._reap()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the body raised: hand it back as is.
        leaf = _sole_leaf(group)
        if leaf is not None and (leaf is body_exc or isinstance(leaf, P2PComputeError)):
            raise leaf from None
        raise


def _sole_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
