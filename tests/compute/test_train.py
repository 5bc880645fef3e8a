"""Training jobs: a joint forward/backward export equals torch autograd; the ops it needs are validated and fuzzed;
``train_locally`` is plain data-parallel SGD.

The network run of :func:`p2pcompute.train.train` is in ``tests/net/test_train.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p2pcompute.client import Job
from p2pcompute.compute.export import export_train_step, trainable_names
from p2pcompute.compute.interpreter import dry_run, execute, tensor_to_blob
from p2pcompute.core.jobspec import ALLOWED_OPS, InputRef, JobSpec, Node, NodeRef, TensorRef
from p2pcompute.errors import ExecutionError, JobError, JobFormatError, Reason
from p2pcompute.testing.fuzz_ops import _RECIPES, OPS
from p2pcompute.train import load_parameters, parameters_of, train_locally

TRAINING_OPS = frozenset(
    {
        "aten.convolution_backward.default",
        "aten.max_pool2d_with_indices_backward.default",
        "aten.avg_pool2d_backward.default",
        "aten._adaptive_avg_pool2d_backward.default",
        "aten.scatter.value",
        "aten.scatter.src",
        "aten.scatter_add.default",
        "aten.index_put.default",
        "aten.slice_scatter.default",
        "aten.upsample_nearest2d.vec",
        "aten.upsample_bilinear2d.vec",
    }
)
"""The new ops whose arguments relate to each other (each has validators and a fuzzer recipe); ``bitwise_and``,
``bitwise_or``, ``bitwise_not`` and ``cumprod`` joined the allow-list too (elementwise or along ``dim``)."""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


class Block(nn.Module):
    """Convolution, group norm, SiLU, nearest upsampling, convolution: a U-Net decoder block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.up = nn.Upsample(scale_factor=2)
        self.out = nn.Conv2d(8, 2, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(F.silu(self.norm(self.conv(x)))))


def autograd(model: nn.Module, loss_fn: object, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    loss = loss_fn(model(x), y)  # type: ignore[operator]
    loss.backward()
    return [loss.detach(), *(p.grad for p in model.parameters() if p.requires_grad)]  # type: ignore[misc]


def assert_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"output {i}")


# --- the joint export ------------------------------------------------------------------------------------------------


def test_joint_export_of_an_mlp_equals_autograd() -> None:
    model = mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    exported = export_train_step(model, F.cross_entropy, (x, y))
    spec = exported.spec
    params = parameters_of(model)
    assert [(m.dtype, m.shape) for m in spec.inputs] == [
        *(("float32", tuple(p.shape)) for p in params),
        ("float32", (8, 6)),
        ("int64", (8,)),
    ]
    assert spec.constants == ()  # every parameter is trained: all are inputs
    outputs = execute(spec, exported.blobs)
    assert_close(outputs, autograd(model, F.cross_entropy, x, y))
    # other parameters and data: the same graph (Job.with_inputs), still autograd's answer
    job = Job.from_exported(exported)
    other = [p + 0.1 for p in params]
    x2, y2 = torch.randn(8, 6), torch.randint(0, 3, (8,))
    load_parameters(model, other)
    assert_close(job.with_inputs([*other, x2, y2]).run_locally(), autograd(model, F.cross_entropy, x2, y2))


def test_joint_export_of_a_conv_group_norm_upsample_block_equals_autograd() -> None:
    torch.manual_seed(1)
    model = Block()
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 16, 16)
    job = Job.from_train_step(model, F.mse_loss, (x, y))
    ops = {node.op for node in job.spec.nodes}
    assert {"aten.convolution_backward.default", "aten.index_put.default", "aten.native_group_norm.default"} <= ops
    assert "aten.empty_permuted.default" not in ops  # written as full(size, 0)
    assert_close(job.run_locally(), autograd(model, F.mse_loss, x, y))
    assert len(job.outputs) == 1 + len(trainable_names(model)) == 6


def test_forward_export_of_the_block_runs_its_upsampling() -> None:
    torch.manual_seed(2)
    model = Block().eval()
    x = torch.randn(2, 3, 8, 8)
    job = Job.from_module(model, (x,))
    assert "aten.upsample_nearest2d.vec" in {node.op for node in job.spec.nodes}
    with torch.no_grad():
        torch.testing.assert_close(job.run_locally()[0], model(x))


def test_frozen_parameters_are_constants_and_targets_split_the_inputs() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(4, 6), torch.randn(4, 3)

    def loss_fn(out: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean() * scale

    scale = torch.tensor(0.5)
    exported = export_train_step(model, loss_fn, (x, y, scale), targets=2)
    assert trainable_names(model) == ("0.bias", "2.weight", "2.bias")
    assert len(exported.spec.inputs) == 3 + 3 and len(exported.spec.constants) == 1
    assert_close(execute(exported.spec, exported.blobs), autograd(model, lambda out, t: loss_fn(out, t, scale), x, y))


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


@pytest.mark.parametrize(
    ("model", "loss_fn", "words"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train(), F.mse_loss, "BUFFER_MUTATION"),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train(), F.mse_loss, "native_dropout"),
        (nn.Linear(4, 4), lambda out, y: (out - y) ** 2, "scalar"),
        (_Unused(), lambda out, y: F.mse_loss(out, y[:, :2]), "did not receive a gradient"),
    ],
)
def test_training_steps_the_format_cannot_say_are_not_exportable(model: nn.Module, loss_fn: object, words: str) -> None:
    with pytest.raises(JobError) as info:
        export_train_step(model, loss_fn, (torch.randn(3, 4), torch.randn(3, 4)))  # type: ignore[arg-type]
    assert info.value.reason == Reason.NOT_EXPORTABLE and words in info.value.detail


# --- the new ops: validators, masked outputs, fuzzer coverage ---------------------------------------------------------


def one_node(op: str, args: tuple[object, ...], *inputs: torch.Tensor, outputs: int = 1) -> tuple[JobSpec, dict]:
    pairs = [tensor_to_blob(t) for t in inputs]
    refs: tuple[TensorRef, ...] = (NodeRef(0),) if outputs == 1 else tuple(NodeRef(0, i) for i in range(outputs))
    spec = JobSpec(
        inputs=tuple(m for m, _ in pairs),
        nodes=(Node(op=op, args=tuple(tuple(a) if isinstance(a, list) else a for a in args)),),  # type: ignore[arg-type]
        outputs=refs,
    )
    return spec, {m.digest: b for m, b in pairs}


def refused(spec: JobSpec, blobs: dict) -> str:
    """The dry run and execution both refuse the node before its kernel: the dry run's detail."""
    with pytest.raises(JobFormatError) as info:
        dry_run(spec)
    with pytest.raises(JobFormatError):
        execute(spec, blobs)
    assert info.value.reason in (Reason.BAD_ARGUMENT, Reason.TENSOR_TOO_LARGE)
    return info.value.detail


def failed(spec: JobSpec, blobs: dict) -> str:
    """The dry run passes (shapes are fine); execution refuses the data before the kernel."""
    dry_run(spec)
    with pytest.raises(ExecutionError) as info:
        execute(spec, blobs)
    assert info.value.detail.endswith("(refused before the kernel)")
    return info.value.detail


I0, I1, I2 = InputRef(0), InputRef(1), InputRef(2)
CONV = ([1], [0], [1], False, [0], 1)  # stride, padding, dilation, transposed, output_padding, groups
POOL = ([2, 2], [2, 2], [0, 0], [1, 1], False)  # kernel, stride, padding, dilation, ceil_mode


def test_convolution_backward_wants_the_forward_output_shape_and_masks_outputs_to_empty_tensors() -> None:
    x, w = torch.randn(1, 2, 6), torch.randn(4, 2, 3)
    grad = torch.randn(1, 4, 4)
    op = "aten.convolution_backward.default"
    spec, blobs = one_node(op, (I0, I1, I2, [4], *CONV, [True, False, True]), grad, x, w, outputs=3)
    plan = dry_run(spec)
    outputs = execute(spec, blobs)
    assert plan.outputs == (("float32", (1, 2, 6)), ("float32", (0,)), ("float32", (4,)))
    assert [(str(t.dtype), tuple(t.shape)) for t in outputs] == [
        ("torch.float32", (1, 2, 6)),
        ("torch.float32", (0,)),  # masked off: empty, whatever the kernel returned there
        ("torch.float32", (4,)),
    ]
    # a grad_output larger than the forward's output would be read past what the kernel sizes
    spec, blobs = one_node(op, (I0, I1, I2, [4], *CONV, [True, True, True]), torch.randn(1, 4, 9), x, w, outputs=3)
    assert "the forward output is" in refused(spec, blobs)
    spec, blobs = one_node(op, (I0, I1, I2, [3], *CONV, [True, True, True]), grad, x, w, outputs=3)
    assert "bias_sizes" in refused(spec, blobs)
    spec, blobs = one_node(op, (I0, I1, I2, None, *CONV, [True, True, True]), grad, x, w, outputs=3)
    assert "bias_sizes None do not fit" in refused(spec, blobs)
    spec, blobs = one_node(op, (I0, I1, I2, [0], *CONV, [True, True, False]), grad, x, w, outputs=3)
    assert dry_run(spec).outputs[2] == ("float32", (0,))  # what the exporter writes for a convolution without bias


def test_max_pool_backward_indices_stay_in_their_plane() -> None:
    x = torch.randn(1, 2, 4, 4)
    values, indices = torch.ops.aten.max_pool2d_with_indices.default(x, [2, 2], [2, 2])
    op = "aten.max_pool2d_with_indices_backward.default"
    spec, blobs = one_node(op, (I0, I1, *POOL, I2), torch.ones_like(values), x, indices)
    assert execute(spec, blobs)[0].sum() == values.numel()
    spec, blobs = one_node(op, (I0, I1, *POOL, I2), torch.ones_like(values), x, indices + 16)  # past the 4 x 4 plane
    assert "out of range for a size of 16" in failed(spec, blobs)
    spec, blobs = one_node(op, (I0, I1, *POOL, I2), torch.ones(1, 2, 3, 3), x, torch.zeros(1, 2, 3, 3).long())
    assert "the forward output is" in refused(spec, blobs)
    spec, blobs = one_node(op, (I0, I1, *POOL, I2), torch.ones_like(values), x, indices.int())
    assert "torch.int32" in refused(spec, blobs)


def test_pooling_backward_ops_want_the_forward_output_shape() -> None:
    x = torch.randn(1, 2, 5, 5)
    avg = "aten.avg_pool2d_backward.default"
    spec, blobs = one_node(avg, (I0, I1, [2, 2], [2, 2], [0, 0], False, True, None), torch.ones(1, 2, 2, 2), x)
    execute(spec, blobs)
    spec, blobs = one_node(avg, (I0, I1, [2, 2], [2, 2], [0, 0], False, True, None), torch.ones(1, 2, 3, 3), x)
    assert "the forward output is" in refused(spec, blobs)
    spec, blobs = one_node(avg, (I0, I1, [2, 2], [2, 2], [0, 0], False, True, 0), torch.ones(1, 2, 2, 2), x)
    assert "divisor_override 0" in refused(spec, blobs)
    adaptive = "aten._adaptive_avg_pool2d_backward.default"
    spec, blobs = one_node(adaptive, (I0, I1), torch.ones(1, 2, 3, 2), x)
    execute(spec, blobs)
    for grad in (torch.ones(2, 2, 3, 2), torch.ones(1, 2, 3), torch.ones(1, 2, 3, 2).double()):
        spec, blobs = one_node(adaptive, (I0, I1), grad, x)
        assert "is no adaptive pooling" in refused(spec, blobs)


def test_scatter_and_index_put_write_only_inside_self() -> None:
    x = torch.zeros(3, 4)
    index = torch.tensor([[0, 1], [2, 0]])
    for op, extra in (("aten.scatter.value", 1.0), ("aten.scatter.src", I2), ("aten.scatter_add.default", I2)):
        spec, blobs = one_node(op, (I0, 1, I1, extra), x, index, torch.ones(2, 2))
        execute(spec, blobs)
        spec, blobs = one_node(op, (I0, 1, I1, extra), x, index + 4, torch.ones(2, 2))
        assert "out of range for a size of 4" in failed(spec, blobs)
        spec, blobs = one_node(op, (I0, 1, I1, extra), x, torch.zeros(4, 1).long(), torch.ones(4, 1))
        assert "is larger than self" in refused(spec, blobs)
        spec, blobs = one_node(op, (I0, 1, I1, extra), x, index.int(), torch.ones(2, 2))
        assert "torch.int32" in refused(spec, blobs)
    put = "aten.index_put.default"
    spec, blobs = one_node(put, (I0, (I1,), I2, True), x, torch.tensor([0, 2, 2]), torch.ones(3, 4))
    assert execute(spec, blobs)[0].sum() == 12
    spec, blobs = one_node(put, (I0, (I1,), I2, True), x, torch.tensor([0, 3]), torch.ones(2, 4))
    assert "out of range for a size of 3" in failed(spec, blobs)
    spec, blobs = one_node(put, (I0, (I1,), I2, False), x, torch.tensor([0, -4]), torch.ones(2, 4))
    assert "out of range" in failed(spec, blobs)
    spec, blobs = one_node(put, (I0, (I1,), I2, False), x, torch.tensor([True, False, True]), torch.ones(2, 4))
    assert "torch.bool" in refused(spec, blobs)
    spec, blobs = one_node(put, (I0, (I1,), I2, False), x, torch.tensor([0]), torch.ones(1, 4).double())
    assert "values are torch.float64" in refused(spec, blobs)


def test_slice_scatter_wants_the_slice_shape() -> None:
    x = torch.zeros(4, 6)
    op = "aten.slice_scatter.default"
    spec, blobs = one_node(op, (I0, I1, 1, 0, 9223372036854775807, 2), x, torch.ones(4, 3))
    assert execute(spec, blobs)[0].sum() == 12
    spec, blobs = one_node(op, (I0, I1, 1, 0, 9223372036854775807, 2), x, torch.ones(4, 4))
    assert "the slice [4, 3]" in refused(spec, blobs)
    spec, blobs = one_node(op, (I0, I1, 1, 0, None, 0), x, torch.ones(4, 3))
    assert "step 0" in refused(spec, blobs)


def test_upsampling_sizes_are_bounded_before_the_kernel() -> None:
    x = torch.randn(1, 2, 3, 3)
    nearest, bilinear = "aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec"
    spec, blobs = one_node(nearest, (I0, None, [2.0, 2.0]), x)
    torch.testing.assert_close(execute(spec, blobs)[0], F.interpolate(x, scale_factor=2.0))
    spec, blobs = one_node(bilinear, (I0, [5, 4], True, None), x)
    torch.testing.assert_close(
        execute(spec, blobs)[0], F.interpolate(x, size=(5, 4), mode="bilinear", align_corners=True)
    )
    assert "over" in refused(*one_node(nearest, (I0, None, [1e300, 1.0]), x))
    assert "bytes" in refused(*one_node(nearest, (I0, [1 << 15, 1 << 15], None), x))  # 8 GiB: tensor_too_large
    assert "elements" in refused(*one_node(nearest, (I0, [1 << 20, 1 << 20], None), x))
    assert "exactly one" in refused(*one_node(nearest, (I0, [4, 4], [2.0, 2.0]), x))
    assert "exactly one" in refused(*one_node(nearest, (I0, None, None), x))
    assert "finite factors" in refused(*one_node(nearest, (I0, None, [float("inf"), 1.0]), x))
    assert "output size 0" in refused(*one_node(nearest, (I0, None, [0.1, 1.0]), x))
    assert "floating" in refused(*one_node(bilinear, (I0, [4, 4], False, None), x.long()))


def test_the_new_ops_are_allowed_and_fuzzed_with_plausible_arguments() -> None:
    new = TRAINING_OPS | {"aten.bitwise_and.Tensor", "aten.bitwise_or.Tensor", "aten.bitwise_not.default"}
    assert new | {"aten.cumprod.default"} <= ALLOWED_OPS
    assert new | {"aten.cumprod.default"} <= set(OPS)  # tests/compute/test_fuzz_ops.py runs every op of OPS
    assert set(_RECIPES) >= TRAINING_OPS


# --- train_locally: data-parallel SGD ---------------------------------------------------------------------------------


def test_train_locally_is_sgd_on_the_whole_batch_with_shards_weighted_by_size() -> None:
    model = mlp()
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 6, generator=generator), torch.randint(0, 3, (20,), generator=generator)
    shards = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]  # the last one smaller: its own step job
    jobs: dict[int, Job] = {}

    def step_job(shard: Sequence[torch.Tensor]) -> Job:
        rows = int(shard[0].shape[0])
        jobs[rows] = Job.from_train_step(model, F.cross_entropy, tuple(shard))
        return jobs[rows]

    result = train_locally(step_job, parameters_of(model), shards, steps=4, lr=0.5)
    assert sorted(jobs) == [4, 8]  # one export per shard shape, reused every step
    reference = mlp()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = F.cross_entropy(reference(x), y)  # the whole batch: what the weighted shard average equals
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert result.losses == pytest.approx(losses, rel=1e-5)
    assert losses[-1] < losses[0]
    assert_close(result.params, [p.detach() for p in reference.parameters()])


def test_train_locally_refuses_parameters_or_shards_that_do_not_fit_the_job() -> None:
    model = mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    job = Job.from_train_step(model, F.cross_entropy, (x, y))
    params = parameters_of(model)
    with pytest.raises(JobError) as info:
        train_locally(job, params[:-1], [(x, y)], steps=1, lr=0.1)
    assert info.value.reason == Reason.SHAPE_MISMATCH
    with pytest.raises(JobError) as info:
        train_locally(job, [params[1], params[0], *params[2:]], [(x, y)], steps=1, lr=0.1)
    assert info.value.reason == Reason.SHAPE_MISMATCH
    with pytest.raises(JobError) as info:
        train_locally(job, params, [(x[:4], y[:4])], steps=1, lr=0.1)  # one job: shards of its shapes only
    assert info.value.reason == Reason.SHAPE_MISMATCH
