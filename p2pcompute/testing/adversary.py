"""Cheating workers for testnets and benchmarks: they run the job, then change the outputs they attest.

Modes (``p2pcompute testnet --cheaters C --cheat-mode MODE``):

``random``   outputs replaced by random values of the same dtypes and shapes
``zeros``    outputs replaced by zeros
``stale``    the outputs of the previous job this worker ran (zeros for its first)
``lazy``     skips part of the work: the second half of every output is left as zeros
``collude``  every worker of the group returns the same wrong outputs for a job (derived from the job digest
             and the group's secret), so colluders agree with each other
``mixed``    for a testnet: the testnet assigns ``collude`` to some cheaters and the other modes to the rest

A cheater's outputs are consistent with its signed attestation (digests and metas are recomputed), so only
verification by redundancy or a spot check can catch it: exactly what the testnet measures.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable

from p2pcompute.compute.executor import ExecResult
from p2pcompute.config import CHEAT_MODES
from p2pcompute.core.tensors import DTYPES, TensorMeta, outputs_digest, tensor_digest
from p2pcompute.errors import ConfigError

__all__ = ["CHEAT_MODES", "Tamper", "make_tamper"]

Tamper = Callable[[bytes, ExecResult], ExecResult]
"""``(job digest, honest result) -> the result the cheater attests``."""


def _values(dtype: str, count: int, rng: random.Random) -> bytes:
    if dtype == "float32":
        return struct.pack(f"<{count}f", *(rng.uniform(-1.0, 1.0) for _ in range(count)))
    if dtype == "float64":
        return struct.pack(f"<{count}d", *(rng.uniform(-1.0, 1.0) for _ in range(count)))
    if dtype == "bool":
        return bytes(rng.getrandbits(1) for _ in range(count))
    return rng.randbytes(count * DTYPES[dtype])  # ints, float16, bfloat16: any bit pattern


def _rebuild(result: ExecResult, datas: list[bytes], metas: list[TensorMeta] | None = None) -> ExecResult:
    old = metas if metas is not None else [meta for meta, _ in result.outputs]
    outputs = [
        (TensorMeta(digest=tensor_digest(data), dtype=meta.dtype, shape=meta.shape), data)
        for meta, data in zip(old, datas, strict=True)
    ]
    return ExecResult(
        outputs=outputs,
        output_digest=outputs_digest(meta for meta, _ in outputs),
        hardware_class=result.hardware_class,
        timings=result.timings,
    )


def make_tamper(mode: str, *, group_secret: bytes = b"p2pcompute-colluders") -> Tamper:
    """The output-changing behaviour of a cheater of ``mode`` (one of :data:`CHEAT_MODES`)."""
    if mode not in CHEAT_MODES:
        raise ConfigError(f"cheat mode must be one of {', '.join(CHEAT_MODES)}, got {mode!r}")
    rng = random.Random()
    previous: list[ExecResult] = []

    def tamper(job_digest: bytes, result: ExecResult) -> ExecResult:
        metas = [meta for meta, _ in result.outputs]
        if mode == "random":
            return _rebuild(result, [_values(m.dtype, m.numel, rng) for m in metas])
        if mode == "zeros":
            return _rebuild(result, [bytes(m.nbytes) for m in metas])
        if mode == "lazy":
            datas = [data[: len(data) // 2] + bytes(len(data) - len(data) // 2) for _, data in result.outputs]
            return _rebuild(result, datas)
        if mode == "collude":
            seeded = random.Random(hashlib.sha256(group_secret + job_digest).digest())
            return _rebuild(result, [_values(m.dtype, m.numel, seeded) for m in metas])
        # stale: the previous job's outputs, attested for this job
        stale = previous[-1] if previous else None
        previous[:] = [result]
        if stale is None or stale.output_digest == result.output_digest:
            return _rebuild(result, [bytes(m.nbytes) for m in metas])
        return stale

    return tamper
