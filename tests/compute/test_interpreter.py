"""The interpreter: tensors from checked bytes only, allow-listed ops only, limits checked on the meta device first."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from p2pcompute.compute.interpreter import (
    DTYPE_BY_NAME,
    TENSOR_OVERHEAD_BYTES,
    blob_to_tensor,
    check_memory,
    dry_run,
    execute,
    resolve_op,
    tensor_to_blob,
)
from p2pcompute.core import codec
from p2pcompute.core.jobspec import (
    ALLOWED_OPS,
    MAX_TUPLE_OUTPUTS,
    OP_SCHEMAS,
    Device,
    DType,
    InputRef,
    JobLimits,
    JobSpec,
    MemoryFormat,
    Node,
    NodeRef,
    _spec_to_wire,
    decode_job,
    encode_job,
)
from p2pcompute.core.schema import to_wire
from p2pcompute.core.tensors import DTYPES, TensorMeta, tensor_digest
from p2pcompute.errors import ExecutionError, JobFormatError, Reason

MIB = 1 << 20


def blob(t: torch.Tensor) -> tuple[TensorMeta, bytes]:
    return tensor_to_blob(t)


def job(
    nodes: list[Node], outputs: list[NodeRef | InputRef], *inputs: torch.Tensor
) -> tuple[JobSpec, dict[bytes, bytes]]:
    pairs = [blob(t) for t in inputs]
    spec = JobSpec(inputs=tuple(m for m, _ in pairs), nodes=tuple(nodes), outputs=tuple(outputs))
    return spec, {m.digest: b for m, b in pairs}


def failure_of(call: object, *args: object, **kwargs: object) -> str:
    """The detail of the ExecutionError a call raises, checked by a validator before the kernel ran."""
    with pytest.raises(ExecutionError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    assert info.value.reason == Reason.EXECUTION_FAILED
    assert info.value.detail.endswith(" (refused before the kernel)")
    return info.value.detail.removesuffix(" (refused before the kernel)")


def reason_of(call: object, *args: object, **kwargs: object) -> Reason:
    with pytest.raises(JobFormatError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.reason


# --- tensors <-> bytes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 1, 2)])
def test_blob_round_trip_for_every_dtype(name: str, shape: tuple[int, ...]) -> None:
    t = (torch.arange(max(1, torch.Size(shape).numel())) % 2).to(DTYPE_BY_NAME[name])[: torch.Size(shape).numel()]
    t = t.reshape(shape)
    meta, data = tensor_to_blob(t)
    assert (meta.dtype, meta.shape, len(data)) == (name, shape, meta.nbytes)
    back = blob_to_tensor(meta, data)
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_blob_is_little_endian_and_c_contiguous() -> None:
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int16).t()  # not contiguous
    meta, data = tensor_to_blob(t)
    assert data == bytes([1, 0, 3, 0, 2, 0, 4, 0])
    assert meta.digest == tensor_digest(data)


def test_blob_tensor_is_a_private_copy() -> None:
    data = bytearray(tensor_to_blob(torch.ones(4))[1])
    meta = TensorMeta(digest=tensor_digest(data), dtype="float32", shape=(4,))
    t = blob_to_tensor(meta, data)
    data[:4] = bytes(4)
    assert torch.equal(t, torch.ones(4))


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(Path.cwd() / "pwned-by-pickle"),))


def test_pickle_bytes_are_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(_Boom())
    real = torch.zeros(len(payload), dtype=torch.uint8)
    # instead of a tensor blob: same length, wrong hash
    meta = TensorMeta(digest=tensor_digest(bytes(real.tolist())), dtype="uint8", shape=(len(payload),))
    assert reason_of(blob_to_tensor, meta, payload) == Reason.HASH_MISMATCH
    assert reason_of(blob_to_tensor, TensorMeta(digest=meta.digest, dtype="float32", shape=(1,)), payload) == (
        Reason.SHAPE_MISMATCH
    )
    # a meta naming the pickle itself gives a byte tensor of it, nothing more
    own = TensorMeta(digest=tensor_digest(payload), dtype="uint8", shape=(len(payload),))
    assert bytes(blob_to_tensor(own, payload).tolist()) == payload
    # instead of a job: torch.save output and a plain pickle
    buffer = io.BytesIO()
    torch.save({"weights": torch.ones(2)}, buffer)
    assert reason_of(decode_job, buffer.getvalue()) in {Reason.MALFORMED, Reason.TRAILING_BYTES, Reason.NOT_A_MAP}
    assert reason_of(decode_job, payload) in {Reason.MALFORMED, Reason.TRAILING_BYTES, Reason.NOT_A_MAP}
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_bool_bytes_must_be_zero_or_one() -> None:
    data = bytes([0, 1, 2])
    meta = TensorMeta(digest=tensor_digest(data), dtype="bool", shape=(3,))
    assert reason_of(blob_to_tensor, meta, data) == Reason.BAD_ARGUMENT


# --- op resolution ---------------------------------------------------------------------------------------------------


def test_every_allowed_op_resolves_in_this_torch() -> None:
    for name in ALLOWED_OPS:
        assert str(resolve_op(name)) == name


@pytest.mark.parametrize(
    "name", ["aten.rand.default", "aten.add_.Tensor", "aten.__class__.default", "builtins.eval", "aten.add", ""]
)
def test_unknown_ops_are_refused(name: str) -> None:
    assert reason_of(resolve_op, name) == Reason.UNKNOWN_OP
    x = torch.ones(2)
    spec, blobs = job([Node(op=name, args=(InputRef(0),))], [NodeRef(0)], x)
    assert reason_of(dry_run, spec) == Reason.UNKNOWN_OP
    assert reason_of(execute, spec, blobs) == Reason.UNKNOWN_OP


# --- execution -------------------------------------------------------------------------------------------------------


def test_execute_runs_a_hand_written_graph() -> None:
    x = torch.randn(3, 4)
    nodes = [
        Node(op="aten.permute.default", args=(InputRef(0), (1, 0))),
        Node(op="aten.mm.default", args=(InputRef(0), NodeRef(0))),
        Node(op="aten.split_with_sizes.default", args=(NodeRef(1), (1, 2))),
        Node(
            op="aten.full.default",
            args=((2, 3), 0.5),
            kwargs=(("device", Device()), ("dtype", DType("float64")), ("pin_memory", False)),
        ),
        Node(
            op="aten.clone.default",
            args=(NodeRef(2, 1),),
            kwargs=(("memory_format", MemoryFormat("contiguous_format")),),
        ),
    ]
    spec, blobs = job(nodes, [NodeRef(2, 0), NodeRef(3), NodeRef(4), InputRef(0)], x)
    spec = decode_job(encode_job(spec))
    assert check_memory(spec, memory_limit=MIB) > 0
    first, full, rest, same = execute(spec, blobs)
    prod = x @ x.t()
    assert torch.equal(first, prod[:1]) and torch.equal(rest, prod[1:]) and torch.equal(same, x)
    assert full.dtype == torch.float64 and torch.equal(full, torch.full((2, 3), 0.5, dtype=torch.float64))


def test_missing_and_mismatched_tensors() -> None:
    x = torch.ones(4)
    spec, blobs = job([Node(op="aten.relu.default", args=(InputRef(0),))], [NodeRef(0)], x)
    assert reason_of(execute, spec, {}) == Reason.MISSING_TENSOR
    (digest,) = blobs
    assert reason_of(execute, spec, {digest: blobs[digest][:-4]}) == Reason.SHAPE_MISMATCH
    assert reason_of(execute, spec, {digest: bytes(16)}) == Reason.HASH_MISMATCH


@pytest.mark.parametrize(
    "node",
    [
        Node(op="aten.view.default", args=(InputRef(0), (5,))),  # wrong element count
        Node(op="aten.relu.default", args=(DType("float32"),)),  # a dtype where a tensor goes
        Node(op="aten.relu.default", args=(InputRef(0), 1, 2)),  # too many positional arguments
        Node(op="aten.relu.default", args=(InputRef(0),), kwargs=(("out", InputRef(0)),)),  # unknown keyword
        Node(op="aten.sum.dim_IntList", args=(InputRef(0), (7,))),  # dimension out of range
        Node(op="aten.full.default", args=((1 << 62, 1 << 62), 0.0)),  # element count overflows
        Node(op="aten.expand.default", args=(InputRef(0), (1 << 30, 1 << 30, 1 << 30))),
        Node(op="aten.view.default", args=(InputRef(0), (1 << 62,))),
        Node(op="aten.tril.default", args=(InputRef(0), -(1 << 63))),
        Node(op="aten.arange.start_step", args=(0, 1e308, 1e-300)),
    ],
)
def test_bad_arguments_are_caught_on_the_meta_device(node: Node) -> None:
    spec, _ = job([node], [NodeRef(0)], torch.ones(4))
    assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT


def test_item_beyond_a_variable_length_result() -> None:
    nodes = [Node(op="aten.split_with_sizes.default", args=(InputRef(0), (2, 2)))]
    spec, blobs = job(nodes, [NodeRef(0, 2)], torch.ones(4))
    assert reason_of(dry_run, spec) == Reason.BAD_GRAPH
    assert reason_of(execute, spec, blobs) == Reason.BAD_GRAPH


# --- limits ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "node",
    [
        Node(op="aten.empty.memory_format", args=((10**12,),), kwargs=(("device", Device()),)),
        Node(op="aten.empty.memory_format", args=((10**12,),)),  # no device: still created on meta
        Node(op="aten.full.default", args=((10**6, 10**6), 1.0)),
        Node(op="aten.arange.default", args=(10**12,)),
        Node(op="aten.full_like.default", args=(InputRef(0), 1.0)),
    ],
)
def test_huge_creation_ops_are_refused_without_allocating(node: Node) -> None:
    spec, _ = job([node], [NodeRef(0)], torch.ones(1))
    limits = JobLimits(max_tensor_bytes=1 if node.op == "aten.full_like.default" else 1 << 30)
    assert reason_of(check_memory, spec, memory_limit=1 << 40, limits=limits) == Reason.TENSOR_TOO_LARGE


def test_expand_is_free_but_materialising_it_is_not() -> None:
    nodes = [
        Node(op="aten.expand.default", args=(InputRef(0), (1 << 20, 1 << 20))),
        Node(op="aten.sum.default", args=(NodeRef(0),)),
    ]
    spec, _ = job(nodes, [NodeRef(1)], torch.ones(1 << 20))
    assert check_memory(spec, memory_limit=16 * MIB) == 4 * MIB + 4 + 3 * TENSOR_OVERHEAD_BYTES
    spec, _ = job([nodes[0], Node(op="aten.clone.default", args=(NodeRef(0),))], [NodeRef(1)], torch.ones(1 << 20))
    assert reason_of(check_memory, spec, memory_limit=1 << 50) == Reason.TENSOR_TOO_LARGE


def test_peak_counts_live_storages_once_and_frees_dead_ones() -> None:
    x = torch.ones(256, 256)  # 256 KiB
    nodes = [
        Node(op="aten.view.default", args=(InputRef(0), (-1,))),  # shares x's storage
        Node(op="aten.neg.default", args=(NodeRef(0),)),  # +256 KiB
        Node(op="aten.exp.default", args=(NodeRef(1),)),  # +256 KiB, then node 1 dies
        Node(op="aten.abs.default", args=(NodeRef(2),)),  # +256 KiB, then node 2 dies
    ]
    spec, blobs = job(nodes, [NodeRef(3)], x)
    # at the peak (exp): x, neg's and exp's outputs; x's view died after neg, neg's output dies after exp
    assert check_memory(spec, memory_limit=MIB) == 3 * 256 * 1024 + 3 * TENSOR_OVERHEAD_BYTES
    assert reason_of(check_memory, spec, memory_limit=700 * 1024) == Reason.MEMORY_LIMIT
    (out,) = execute(spec, blobs)
    assert torch.equal(out, x.view(-1).neg().exp().abs())


def test_outputs_over_the_limit() -> None:
    nodes = [Node(op="aten.full.default", args=((1024, 1024), 1.0), kwargs=(("device", Device()),))]
    spec, _ = job(nodes, [NodeRef(0), NodeRef(0)], torch.ones(1))
    assert dry_run(spec).output_bytes == 8 * MIB
    assert reason_of(dry_run, spec, limits=JobLimits(max_output_bytes=6 * MIB)) == Reason.OUTPUT_TOO_LARGE


def test_a_graph_over_the_op_limit_is_refused() -> None:
    x = {"digest": bytes(32), "dtype": "float32", "shape": [1]}
    nodes = [{"op": "aten.relu.default", "args": [{"input": 0}], "kwargs": {}}] * 10_001
    wire = {
        "version": 1,
        "inputs": [x],
        "constants": [],
        "nodes": nodes,
        "outputs": [{"node": 0}],
        "limits": to_wire(JobLimits(max_ops=1_000_000)),
        "compare": {"mode": "exact", "rtol": 0.0, "atol": 0.0},
    }
    assert reason_of(decode_job, codec.pack(wire)) == Reason.TOO_MANY_OPS


# --- typed arguments (issue 9: dtype and layout only by name) ---------------------------------------------------------


def raw_spec(nodes: list[Node], outputs: list[NodeRef], *inputs: torch.Tensor) -> tuple[JobSpec, dict[bytes, bytes]]:
    """A spec as a hostile client builds it: whatever the job format's encoder would refuse."""
    return job(nodes, outputs, *inputs)


def hostile_bytes(spec: JobSpec) -> bytes:
    return codec.pack(_spec_to_wire(spec))


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        # an int where a ScalarType goes: torch takes 9 as complex64, 12 as qint8
        (Node(op="aten._to_copy.default", args=(InputRef(0),), kwargs=(("dtype", 9),)), Reason.BAD_DTYPE),
        (Node(op="aten._to_copy.default", args=(InputRef(0),), kwargs=(("dtype", 12),)), Reason.BAD_DTYPE),
        (Node(op="aten.sum.default", args=(InputRef(0),), kwargs=(("dtype", 5),)), Reason.BAD_DTYPE),
        # an int where a Layout or MemoryFormat goes: torch takes layout 1 as sparse_coo
        (Node(op="aten._to_copy.default", args=(InputRef(0),), kwargs=(("layout", 1),)), Reason.BAD_ARGUMENT),
        (Node(op="aten.clone.default", args=(InputRef(0),), kwargs=(("memory_format", 2),)), Reason.BAD_ARGUMENT),
        # a bool or a float where an int goes (torch would coerce them)
        (Node(op="aten.select.int", args=(InputRef(0), True, 0)), Reason.BAD_ARGUMENT),
        (Node(op="aten.unsqueeze.default", args=(InputRef(0), 0.0)), Reason.BAD_ARGUMENT),
        (Node(op="aten.view.default", args=(InputRef(0), (2.0, 2))), Reason.BAD_ARGUMENT),
        # a number or a tag where a tensor goes, a tensor where a number goes
        (Node(op="aten.add.Tensor", args=(InputRef(0), 1)), Reason.BAD_ARGUMENT),
        (Node(op="aten.mul.Scalar", args=(InputRef(0), InputRef(0))), Reason.BAD_ARGUMENT),
        (Node(op="aten.relu.default", args=(DType("float32"),)), Reason.BAD_ARGUMENT),
        # strings are not job arguments; arities and names follow the schema
        (Node(op="aten.div.Tensor_mode", args=(InputRef(0), InputRef(0))), Reason.BAD_ARGUMENT),
        (Node(op="aten.relu.default", args=()), Reason.BAD_ARGUMENT),
        (Node(op="aten.add.Tensor", args=(InputRef(0),), kwargs=(("other", InputRef(0)), ("self", InputRef(0)))),
         Reason.BAD_ARGUMENT),
    ],
)  # fmt: skip
def test_arguments_are_typed_against_the_ops_schema(node: Node, reason: Reason) -> None:
    x = torch.ones(2, 2)
    spec, blobs = raw_spec([node, Node(op="aten.abs.default", args=(NodeRef(0),))], [NodeRef(1)], x)
    assert reason_of(decode_job, hostile_bytes(spec)) == reason
    assert reason_of(dry_run, spec) == reason  # a spec built in-process is checked by the interpreter too
    assert reason_of(execute, spec, blobs) == reason


def test_the_schema_table_is_the_installed_torchs() -> None:
    for name in ALLOWED_OPS:
        assert str(resolve_op(name)._schema) == "aten::" + OP_SCHEMAS[name].text


def test_numbers_where_torch_export_puts_them_in_tensor_slots_are_exported_as_scalar_overloads() -> None:
    from p2pcompute.compute.export import export_job

    def fn(x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x * 2, x / 4.0, 1 - x, i * 3, i % 3

    x, i = torch.randn(3, 4).to(torch.bfloat16), torch.tensor([-7, 0, 5])
    job_ = export_job(fn, (x, i))
    ops = [node.op for node in job_.spec.nodes]
    assert "aten.mul.Scalar" in ops and "aten.div.Scalar" in ops and "aten.remainder.Scalar" in ops
    outs = execute(decode_job(job_.spec_bytes), job_.blobs)
    for got, want in zip(outs, fn(x, i), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


# --- kernel argument validators (issue 9: out-of-bounds reads, SIGFPE) ------------------------------------------------


def batch_norm(stats: int, channels: int = 8) -> tuple[JobSpec, dict[bytes, bytes]]:
    x = torch.randn(1, channels, 1, 1)
    mean, var = torch.zeros(stats), torch.ones(stats)
    nodes = [
        Node(
            op="aten._native_batch_norm_legit_no_training.default",
            args=(InputRef(0), None, None, InputRef(1), InputRef(2), 0.1, 1e-5),
        )
    ]
    return job(nodes, [NodeRef(0, 0)], x, mean, var)


def test_batch_norm_statistics_must_have_one_value_per_channel() -> None:
    spec, blobs = batch_norm(stats=1)  # the kernel read 7 values past each 1-element view
    assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT
    assert reason_of(execute, spec, blobs) == Reason.BAD_ARGUMENT
    spec, blobs = batch_norm(stats=8)
    (out,) = execute(spec, blobs)
    assert out.shape == (1, 8, 1, 1)


def test_group_norm_parameters_must_be_contiguous_and_fit_the_channels() -> None:
    x = torch.randn(2, 4, 3)
    one = torch.ones(1)

    def group_norm(weight: NodeRef | InputRef, n: int = 2, c: int = 4, hxw: int = 3) -> tuple[JobSpec, dict]:
        nodes = [
            Node(op="aten.expand.default", args=(InputRef(1), (4,))),  # a stride-0 view: the kernel reads 4 values
            Node(op="aten.native_group_norm.default", args=(InputRef(0), weight, None, n, c, hxw, 2, 1e-5)),
        ]
        return job(nodes, [NodeRef(1, 0)], x, one)

    for spec, _ in [group_norm(NodeRef(0)), group_norm(InputRef(1)), group_norm(InputRef(1), hxw=30000000)]:
        assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT
    spec, blobs = group_norm(NodeRef(0))
    assert reason_of(execute, spec, blobs) == Reason.BAD_ARGUMENT


def test_integer_average_pooling_is_refused_before_it_can_divide_int64_min_by_minus_one() -> None:
    x = torch.full((1, 1, 2, 2), -(1 << 63), dtype=torch.int64)
    nodes = [Node(op="aten.avg_pool2d.default", args=(InputRef(0), (1, 1), (1, 1), (0, 0), False, True, -1))]
    spec, blobs = job(nodes, [NodeRef(0)], x)
    assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT  # checked first: the old code died of SIGFPE below
    assert reason_of(execute, spec, blobs) == Reason.BAD_ARGUMENT
    floats = [Node(op="aten.avg_pool2d.default", args=(InputRef(0), (1, 1), (1, 1), (0, 0), False, True, -1))]
    spec, _ = job(floats, [NodeRef(0)], torch.ones(1, 1, 2, 2))
    assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT  # a divisor must be at least 1


@pytest.mark.parametrize("op", ["aten.remainder.Tensor", "aten.fmod.Tensor", "aten.remainder.Scalar"])
def test_integer_division_of_the_minimum_by_minus_one_is_refused_on_the_data(op: str) -> None:
    x = torch.tensor([5, -(1 << 63), 7])
    other: InputRef | int = -1 if op.endswith("Scalar") else InputRef(1)
    spec, blobs = job([Node(op=op, args=(InputRef(0), other))], [NodeRef(0)], x, torch.tensor([2, -1, 3]))
    dry_run(spec)  # the data is not known to the dry run
    assert failure_of(execute, spec, blobs) == f"node 0 {op}: integer division of -9223372036854775808 by -1"


@pytest.mark.parametrize(
    "node",
    [
        Node(op="aten.index_select.default", args=(InputRef(0), 0, InputRef(1))),
        Node(op="aten.embedding.default", args=(InputRef(0), InputRef(1))),
        Node(op="aten.index.Tensor", args=(InputRef(0), (InputRef(1),))),
    ],
)
def test_index_ranges_are_checked_on_the_data(node: Node) -> None:
    table = torch.randn(4, 3)
    for bad in (4, -5, 1 << 40):
        spec, blobs = job([node], [NodeRef(0)], table, torch.tensor([0, bad, 1]))
        dry_run(spec)
        assert "out of range for a size of 4" in failure_of(execute, spec, blobs)
    spec, blobs = job([node], [NodeRef(0)], table, torch.tensor([0, 3, 1]))
    (out,) = execute(spec, blobs)
    assert torch.equal(out, table[[0, 3, 1]])


def test_a_dim_the_meta_kernel_would_take_is_refused_in_the_dry_run() -> None:
    spec, _ = job([Node(op="aten.sort.default", args=(InputRef(0), 5))], [NodeRef(0, 0)], torch.ones(4))
    assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT


@pytest.mark.parametrize(
    "node",
    [
        Node(op="aten.expand.default", args=(InputRef(0), (1 << 62,))),
        Node(op="aten.full.default", args=((2,), 0.0), kwargs=(("pin_memory", True),)),
    ],
)
def test_huge_size_arguments_are_refused_before_the_kernel_computes_them(node: Node) -> None:
    spec, _ = job([node], [NodeRef(0)], torch.ones(1))
    assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT


def test_list_valued_ops_are_bounded_before_they_run() -> None:
    # issue 9: 1.2 million one-byte tensors grew the child by ~751 MiB in a job limited to 16 MiB
    nodes = [
        Node(op="aten.full.default", args=((1_200_000,), 0), kwargs=(("dtype", DType("int8")),)),
        Node(op="aten.split.Tensor", args=(NodeRef(0), 1)),
    ]
    spec, _ = job(nodes, [NodeRef(1, 0)], torch.ones(1))
    with pytest.raises(JobFormatError) as info:
        check_memory(spec, memory_limit=16 * MIB)
    assert info.value.reason == Reason.BAD_ARGUMENT and f"limit {MAX_TUPLE_OUTPUTS}" in info.value.detail
    unbind = [Node(op="aten.unbind.int", args=(InputRef(0),))]
    spec, _ = job(unbind, [NodeRef(0, 0)], torch.ones(MAX_TUPLE_OUTPUTS + 1, 1))
    assert reason_of(dry_run, spec) == Reason.BAD_ARGUMENT


def test_every_live_tensor_costs_its_overhead_in_the_peak() -> None:
    nodes = [
        Node(op="aten.full.default", args=((1000,), 0), kwargs=(("dtype", DType("int8")),)),
        Node(op="aten.split.Tensor", args=(NodeRef(0), 1)),
    ]
    spec, _ = job(nodes, [NodeRef(1, 0)], torch.ones(1))
    run = dry_run(spec)
    assert run.peak_bytes == 4 + 1000 + (1 + 1 + 1000) * TENSOR_OVERHEAD_BYTES
    assert reason_of(check_memory, spec, memory_limit=512 << 10) == Reason.MEMORY_LIMIT


def test_flops_count_the_work_of_reductions_and_products() -> None:
    x = torch.ones(256, 256)
    nodes = [
        Node(op="aten.sum.default", args=(InputRef(0),)),
        Node(op="aten.mm.default", args=(InputRef(0), InputRef(0))),
        Node(op="aten.expand.default", args=(NodeRef(0), (1 << 20, 1 << 10))),
        Node(op="aten.amax.default", args=(NodeRef(2),)),
    ]
    spec, _ = job(nodes, [NodeRef(1), NodeRef(3)], x)
    flops = dry_run(spec).flops
    assert flops >= 256 * 256 + 2 * 256**3 + (1 << 30)


def test_single_element_outputs_with_any_stride_become_blobs() -> None:
    # found by the op fuzzer: a one-element view with stride 2 counts as contiguous, but its bytes need stride 1
    base = torch.arange(6, dtype=torch.float64)
    for view in (base[2:3], base[::4][1:], base[:1].expand(1), base.view(3, 2)[1:2, :1]):
        meta, data = tensor_to_blob(view)
        assert meta.shape == tuple(view.shape) and data == view.contiguous().numpy().tobytes()
    nodes = [Node(op="aten.slice.Tensor", args=(InputRef(0), 0, 1, 3, 2))]
    spec, blobs = job(nodes, [NodeRef(0)], base)
    (out,) = execute(spec, blobs)
    assert torch.equal(out, base[1:2])
