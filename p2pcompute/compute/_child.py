"""The executor's worker process: ``python -m p2pcompute.compute._child --device cpu --threads 2``.

It imports torch once, fixes the deterministic settings, reports ``ready`` with its hardware class, then serves
jobs one at a time over its stdin/stdout pipes until stdin closes. The pipe protocol (shared with
:mod:`p2pcompute.compute.executor`, which imports the constants and framing helpers from here; this module
imports torch only inside :func:`main`):

- a *frame* is an 8-byte big-endian length and that many bytes;
- a *message* is one header frame (canonical msgpack map, at most :data:`MAX_HEADER_SIZE`) followed by the raw
  blob frames its header announces.

Parent → child: ``{"type": "job", "blobs": [digest, ...], "trace": bool, "trace_budget": int}`` + spec frame + one
frame per digest (``trace`` absent means true; ``trace_budget``, the bytes of intermediates to keep, absent means and
is capped at ``TRACE_BYTES_BUDGET``), or
``{"type": "estimate"}`` + spec frame (the worker's own dry run, before it offers).
Child → parent: ``{"type": "ready", "hardware_class": str, "device_kind": "cpu"|"cuda", "sandbox": {layer:
status}}`` once at start (``{"type": "fatal", "detail": str}`` instead when the device cannot be used or a
required sandbox layer is missing), then per estimate ``{"type": "estimate", "peak_bytes": int, "output_bytes":
int, "flops": int}`` or an error, and per job zero or more
``{"type": "progress", "stage": str}``, and one ``{"type": "result", "outputs": [TensorMeta wire map, ...],
"dtype": str, "load_ms": int, "exec_ms": int, "trace_frames": int, "trace_blobs": int, "trace_complete": bool}``
+ one frame per output, then (the committed trace, specs/verification.md §10) ``trace_frames`` frames, each the
canonical msgpack array of at most :data:`TRACE_LEAVES_PER_FRAME` ``TraceLeaf`` wire maps in node order and at most
:data:`MAX_HEADER_SIZE` bytes, then, when ``trace_blobs`` > 0, one frame of that many 32-byte digests and one frame
of raw bytes per digest (the intermediates kept within ``TRACE_BYTES_BUDGET``); or ``{"type": "error", "kind":
"job_format"|"execution", "reason": str, "detail": str, "recycle": bool}``.

Nothing is pickled: headers are canonical msgpack and tensors raw little-endian bytes.

The child confines itself (:mod:`p2pcompute.compute.sandbox`): its own network namespace before torch is
imported, then, after warm-up, its own uid, no new privileges, Landlock, rlimits and a seccomp allow-list. Every
estimate and job runs its meta dry run under the job's address-space ceiling, so a graph whose dry run alone
would take the memory (millions of tensor objects) fails there, as ``memory_limit``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import struct
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from p2pcompute.compute import sandbox
from p2pcompute.core import codec
from p2pcompute.core.schema import to_wire
from p2pcompute.core.trace import TRACE_BYTES_BUDGET
from p2pcompute.errors import ExecutionError, JobFormatError, P2PComputeError, Reason

__all__ = [
    "FRAME_PREFIX",
    "MAX_BLOB_FRAME",
    "MAX_HEADER_SIZE",
    "TRACE_LEAVES_PER_FRAME",
    "address_space_limit",
    "main",
]

FRAME_PREFIX = struct.Struct(">Q")
MAX_HEADER_SIZE = codec.MAX_FRAME_SIZE
MAX_BLOB_FRAME = 1 << 40  # 1 TiB: a sanity cap; the real bounds are the job's limits, checked before reading
MEMORY_HEADROOM = 512 << 20  # address space allowed above baseline + the job's memory + its outputs
MAX_ERROR_DETAIL = 1000
_DEFAULT_MEMORY = 1 << 30  # a recheck's memory when the worker set no limit
TRACE_LEAVES_PER_FRAME = 4096  # = codec.DEFAULT_LIMITS.max_array_len: the parent decodes a frame with the defaults
_U64_MAX = (1 << 64) - 1
_DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


class _PipeClosed(Exception):
    """The parent closed our stdin: exit quietly."""


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise _PipeClosed
    return data


def _read_frame(stream: IO[bytes], cap: int) -> bytes:
    (length,) = FRAME_PREFIX.unpack(_read_exactly(stream, FRAME_PREFIX.size))
    if length > cap:
        raise _PipeClosed  # the parent never does this; treat as a broken pipe
    return _read_exactly(stream, length)


def _write_message(stream: IO[bytes], header: dict[str, Any], blobs: list[bytes] = []) -> None:  # noqa: B006
    packed = codec.pack(header)
    stream.write(FRAME_PREFIX.pack(len(packed)))
    stream.write(packed)
    for blob in blobs:
        stream.write(FRAME_PREFIX.pack(len(blob)))
        stream.write(blob)
    stream.flush()


class _Statm:
    """``/proc/self/statm``, opened once before the sandbox closes the file system."""

    fd: int | None = None

    @classmethod
    def open(cls) -> int:
        if cls.fd is None:
            cls.fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        return cls.fd


def _virtual_size() -> int:
    """This process's current address-space size in bytes (what RLIMIT_AS is compared with)."""
    pages = int(os.pread(_Statm.open(), 256, 0).split()[0])
    return pages * resource.getpagesize()


@contextlib.contextmanager
def address_space_limit(extra_bytes: int) -> Iterator[int]:
    """Lower the soft RLIMIT_AS to the current address space plus ``extra_bytes``; restore it afterwards.

    Yields the ceiling set. Allocations past it fail (``MemoryError`` in Python, a ``RuntimeError`` from
    torch's CPU allocator) instead of the machine's OOM killer ending the peer.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    ceiling = _virtual_size() + extra_bytes
    for limit in (soft, hard):  # never loosen a limit set from outside
        if limit != resource.RLIM_INFINITY:
            ceiling = min(ceiling, limit)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield ceiling
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


class _Worker:
    """One warm worker: torch imported, deterministic settings applied, device chosen."""

    def __init__(self, torch: Any, device: str, threads: int, memory_limit: int | None) -> None:
        self.torch = torch
        self.device = device
        self.memory_limit = memory_limit
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            model = f"cuda:{props.name}"
            cuda = torch.version.cuda or "none"
        else:
            model = f"cpu:{_cpu_model()}"
            cuda = "none"
        self.hardware_class = f"{model}|torch {torch.__version__}|cuda {cuda}|threads {threads}"

    def run(
        self, out: IO[bytes], spec_bytes: bytes, blobs: Mapping[bytes, bytes], trace: int | None = TRACE_BYTES_BUDGET
    ) -> None:
        """Run one job and write its result or error message; ``trace``: None, or the bytes of its trace to keep."""
        self._answer(out, lambda: self._run(out, spec_bytes, blobs, trace))

    def estimate(self, out: IO[bytes], spec_bytes: bytes) -> None:
        """The worker's own dry run of a job: peak bytes (with per-tensor overhead), output bytes, flops."""
        self._answer(out, lambda: self._estimate(spec_bytes))

    def recheck(self, out: IO[bytes], evidence: bytes, now: int) -> None:
        """Redo the check of another client's check evidence (specs/verification.md §12), here in the sandbox:
        its tensors come from strangers."""
        self._answer(out, lambda: self._recheck(evidence, now))

    def _recheck(self, evidence: bytes, now: int) -> tuple[dict[str, Any], list[bytes]]:
        from p2pcompute.compute.evidence import recheck
        from p2pcompute.core.envelope import open_envelope
        from p2pcompute.core.messages import CheckEvidence
        from p2pcompute.core.verification import check_check_evidence

        valid = check_check_evidence(open_envelope(evidence, expect=CheckEvidence), now)
        with self._guard(self.memory_limit or _DEFAULT_MEMORY, 0):
            confirmed, detail = recheck(valid)
        return {"type": "rechecked", "confirmed": confirmed, "detail": detail[:MAX_ERROR_DETAIL]}, []

    def _answer(self, out: IO[bytes], work: Callable[[], tuple[dict[str, Any], list[bytes]]]) -> None:
        cuda = self.device == "cuda"  # after any CUDA error the context may be poisoned: recycle the child
        try:
            header, payload = work()
        except JobFormatError as exc:
            header, payload = _error("job_format", exc.reason, exc.detail, recycle=False), []
        except ExecutionError as exc:
            if exc.reason == Reason.MEMORY_LIMIT or (exc.__cause__ and _is_allocation_failure(exc.__cause__)):
                header, payload = _error("execution", Reason.MEMORY_LIMIT, exc.detail, recycle=True), []
            else:
                header, payload = _error("execution", exc.reason, exc.detail, recycle=cuda), []
        except P2PComputeError as exc:  # e.g. a SchemaError/DecodeError from decoding the spec
            header, payload = _error("job_format", exc.reason, exc.detail, recycle=False), []
        except Exception as exc:  # any op failure is reported, never fatal to the worker
            if _is_allocation_failure(exc):
                header, payload = _error("execution", Reason.MEMORY_LIMIT, _describe(exc), recycle=True), []
            else:
                header, payload = _error("execution", Reason.EXECUTION_FAILED, _describe(exc), recycle=cuda), []
        _write_message(out, header, payload)

    def _limits(self, spec_bytes: bytes) -> tuple[Any, Any, int]:
        from p2pcompute.core.jobspec import DEFAULT_JOB_LIMITS, decode_job, tighter

        spec = decode_job(spec_bytes)
        limits = tighter(spec.limits, DEFAULT_JOB_LIMITS)
        memory = limits.memory_bytes if self.memory_limit is None else min(limits.memory_bytes, self.memory_limit)
        return spec, limits, memory

    def _guard(self, memory: int, max_output_bytes: int) -> contextlib.AbstractContextManager[object]:
        """The job's address-space ceiling (CPU): its memory, its outputs twice (tensor and wire), the kept trace,
        slack."""
        if self.device == "cpu":
            return address_space_limit(memory + 2 * max_output_bytes + TRACE_BYTES_BUDGET + MEMORY_HEADROOM)
        return contextlib.nullcontext()

    def _estimate(self, spec_bytes: bytes) -> tuple[dict[str, Any], list[bytes]]:
        from p2pcompute.compute import interpreter

        spec, limits, memory = self._limits(spec_bytes)
        with self._guard(memory, limits.max_output_bytes):
            run = interpreter.dry_run(spec, limits=_with_memory(limits, memory))
        header = {
            "type": "estimate",
            "peak_bytes": run.peak_bytes,
            "output_bytes": run.output_bytes,
            "flops": min(run.flops, _U64_MAX),
        }
        return header, []

    def _run(
        self, out: IO[bytes], spec_bytes: bytes, blobs: Mapping[bytes, bytes], trace: int | None
    ) -> tuple[dict[str, Any], list[bytes]]:
        from p2pcompute.compute import interpreter

        torch = self.torch
        start = time.perf_counter()
        spec, limits, memory = self._limits(spec_bytes)
        # The ceiling is in place before the dry run: the dry run itself builds one (meta) tensor per value.
        with self._guard(memory, limits.max_output_bytes):
            interpreter.check_memory(spec, memory_limit=memory)
            loaded = time.perf_counter()
            _write_message(out, {"type": "progress", "stage": "running"})
            known = frozenset(meta.digest for meta in spec.inputs + spec.constants)
            sink = None if trace is None else interpreter.TraceSink(budget=trace, known=known)
            outputs = interpreter.execute(spec, blobs, device=self.device, trace=sink)
            if self.device == "cuda":
                torch.cuda.synchronize()
            pairs = [interpreter.tensor_to_blob(t) for t in outputs]
        done = time.perf_counter()
        total = sum(len(data) for _, data in pairs)
        if total > limits.max_output_bytes:
            raise JobFormatError(Reason.OUTPUT_TOO_LARGE, f"{total} output bytes, limit {limits.max_output_bytes}")
        header = {
            "type": "result",
            "outputs": [to_wire(meta) for meta, _ in pairs],
            "dtype": _job_dtype(spec, [meta.dtype for meta, _ in pairs]),
            "load_ms": round((loaded - start) * 1000),
            "exec_ms": round((done - loaded) * 1000),
        }
        frames = [data for _, data in pairs]
        if sink is not None:
            leaf_frames = _leaf_frames(sink.leaves)
            header.update(trace_frames=len(leaf_frames), trace_blobs=len(sink.blobs), trace_complete=sink.complete)
            frames += leaf_frames
            if sink.blobs:
                frames.append(b"".join(sink.blobs))
                frames += sink.blobs.values()
        return header, frames


def _leaf_frames(leaves: list[Any]) -> list[bytes]:
    """The trace's leaves as canonical msgpack arrays of at most TRACE_LEAVES_PER_FRAME leaves and MAX_HEADER_SIZE
    bytes each (one leaf is far smaller: at most 1,024 metas of under 120 bytes)."""
    frames: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for leaf in leaves:
        packed = codec.pack(to_wire(leaf))
        if group and (len(group) == TRACE_LEAVES_PER_FRAME or size + len(packed) + 3 > MAX_HEADER_SIZE):
            frames.append(_array(group))
            group, size = [], 0
        group.append(packed)
        size += len(packed)
    if group:
        frames.append(_array(group))
    return frames


def _array(packed: list[bytes]) -> bytes:
    """A msgpack array of already packed items, with its shortest (canonical) header."""
    n = len(packed)
    header = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
    return header + b"".join(packed)


def _with_memory(limits: Any, memory: int) -> Any:
    from dataclasses import replace

    return replace(limits, memory_bytes=memory)


def _job_dtype(spec: Any, output_dtypes: list[str]) -> str:
    """The dtype appended to the hardware class: the spec's declared one, else the first floating output's."""
    declared = getattr(spec, "dtype", None)
    if isinstance(declared, str) and declared:
        return declared
    for dtype in output_dtypes:
        if dtype.startswith(("float", "bfloat")):
            return dtype
    return output_dtypes[0] if output_dtypes else "none"


def _error(kind: str, reason: Reason, detail: str, *, recycle: bool) -> dict[str, Any]:
    return {
        "type": "error",
        "kind": kind,
        "reason": reason.value,
        "detail": detail[:MAX_ERROR_DETAIL],
        "recycle": recycle,
    }


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_DETAIL]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:128]
    except OSError:
        pass
    import platform

    return (platform.processor() or platform.machine() or "unknown")[:128]


@dataclass(frozen=True, slots=True)
class _Options:
    device: str
    threads: int
    memory_limit: int | None
    sandbox: sandbox.SandboxSpec


def _prepare(options: _Options, lock: sandbox.LockDown) -> tuple[_Worker | None, str]:
    """Import torch, fix the deterministic settings, warm up, then lock the sandbox down.

    Returns the worker, or None and the one-line reason it cannot serve (sent as ``fatal``).
    """
    os.environ.update(_DETERMINISTIC_ENV)  # before torch initialises CUDA/cuBLAS
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        return None, "device 'cuda' requested but torch sees no CUDA device"
    torch.set_num_threads(options.threads)
    with contextlib.suppress(RuntimeError):  # fails if already set in this process; it is not
        torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # Import the interpreter and warm up the intra-op thread pool, the CUDA context and the modules torch loads
    # lazily now: once the sandbox is locked the child can no longer read files outside the install (and under
    # its own uid not even those where the install lives in a private home directory).
    from p2pcompute.compute import interpreter
    from p2pcompute.core import jobspec

    a = torch.ones(256, 256, device=device)
    float((a @ a).sum().item())
    _warm_up(interpreter, jobspec, device)
    worker = _Worker(torch, device, options.threads, options.memory_limit)
    _Statm.open()
    spec = options.sandbox
    if spec.device != device:
        from dataclasses import replace

        spec = replace(spec, device=device)
    sandbox.lock_down(spec, lock)  # after this: no network, no files, no new processes, no syscalls unlisted
    missing = lock.missing(spec)
    if missing and spec.mode is sandbox.SandboxMode.REQUIRED:
        reasons = ", ".join(f"{name} ({lock.layers[name].removeprefix('unavailable: ')})" for name in missing)
        return None, f'sandbox = "required" but these layers are unavailable: {reasons}'
    return worker, ""


def _warm_up(interpreter: Any, jobspec: Any, device: str) -> None:
    """Run a small job through the dry run and the interpreter, so their lazy imports happen now."""
    from p2pcompute.core.tensors import TensorMeta, tensor_digest

    data = bytes(16)
    meta = TensorMeta(digest=tensor_digest(data), dtype="float32", shape=(2, 2))
    x = jobspec.InputRef(0)
    nodes = (
        jobspec.Node(op="aten.mm.default", args=(x, x)),
        jobspec.Node(op="aten.relu.default", args=(jobspec.NodeRef(0),)),
        jobspec.Node(op="aten._softmax.default", args=(jobspec.NodeRef(1), 1, False)),
        jobspec.Node(op="aten.sum.dim_IntList", args=(jobspec.NodeRef(2), (0,))),
    )
    spec = jobspec.JobSpec(inputs=(meta,), nodes=nodes, outputs=(jobspec.NodeRef(3),))
    spec = jobspec.decode_job(jobspec.encode_job(spec))
    interpreter.dry_run(spec)
    sink = interpreter.TraceSink(budget=16)  # both trace paths: the first node's bytes kept, then digests only
    interpreter.tensor_to_blob(interpreter.execute(spec, {meta.digest: data}, device=device, trace=sink)[0])
    _leaf_frames(sink.leaves)


def _serve(proto_in: IO[bytes], proto_out: IO[bytes], options: _Options) -> int:
    lock = sandbox.enter_early(options.sandbox)
    worker, fatal = _prepare(options, lock)
    if worker is None:
        _write_message(proto_out, {"type": "fatal", "detail": fatal})
        return 2
    ready = {
        "type": "ready",
        "hardware_class": worker.hardware_class,
        "device_kind": worker.device,
        "sandbox": lock.report(),
    }
    _write_message(proto_out, ready)
    while True:
        try:
            header = codec.unpack(_read_frame(proto_in, MAX_HEADER_SIZE))
            kind = header.get("type") if isinstance(header, dict) else None
            if kind == "estimate":
                worker.estimate(proto_out, _read_frame(proto_in, MAX_BLOB_FRAME))
                continue
            if kind == "recheck":
                now = header.get("now")
                worker.recheck(proto_out, _read_frame(proto_in, MAX_BLOB_FRAME), now if isinstance(now, int) else 0)
                continue
            if kind != "job":
                return 3
            digests = header.get("blobs")
            if not isinstance(digests, list) or not all(isinstance(d, bytes) for d in digests):
                return 3
            traced, budget = header.get("trace", True), header.get("trace_budget", TRACE_BYTES_BUDGET)
            if not isinstance(traced, bool) or not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
                return 3
            trace = min(budget, TRACE_BYTES_BUDGET) if traced else None
            spec_bytes = _read_frame(proto_in, MAX_BLOB_FRAME)
            blobs = {digest: _read_frame(proto_in, MAX_BLOB_FRAME) for digest in digests}
        except _PipeClosed:
            return 0
        worker.run(proto_out, spec_bytes, blobs, trace)
        del spec_bytes, blobs


def _probe(proto_out: IO[bytes], options: _Options, args: argparse.Namespace) -> int:
    """Test-only: confine this process exactly as a serving child does, then try what the layers forbid."""
    lock = sandbox.enter_early(options.sandbox)
    worker, fatal = _prepare(options, lock)
    if worker is None:
        _write_message(proto_out, {"type": "fatal", "detail": fatal})
        return 2
    connect_to = None
    if args.probe_connect:
        host, _, port = args.probe_connect.rpartition(":")
        connect_to = (host, int(port))
    report = sandbox.probe(
        options.sandbox, lock, connect_to=connect_to, secret=args.probe_secret, writable=args.probe_writable
    )
    _write_message(proto_out, {"type": "probe", "report": report})
    return 0


def _address_space(memory_limit: int | None) -> int:
    """The child's hard RLIMIT_AS above its warm baseline: the largest job it may run, outputs, slack."""
    from p2pcompute.core.jobspec import DEFAULT_JOB_LIMITS

    memory = DEFAULT_JOB_LIMITS.memory_bytes if memory_limit is None else memory_limit
    return memory + 2 * DEFAULT_JOB_LIMITS.max_output_bytes + TRACE_BYTES_BUDGET + MEMORY_HEADROOM


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pcompute.compute._child")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-limit", type=int, default=None)
    parser.add_argument("--sandbox", choices=[m.value for m in sandbox.SandboxMode], default="auto")
    parser.add_argument("--sandbox-uid", type=int, default=None)
    # test-only (never set by the executor): a subset of layers, and the probe instead of serving
    parser.add_argument("--sandbox-layers", default=",".join(sandbox.LAYERS), help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-connect", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-secret", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-writable", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    layers = frozenset(name for name in args.sandbox_layers.split(",") if name)
    unknown = layers - set(sandbox.LAYERS)
    if unknown:
        parser.error(f"unknown sandbox layers: {', '.join(sorted(unknown))}")
    device = args.device if args.device != "auto" else "cpu"
    options = _Options(
        device=args.device,
        threads=max(1, args.threads),
        memory_limit=args.memory_limit,
        sandbox=sandbox.SandboxSpec(
            mode=sandbox.SandboxMode(args.sandbox),
            uid=args.sandbox_uid,
            device=device,
            address_space_bytes=_address_space(args.memory_limit),
            layers=layers,
        ),
    )
    # Keep the protocol on private descriptors; stray prints (ours, torch's, C libraries') go to stderr.
    proto_out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    proto_in = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    try:
        if args.sandbox_probe:
            return _probe(proto_out, options, args)
        return _serve(proto_in, proto_out, options)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
