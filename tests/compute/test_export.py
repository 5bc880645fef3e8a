"""Exported jobs, run by the interpreter, give what eager PyTorch gives (bit for bit on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p2pcompute.compute.export import ExportedJob, export_job
from p2pcompute.compute.interpreter import check_memory, dry_run, execute
from p2pcompute.core.jobspec import (
    ALLOWED_OPS,
    CompareMode,
    Comparison,
    ConstRef,
    JobLimits,
    decode_bundle,
    decode_job,
    encode_bundle,
)
from p2pcompute.errors import JobError, Reason


def run_as_worker(job: ExportedJob) -> list[torch.Tensor]:
    """What a worker does: decode the spec bytes, check the bundle's blobs, dry-run, execute."""
    assert job.bundle() == encode_bundle(job.spec_bytes, job.blobs)
    spec_bytes, blobs = decode_bundle(job.bundle())
    spec = decode_job(spec_bytes)
    assert spec == job.spec
    check_memory(spec, memory_limit=1 << 30)
    return execute(spec, blobs)


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4), nn.Softmax(-1))


def convnet() -> nn.Module:
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 10),
        nn.LogSoftmax(-1),
    )
    norm = net[1]
    assert isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None and norm.running_var is not None
    with torch.no_grad():  # non-trivial running statistics
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    return net.eval()


def test_mlp_matches_eager_exactly() -> None:
    model = mlp()
    x = torch.randn(8, 16)
    job = export_job(model, (x,))
    assert len(job.spec.constants) == 6 and all(node.op in ALLOWED_OPS for node in job.spec.nodes)
    (out,) = run_as_worker(job)
    with torch.no_grad():
        assert torch.equal(out, model(x))
    # the same job on other inputs keeps the graph and the constants, and names new input tensors
    y = torch.randn(8, 16)
    other = job.with_inputs(y)
    assert other.spec.nodes == job.spec.nodes and other.spec.constants == job.spec.constants
    assert other.digest != job.digest
    (out,) = run_as_worker(other)
    with torch.no_grad():
        assert torch.equal(out, model(y))
    with pytest.raises(JobError) as info:
        job.with_inputs(torch.randn(4, 16))
    assert info.value.reason == Reason.NOT_EXPORTABLE


def test_convnet_matches_eager_exactly() -> None:
    model = convnet()
    x = torch.randn(2, 3, 8, 8)
    job = export_job(model, (x,), compare=Comparison(mode=CompareMode.EXACT, rtol=0.0, atol=0.0))
    assert job.spec.compare.mode == CompareMode.EXACT
    ops = {node.op for node in job.spec.nodes}
    assert {"aten.convolution.default", "aten._native_batch_norm_legit_no_training.default"} <= ops
    (out,) = run_as_worker(job)
    with torch.no_grad():
        assert torch.equal(out, model(x))
    info = dry_run(job.spec)
    assert info.outputs == (("float32", (2, 10)),)
    assert info.output_bytes == 2 * 10 * 4
    assert info.flops > 2 * 8 * 27 * 64 * 2  # at least the first convolution


def attention_block(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = F.layer_norm(x, (x.shape[-1],))
    scores = (h @ w @ h.transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(mask, float("-inf")).softmax(-1)
    y = torch.cat([x + scores @ h, torch.tanh(x)], dim=-1)
    return y, y.sum(dim=1).argmax(-1), (y.to(torch.bfloat16) * 2).float().mean()


def test_function_with_several_outputs_matches_eager_exactly() -> None:
    x, w = torch.randn(2, 5, 8), torch.randn(8, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    job = export_job(attention_block, (x, w, mask), limits=JobLimits(max_ops=500))
    assert [meta.dtype for meta in job.spec.inputs] == ["float32", "float32", "bool"]
    assert job.spec.limits.max_ops == 500
    outs = run_as_worker(job)
    expected = attention_block(x, w, mask)
    assert len(outs) == 3
    for got, want in zip(outs, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_bfloat16_and_integer_tensors_travel_exactly() -> None:
    a = torch.randn(4, 4).to(torch.bfloat16)
    idx = torch.tensor([3, 0, 2], dtype=torch.int64)
    job = export_job(lambda t, i: (t.float()[i] * 3).to(torch.bfloat16), (a, idx))
    (out,) = run_as_worker(job)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (a.float()[idx] * 3).to(torch.bfloat16))


def test_lifted_tensor_constants_become_job_constants() -> None:
    table = torch.arange(6, dtype=torch.float32)

    class WithConstant(nn.Module):
        scale: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.tensor([2.0, 3.0]), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale + table[:2]

    model = WithConstant()
    x = torch.randn(3, 2)
    job = export_job(model, (x,))
    assert len(job.spec.constants) == 2
    assert any(isinstance(arg, ConstRef) for node in job.spec.nodes for arg in node.args)
    (out,) = run_as_worker(job)
    assert torch.equal(out, model(x))


@pytest.mark.parametrize(
    ("fn", "inputs"),
    [
        (lambda x: torch.lgamma(x), (torch.randn(3),)),  # an op outside the allow-list
        (lambda x: x * 2, (torch.randn(3, dtype=torch.complex64),)),  # a dtype outside DTYPES
        (lambda x, n: x * n, (torch.randn(3), 2)),  # a non-tensor input
    ],
)
def test_unsupported_programs_are_not_exportable(fn: object, inputs: tuple[object, ...]) -> None:
    with pytest.raises(JobError) as info:
        export_job(fn, inputs)  # type: ignore[arg-type]
    assert info.value.reason == Reason.NOT_EXPORTABLE


def test_state_updates_are_not_exportable() -> None:
    with pytest.raises(JobError) as info:
        export_job(nn.BatchNorm1d(4).train(), (torch.randn(3, 4),))
    assert info.value.reason == Reason.NOT_EXPORTABLE
    assert "eval" in info.value.detail


def test_a_graph_over_the_op_limit_is_not_exportable() -> None:
    with pytest.raises(JobError) as info:
        export_job(lambda x: x.relu().exp().neg().abs(), (torch.randn(2),), limits=JobLimits(max_ops=3))
    assert info.value.reason == Reason.NOT_EXPORTABLE
    assert "too_many_ops" in info.value.detail


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_execution_agrees_with_cpu_within_the_jobs_tolerance() -> None:
    model = convnet()
    job = export_job(model, (torch.randn(2, 3, 8, 8),))
    spec = decode_job(job.spec_bytes)
    (cpu,) = execute(spec, job.blobs)
    (gpu,) = execute(spec, job.blobs, device="cuda")
    assert gpu.device.type == "cpu"
    assert torch.allclose(gpu, cpu, rtol=spec.compare.rtol, atol=spec.compare.atol)
