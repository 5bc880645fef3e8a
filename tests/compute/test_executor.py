"""The sandboxed executor with real worker processes: results, limits, crash isolation, respawn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import trio
from torch import nn

from p2pcompute.compute._child import MAX_HEADER_SIZE, TRACE_LEAVES_PER_FRAME, _leaf_frames
from p2pcompute.compute.check import build_trace, check_nodes
from p2pcompute.compute.executor import ExecResult, Executor, _decode_trace, open_executor
from p2pcompute.compute.export import ExportedJob, export_job
from p2pcompute.compute.interpreter import tensor_to_blob
from p2pcompute.core import codec
from p2pcompute.core.jobspec import JobLimits
from p2pcompute.core.schema import from_wire
from p2pcompute.core.tensors import TensorMeta, tensor_digest
from p2pcompute.core.trace import TRACE_BYTES_BUDGET, TraceLeaf, check_trace, trace_root
from p2pcompute.errors import ConfigError, DecodeError, ExecutionError, JobFormatError, Reason, TraceError

JOB_TIMEOUT_S = 120.0  # generous: a job may wait for a worker to be respawned (python + torch import)
MEMORY_LIMIT = 256 << 20


def _mlp_job() -> tuple[ExportedJob, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        expected = model(x)
    return export_job(model, (x,)), expected


def _slow(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    for _ in range(40):
        x = torch.tanh(x @ w)
    return x


def _slow_job(wall_time_ms: int) -> ExportedJob:
    """~86 GFLOP of matmuls: seconds on a CPU."""
    a = torch.randn(1024, 1024)
    return export_job(_slow, (a, a), limits=JobLimits(wall_time_ms=wall_time_ms))


def _tensor(result: ExecResult, index: int = 0) -> torch.Tensor:
    meta, data = result.outputs[index]
    assert meta.dtype == "float32"
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(meta.shape)


async def _run(executor: Executor, job: ExportedJob, **kwargs: Callable[[str], None]) -> ExecResult:
    with trio.fail_after(JOB_TIMEOUT_S):
        return await executor.run(job.spec_bytes, job.blobs, **kwargs)


async def _reason_of(executor: Executor, spec_bytes: bytes, blobs: dict[bytes, bytes]) -> tuple[type, Reason]:
    with trio.fail_after(JOB_TIMEOUT_S):
        try:
            await executor.run(spec_bytes, blobs)
        except (JobFormatError, ExecutionError) as exc:
            return type(exc), exc.reason
    raise AssertionError("the job was not rejected")


def _with_op(job: ExportedJob, node: int, op: str) -> bytes:
    """The job's spec with one node's op name replaced (canonical bytes a hostile client could send)."""
    wire = codec.unpack(job.spec_bytes, codec.DecodeLimits(max_array_len=1 << 16))
    wire["nodes"][node]["op"] = op
    return codec.pack(wire)


async def test_executor_pool() -> None:
    mlp, expected = _mlp_job()
    async with open_executor(workers=1, device="cpu", memory_limit=MEMORY_LIMIT) as executor:
        assert executor.device_kind == "cpu"
        assert executor.hardware_class_base.startswith("cpu:")
        assert f"|torch {torch.__version__}|cuda none|threads " in executor.hardware_class_base
        (pid,) = executor.worker_pids

        # Results equal eager execution; the hardware class carries the dtype; progress is reported.
        stages: list[str] = []
        first = await _run(executor, mlp, progress=stages.append)
        torch.testing.assert_close(_tensor(first), expected, rtol=1e-6, atol=1e-6)
        assert first.hardware_class == executor.hardware_class_base + "|float32"
        assert stages[0] == "queued" and "running" in stages and stages[-1] == "done"
        assert first.timings.total_ms >= first.timings.exec_ms
        # Deterministic: the same job gives the same digest (and bytes) again.
        again = await _run(executor, mlp)
        assert again.output_digest == first.output_digest
        assert again.outputs == first.outputs

        # Rejected jobs keep the worker: unknown op (refused before any worker sees it) ...
        bad_op = _with_op(mlp, 0, "aten.system.default")
        assert await _reason_of(executor, bad_op, mlp.blobs) == (JobFormatError, Reason.UNKNOWN_OP)
        # ... a tensor whose bytes do not hash to its name ...
        tampered = dict(mlp.blobs)
        digest = mlp.spec.inputs[0].digest
        tampered[digest] = bytes(b ^ 0xFF for b in tampered[digest])
        assert await _reason_of(executor, mlp.spec_bytes, tampered) == (JobFormatError, Reason.HASH_MISMATCH)
        # ... a missing tensor ...
        missing = {d: b for d, b in mlp.blobs.items() if d != digest}
        assert await _reason_of(executor, mlp.spec_bytes, missing) == (JobFormatError, Reason.MISSING_TENSOR)
        # ... a 512 MiB allocation, past the executor's memory limit (refused by the meta-device dry run) ...
        huge = export_job(lambda x: x + torch.zeros(1 << 14, 1 << 13).sum(), (torch.ones(2),))
        assert await _reason_of(executor, huge.spec_bytes, huge.blobs) == (JobFormatError, Reason.MEMORY_LIMIT)
        # ... and an op that fails on the data (index out of range) at run time.
        gather = export_job(lambda x, i: torch.index_select(x, 0, i), (torch.ones(4, 2), torch.tensor([1])))
        out_of_range = gather.with_inputs(torch.ones(4, 2), torch.tensor([7]))
        failed = await _reason_of(executor, out_of_range.spec_bytes, out_of_range.blobs)
        assert failed == (ExecutionError, Reason.EXECUTION_FAILED)
        assert executor.worker_pids == (pid,)
        assert (await _run(executor, mlp)).output_digest == first.output_digest

        # A job past its wall time is killed; a fresh worker takes its place and the next job succeeds.
        slow = _slow_job(wall_time_ms=200)
        assert await _reason_of(executor, slow.spec_bytes, slow.blobs) == (ExecutionError, Reason.WALL_TIME)
        after_wall_time = await _run(executor, mlp)
        assert after_wall_time.output_digest == first.output_digest
        (second_pid,) = executor.worker_pids
        assert second_pid != pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the killed worker was reaped

        # A worker killed mid-job (as by the OOM killer) gives worker_crashed; the pool recovers.
        long_job = _slow_job(wall_time_ms=60_000)
        running = trio.Event()
        crash: list[BaseException] = []

        def on_progress(stage: str) -> None:
            if stage == "running":
                running.set()

        async def doomed() -> None:
            try:
                await _run(executor, long_job, progress=on_progress)
            except ExecutionError as exc:
                crash.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(doomed)
            with trio.fail_after(JOB_TIMEOUT_S):
                await running.wait()
            os.kill(second_pid, signal.SIGKILL)
        assert len(crash) == 1 and isinstance(crash[0], ExecutionError)
        assert crash[0].reason == Reason.WORKER_CRASHED
        assert (await _run(executor, mlp)).output_digest == first.output_digest
        assert executor.worker_pids not in ((pid,), (second_pid,))

        # Concurrent callers share the pool (one worker: they queue) and all get the same answer.
        digests: list[bytes] = []

        async def one() -> None:
            digests.append((await _run(executor, mlp)).output_digest)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
        assert digests == [first.output_digest] * 3
        pids = executor.worker_pids

    # Closing kills and reaps every worker; a closed executor refuses jobs.
    for worker in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)
    with pytest.raises(ExecutionError) as closed:
        await executor.run(mlp.spec_bytes, mlp.blobs)
    assert closed.value.reason == Reason.EXECUTOR_CLOSED


async def test_results_carry_the_committed_trace() -> None:
    mlp, _ = _mlp_job()
    # five 16 MiB intermediates: more than the trace budget
    big = export_job(lambda x: ((x.abs() + 1).neg().exp() * 2).relu(), (torch.randn(2048, 2048),))
    async with open_executor(workers=1, device="cpu", memory_limit=MEMORY_LIMIT) as executor:
        result = await _run(executor, mlp)
        spec = mlp.spec
        assert [leaf.node for leaf in result.trace] == list(range(len(spec.nodes)))
        assert result.trace_root == trace_root(result.trace)
        check_trace(spec, result.trace, [meta for meta, _ in result.outputs])
        assert result.trace_complete
        own = {meta.digest for meta in spec.inputs + spec.constants}
        assert set(result.trace_blobs) == {m.digest for leaf in result.trace for m in leaf.outputs} - own
        assert all(tensor_digest(data) == digest for digest, data in result.trace_blobs.items())
        # the client checks every node of the worker's trace against its committed inputs
        checks = check_nodes(spec, mlp.blobs, result.trace, result.trace_blobs, range(len(spec.nodes)), seed=1)
        assert all(check.ok for check in checks)
        # deterministic: the same trace again; and without tracing, the same outputs and no trace
        assert (await _run(executor, mlp)).trace_root == result.trace_root
        with trio.fail_after(JOB_TIMEOUT_S):
            plain = await executor.run(mlp.spec_bytes, mlp.blobs, trace=False)
        assert plain.output_digest == result.output_digest
        assert (plain.trace, plain.trace_root, plain.trace_blobs, plain.trace_complete) == ((), b"", {}, False)
        with trio.fail_after(JOB_TIMEOUT_S):
            digests_only = await executor.run(mlp.spec_bytes, mlp.blobs, trace_budget=0)
        assert digests_only.trace == result.trace and digests_only.trace_root == result.trace_root
        assert digests_only.trace_blobs == {} and not digests_only.trace_complete
        with pytest.raises(ConfigError):
            await executor.run(mlp.spec_bytes, mlp.blobs, trace_budget=TRACE_BYTES_BUDGET + 1)

        over = await _run(executor, big)
        assert len(over.trace) == len(big.spec.nodes) and not over.trace_complete
        kept = sum(len(data) for data in over.trace_blobs.values())
        assert 0 < kept <= TRACE_BYTES_BUDGET
        prefix = [m.digest for leaf in over.trace for m in leaf.outputs][: len(over.trace_blobs)]
        assert set(over.trace_blobs) == set(prefix)  # the bytes of the first nodes, up to the budget


def test_leaf_frames_are_canonical_and_bounded() -> None:
    meta = TensorMeta(digest=bytes(32), dtype="float32", shape=(1, 2, 3, 4, 5, 6, 7, 8))
    small = [TraceLeaf(node=i, outputs=(meta,)) for i in range(2 * TRACE_LEAVES_PER_FRAME + 5)]
    wide = [TraceLeaf(node=i, outputs=(meta,) * 1024) for i in range(40)]
    for leaves in (small, wide, small[:1], small[:15], small[:16]):
        frames = _leaf_frames(leaves)
        decoded = []
        for frame in frames:
            assert len(frame) <= MAX_HEADER_SIZE
            items = codec.unpack(frame)  # default limits, canonical form checked
            assert 1 <= len(items) <= TRACE_LEAVES_PER_FRAME
            decoded += [from_wire(TraceLeaf, item) for item in items]
        assert decoded == leaves
    assert len(_leaf_frames(small)) == 3 and len(_leaf_frames(wide)) > 1


def test_the_parent_checks_the_trace_a_child_sends() -> None:
    mlp, _ = _mlp_job()
    leaves, _, outputs = build_trace(mlp.spec, mlp.blobs)
    metas = [tensor_to_blob(t)[0] for t in outputs]
    frames = _leaf_frames(list(leaves))
    assert _decode_trace(mlp.spec, frames, metas) == (leaves, trace_root(leaves))
    extra = _leaf_frames([*leaves, leaves[0]])
    for bad_frames, bad_outputs, error in [
        (extra, metas, TraceError),  # a leaf more than the job has nodes
        (_leaf_frames(list(leaves[:-1])), metas, TraceError),  # one missing
        (frames, [leaves[0].outputs[0]], TraceError),  # outputs the trace does not name
        ([b"\xc1"], metas, DecodeError),  # not msgpack
    ]:
        with pytest.raises(error):
            _decode_trace(mlp.spec, bad_frames, bad_outputs)


@pytest.mark.parametrize(
    "kwargs",
    [{"workers": 0}, {"device": "tpu"}, {"memory_limit": 0}, {"threads": 0}],
)
async def test_bad_arguments_are_refused_before_any_process_starts(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        async with open_executor(**kwargs):  # type: ignore[arg-type]
            raise AssertionError("unreachable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_unusable_device_is_a_config_error() -> None:
    with trio.fail_after(JOB_TIMEOUT_S), pytest.raises(ConfigError, match="cuda"):
        async with open_executor(device="cuda"):
            raise AssertionError("unreachable")


def test_address_space_limit_turns_overallocation_into_memory_error() -> None:
    # In a child process: lowering RLIMIT_AS inside the test process could starve its other threads.
    script = (
        "from p2pcompute.compute._child import address_space_limit\n"
        "import resource\n"
        "before = resource.getrlimit(resource.RLIMIT_AS)\n"
        "with address_space_limit(64 << 20):\n"
        "    try:\n"
        "        bytearray(1 << 30)\n"
        "    except MemoryError:\n"
        "        print('refused')\n"
        "assert resource.getrlimit(resource.RLIMIT_AS) == before\n"
        "print(len(bytearray(1 << 30)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["refused", str(1 << 30)]


def test_the_executor_module_does_not_import_torch() -> None:
    # The peer's network process imports the executor; torch (~200 MB) lives only in the workers.
    script = "import sys, p2pcompute.compute.executor\nprint('torch' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"
