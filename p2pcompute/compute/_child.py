"""The executor's worker process: ``python -m p2pcompute.compute._child --device cpu --threads 2``.

It imports torch once, fixes the deterministic settings, reports ``ready`` with its hardware class, then serves
jobs one at a time over its stdin/stdout pipes until stdin closes. The pipe protocol (shared with
:mod:`p2pcompute.compute.executor`, which imports the constants and framing helpers from here; this module
imports torch only inside :func:`main`):

- a *frame* is an 8-byte big-endian length and that many bytes;
- a *message* is one header frame (canonical msgpack map, at most :data:`MAX_HEADER_SIZE`) followed by the raw
  blob frames its header announces.

Parent → child: ``{"type": "job", "blobs": [digest, ...]}`` + spec frame + one frame per digest.
Child → parent: ``{"type": "ready", "hardware_class": str, "device_kind": "cpu"|"cuda"}`` once at start
(``{"type": "fatal", "detail": str}`` instead when the device cannot be used), then per job zero or more
``{"type": "progress", "stage": str}``, and one ``{"type": "result", "outputs": [TensorMeta wire map, ...],
"dtype": str, "load_ms": int, "exec_ms": int}`` + one frame per output, or ``{"type": "error", "kind":
"job_format"|"execution", "reason": str, "detail": str, "recycle": bool}``.

Nothing is pickled: headers are canonical msgpack and tensors raw little-endian bytes.
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
from collections.abc import Iterator, Mapping
from typing import IO, Any

from p2pcompute.core import codec
from p2pcompute.core.schema import to_wire
from p2pcompute.errors import ExecutionError, JobFormatError, P2PComputeError, Reason

__all__ = [
    "FRAME_PREFIX",
    "MAX_BLOB_FRAME",
    "MAX_HEADER_SIZE",
    "address_space_limit",
    "main",
]

FRAME_PREFIX = struct.Struct(">Q")
MAX_HEADER_SIZE = codec.MAX_FRAME_SIZE
MAX_BLOB_FRAME = 1 << 40  # 1 TiB: a sanity cap; the real bounds are the job's limits, checked before reading
MEMORY_HEADROOM = 512 << 20  # address space allowed above baseline + the job's memory + its outputs
MAX_ERROR_DETAIL = 1000
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


def _virtual_size() -> int:
    """This process's current address-space size in bytes (what RLIMIT_AS is compared with)."""
    with open("/proc/self/statm", "rb") as f:
        pages = int(f.read().split()[0])
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

    def run(self, out: IO[bytes], spec_bytes: bytes, blobs: Mapping[bytes, bytes]) -> None:
        """Run one job and write its result or error message."""
        try:
            header, payload = self._run(out, spec_bytes, blobs)
        except JobFormatError as exc:
            header, payload = _error("job_format", exc.reason, exc.detail, recycle=False), []
        except ExecutionError as exc:
            if exc.reason == Reason.MEMORY_LIMIT or (exc.__cause__ and _is_allocation_failure(exc.__cause__)):
                header, payload = _error("execution", Reason.MEMORY_LIMIT, exc.detail, recycle=True), []
            else:
                header, payload = _error("execution", exc.reason, exc.detail, recycle=False), []
        except P2PComputeError as exc:  # e.g. a SchemaError/DecodeError from decoding the spec
            header, payload = _error("job_format", exc.reason, exc.detail, recycle=False), []
        except Exception as exc:  # any op failure is reported, never fatal to the worker
            if _is_allocation_failure(exc):
                header, payload = _error("execution", Reason.MEMORY_LIMIT, _describe(exc), recycle=True), []
            else:
                header, payload = _error("execution", Reason.EXECUTION_FAILED, _describe(exc), recycle=False), []
        _write_message(out, header, payload)

    def _run(
        self, out: IO[bytes], spec_bytes: bytes, blobs: Mapping[bytes, bytes]
    ) -> tuple[dict[str, Any], list[bytes]]:
        from p2pcompute.compute import interpreter
        from p2pcompute.core.jobspec import DEFAULT_JOB_LIMITS, decode_job, tighter

        torch = self.torch
        start = time.perf_counter()
        spec = decode_job(spec_bytes)
        limits = tighter(spec.limits, DEFAULT_JOB_LIMITS)
        memory = limits.memory_bytes if self.memory_limit is None else min(limits.memory_bytes, self.memory_limit)
        interpreter.check_memory(spec, memory_limit=memory)
        loaded = time.perf_counter()
        _write_message(out, {"type": "progress", "stage": "running"})
        if self.device == "cpu":
            # the job's memory, its outputs twice (tensor and wire bytes), allocator slack
            guard: contextlib.AbstractContextManager[object] = address_space_limit(
                memory + 2 * limits.max_output_bytes + MEMORY_HEADROOM
            )
        else:
            guard = contextlib.nullcontext()
        with guard:
            outputs = interpreter.execute(spec, blobs, device=self.device)
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
        return header, [data for _, data in pairs]


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


def _serve(proto_in: IO[bytes], proto_out: IO[bytes], device: str, threads: int, memory_limit: int | None) -> int:
    os.environ.update(_DETERMINISTIC_ENV)  # before torch initialises CUDA/cuBLAS
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        _write_message(proto_out, {"type": "fatal", "detail": "device 'cuda' requested but torch sees no CUDA device"})
        return 2
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # fails if already set in this process; it is not
        torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # Import the interpreter and warm up the intra-op thread pool (and the CUDA context) now, not in the first job
    # nor under a job's address-space limit.
    from p2pcompute.compute import interpreter  # noqa: F401
    from p2pcompute.core import jobspec  # noqa: F401

    a = torch.ones(256, 256, device=device)
    float((a @ a).sum().item())
    worker = _Worker(torch, device, threads, memory_limit)
    _write_message(proto_out, {"type": "ready", "hardware_class": worker.hardware_class, "device_kind": device})
    while True:
        try:
            header = codec.unpack(_read_frame(proto_in, MAX_HEADER_SIZE))
            if not isinstance(header, dict) or header.get("type") != "job":
                return 3
            digests = header.get("blobs")
            if not isinstance(digests, list) or not all(isinstance(d, bytes) for d in digests):
                return 3
            spec_bytes = _read_frame(proto_in, MAX_BLOB_FRAME)
            blobs = {digest: _read_frame(proto_in, MAX_BLOB_FRAME) for digest in digests}
        except _PipeClosed:
            return 0
        worker.run(proto_out, spec_bytes, blobs)
        del spec_bytes, blobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pcompute.compute._child")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-limit", type=int, default=None)
    args = parser.parse_args(argv)
    # Keep the protocol on private descriptors; stray prints (ours, torch's, C libraries') go to stderr.
    proto_out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    proto_in = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    try:
        return _serve(proto_in, proto_out, args.device, max(1, args.threads), args.memory_limit)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
