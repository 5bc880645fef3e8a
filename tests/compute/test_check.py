"""The client's checks of committed traces: honest traces of several models pass, each faked node is caught where it
was faked, fakes within the tolerance pass, hostile tensors are refused; and the worker-side trace capture."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from p2pcompute.compute import check as check_module
from p2pcompute.compute.check import (
    CheckMethod,
    TraceChecker,
    build_trace,
    check_costs,
    check_nodes,
    conv_check,
    derived_nodes,
    matmul_check,
    method_of,
    needed_tensors,
    node_seed,
)
from p2pcompute.compute.export import ExportedJob, export_job
from p2pcompute.compute.interpreter import (
    HASH_CHUNK_BYTES,
    TraceSink,
    dry_run,
    execute,
    tensor_meta,
    tensor_to_blob,
)
from p2pcompute.core.jobspec import Comparison
from p2pcompute.core.tensors import TensorMeta, tensor_digest
from p2pcompute.core.trace import TraceLeaf, check_trace, trace_root
from p2pcompute.errors import JobFormatError, Reason, TraceError
from p2pcompute.testing.jobs import chain_module
from tests.core.test_trace import spec_parameters

# --- models ----------------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=4, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, groups=2)
        self.c1d = nn.Conv1d(4, 6, 3, dilation=2)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.c1(x)))
        y = self.up(self.c2(y))
        return self.c1d(y.flatten(2)).mean(-1)


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.ln(x)
        probs = torch.softmax(self.lin(y), dim=-1)
        top = torch.topk(probs, 3, dim=-1)
        return probs, torch.log_softmax(y, dim=-1), top.values, top.indices, probs.argmax(-1), y.max(dim=-1).indices


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = torch.bmm(q, k.transpose(1, 2)) / 4.0
        return torch.bmm(torch.softmax(scores, -1), k)


def _models() -> dict[str, ExportedJob]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    return {
        "mlp": export_job(mlp, (torch.randn(4, 32),)),
        "conv": export_job(ConvNet().eval(), (torch.randn(2, 3, 12, 12),)),
        "norms": export_job(Norms().eval(), (torch.randn(5, 16),)),
        "chain": export_job(chain_module(48, 3), (torch.randn(48, 48),)),
        "attention": export_job(Attention(), (torch.randn(2, 6, 8), torch.randn(2, 7, 8))),
        "ints": export_job(
            lambda x, i: (torch.sort(x, -1).indices, (x > 0).sum(-1), torch.index_select(x, 0, i) * 2),
            (torch.randn(4, 5), torch.tensor([3, 0, 1])),
        ),
    }


MODELS = _models()


def _honest(job: ExportedJob) -> tuple[tuple[TraceLeaf, ...], dict[bytes, bytes]]:
    leaves, kept, _ = build_trace(job.spec, job.blobs)
    return leaves, kept


def _check_all(job: ExportedJob, leaves: tuple[TraceLeaf, ...], kept: dict[bytes, bytes], seed: int = 7) -> list:
    return check_nodes(job.spec, job.blobs, leaves, kept, range(len(leaves)), seed=seed)


def _perturb(factor: float, compare: Comparison) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """Every element of a node's first output moved by ``factor`` times what the tolerance allows there (integers
    and bools: one element changed)."""

    def fake(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        first = outs[0]
        if first.is_floating_point():
            step = (compare.atol + compare.rtol * first.abs()) * factor
            first = (first.to(torch.float64) + step).to(first.dtype)
        elif first.dtype == torch.bool:
            first = first.clone(memory_format=torch.contiguous_format)
            first.view(-1)[0] = ~first.view(-1)[0]
        else:
            first = first.clone(memory_format=torch.contiguous_format)
            first.view(-1)[0] += 1
        return [first, *outs[1:]]

    return fake


# --- honest and faked traces -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_honest_traces_pass_and_every_faked_node_is_caught_where_it_was_faked(name: str) -> None:
    job = MODELS[name]
    leaves, kept = _honest(job)
    checks = _check_all(job, leaves, kept)
    assert [c.node for c in checks if not c.ok] == [], [c for c in checks if not c.ok]
    methods = {c.method for c in checks}
    if name in ("mlp", "chain", "attention"):
        assert CheckMethod.FREIVALDS in methods
    if name == "conv":
        assert CheckMethod.PROJECTION in methods
    for node in range(len(leaves)):
        faked, fake_kept, _ = build_trace(job.spec, job.blobs, fakes={node: _perturb(10.0, job.spec.compare)})
        if faked[node] == leaves[node]:
            continue  # the perturbation does not change this value (e.g. a bool that is rounded back)
        caught = [c.node for c in _check_all(job, faked, fake_kept, seed=node) if not c.ok]
        assert caught == [node], f"{name}: node {node} {job.spec.nodes[node].op} faked, caught at {caught}"


@pytest.mark.parametrize("name", ["mlp", "conv", "chain", "attention"])
def test_a_fake_within_the_tolerance_passes(name: str) -> None:
    """Except where no honest worker can differ at all: a view of the job's own tensors (``permute`` of a weight)
    is bytes the client derives itself, so any change to it is a fake, within the tolerance or not."""
    job = MODELS[name]
    derived = derived_nodes(job.spec)
    for node in range(len(job.spec.nodes)):
        faked, kept, _ = build_trace(job.spec, job.blobs, fakes={node: _perturb(0.4, job.spec.compare)})
        checks = _check_all(job, faked, kept)
        if node in derived:
            assert [c.node for c in checks if not c.ok] == [node], (name, node)
        else:
            assert all(c.ok for c in checks), (name, node)


def test_a_single_element_fake_is_caught_by_its_row_or_by_sampling() -> None:
    job = MODELS["chain"]
    mm = next(i for i, n in enumerate(job.spec.nodes) if n.op == "aten.mm.default")

    def one_element(outs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = outs[0].clone()
        out[5, 7] += 1.0  # far beyond the row's bound
        return [out]

    faked, kept, _ = build_trace(job.spec, job.blobs, fakes={mm: one_element})
    for seed in range(5):
        (check,) = check_nodes(job.spec, job.blobs, faked, kept, [mm], seed=seed, samples=0)
        assert not check.ok and "row 5" in check.detail and check.error > check.bound


def test_a_faked_index_is_caught_at_its_node_and_refused_downstream() -> None:
    job = export_job(lambda w, x: torch.index_select(w, 0, x.argmax(-1)), (torch.randn(6, 3), torch.randn(2, 6)))
    leaves, kept = _honest(job)
    argmax = next(i for i, n in enumerate(job.spec.nodes) if n.op == "aten.argmax.default")
    # an index out of range: index_select cannot run on it, so the faker commits its own output for that node too
    bad, data = tensor_to_blob(torch.full((2,), 99))
    fake_leaves = list(leaves)
    fake_leaves[argmax] = TraceLeaf(node=argmax, outputs=(bad,))
    checks = check_nodes(job.spec, job.blobs, fake_leaves, {**kept, bad.digest: data}, range(len(leaves)), seed=1)
    failed = {c.node: c for c in checks if not c.ok}
    assert set(failed) == {argmax, argmax + 1}
    assert "refuses its committed inputs" in failed[argmax + 1].detail


def test_ties_may_be_broken_otherwise_but_indices_must_point_at_the_values() -> None:
    job = export_job(lambda x: (torch.sort(x, -1), torch.topk(x, 2, -1), x.max(-1)), (torch.zeros(3, 4),))
    leaves, kept = _honest(job)
    spec = job.spec
    sort = next(i for i, n in enumerate(spec.nodes) if n.op == "aten.sort.default")
    topk = next(i for i, n in enumerate(spec.nodes) if n.op == "aten.topk.default")

    def swap(outs: list[torch.Tensor]) -> list[torch.Tensor]:  # another order among equal values: honest
        return [outs[0], outs[1].flip(-1)]

    def repeat(outs: list[torch.Tensor]) -> list[torch.Tensor]:  # one index twice: not a choice of top-k
        return [outs[0], torch.zeros_like(outs[1])]

    for node, fake, ok in [(sort, swap, True), (topk, swap, True), (topk, repeat, False), (sort, repeat, False)]:
        faked, fk, _ = build_trace(spec, job.blobs, fakes={node: fake})
        (check,) = check_nodes(spec, job.blobs, faked, fk, [node], seed=0)
        assert check.ok is ok, (spec.nodes[node].op, fake.__name__)
    assert all(c.ok for c in _check_all(job, leaves, kept))


# --- the checks themselves -------------------------------------------------------------------------------------------


def test_freivalds_on_non_contiguous_and_batched_inputs() -> None:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    a = torch.randn(40, 30).t()  # 30 x 40, transposed strides
    b = torch.randn(50, 40)[:, ::1].t()[:, :20]  # 40 x 20, a strided slice
    bias = torch.randn(20).expand(30, 20)  # stride 0
    c = torch.addmm(bias, a, b, beta=0.5, alpha=2.0)
    assert not a.is_contiguous() and not b.is_contiguous()
    kw = {"rtol": 1e-4, "atol": 1e-5, "generator": g}
    assert matmul_check(a, b, c, bias=bias, alpha=2.0, beta=0.5, **kw).ok
    assert matmul_check(a, b, c.t().contiguous().t(), bias=bias, alpha=2.0, beta=0.5, **kw).ok
    wrong = c.clone()
    wrong[3] += 0.5
    assert not matmul_check(a, b, wrong, bias=bias, alpha=2.0, beta=0.5, **kw).ok
    assert not matmul_check(a, b, c, bias=bias, alpha=2.0, beta=1.0, **kw).ok  # another beta is another product
    x, y = torch.randn(3, 8, 5).transpose(1, 2), torch.randn(3, 8, 6)  # 3 x 5 x 8 @ 3 x 8 x 6
    z = torch.bmm(x, y)
    assert matmul_check(x, y, z, **kw).ok
    z[1, 2, 3] += 1.0
    found = matmul_check(x, y, z, samples=0, **kw)
    assert not found.ok and "row 2 of batch 1" in found.where
    half = torch.randn(16, 64).half(), torch.randn(64, 16).half()
    assert matmul_check(*half, half[0] @ half[1], **kw).ok


def test_the_bound_covers_an_honest_product_in_another_summation_order() -> None:
    # float32 products summed in reverse and in pairs: as another device would; both pass with a zero tolerance
    torch.manual_seed(2)
    a, b = torch.randn(16, 256) * 100, torch.randn(256, 16)
    products = a[:, :, None] * b[None, :, :]  # each product rounded to float32, as a kernel's are
    reverse = products.flip(1).cumsum(1)[:, -1]
    pairwise = products.reshape(16, 128, 2, 16).sum(2).reshape(16, 32, 4, 16).sum(2).sum(1)
    g = torch.Generator().manual_seed(0)
    for c in (a @ b, reverse, pairwise):
        assert matmul_check(a, b, c, rtol=0.0, atol=0.0, generator=g).ok
    wrong = (a @ b) * (1 + 1e-3)
    assert not matmul_check(a, b, wrong, rtol=0.0, atol=0.0, generator=g).ok


def test_conv_check_grouped_transposed_and_strided() -> None:
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(3)
    kw = {"rtol": 1e-4, "atol": 1e-5, "generator": g}
    x = torch.randn(2, 6, 9, 9)
    for transposed, groups in [(False, 1), (False, 3), (True, 1), (True, 2)]:
        w = torch.randn(6, 4 // (2 if transposed and groups == 2 else 1) if transposed else 2, 3, 3)
        if not transposed:
            w = torch.randn(6, 6 // groups, 3, 3)
        bias = torch.randn(int(w.shape[1]) * groups if transposed else 6)
        args = ([2, 1], [1, 0], [1, 2], transposed, [1, 0] if transposed else [0, 0], groups)
        y = torch.ops.aten.convolution.default(x, w, bias, *args)
        params = {
            "stride": args[0],
            "padding": args[1],
            "dilation": args[2],
            "transposed": transposed,
            "output_padding": args[4],
            "groups": groups,
        }
        assert conv_check(x, w, bias, y, **params, **kw).ok, (transposed, groups)
        wrong = y.clone()
        wrong[1, 2] += 0.01
        assert not conv_check(x, w, bias, wrong, **params, channels=0, **kw).ok
        assert not conv_check(x, w, None, y, **params, **kw).ok


def test_hostile_tensors_are_refused() -> None:
    job = MODELS["mlp"]
    leaves, kept = _honest(job)
    node = next(i for i, n in enumerate(job.spec.nodes) if n.op == "aten.relu.default")
    out = leaves[node].outputs[0]
    checker = TraceChecker(job.spec, job.blobs, leaves)
    needed = checker.needed([node])
    assert out.digest in needed and not needed & {m.digest for m in job.spec.inputs + job.spec.constants}
    for change, reason in [
        (lambda data: data[:-4], Reason.SHAPE_MISMATCH),  # too short
        (lambda data: bytes([data[0] ^ 1]) + data[1:], Reason.HASH_MISMATCH),  # not the committed bytes
    ]:
        with pytest.raises(JobFormatError) as info:
            checker.check([node], {**kept, out.digest: change(kept[out.digest])}, seed=0)
        assert info.value.reason is reason
    with pytest.raises(JobFormatError) as info:
        checker.check([node], {d: b for d, b in kept.items() if d != out.digest}, seed=0)
    assert info.value.reason is Reason.MISSING_TENSOR
    # a leaf that states another shape or dtype than the job gives is refused before anything is fetched
    for wrong in (
        TensorMeta(digest=out.digest, dtype="float64", shape=out.shape),
        TensorMeta(digest=out.digest, dtype=out.dtype, shape=(1 << 20, 1 << 20)),
    ):
        bad = list(leaves)
        bad[node] = TraceLeaf(node=node, outputs=(wrong,))
        with pytest.raises(TraceError) as trace_info:
            TraceChecker(job.spec, job.blobs, bad)
        assert trace_info.value.reason is Reason.BAD_TRACE
    with pytest.raises(TraceError):
        TraceChecker(job.spec, job.blobs, leaves[:-1])


def test_a_committed_bool_that_is_not_0_or_1_fails_its_check() -> None:
    job = export_job(lambda x: (x > 0).logical_not(), (torch.randn(4),))
    leaves, kept = _honest(job)
    gt = next(i for i, n in enumerate(job.spec.nodes) if n.op == "aten.gt.Scalar")
    data = bytes([2, 0, 1, 0])
    bad = list(leaves)
    bad[gt] = TraceLeaf(node=gt, outputs=(TensorMeta(digest=tensor_digest(data), dtype="bool", shape=(4,)),))
    checks = check_nodes(job.spec, job.blobs, bad, {**kept, tensor_digest(data): data}, range(len(bad)), seed=0)
    assert {c.node for c in checks if not c.ok} == {gt, gt + 1}
    assert all("invalid" in c.detail for c in checks if not c.ok)


def test_checks_are_repeatable_and_record_what_an_offline_checker_needs() -> None:
    job = MODELS["chain"]
    faked, fk, _ = build_trace(job.spec, job.blobs, fakes={0: _perturb(10.0, job.spec.compare)})
    first = check_nodes(job.spec, job.blobs, faked, fk, [0, 1], seed=11)
    assert first == check_nodes(job.spec, job.blobs, faked, fk, [0, 1], seed=11)
    bad = first[0]
    assert not bad.ok and bad.method is CheckMethod.FREIVALDS and bad.error > bad.bound
    assert bad.seed == node_seed(11, 0) and bad.outputs == faked[0].outputs
    assert [m.digest for m in bad.inputs] == [job.spec.inputs[0].digest, job.spec.constants[0].digest]
    assert bad.bytes_read == faked[0].outputs[0].nbytes  # the inputs are the job's own
    assert first[1].ok and first[1].bytes_read == 2 * faked[0].outputs[0].nbytes


# --- what checks cost ------------------------------------------------------------------------------------------------


def test_cost_model() -> None:
    job = export_job(chain_module(256, 2), (torch.randn(256, 256),))
    plan = dry_run(job.spec)
    costs = check_costs(job.spec, plan)
    assert [c.node for c in costs] == list(range(len(job.spec.nodes)))
    for cost in costs:
        assert cost.node_flops == plan.node_flops[cost.node]
        if cost.op == "aten.mm.default":
            assert cost.method is CheckMethod.FREIVALDS
            assert cost.check_flops < cost.node_flops / 10
            assert cost.fetch_bytes == 256 * 256 * 4 * (1 if cost.node == 0 else 2)
        else:
            assert cost.method is CheckMethod.RECOMPUTE and cost.check_flops >= cost.node_flops
    leaves, kept = _honest(job)
    checks = check_nodes(job.spec, job.blobs, leaves, kept, range(len(leaves)), seed=0)
    for check, cost in zip(checks, costs, strict=True):
        assert check.flops <= 2 * cost.check_flops
    assert method_of("aten.mm.default", "int64") is CheckMethod.RECOMPUTE
    assert method_of("aten.empty_like.default", "float32") is CheckMethod.FREE
    assert needed_tensors(job.spec, leaves, []) == set()


# --- the worker side: trace capture ----------------------------------------------------------------------------------


def test_tensor_meta_hashes_what_the_blob_would_be() -> None:
    torch.manual_seed(0)
    base = torch.randn(6, 7)
    cases = [
        base,
        base.t(),
        base[::2, 1:5],
        torch.randn(3).expand(4, 3),
        torch.tensor(3.5),
        torch.empty(0, 3),
        base.to(torch.bfloat16).t(),
        base > 0,
        torch.arange(10, dtype=torch.int16)[::3],
        torch.randn(2200, 2100).t(),  # over HASH_CHUNK_BYTES, not contiguous: hashed in chunks of rows
        torch.randn(1, 2100, 2100).transpose(1, 2),
    ]
    assert cases[-2].numel() * 4 > HASH_CHUNK_BYTES
    for tensor in cases:
        assert tensor_meta(tensor) == tensor_to_blob(tensor)[0]


def test_execute_with_a_trace_sink_commits_every_node() -> None:
    job = MODELS["norms"]
    sink = TraceSink()
    outputs = execute(job.spec, job.blobs, trace=sink)
    leaves, _, reference = build_trace(job.spec, job.blobs)
    assert tuple(sink.leaves) == leaves
    check_trace(job.spec, sink.leaves, [tensor_to_blob(t)[0] for t in outputs])
    assert sink.complete and set(sink.blobs) == {m.digest for leaf in leaves for m in leaf.outputs} - {
        m.digest for m in job.spec.inputs + job.spec.constants
    }
    assert all(tensor_digest(data) == digest for digest, data in sink.blobs.items())
    assert sink.kept_bytes == sum(len(data) for data in sink.blobs.values())
    assert all(c.ok for c in check_nodes(job.spec, job.blobs, sink.leaves, sink.blobs, range(len(leaves)), seed=3))
    for a, b in zip(outputs, reference, strict=True):
        assert torch.equal(a, b)
    # a small budget keeps the bytes of a prefix of the nodes and says the trace is incomplete
    sizes = [sum(m.nbytes for m in leaf.outputs) for leaf in leaves]
    small = TraceSink(budget=sizes[0] + sizes[1])
    execute(job.spec, job.blobs, trace=small)
    assert tuple(small.leaves) == leaves and not small.complete and small.kept_bytes <= sizes[0] + sizes[1]
    assert {m.digest for m in leaves[0].outputs} <= set(small.blobs) | {m.digest for m in job.spec.constants}
    assert trace_root(small.leaves) == trace_root(leaves)
    empty = TraceSink(budget=0)
    execute(job.spec, job.blobs, trace=empty)
    assert not empty.blobs and not empty.complete and tuple(empty.leaves) == leaves


def test_a_tensor_of_more_dims_than_a_meta_holds_cannot_be_committed() -> None:
    job = export_job(lambda x: x.reshape(1, 1, 1, 1, 1, 1, 1, 1, 1, 2).sum(), (torch.ones(2),))
    assert math.isfinite(float(execute(job.spec, job.blobs)[0]))
    with pytest.raises(JobFormatError) as info:
        execute(job.spec, job.blobs, trace=TraceSink())
    assert info.value.reason is Reason.BAD_GRAPH


def test_the_spec_s_check_parameters_are_the_code_s() -> None:
    stated = spec_parameters()
    for name in ("FREIVALDS_ROUNDS", "FREIVALDS_BLOCKS", "BLOCK_COLUMNS", "ELEMENT_SAMPLES", "PROJECTION_CHANNELS"):
        assert stated[name] == getattr(check_module, name), name
    assert stated["OUTPUT_ROUNDINGS"] == check_module.OUTPUT_ROUNDINGS
    assert stated["HASH_CHUNK_BYTES"] == HASH_CHUNK_BYTES
